//! Harness for end-to-end tests: runs the real `sundial` binary as separate processes on
//! loopback with ephemeral ports in a temporary folder, and kills them when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sundial"))
}

/// Heartbeat flags that make membership changes quick to observe.
pub const FAST_HEARTBEATS: [&str; 4] = ["--heartbeat-interval", "200ms", "--heartbeat-timeout", "1s"];

/// A child process that is killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, through the OS.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A temporary folder for one test's processes.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A fresh folder; kept after the test when `SUNDIAL_TEST_KEEP` is set (its path is printed).
    pub fn new() -> Self {
        let keep = std::env::var_os("SUNDIAL_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new().prefix("sundial-test-").disable_cleanup(keep).tempdir().unwrap();
        if keep {
            eprintln!("test folder (kept): {}", dir.path().display());
        }
        Env { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a process of the binary with `args`, logging stdout and stderr to `<name>.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        let log = self.path(&format!("{name}.log"));
        let file = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "info")
            // Small log segments, so that checkpoints delete some in tests.
            .env("SUNDIAL_LOG_SEGMENT_BYTES", "262144")
            .spawn()
            .unwrap();
        Proc { name: name.to_string(), child, log }
    }

    /// Starts a coordinator for `workers` workers with fast heartbeats; `control` and `http` may
    /// use port 0.
    pub fn coordinator(&self, workers: usize, control: &str, http: &str) -> Proc {
        self.coordinator_with(workers, control, http, &[])
    }

    /// [`Env::coordinator`] with more flags.
    pub fn coordinator_with(&self, workers: usize, control: &str, http: &str, extra: &[&str]) -> Proc {
        let data = self.path("coordinator");
        let workers = workers.to_string();
        let mut args = vec![
            "coordinator",
            "--listen",
            control,
            "--http",
            http,
            "--workers",
            &workers,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend(FAST_HEARTBEATS);
        args.extend(extra);
        self.spawn("coordinator", &args)
    }

    /// The control and HTTP addresses the coordinator bound (waits for it to write them).
    pub fn coordinator_addresses(&self) -> (String, String) {
        let file = self.path("coordinator").join("addresses.json");
        let v: Value = wait_for(Duration::from_secs(20), "coordinator addresses", || {
            let text = fs::read_to_string(&file).ok()?;
            serde_json::from_str(&text).ok()
        });
        (v["control"].as_str().unwrap().to_string(), v["http"].as_str().unwrap().to_string())
    }

    /// Starts a worker whose data dir is `<dir>/<name>`.
    pub fn worker(&self, name: &str, coordinator: &str, threads: usize) -> Proc {
        let data = self.path(name);
        let threads = threads.to_string();
        self.spawn(
            name,
            &["worker", "--coordinator", coordinator, "--threads", &threads, "--data-dir", data.to_str().unwrap()],
        )
    }
}

impl Env {
    /// Starts a worker whose HTTP endpoint (ingest, metrics) is on an ephemeral port.
    pub fn ingest_worker(&self, name: &str, coordinator: &str, threads: usize) -> Proc {
        let data = self.path(name);
        let threads = threads.to_string();
        self.spawn(
            name,
            &[
                "worker",
                "--coordinator",
                coordinator,
                "--threads",
                &threads,
                "--data-dir",
                data.to_str().unwrap(),
                "--http",
                "127.0.0.1:0",
            ],
        )
    }
}

/// A coordinator expecting two workers, and the two (`w0` and `w1`), formed and running.
pub struct Pair {
    pub coordinator: Proc,
    pub workers: [Proc; 2],
    /// The coordinator's control address.
    pub control: String,
    /// The coordinator's HTTP address.
    pub http: String,
    /// `GET /v1/cluster` once running.
    pub status: Value,
}

impl Env {
    /// Starts a coordinator and two workers of `threads` threads each, and waits until the
    /// cluster runs.
    pub fn running_pair(&self, threads: usize) -> Pair {
        let coordinator = self.coordinator(2, "127.0.0.1:0", "127.0.0.1:0");
        let (control, http) = self.coordinator_addresses();
        let workers = [self.worker("w0", &control, threads), self.worker("w1", &control, threads)];
        let status = wait_state(&http, "running", Duration::from_secs(60));
        Pair { coordinator, workers, control, http, status }
    }
}

/// POST `body` with `content_type` to `http://{addr}{path}`: status and body text.
pub fn post(addr: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response =
        agent.post(&format!("http://{addr}{path}")).header("content-type", content_type).send(body).unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().with_config().limit(1 << 30).read_to_string().unwrap())
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `http://{http}{path}`: status and JSON body; `None` when the server cannot be reached.
pub fn get(http: &str, path: &str) -> Option<(u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(&format!("http://{http}{path}")).call().ok()?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// The cluster status, once the coordinator answers.
pub fn cluster(http: &str) -> Value {
    wait_for(Duration::from_secs(20), "GET /v1/cluster", || get(http, "/v1/cluster")).1
}

/// Waits until the cluster is in `state` and returns its status.
pub fn wait_state(http: &str, state: &str, timeout: Duration) -> Value {
    wait_for(timeout, &format!("cluster state {state}"), || {
        let (_, v) = get(http, "/v1/cluster")?;
        (v["state"] == state).then_some(v)
    })
}

/// Runs the exchange check and asserts it proves all-to-all exchange over `peers` threads.
pub fn assert_all_to_all(http: &str, peers: usize) -> Value {
    let (status, body) = get(http, "/v1/cluster/check").expect("coordinator reachable");
    assert_eq!(status, 200, "check failed: {body}");
    assert_eq!(body["ok"], true, "{body}");
    let rows = body["received"].as_array().unwrap();
    assert_eq!(rows.len(), peers, "{body}");
    for row in rows {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), peers);
        assert!(row.iter().all(|n| n.as_u64() == Some(16)), "{body}");
    }
    body
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u64) -> bool {
    let state = stat_fields(format!("/proc/{pid}/stat")).and_then(|fields| fields.into_iter().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

/// The fields of a `/proc/.../stat` file after the name (which may hold spaces and
/// parentheses): the state (field 3) first. `None` when it cannot be read (the task ended).
pub fn stat_fields(path: impl AsRef<std::path::Path>) -> Option<Vec<String>> {
    let stat = fs::read_to_string(path).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(String::from).collect())
}

/// Pids of live processes whose command line contains `needle`.
pub fn pids_with_arg(needle: &str) -> Vec<u64> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Sends raw bytes to a control port and returns the coordinator's answer frame, if any.
pub fn raw_control_exchange(addr: &str, bytes: &[u8]) -> Option<Value> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    read_frame(&mut stream)
}

/// Reads one length-prefixed JSON frame.
pub fn read_frame(stream: &mut TcpStream) -> Option<Value> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// A frame around a JSON value.
pub fn frame(value: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(value).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Reads the worker ids by index from a status.
pub fn ids(status: &Value) -> Vec<String> {
    status["workers"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap_or_default().to_string()).collect()
}

/// Reads a per-worker numeric field by index from a status.
pub fn field(status: &Value, index: usize, name: &str) -> u64 {
    status["workers"][index][name].as_u64().unwrap_or_else(|| panic!("no {name} for worker {index}: {status}"))
}

/// Asserts the log at `path` eventually contains `needle`.
pub fn wait_log(path: &Path, needle: &str, timeout: Duration) {
    wait_for(timeout, &format!("{needle:?} in {}", path.display()), || {
        fs::read_to_string(path).ok().filter(|t| t.contains(needle)).map(|_| ())
    });
}

/// GET `http://{addr}{path}`: status and body text (up to 1 GiB).
pub fn get_text(addr: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(&format!("http://{addr}{path}")).call().unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().with_config().limit(1 << 30).read_to_string().unwrap())
}

/// An export's NDJSON as (first key part, feature, window start) → value.
pub fn parse_export(text: &str) -> std::collections::BTreeMap<(String, String, i64), Value> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let key = v["key"][0].as_str().unwrap().to_string();
            ((key, v["feature"].as_str().unwrap().to_string(), v["start"].as_i64().unwrap()), v["value"].clone())
        })
        .collect()
}

/// The address a worker's log says its HTTP endpoint listens on (the newest start's).
pub fn http_addr_in_log(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap();
    let after = text.rsplit("HTTP endpoint listening address=").next().unwrap();
    after.split_whitespace().next().unwrap().to_string()
}
