//! `sundial local` end to end: one command starts a coordinator and N worker processes, prints
//! where the API is once the cluster has formed, and on SIGTERM stops every process it started,
//! computation children included, leaving no orphans in the process table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

#[test]
fn local_starts_a_cluster_and_stops_without_orphans() {
    let env = Env::new();
    let data = env.path("data");
    let http = format!("127.0.0.1:{}", free_port());
    let mut local = Command::new(bin())
        .args(["local", "--workers", "2", "--threads", "2", "--data-dir", data.to_str().unwrap(), "--http", &http])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(local.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("sundial is running: 2 workers × 2 threads"), "{first}");

    let status = cluster(&http);
    assert_eq!(status["state"], "running");
    assert_all_to_all(&http, 4);

    // Every process of the cluster: those started with the data dir in their arguments
    // (coordinator, workers) and the computation children the workers report.
    let mut pids = pids_with_arg(data.to_str().unwrap());
    assert!(pids.len() >= 3, "coordinator and two workers: {pids:?}");
    for i in 0..2 {
        pids.push(field(&status, i, "computation_pid"));
    }
    assert!(pids.iter().all(|&p| alive(p)));

    Command::new("kill").arg("-TERM").arg(local.id().to_string()).status().unwrap();
    let exit = wait_for(Duration::from_secs(20), "sundial local to exit", || local.try_wait().unwrap());
    assert!(exit.success(), "{exit}");
    let rest: Vec<String> = stdout.lines().map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l == "sundial stopped"), "{rest:?}");
    for pid in pids {
        wait_for(Duration::from_secs(5), &format!("process {pid} to end"), || (!alive(pid)).then_some(()));
    }
}
