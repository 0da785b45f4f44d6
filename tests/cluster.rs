//! End-to-end tests of cluster formation and membership: the real `sundial` binary as separate
//! coordinator and worker processes over loopback. They prove that N processes form one timely
//! computation (every worker thread exchanges records with every other), that a worker killed
//! with SIGKILL is detected within the heartbeat timeout and rejoins at its old index in a new
//! generation, that the survivors do not linger in a dead computation, and that the computation
//! survives the coordinator's absence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::time::{Duration, Instant};

use util::*;

const FORM: Duration = Duration::from_secs(60);

#[test]
fn one_two_and_three_workers_form_one_computation() {
    for n in 1..=3usize {
        let env = Env::new();
        let _coordinator = env.coordinator(n, "127.0.0.1:0", "127.0.0.1:0");
        let (control, http) = env.coordinator_addresses();
        let _workers: Vec<Proc> = (0..n).map(|i| env.worker(&format!("w{i}"), &control, 2)).collect();
        let status = wait_state(&http, "running", FORM);
        assert_eq!(status["generation"], 1);
        assert_eq!(status["expected_workers"], n);
        assert_eq!(status["registered_workers"], n);
        assert_eq!(status["threads_per_worker"], 2);
        let workers = status["workers"].as_array().unwrap();
        for (i, w) in workers.iter().enumerate() {
            assert_eq!(w["index"], i);
            assert_eq!(w["state"], "running");
            assert!(w["id"].as_str().unwrap().starts_with("w-"));
            assert!(w["data_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
            assert!(w["last_heartbeat_ms_ago"].as_u64().unwrap() < 5_000);
            assert!(w["last_heartbeat_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        }
        let check = assert_all_to_all(&http, n * 2);
        assert_eq!(check["processes"], n);
        assert_eq!(check["threads"], 2);
    }
}

#[test]
fn killed_worker_is_detected_and_rejoins_at_its_index() {
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: [_w0, mut w1], control, http, status: before } = env.running_pair(2);
    let ids_before = ids(&before);
    let victim = before["workers"].as_array().unwrap().iter().position(|w| w["pid"] == w1.pid()).unwrap();
    let survivor = 1 - victim;
    let survivor_computation = field(&before, survivor, "computation_pid");

    let killed_at = Instant::now();
    w1.kill9();
    let degraded = wait_state(&http, "degraded", Duration::from_secs(5));
    let detected = killed_at.elapsed();
    assert!(detected < Duration::from_secs(2), "detection took {detected:?}");
    assert_eq!(degraded["workers"][victim]["state"], "lost");
    assert!(degraded["reason"].as_str().unwrap().contains(&format!("worker {victim} lost")), "{degraded}");

    // Reads of the computation answer 503 with the reason instead of hanging.
    let (code, body) = get(&http, "/v1/cluster/check").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("lost"), "{body}");

    // The survivor's computation of the dead generation ends; its supervisor stays.
    wait_for(Duration::from_secs(5), "the survivor's old computation to end", || {
        (!alive(survivor_computation)).then_some(())
    });
    assert!(alive(field(&degraded, survivor, "pid")));

    let _w1 = env.worker("w1", &control, 2);
    let after = wait_state(&http, "running", FORM);
    assert_eq!(after["generation"], 2);
    assert_eq!(ids(&after), ids_before, "indices are kept across the restart");
    assert_all_to_all(&http, 4);
}

#[test]
fn crashed_computation_makes_the_next_generation() {
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: _workers, http, status: before, .. } = env.running_pair(1);
    let computation = field(&before, 1, "computation_pid");
    std::process::Command::new("kill").arg("-9").arg(computation.to_string()).status().unwrap();
    let after = wait_for(FORM, "generation 2 running", || {
        let (_, v) = get(&http, "/v1/cluster")?;
        (v["state"] == "running" && v["generation"] == 2).then_some(v)
    });
    assert_eq!(ids(&after), ids(&before));
    assert_ne!(field(&after, 1, "computation_pid"), computation);
    assert_all_to_all(&http, 2);
}

#[test]
fn a_worker_whose_data_port_was_taken_moves_to_another() {
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: _workers, http, status: before, .. } = env.running_pair(1);
    let worker = &before["workers"][1];
    let taken = worker["data_addr"].as_str().unwrap().to_string();
    // Between two generations the port is free, and any socket may take it (here: this test,
    // while the worker is stopped, so that its next computation cannot take the port first).
    let signal = |sig: &str, pid: u64| {
        assert!(std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap().success())
    };
    signal("-STOP", field(&before, 1, "pid"));
    signal("-9", field(&before, 1, "computation_pid"));
    let holder = wait_for(FORM, "the freed data port", || std::net::TcpListener::bind(&taken).ok());
    signal("-CONT", field(&before, 1, "pid"));
    let after = wait_for(FORM, "a generation running on another port", || {
        let (_, v) = get(&http, "/v1/cluster")?;
        (v["state"] == "running" && v["workers"][1]["data_addr"].as_str() != Some(taken.as_str())).then_some(v)
    });
    assert_eq!(ids(&after), ids(&before), "the same workers, at the same indexes");
    assert_all_to_all(&http, 2);
    drop(holder);
}

#[test]
fn workers_wait_for_the_coordinator_and_survive_its_restart() {
    let env = Env::new();
    let control = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let w0 = env.worker("w0", &control, 1);
    let _w1 = env.worker("w1", &control, 1);
    wait_log(&w0.log, "coordinator not reachable", Duration::from_secs(10));
    assert!(w0.log_text().contains("Connection refused"), "{}", w0.log_text());

    let mut coordinator = env.coordinator(2, &control, &http);
    let before = wait_state(&http, "running", FORM);
    assert_eq!(before["generation"], 1);
    let computations = [field(&before, 0, "computation_pid"), field(&before, 1, "computation_pid")];

    coordinator.kill9();
    let _coordinator = env.coordinator(2, &control, &http);
    let after = wait_state(&http, "running", FORM);
    assert_eq!(after["generation"], 1, "the running generation is adopted, not re-formed: {after}");
    assert_eq!(ids(&after), ids(&before));
    for (i, pid) in computations.iter().enumerate() {
        assert!(alive(*pid), "computation {i} kept running");
    }
    assert_all_to_all(&http, 2);
}
