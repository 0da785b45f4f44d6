//! `sundial local`: a coordinator and N workers on this machine, in one command.
//!
//! The processes are the real ones (the same binary, `coordinator` and `worker` subcommands),
//! talking over loopback; this command only starts them, waits for the cluster, restarts a worker
//! that dies, and stops them all on Ctrl-C or SIGTERM.

use std::fs::{self, File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::client;

/// `sundial local`.
#[derive(Args, Debug)]
pub struct LocalArgs {
    /// Worker processes to start.
    #[arg(long, env = "SUNDIAL_LOCAL_WORKERS", value_name = "N", default_value_t = 2)]
    workers: usize,
    /// Timely threads per worker process.
    #[arg(long, env = "SUNDIAL_LOCAL_THREADS", value_name = "T", default_value_t = 2)]
    threads: usize,
    /// Data of all processes goes below this folder (and their logs in DIR/logs).
    #[arg(long, env = "SUNDIAL_LOCAL_DATA_DIR", value_name = "DIR", default_value = "sundial-data")]
    data_dir: PathBuf,
    /// The coordinator's HTTP API.
    #[arg(long, env = "SUNDIAL_HTTP", value_name = "ADDR", default_value = "127.0.0.1:7700")]
    http: String,
    /// How long to wait for the cluster to form.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::parse_duration)]
    startup_timeout: Duration,
}

struct Proc {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Child,
    restarts: u32,
}

fn spawn(exe: &Path, name: &str, args: Vec<String>, log: PathBuf) -> anyhow::Result<Proc> {
    let file = open_log(&log)?;
    // Its own process group: a Ctrl-C in the terminal reaches only `sundial local`, which stops
    // the processes in order.
    let child = Command::new(exe)
        .process_group(0)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok(Proc { name: name.to_string(), args, log, child, restarts: 0 })
}

fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening log {}", path.display()))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Stops the coordinator first (it takes a last checkpoint while the workers still run), then
/// the workers.
fn stop_all(procs: &mut [Proc]) {
    let (coordinator, workers) = procs.split_at_mut(1.min(procs.len()));
    stop(coordinator, Duration::from_secs(15));
    stop(workers, Duration::from_secs(5));
}

fn stop(procs: &mut [Proc], grace: Duration) {
    for p in procs.iter() {
        if let Ok(pid) = i32::try_from(p.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
            }
        }
    }
}

/// Runs the local cluster until a signal.
pub fn run(args: LocalArgs, log_format: &str) -> anyhow::Result<()> {
    if args.workers == 0 || args.threads == 0 {
        bail!("--workers and --threads must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the sundial binary")?;
    let logs = args.data_dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let coordinator_dir = args.data_dir.join("coordinator");
    let addresses_file = coordinator_dir.join("addresses.json");
    match fs::remove_file(&addresses_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", addresses_file.display())),
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing the signal handler")?;
    }

    let started = Instant::now();
    let mut procs = Vec::new();
    let coordinator_args = vec![
        "--log-format".into(),
        log_format.into(),
        "coordinator".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        args.http.clone(),
        "--workers".into(),
        args.workers.to_string(),
        "--data-dir".into(),
        coordinator_dir.display().to_string(),
    ];
    procs.push(spawn(&exe, "coordinator", coordinator_args, logs.join("coordinator.log"))?);

    let result = (|| -> anyhow::Result<()> {
        let control = wait_for_addresses(&addresses_file, &mut procs[0], &stop)?;
        for i in 0..args.workers {
            let worker_args = vec![
                "--log-format".into(),
                log_format.into(),
                "worker".into(),
                "--coordinator".into(),
                control.clone(),
                "--threads".into(),
                args.threads.to_string(),
                "--data-dir".into(),
                args.data_dir.join(format!("worker-{i}")).display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--http".into(),
                "127.0.0.1:0".into(),
                "--lines".into(),
                "127.0.0.1:0".into(),
            ];
            procs.push(spawn(&exe, &format!("worker {i}"), worker_args, logs.join(format!("worker-{i}.log")))?);
        }
        let server = format!("http://{}", args.http);
        wait_for_running(&server, &mut procs, &stop, args.startup_timeout)?;
        let elapsed = started.elapsed();
        println!(
            "sundial is running: {} workers × {} threads, formed in {:.2}s",
            args.workers,
            args.threads,
            elapsed.as_secs_f64()
        );
        println!("  HTTP API  {server}");
        println!("  data      {}", args.data_dir.display());
        println!("  logs      {}", logs.display());
        println!();
        println!("Try next, in another terminal:");
        println!("  sundial status            # the cluster's members and their state");
        println!("  sundial status --check    # prove that every worker thread exchanges data with every other");
        println!("  curl {server}/v1/cluster");
        println!();
        println!("Ctrl-C stops the cluster.");
        supervise(&exe, &mut procs, &stop)
    })();
    stop_all(&mut procs);
    if result.is_ok() {
        println!("sundial stopped");
    }
    result
}

fn wait_for_addresses(file: &Path, coordinator: &mut Proc, stop: &AtomicBool) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(text) = fs::read_to_string(file) {
            if let Some(control) =
                serde_json::from_str::<Value>(&text).ok().and_then(|v| v["control"].as_str().map(String::from))
            {
                return Ok(control);
            }
        }
        if let Ok(Some(status)) = coordinator.child.try_wait() {
            bail!("the coordinator exited ({status}):\n{}", log_tail(&coordinator.log));
        }
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not start within 15s; see {}", coordinator.log.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_running(server: &str, procs: &mut [Proc], stop: &AtomicBool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = client::get(server, "/v1/cluster", Duration::from_secs(2)) {
            if response.body["state"] == "running" {
                return Ok(());
            }
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("the {} exited ({status}) before the cluster formed:\n{}", p.name, log_tail(&p.log));
            }
        }
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not form within {timeout:?}; see the logs in {}",
                procs[0].log.parent().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn supervise(exe: &Path, procs: &mut [Proc], stop: &AtomicBool) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        for p in procs.iter_mut() {
            let Ok(Some(status)) = p.child.try_wait() else {
                continue;
            };
            if p.name == "coordinator" {
                bail!("the coordinator exited ({status}):\n{}", log_tail(&p.log));
            }
            if p.restarts >= 5 {
                bail!("the {} exited ({status}) {} times:\n{}", p.name, p.restarts + 1, log_tail(&p.log));
            }
            eprintln!("{} exited ({status}); restarting it (see {})", p.name, p.log.display());
            thread::sleep(Duration::from_millis(500));
            let file = open_log(&p.log)?;
            p.child = Command::new(exe)
                .process_group(0)
                .args(&p.args)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
                .with_context(|| format!("restarting the {}", p.name))?;
            p.restarts += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
