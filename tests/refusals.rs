//! End-to-end tests of bad input at the edges of the cluster: raw bytes, malformed and
//! wrong-version handshakes on the control port, workers the cluster has no room for or that
//! share an identity, busy ports and unreachable coordinators. Each is refused with an error
//! that names the cause, nothing panics, and the coordinator keeps serving its workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use util::*;

fn register(version: u32, id: &str) -> serde_json::Value {
    json!({"type": "register", "magic": "sundial", "protocol_version": version, "worker_id": id,
           "host": "test", "data_addr": "127.0.0.1:9", "threads": 1, "pid": 1, "running": null})
}

fn refusal(answer: Option<serde_json::Value>) -> String {
    let answer = answer.expect("the coordinator answers before closing");
    assert_eq!(answer["type"], "refused", "{answer}");
    answer["reason"].as_str().unwrap().to_string()
}

#[test]
fn bad_handshakes_are_refused_and_the_cluster_keeps_running() {
    let env = Env::new();
    let Pair { coordinator, workers: [w0, _w1], control, http, .. } = env.running_pair(1);

    let reason = refusal(raw_control_exchange(&control, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(reason.contains("over the limit"), "{reason}");

    let reason = refusal(raw_control_exchange(&control, &[0, 0, 0, 5, b'{', b'b', b'a', b'd', b'}']));
    assert!(reason.contains("not a sundial message"), "{reason}");

    let reason = refusal(raw_control_exchange(&control, &frame(&register(99, "w-x"))));
    assert!(reason.contains("protocol version 99 is not supported"), "{reason}");

    let reason = refusal(raw_control_exchange(
        &control,
        &frame(&json!({"type": "heartbeat", "magic": "sundial", "protocol_version": 1})),
    ));
    assert!(reason.contains("must be a registration"), "{reason}");

    let reason =
        refusal(raw_control_exchange(&control, &frame(&register(sundial_protocol::PROTOCOL_VERSION, "w-fresh"))));
    assert!(reason.contains("already has all of its 2 workers"), "{reason}");

    // A client that connects and says nothing is dropped after the handshake timeout.
    let mut silent = TcpStream::connect(&control).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let reason = refusal(read_frame(&mut silent));
    assert!(reason.contains("no registration within"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(silent.read(&mut [0u8; 1]).unwrap_or(0), 0, "closed after the refusal");

    // A worker that shares another's identity (a copied data dir) is refused and exits.
    std::fs::create_dir_all(env.path("copy")).unwrap();
    std::fs::copy(env.path("w0").join("worker-id"), env.path("copy").join("worker-id")).unwrap();
    let mut copy = env.worker("copy", &control, 1);
    let status = copy.wait_exit(Duration::from_secs(20)).expect("the refused worker exits");
    assert!(!status.success());
    assert!(copy.log_text().contains("refused by the coordinator: worker id"), "{}", copy.log_text());
    assert!(copy.log_text().contains("already connected as process"), "{}", copy.log_text());

    // A third worker has no room in a cluster of two.
    let mut extra = env.worker("extra", &control, 1);
    assert!(!extra.wait_exit(Duration::from_secs(20)).expect("the refused worker exits").success());
    assert!(extra.log_text().contains("already has all of its 2 workers connected"), "{}", extra.log_text());

    // Nothing of this disturbed the cluster.
    let status = cluster(&http);
    assert_eq!(status["state"], "running");
    assert_eq!(status["generation"], 1);
    assert_all_to_all(&http, 2);
    assert!(!coordinator.log_text().contains("panicked"));
    assert!(!w0.log_text().contains("panicked"));
    assert!(coordinator.log_text().contains("refused a control connection"));
}

#[test]
fn a_worker_with_other_threads_is_refused() {
    let env = Env::new();
    let _coordinator = env.coordinator(2, "127.0.0.1:0", "127.0.0.1:0");
    let (control, _http) = env.coordinator_addresses();
    let _w0 = env.worker("w0", &control, 2);
    wait_log(&env.path("w0.log"), "registered with the coordinator", Duration::from_secs(20));
    let mut odd = env.worker("odd", &control, 3);
    assert!(!odd.wait_exit(Duration::from_secs(20)).expect("exits").success());
    assert!(odd.log_text().contains("same --threads"), "{}", odd.log_text());
}

#[test]
fn busy_ports_and_unreachable_coordinators_name_the_cause() {
    let env = Env::new();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();

    let mut c = env.coordinator(1, "127.0.0.1:0", &busy_addr);
    assert!(!c.wait_exit(Duration::from_secs(20)).expect("exits").success());
    let log = c.log_text();
    assert!(log.contains(&format!("cannot bind HTTP address {busy_addr}")) && log.contains("in use"), "{log}");

    let data = env.path("w-busy");
    let mut w = env.spawn(
        "w-busy",
        &["worker", "--coordinator", "127.0.0.1:9", "--listen", &busy_addr, "--data-dir", data.to_str().unwrap()],
    );
    assert!(!w.wait_exit(Duration::from_secs(20)).expect("exits").success());
    assert!(w.log_text().contains(&format!("cannot listen on data address {busy_addr}")), "{}", w.log_text());

    // An unreachable coordinator is waited for, with the cause in the log.
    let nobody = format!("127.0.0.1:{}", free_port());
    let w = env.worker("w-wait", &nobody, 1);
    wait_log(&w.log, "coordinator not reachable", Duration::from_secs(10));
    assert!(w.log_text().contains("Connection refused"), "{}", w.log_text());

    let w = env.worker("w-dns", "no-such-host.invalid:7701", 1);
    wait_log(&w.log, "cannot resolve no-such-host.invalid:7701", Duration::from_secs(30));

    // Client commands fail with the cause and a non-zero code.
    let out =
        std::process::Command::new(bin()).args(["--server", &format!("http://{nobody}"), "status"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: cannot reach the coordinator"), "{stderr}");

    // Flags out of range.
    let mut c =
        env.spawn("c-zero", &["coordinator", "--workers", "0", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    assert!(!c.wait_exit(Duration::from_secs(20)).expect("exits").success());
    assert!(c.log_text().contains("--workers must be between 1 and 1024"), "{}", c.log_text());
    let out = std::process::Command::new(bin()).args(["coordinator", "--heartbeat-timeout", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a duration"));
}

#[test]
fn unknown_endpoints_answer_json_404() {
    let env = Env::new();
    let _coordinator = env.coordinator(1, "127.0.0.1:0", "127.0.0.1:0");
    let (_, http) = env.coordinator_addresses();
    let (code, body) = wait_for(Duration::from_secs(20), "coordinator", || get(&http, "/v1/nothing"));
    assert_eq!(code, 404);
    assert_eq!(body["error"], "no such endpoint: GET /v1/nothing");
    let (code, body) = get(&http, "/v1/cluster/check?records_per_pair=0").unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = get(&http, "/v1/cluster/check?records_per_pair=abc").unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = get(&http, "/v1/cluster/check").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("waiting for 1 of 1 workers"), "{body}");
}
