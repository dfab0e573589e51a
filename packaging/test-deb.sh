#!/usr/bin/env bash
# Install a lathe .deb in a clean Debian (bookworm, minbase, made by debootstrap) and check
# what it installed; then start the agent there as its unit would (the user lathe), deploy a
# model to it from the host, and require `lathe doctor` to pass.
#   packaging/test-deb.sh target/artefacts/lathe_0.1.0-1_amd64.deb
# Needs root, debootstrap (installed if missing), the Debian mirror, mosquitto, and a
# lathe-hub binary on the host (HUB=…, default target/debug/lathe-hub, built if missing). The
# chroot shares the host's network, so the agent in it reaches a broker started here.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "$1")
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
command -v debootstrap >/dev/null 2>&1 || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq debootstrap >/dev/null; }
hub="${HUB:-target/debug/lathe-hub}"
[ -x "$hub" ] || cargo build -q --locked -p lathe-hub
hub=$(realpath "$hub")

work=$(mktemp -d /var/tmp/lathe-deb.XXXXXX)
root="$work/debian"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # Anything still running inside the chroot (the agent, a doctor) goes too: nothing of the
    # test outlives it.
    for proc in /proc/[0-9]*; do
        [ "$($SUDO readlink "$proc/root" 2>/dev/null)" = "$root" ] && $SUDO kill "${proc#/proc/}" 2>/dev/null
    done
    wait 2>/dev/null || true
    $SUDO rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "test-deb: $*" >&2; exit 1; }

echo "test-deb: a clean Debian bookworm in $root"
$SUDO debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; fail "debootstrap failed"; }
in_root() { $SUDO chroot "$root" "$@"; }

echo "test-deb: installing $(basename "$deb")"
cp "$deb" "$root/tmp/lathe.deb"
in_root apt-get install -y -qq /tmp/lathe.deb >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "the package did not install"; }

# What the package installed, and how.
in_root getent passwd lathe >/dev/null || fail "no user lathe"
[ "$(in_root stat -c '%U:%G %a' /etc/lathe/lathe.toml)" = "root:lathe 640" ] || fail "/etc/lathe/lathe.toml: $(in_root stat -c '%U:%G %a' /etc/lathe/lathe.toml)"
[ "$(in_root stat -c '%U:%G %a' /var/lib/lathe)" = "lathe:lathe 700" ] || fail "/var/lib/lathe: $(in_root stat -c '%U:%G %a' /var/lib/lathe)"
in_root test -x /usr/bin/lathe || fail "no /usr/bin/lathe"
in_root test -f /usr/lib/systemd/system/lathe.service || fail "no lathe.service"
in_root test -f /usr/share/doc/lathe/README.md || fail "no README"
in_root dpkg-query -W -f='${Conffiles}\n' lathe | grep -q /etc/lathe/lathe.toml || fail "lathe.toml is not a conffile"
in_root /usr/bin/lathe --version

# A broker, keys and a bundle on the host; the packaged config pointed at them.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$work/mosquitto.conf"
[ "$(id -u)" = 0 ] && echo "user root" >>"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
pids+=($!)
"$hub" keygen --out-dir "$work" --name k1 >/dev/null
$SUDO cp "$work/k1.pub" "$root/etc/lathe/trust.keys"
$SUDO sed -i "s/^port = 1883/port = $port/" "$root/etc/lathe/lathe.toml"
# No watch period: the deploy below is answered once the model is active.
printf '\n[rollout.watch]\nsecs = 0\n' | $SUDO tee -a "$root/etc/lathe/lathe.toml" >/dev/null
features=$(python3 -c 'import json; print(",".join(json.load(open("fixtures/models/vibration_logreg.cases.json"))["features"]))')
rows=$(python3 -c '
import json
c = json.load(open("fixtures/models/vibration_logreg.cases.json"))
print(",".join(c["features"]))
for r in c["rows"][:8]:
    print(",".join(str(x) for x in r))')
echo "$rows" >"$work/selftest.csv"
"$hub" bundle pack --model fixtures/models/vibration_logreg.onnx --name bearing --version 1 \
    --features "$features" --selftest "$work/selftest.csv" --key "$work/k1.key" --out "$work/bearing.lbundle" >/dev/null

# The agent as its unit runs it: as the user lathe, with the packaged config.
as_lathe() { in_root setpriv --reuid=lathe --regid=lathe --init-groups "$@"; }
# Started directly, not through the function: $! is then the process that becomes the agent.
$SUDO chroot "$root" setpriv --reuid=lathe --regid=lathe --init-groups \
    /usr/bin/lathe run --config /etc/lathe/lathe.toml >"$work/agent.log" 2>&1 &
pids+=($!)
"$hub" deploy --broker "127.0.0.1:$port" --fleet plant1 --device gateway-1 --key "$work/k1.key" \
    --bundle "$work/bearing.lbundle" --timeout-secs 60 || { cat "$work/agent.log"; fail "the deploy failed"; }

set +e
as_lathe /usr/bin/lathe doctor --json >"$work/doctor.json"
code=$?
set -e
as_lathe /usr/bin/lathe doctor || true
python3 - "$work/doctor.json" "$code" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
code = int(sys.argv[2])
outcomes = {c["check"]: c["outcome"] for c in r["checks"]}
want = {"config": "ok", "secrets": "ok", "state_dir": "ok", "disk": "ok", "trust": "ok",
        "broker": "ok", "certificates": "skipped", "model": "ok", "clock": "ok"}
bad = {k: (outcomes.get(k), v) for k, v in want.items() if outcomes.get(k) != v}
if code != 0 or not r["ok"] or bad:
    sys.exit(f"test-deb: lathe doctor exit {code}; (got, wanted): {bad}")
EOF
echo "test-deb: $(basename "$deb") installs, runs as lathe, and lathe doctor passes"
