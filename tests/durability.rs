//! Nothing accepted is lost: workers killed with SIGKILL (through the OS) at random moments of a
//! long ingest, and the whole cluster killed at once, come back with exactly what they accepted;
//! `sundial ingest` retries through the re-formations and its batch ids keep a retried batch
//! from counting twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::*;

const BASE: i64 = 1_700_000_000_000;

type Model = BTreeMap<(String, String, i64), Value>;

/// `n` events in event-time order: (user, time, amount).
fn stream(n: usize, seed: u64) -> Vec<(u64, i64, i64)> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n).map(|i| (next() % 300, BASE + i as i64 * 7, (next() % 1_000) as i64)).collect()
}

fn model(evs: &[(u64, i64, i64)]) -> Model {
    let mut windows: BTreeMap<(u64, i64), (u64, i64, i64)> = BTreeMap::new();
    for (u, t, a) in evs {
        let w = windows.entry((*u, t.div_euclid(60_000) * 60_000)).or_insert((0, 0, i64::MIN));
        w.0 += 1;
        w.1 += a;
        w.2 = w.2.max(*a);
    }
    let mut out = Model::new();
    for ((u, start), (n, sum, max)) in windows {
        out.insert((u.to_string(), "n".into(), start), json!(n));
        out.insert((u.to_string(), "total".into(), start), json!(sum));
        out.insert((u.to_string(), "largest".into(), start), json!(max));
    }
    out
}

fn export(http: &str) -> Model {
    export_at(http, None)
}

/// The export at `as_of` (else at the newest complete epoch).
fn export_at(http: &str, as_of: Option<u64>) -> Model {
    let query = as_of.map_or(String::new(), |e| format!("?as_of={e}"));
    let (status, text) = get_text(http, &format!("/v1/dataflows/per_minute/export{query}"));
    assert_eq!(status, 200, "{text}");
    parse_export(&text)
}

fn create_catalog(http: &str) {
    // Lateness beyond the stream's span: this test is about losing nothing, not about lateness.
    let source = json!({"name": "tx", "time": "ts", "allowed_lateness": "1h",
        "fields": {"user_id": "u64", "ts": "i64", "amount": "i64"}});
    let (code, text) = post(http, "/v1/sources", "application/json", source.to_string().as_bytes());
    assert_eq!(code, 201, "{text}");
    let definition = json!({"name": "per_minute", "source": "tx", "key": "user_id", "retention": "forever",
        "features": [{"name": "n", "agg": "count", "window": {"tumbling": "1m"}},
                     {"name": "total", "agg": "sum", "field": "amount", "window": {"tumbling": "1m"}},
                     {"name": "largest", "agg": "max", "field": "amount", "window": {"tumbling": "1m"}}]});
    let (code, text) = post(http, "/v1/dataflows", "application/json", definition.to_string().as_bytes());
    assert_eq!(code, 201, "{text}");
}

fn ndjson(evs: &[(u64, i64, i64)]) -> String {
    evs.iter().map(|(u, t, a)| format!("{{\"user_id\":{u},\"ts\":{t},\"amount\":{a}}}\n")).collect()
}

/// The totals line of `sundial ingest`: (accepted, rejected, late).
fn totals(out: &str) -> (u64, u64, u64) {
    let line = out.lines().find(|l| l.starts_with("accepted ")).unwrap_or_else(|| panic!("no totals in {out}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

/// Asserts two exports are equal, listing the first differences.
fn assert_same(got: &Model, want: &Model, what: &str) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in want {
        if got.get(k) != Some(v) {
            diffs.push(format!("{k:?}: want {v}, got {:?}", got.get(k)));
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            diffs.push(format!("{k:?}: not wanted, got {v}"));
        }
    }
    panic!("{what}: {} windows differ, e.g.\n{}", diffs.len(), diffs[..diffs.len().min(12)].join("\n"));
}

#[test]
fn workers_killed_at_random_moments_of_a_long_ingest_lose_nothing() {
    let env = Env::new();
    // Frequent checkpoints: recoveries restore one and replay only the log after it.
    let _coordinator = env.coordinator_with(2, "127.0.0.1:0", "127.0.0.1:0", &["--checkpoint-interval", "700ms"]);
    let (control, http) = env.coordinator_addresses();
    let mut workers = [env.worker("w0", &control, 2), env.worker("w1", &control, 2)];
    wait_state(&http, "running", Duration::from_secs(60));
    create_catalog(&http);
    // A first checkpoint, so that every generation below has one to restore.
    wait_for(Duration::from_secs(30), "a first checkpoint", || {
        [env.path("w0"), env.path("w1")].iter().all(|d| !complete_checkpoints(d).is_empty()).then_some(())
    });

    // `sundial ingest` reads the stream from a pipe that the test fills at a steady pace, so the
    // ingest lasts while the workers are killed.
    let evs = stream(120_000, 0x5eed);
    let mut cli = Command::new(bin())
        .args([
            "--server",
            &format!("http://{http}"),
            "ingest",
            "tx",
            "-",
            "--format",
            "ndjson",
            "--batch-lines",
            "300",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    let feeder = {
        let evs = evs.clone();
        std::thread::spawn(move || {
            for chunk in evs.chunks(600) {
                stdin.write_all(ndjson(chunk).as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };

    // At least 20 kill points, each at a random moment after the cluster runs again.
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = move |n: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let started = Instant::now();
    let mut kills = 0;
    // The generation the last kill ended: the next kill waits for a later one to run (the state
    // says "running" until the coordinator has seen the kill).
    let mut killed_generation = 0;
    while kills < 20 {
        assert!(started.elapsed() < Duration::from_secs(150), "the kill loop took too long");
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&http, "/v1/cluster").is_none_or(|(_, v)| {
            v["state"] != "running" || v["generation"].as_u64().is_none_or(|g| g <= killed_generation)
        }) {
            if Instant::now() > deadline {
                let tail = |name: &str| {
                    let text = std::fs::read_to_string(env.path(&format!("{name}.log"))).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                };
                panic!(
                    "the cluster did not run again after kill {kills}:\n{}\n--- coordinator\n{}\n--- w0\n{}\n--- w1\n{}",
                    cluster(&http),
                    tail("coordinator"),
                    tail("w0"),
                    tail("w1")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        std::thread::sleep(Duration::from_millis(50 + rng(500)));
        let victim = rng(2) as usize;
        killed_generation = cluster(&http)["generation"].as_u64().unwrap_or(0);
        workers[victim].kill9();
        kills += 1;
        workers[victim] = env.worker(&format!("w{victim}"), &control, 2);
    }
    let during_ingest = !feeder.is_finished();
    feeder.join().unwrap();
    let out = cli.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sundial ingest failed:\n{stdout}\n{stderr}");
    assert_eq!(totals(&stdout), (evs.len() as u64, 0, 0), "{stdout}");
    eprintln!("{kills} kills (the last one during the ingest: {during_ingest}) in {:?}", started.elapsed());

    wait_state(&http, "running", Duration::from_secs(60));
    let visible =
        stdout.split("visible at epoch ").nth(1).and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok());
    assert!(visible.is_some(), "{stdout}");
    assert_same(&export_at(&http, visible), &model(&evs), &format!("after {kills} kills"));
    let replays = ["w0", "w1"]
        .iter()
        .map(|w| std::fs::read_to_string(env.path(&format!("{w}.log"))).unwrap())
        .map(|log| log.matches("replayed the ingest log").count())
        .sum::<usize>();
    assert!(replays >= 20, "every generation replays the logs ({replays} replays logged)");
    // Checkpoints were taken, restored, and deleted the log segments they cover.
    let logs = || -> String {
        ["w0", "w1"].iter().map(|w| std::fs::read_to_string(env.path(&format!("{w}.log"))).unwrap()).collect()
    };
    let restores = logs().matches("restoring the checkpoint").count();
    assert!(restores >= 2 * kills, "every generation starts from a checkpoint ({restores} restores)");
    // Once the cluster stays up, committed checkpoints delete the log segments they cover.
    let freed = wait_for(Duration::from_secs(30), "checkpoints to delete covered log segments", || {
        let freed: u64 = logs()
            .lines()
            .filter(|l| l.contains("checkpoint committed"))
            .filter_map(|l| l.split("log_bytes_freed=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        (freed > 0).then_some(freed)
    });
    eprintln!("{restores} restores from checkpoints; {freed} log bytes freed");
}

#[test]
fn the_whole_cluster_killed_at_once_loses_nothing() {
    let env = Env::new();
    let port = free_port();
    let control = format!("127.0.0.1:{port}");
    let mut coordinator = env.coordinator(2, &control, "127.0.0.1:0");
    let (_, http) = env.coordinator_addresses();
    let mut w0 = env.worker("w0", &control, 2);
    let mut w1 = env.worker("w1", &control, 2);
    wait_state(&http, "running", Duration::from_secs(60));
    create_catalog(&http);

    let evs = stream(30_000, 0xabc);
    let file = env.path("events.ndjson");
    std::fs::write(&file, ndjson(&evs)).unwrap();
    let out = Command::new(bin())
        .args(["--server", &format!("http://{http}"), "ingest", "tx", file.to_str().unwrap(), "--batch-lines", "1000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Also some through the coordinator's endpoint, with a batch id sent twice: counted once.
    let extra = stream(500, 0xdef).into_iter().map(|(u, t, a)| (u, t + 30_000 * 7, a)).collect::<Vec<_>>();
    let mut last_epoch = None;
    for _ in 0..2 {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut r = agent
            .post(&format!("http://{http}/v1/sources/tx/events"))
            .header("content-type", "application/x-ndjson")
            .header("x-sundial-batch", "extra-1")
            .send(ndjson(&extra).as_bytes())
            .unwrap();
        let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(body["accepted"], 500, "{body}");
        last_epoch = body["epoch"].as_u64();
    }
    let all: Vec<_> = evs.iter().chain(extra.iter()).cloned().collect();
    let want = model(&all);
    assert_same(&export_at(&http, last_epoch), &want, "before the kill");

    // Everything at once, through the OS.
    coordinator.kill9();
    w0.kill9();
    w1.kill9();
    std::fs::remove_file(env.path("coordinator").join("addresses.json")).unwrap();
    let _coordinator = env.coordinator(2, &control, "127.0.0.1:0");
    let (_, http) = env.coordinator_addresses();
    let _w1 = env.worker("w1", &control, 2);
    let _w0 = env.worker("w0", &control, 2);
    wait_state(&http, "running", Duration::from_secs(60));
    assert_same(&export(&http), &want, "after killing everything");

    // The retried batch id is still remembered: sending it again changes nothing.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent
        .post(&format!("http://{http}/v1/sources/tx/events"))
        .header("content-type", "application/x-ndjson")
        .header("x-sundial-batch", "extra-1")
        .send(ndjson(&extra).as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let epoch: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_same(&export_at(&http, epoch["epoch"].as_u64()), &want, "a batch id seen before the crash counts once");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `dir`; `None` (with the reason) where this cannot be done.
    fn mount(dir: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()])
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", self.0.to_str().unwrap()]).status();
    }
}

fn ingest_batch(addr: &str, id: &str, evs: &[(u64, i64, i64)]) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent
        .post(&format!("http://{addr}/v1/sources/tx/events"))
        .header("content-type", "application/x-ndjson")
        .header("x-sundial-batch", id)
        .send(ndjson(evs).as_bytes())
        .unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null))
}

#[test]
fn a_full_disk_refuses_ingest_and_recovers_when_space_returns() {
    let env = Env::new();
    let data = env.path("w0");
    let _disk = match Tmpfs::mount(&data, "6m") {
        Ok(d) => d,
        Err(reason) => {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root and must be able to mount a tmpfs: {reason}");
            eprintln!("skipped: {reason} (needs root)");
            return;
        }
    };
    let _coordinator = env.coordinator(1, "127.0.0.1:0", "127.0.0.1:0");
    let (control, http) = env.coordinator_addresses();
    let mut w0 = env.worker("w0", &control, 1);
    let status = wait_state(&http, "running", Duration::from_secs(60));
    let worker = status["workers"][0]["ingest_addr"].as_str().unwrap().to_string();
    create_catalog(&http);

    let evs = stream(3_000, 0x77);
    let (a, rest) = evs.split_at(1_000);
    let (b, c) = rest.split_at(1_000);
    let (code, body) = ingest_batch(&worker, "a", a);
    assert_eq!(code, 200, "{body}");
    let epoch = body["epoch"].as_u64();

    // The disk fills up: the batch is refused, nothing of it is accepted, the worker stays up.
    let filler = data.join("filler");
    let _ = Command::new("dd").args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"]).output();
    let (code, body) = ingest_batch(&worker, "b", b);
    assert_eq!(code, 507, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("ingest log cannot be written") && message.contains("No space left"), "{message}");
    assert_same(&export_at(&http, epoch), &model(a), "nothing of the refused batch is visible");
    assert_eq!(cluster(&http)["state"], "running");

    // Space returns: the same batch goes in, and the next one.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = ingest_batch(&worker, "b", b);
    assert_eq!((code, body["accepted"].as_u64()), (200, Some(1_000)), "{body}");
    let (code, body) = ingest_batch(&worker, "c", c);
    assert_eq!(code, 200, "{body}");
    assert_same(&export_at(&http, body["epoch"].as_u64()), &model(&evs), "after space returned");

    // What was accepted is in the log: a restarted worker has all of it, and no refused part twice.
    w0.kill9();
    let _w0 = env.worker("w0", &control, 1);
    wait_for(Duration::from_secs(60), "generation 2 serving", || {
        let (_, v) = get(&http, "/v1/cluster")?;
        (v["state"] == "running" && v["generation"] == 2).then_some(())
    });
    assert_same(&export(&http), &model(&evs), "after a restart");
}

/// The complete checkpoints in a worker's data dir, oldest first.
fn complete_checkpoints(data: &std::path::Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(data.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("COMPLETE").is_file())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// The last segment of a partition's log.
fn last_segment(data: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(data.join("log").join("t0"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Ingests `evs` through the coordinator in batches with ids `{name}-{i}`; the last reply's epoch.
fn ingest_through(http: &str, name: &str, evs: &[(u64, i64, i64)]) -> Option<u64> {
    let mut epoch = None;
    for (i, chunk) in evs.chunks(500).enumerate() {
        let (code, body) = ingest_batch(http, &format!("{name}-{i}"), chunk);
        assert_eq!(code, 200, "{body}");
        epoch = body["epoch"].as_u64();
    }
    epoch
}

#[test]
fn damaged_logs_and_checkpoints_are_handled_and_reported() {
    let env = Env::new();
    let control = format!("127.0.0.1:{}", free_port());
    let start = |env: &Env| {
        let _ = std::fs::remove_file(env.path("coordinator").join("addresses.json"));
        let coordinator = env.coordinator_with(2, &control, "127.0.0.1:0", &["--checkpoint-interval", "300ms"]);
        let (_, http) = env.coordinator_addresses();
        let workers = [env.worker("w0", &control, 1), env.worker("w1", &control, 1)];
        wait_state(&http, "running", Duration::from_secs(60));
        (coordinator, workers, http)
    };
    let (mut coordinator, mut workers, http) = start(&env);
    create_catalog(&http);
    let (w0, w1) = (env.path("w0"), env.path("w1"));

    // A, then two checkpoints after it; B after them (in the logs only); C, one batch straight
    // to worker 0, is the last record of its log.
    let evs = stream(6_300, 0x1234);
    let (a, rest) = evs.split_at(4_000);
    let (b, c) = rest.split_at(2_000);
    let a_epoch = ingest_through(&http, "a", a).unwrap();
    wait_for(Duration::from_secs(30), "two checkpoints after A on both workers", || {
        [&w0, &w1].iter().all(|d| complete_checkpoints(d).iter().filter(|e| **e > a_epoch).count() >= 2).then_some(())
    });
    // No checkpoint may cover B: the coordinator, which asks for them, goes first.
    coordinator.kill9();
    let status_before = complete_checkpoints(&w1);
    let b_epoch = {
        // Without a coordinator, ingest goes to the workers' own endpoints.
        let (addr0, addr1) = (http_addr_in_log(&env.path("w0.log")), http_addr_in_log(&env.path("w1.log")));
        let mut epoch = None;
        for (i, chunk) in b.chunks(500).enumerate() {
            let addr = if i % 2 == 0 { &addr0 } else { &addr1 };
            let (code, body) = ingest_batch(addr, &format!("b-{i}"), chunk);
            assert_eq!(code, 200, "{body}");
            epoch = body["epoch"].as_u64();
        }
        let (code, body) = ingest_batch(&addr0, "c", c);
        assert_eq!(code, 200, "{body}");
        epoch
    };
    assert!(b_epoch.is_some());
    assert_eq!(complete_checkpoints(&w1), status_before, "no checkpoint without the coordinator");
    for p in workers.iter_mut() {
        p.kill9();
    }

    // Damage: worker 1 loses its newest checkpoint and gets garbage after its last record;
    // worker 0's last record (batch C) is cut in the middle.
    let newest = *complete_checkpoints(&w1).last().unwrap();
    std::fs::remove_dir_all(w1.join("checkpoints").join(format!("{newest:020}"))).unwrap();
    // What both still have in common: older than the deleted one.
    let w0_has = complete_checkpoints(&w0);
    let fallback = *complete_checkpoints(&w1).iter().rfind(|e| w0_has.contains(e)).unwrap();
    assert!(fallback < newest);
    let seg1 = last_segment(&w1);
    let mut garbage = std::fs::OpenOptions::new().append(true).open(&seg1).unwrap();
    garbage.write_all(&[0xAB; 77]).unwrap();
    drop(garbage);
    let seg0 = last_segment(&w0);
    let len = std::fs::metadata(&seg0).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&seg0).unwrap().set_len(len - 5).unwrap();

    let (coordinator, workers, http) = start(&env);
    let all_but_c: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
    assert_same(&export(&http), &model(&all_but_c), "after the damage (C was destroyed by it)");
    let log = coordinator.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("the generation restores a checkpoint") && l.contains(&format!("epoch={fallback}"))),
        "falls back to the checkpoint both workers have: {log}"
    );
    let w0_log = std::fs::read_to_string(env.path("w0.log")).unwrap();
    let w1_log = std::fs::read_to_string(env.path("w1.log")).unwrap();
    assert!(w0_log.contains("torn record") && w0_log.contains("cut"), "worker 0 says what it cut: {w0_log}");
    assert!(w1_log.contains("cut 77 bytes"), "worker 1 says what it cut: {w1_log}");

    // A damaged checkpoint file: set aside, and the cluster falls back to the one before.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    wait_for(Duration::from_secs(30), "two checkpoints of the new generation", || {
        [&w0, &w1].iter().all(|d| complete_checkpoints(d).iter().filter(|e| **e > now).count() >= 2).then_some(())
    });
    drop(coordinator);
    std::thread::sleep(Duration::from_millis(500));
    drop(workers);
    // The newest checkpoint both have is what the next generation would restore.
    let theirs = complete_checkpoints(&w1);
    let newest = *complete_checkpoints(&w0).iter().rfind(|e| theirs.contains(e)).unwrap();
    let state = std::fs::read_dir(w0.join("checkpoints").join(format!("{newest:020}")))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let (_coordinator, _workers, http) = start(&env);
    assert_same(&export(&http), &model(&all_but_c), "after a damaged checkpoint");
    let w0_log = std::fs::read_to_string(env.path("w0.log")).unwrap();
    assert!(w0_log.contains("corrupt checkpoint") && w0_log.contains("set aside"), "{w0_log}");
    assert!(w0.join("checkpoints").join(format!("{newest:020}.damaged")).is_dir());
}
