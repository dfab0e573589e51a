#!/usr/bin/env python3
"""Lathe's footprint against its budgets, measured on the real binary:

- the stripped static `lathe` of each architecture is at most 10 MB (10,000,000 bytes);
- idle, with a tabular model active, connected, after 2,000 readings, its RSS is at most
  12 MB (12,000,000 bytes);
- from exec to READY=1 (the sd_notify message that says every model is loaded and the store
  is open), with a model installed, it takes at most 100 ms.

    bench/footprint.py --lathe X86_LATHE --hub LATHE_HUB [--size OTHER_LATHE ...]

`--lathe` is run (it must run here); `--size` binaries are only weighed. It starts its own
Mosquitto on a free port and a hub that syncs, so the agent is connected and its outbox drains.
Needs python3 (stdlib), mosquitto and mosquitto_pub. Exits 1 when a budget is exceeded.
bench/footprint.sh builds the release binaries and runs it.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_BUDGET = 10_000_000
RSS_BUDGET = 12_000_000
START_BUDGET_MS = 100.0
READINGS = 2000
STARTS = 7


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rss(pid):
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def mb(n):
    return f"{n / 1e6:.2f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lathe", required=True, help="the lathe binary to run and weigh")
    ap.add_argument("--hub", required=True, help="a lathe-hub binary (any build)")
    ap.add_argument("--size", action="append", default=[], help="another lathe binary to weigh")
    args = ap.parse_args()
    lathe, hub = os.path.abspath(args.lathe), os.path.abspath(args.hub)
    failed = []
    results = []

    for path in [lathe] + args.size:
        size = os.path.getsize(path)
        kind = run(["file", "-b", path]).strip() if shutil.which("file") else ""
        ok = size <= SIZE_BUDGET
        results.append((f"binary {path}", mb(size), "≤ 10 MB", ok))
        if kind:
            results.append(("  file", kind.split(",")[0] + ", " + ", ".join(p.strip() for p in kind.split(",")[1:4]), "", True))
        if not ok:
            failed.append(f"size of {path}")

    cases = json.load(open(os.path.join(ROOT, "fixtures/models/vibration_logreg.cases.json")))
    features = cases["features"]
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        conf = os.path.join(d, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n")
            if os.geteuid() == 0:
                f.write("user root\n")
        broker = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [broker]
        try:
            wait_port(port)
            run([hub, "keygen", "--out-dir", d, "--name", "k1"])
            os.replace(os.path.join(d, "k1.pub"), os.path.join(d, "trust.keys"))
            bundle = os.path.join(d, "bearing.lbundle")
            run([hub, "bundle", "pack", "--model", os.path.join(ROOT, "fixtures/models/vibration_logreg.onnx"),
                 "--name", "bearing", "--version", "1", "--features", ",".join(features),
                 "--key", os.path.join(d, "k1.key"), "--out", bundle])
            hub_proc = subprocess.Popen([hub, "serve", "--broker", f"127.0.0.1:{port}", "--db", os.path.join(d, "hub.db")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(hub_proc)
            config = os.path.join(d, "lathe.toml")
            with open(config, "w") as f:
                f.write(f"""[device]
fleet = "plant1"
id = "fp-1"
state_dir = "{d}/state"
[broker]
host = "127.0.0.1"
port = {port}
[inputs]
topics = ["sensors/fp-1/features"]
qos = 1
[trust]
keys_file = "{d}/trust.keys"
[rollout.watch]
secs = 0
""")
            env = dict(os.environ, LATHE_LOG="warn")
            env.pop("NOTIFY_SOCKET", None)
            env.pop("WATCHDOG_USEC", None)
            agent = subprocess.Popen([lathe, "run", "--config", config], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run([hub, "deploy", "--broker", f"127.0.0.1:{port}", "--fleet", "plant1", "--device", "fp-1",
                 "--key", os.path.join(d, "k1.key"), "--bundle", bundle, "--timeout-secs", "60"])
            stop(agent)

            # Start-up to READY with the model installed: the agent loads and re-verifies it.
            notify = os.path.join(d, "notify")
            starts = []
            for i in range(STARTS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(notify)
                sock.settimeout(10)
                t0 = time.monotonic()
                agent = subprocess.Popen([lathe, "run", "--config", config], env=dict(env, NOTIFY_SOCKET=notify),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while True:
                    msg = sock.recv(4096).decode()
                    if "READY=1" in msg.split("\n"):
                        break
                starts.append((time.monotonic() - t0) * 1000)
                sock.close()
                os.unlink(notify)
                if i < STARTS - 1:
                    stop(agent)
            median = statistics.median(starts)
            ok = median <= START_BUDGET_MS
            results.append((f"start-up to READY, median of {STARTS}", f"{median:.1f} ms (max {max(starts):.1f})", "≤ 100 ms", ok))
            if not ok:
                failed.append("start-up")

            # 2,000 readings at QoS 1, then idle.
            procs.append(agent)
            lines = []
            for i in range(READINGS):
                row = cases["rows"][i % len(cases["rows"])]
                reading = {f: v for f, v in zip(features, row)}
                reading["id"] = i
                lines.append(json.dumps(reading))
            subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", "sensors/fp-1/features", "-l"],
                           input="\n".join(lines) + "\n", text=True, check=True)
            deadline = time.monotonic() + 60
            done = 0
            while time.monotonic() < deadline:
                st = json.loads(subprocess.run([lathe, "status", "--json", "--config", config],
                                               capture_output=True, text=True).stdout)
                done = (st.get("activity") or {}).get("predictions", 0)
                if done >= READINGS and st.get("outbox_depth", 1) == 0:
                    break
                time.sleep(0.5)
            if done < READINGS:
                raise SystemExit(f"only {done} of {READINGS} predictions in 60 s")
            time.sleep(10)
            mem = rss(agent.pid)
            ok = mem["VmRSS"] <= RSS_BUDGET
            results.append((f"idle RSS after {READINGS} readings, connected", mb(mem["VmRSS"]), "≤ 12 MB", ok))
            results.append(("  of which anonymous / file-backed", f"{mb(mem['RssAnon'])} / {mb(mem['RssFile'])}", "", True))
            results.append(("  peak (VmHWM)", mb(mem["VmHWM"]), "", True))
            if not ok:
                failed.append("idle RSS")
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    stop(p)

    width = max(len(r[0]) for r in results)
    for what, got, budget, ok in results:
        mark = "" if not budget else ("ok" if ok else "OVER")
        print(f"{what:<{width}}  {got:<28} {budget:<10} {mark}")
    if failed:
        print(f"over budget: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
