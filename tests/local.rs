//! `sundial local` end to end: one command starts a coordinator and N worker processes, prints
//! where the API is once the cluster has formed, and on SIGTERM stops every process it started,
//! computation children included, leaving no orphans in the process table. The coordinator
//! stops first and takes a last checkpoint: started again, the cluster has everything back
//! without replaying a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

/// `sundial local` with two workers of two threads, its data in `data`, its API on `http`.
fn start_local(data: &std::path::Path, http: &str, stdout: Stdio) -> Local {
    Local(
        Command::new(bin())
            .args(["local", "--workers", "2", "--threads", "2", "--data-dir", data.to_str().unwrap(), "--http", http])
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A running `sundial local`, stopped as a user would (SIGTERM: it stops what it started) if a
/// failing assertion leaves it running, so that a failed run leaves no cluster behind.
struct Local(std::process::Child);

impl std::ops::Deref for Local {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Local {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
            if wait_child(&mut self.0, Duration::from_secs(20)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// Each thread of process `pid`: its name, id and scheduling policy (`/proc`). A thread that
/// ends while it is read (a merge thread leaving after its idle time) is left out.
fn thread_policies(pid: u64) -> Vec<(String, u64, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let read = |dir: std::path::PathBuf| -> Option<(String, u64, u32)> {
        let tid: u64 = dir.file_name()?.to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(dir.join("comm")).ok()?.trim().to_string();
        // The policy is field 41.
        let policy = stat_fields(dir.join("stat"))?.get(41 - 3)?.parse().ok()?;
        Some((name, tid, policy))
    };
    tasks.filter_map(|entry| read(entry.ok()?.path())).collect()
}

#[test]
fn local_starts_a_cluster_and_stops_without_orphans() {
    let env = Env::new();
    let data = env.path("data");
    let http = format!("127.0.0.1:{}", free_port());
    let mut local = start_local(&data, &http, Stdio::piped());
    let mut stdout = BufReader::new(local.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("sundial is running: 2 workers × 2 threads"), "{first}");

    let status = cluster(&http);
    assert_eq!(status["state"], "running");
    assert_all_to_all(&http, 4);

    // Some state: the example source and definition, and events through the workers.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let server = format!("http://{http}");
    let sundial = |args: &[&str]| {
        let out = Command::new(bin()).arg("--server").arg(&server).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sundial(&["source", "create", examples.join("transactions.json").to_str().unwrap()]);
    sundial(&["submit", examples.join("user_spend.yaml").to_str().unwrap()]);
    let ingested = sundial(&["ingest", "transactions", examples.join("events.csv").to_str().unwrap()]);
    let epoch = ingested.split("visible at epoch ").nth(1).unwrap().split(' ').next().unwrap().to_string();
    let (_, before) = get(&http, &format!("/v1/dataflows/user_spend/keys/42?as_of={epoch}")).unwrap();
    assert!(!before["features"].as_object().unwrap().is_empty(), "{before}");

    // Every process of the cluster: those started with the data dir in their arguments
    // (coordinator, workers) and the computation children the workers report.
    let mut pids = pids_with_arg(data.to_str().unwrap());
    assert!(pids.len() >= 3, "coordinator and two workers: {pids:?}");
    for i in 0..2 {
        let child = field(&status, i, "computation_pid");
        // The allocator settings a worker gives its computation unless the environment does.
        let environ = std::fs::read(format!("/proc/{child}/environ")).unwrap();
        let vars: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        for (name, value) in [("MIMALLOC_ALLOW_THP", "0"), ("MIMALLOC_PURGE_DELAY", "1000")] {
            if std::env::var_os(name).is_none() {
                assert!(vars.contains(&format!("{name}={value}")), "{name} of computation {child}: {vars:?}");
            }
        }
        // Ingest runs below the threads that answer reads (`sundial_dataflows::priority`).
        if std::env::var_os("SUNDIAL_BACKGROUND_PRIORITY").is_none() {
            let threads = thread_policies(child);
            let idle = |name: &str| {
                ["timely:work-", "timely:send-", "timely:recv-", "sundial:parse-", "sundial:merge"]
                    .iter()
                    .any(|p| name.starts_with(p))
            };
            // Two worker threads and their parsers; a send and a receive thread for the peer.
            let named = |prefix: &str| threads.iter().filter(|(name, _, _)| name.starts_with(prefix)).count();
            let counts = ["timely:work-", "sundial:parse-", "timely:send-", "timely:recv-"].map(named);
            assert_eq!(counts, [2, 2, 1, 1], "{threads:?}");
            // The ingest threads run idle; the main thread (which answers reads) does not.
            for (name, tid, policy) in &threads {
                let expected = match (idle(name), *tid == child) {
                    (true, _) => SCHED_IDLE,
                    (false, true) => SCHED_OTHER,
                    (false, false) => continue,
                };
                assert_eq!(*policy, expected, "policy of thread {name} ({tid}) of computation {child}: {threads:?}");
            }
        }
        pids.push(child);
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
    let logs = data.join("logs");
    let coordinator_log = std::fs::read_to_string(logs.join("coordinator.log")).unwrap();
    assert!(coordinator_log.contains("checkpoint on shutdown committed"), "{coordinator_log}");

    // Started again: the state is back from the checkpoint, with nothing to replay.
    let mut local = start_local(&data, &http, Stdio::null());
    wait_state(&http, "running", Duration::from_secs(60));
    let (_, after) = get(&http, "/v1/dataflows/user_spend/keys/42").unwrap();
    assert_eq!(after["features"], before["features"]);
    for i in 0..2 {
        let log = std::fs::read_to_string(logs.join(format!("worker-{i}.log"))).unwrap();
        let second_run = log.rsplit("restoring the checkpoint").next().unwrap();
        assert!(log.contains("restoring the checkpoint"), "{log}");
        assert!(!second_run.contains("replayed the ingest log"), "nothing left to replay: {log}");
    }
    Command::new("kill").arg("-TERM").arg(local.id().to_string()).status().unwrap();
    wait_for(Duration::from_secs(30), "sundial local to exit", || local.try_wait().unwrap());
}
