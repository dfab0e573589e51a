//! The agent as a systemd service: the unit passes `systemd-analyze`, and the real agent
//! speaks the notify protocol (READY once its model is loaded, the watchdog fed while it
//! works, even with its broker gone, STOPPING at shutdown).

use lathe_e2e::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn analyze(args: &[&str]) -> (i32, String, String) {
    run(Command::new("systemd-analyze").args(args))
}

/// The unit as shipped, with `ExecStart` pointing at the binary just built (verify checks
/// that it exists).
fn unit_here(dir: &std::path::Path) -> String {
    let unit = std::fs::read_to_string(repo_root().join("systemd/lathe.service")).expect("unit file");
    assert!(unit.contains("ExecStart=/usr/bin/lathe run "), "{unit}");
    let path = dir.join("lathe.service");
    let bin = bins().0.to_str().expect("utf8").to_string();
    std::fs::write(&path, unit.replace("/usr/bin/lathe", &bin)).expect("write unit");
    path.to_str().expect("utf8").to_string()
}

#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_here(dir.path());
    let (code, out, err) = analyze(&["verify", &unit]);
    assert_eq!((code, err.trim()), (0, ""), "systemd-analyze verify: {out}{err}");

    // --threshold fails the command above the given exposure (in tenths).
    let (code, out, err) = analyze(&["security", "--offline=yes", "--threshold=20", &unit]);
    let exposure: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for lathe.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {out}{err}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {out}");
    assert_eq!(code, 0, "{out}{err}");
}

/// Everything the agent told systemd so far.
fn received(socket: &UnixDatagram, into: &mut Vec<(Instant, String)>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        into.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
    }
}

fn wait_for(socket: &UnixDatagram, got: &mut Vec<(Instant, String)>, what: &str, timeout: Duration) -> Instant {
    eventually(timeout, || {
        received(socket, got);
        got.iter().find(|(_, m)| m.contains(what)).map(|(t, _)| *t)
    })
    .unwrap_or_else(|| panic!("no {what} from the agent in {timeout:?}: {got:?}"))
}

/// Wait until the watchdog was fed `n` times since `since`.
fn fed_times(socket: &UnixDatagram, got: &mut Vec<(Instant, String)>, since: Instant, n: usize) {
    let fed = eventually(Duration::from_secs(30), || {
        received(socket, got);
        let fed = got.iter().filter(|(t, m)| *t >= since && m == "WATCHDOG=1").count();
        (fed >= n).then_some(fed)
    });
    assert!(fed.is_some(), "fed fewer than {n} times: {got:?}");
}

#[test]
fn the_agent_is_ready_once_its_model_loads_and_feeds_the_watchdog_while_it_works() {
    let mut s = Fleet::new();
    let d = s.device("svc-1", s.hub_broker.port, &[]);
    let _hub = s.hub();
    {
        let mut agent = s.agent(&d);
        wait_online(s.hub_broker.port, "svc-1");
        let (code, out) = s.deploy(&d, &s.bundle);
        assert_eq!(code, 0, "{out}");
        assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_nonblocking(true).expect("nonblocking");
    let log = dir.path().join("agent.log");
    let mut agent = Proc::spawn(
        "lathe run (svc-1, under a notify socket)",
        Command::new(&bins().0)
            .args(["run", "--config"])
            .arg(&d.config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .env("LATHE_LOG", "info,rumqttc=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file")),
    );
    let mut got = vec![];
    wait_for(&socket, &mut got, "READY=1", Duration::from_secs(20));
    // The log line is written before READY is sent.
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("model active") && text.contains("bearing"), "{text}");

    // Fed again and again (every half second: WATCHDOG_USEC is one second).
    let first = wait_for(&socket, &mut got, "WATCHDOG=1", Duration::from_secs(5));
    fed_times(&socket, &mut got, first, 4);

    // A broker that is gone is not a hung agent: the links keep trying, and keep beating.
    s.hub_broker.kill();
    s.sensor_broker.kill();
    let cut = Instant::now();
    fed_times(&socket, &mut got, cut, 6);
    assert!(!got.iter().any(|(_, m)| m.contains("not fed")), "{got:?}");

    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    received(&socket, &mut got);
    assert!(got.iter().any(|(_, m)| m == "STOPPING=1"), "{got:?}");
}
