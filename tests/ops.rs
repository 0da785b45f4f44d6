//! Watching the cluster: `GET /metrics` on the coordinator and on the workers counts exactly what
//! was sent, rejected and late, and parses as Prometheus text; logs are JSON with
//! `--log-format json` and name each refused batch once; `sundial status` shows the health
//! summary; the status page at `/`, loaded in headless Chromium, shows the workers and a
//! submitted dataflow (a screenshot is saved as a test artifact).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::*;

const BASE: i64 = 1_700_000_000_000;

/// Parses Prometheus text with a parser crate, failing on text it cannot read.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, text) = get_text(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        // Every sample line is `name{labels} value`.
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(sample: &prometheus_parse::Sample) -> f64 {
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{}: unexpected value {other:?}", sample.metric),
    }
}

/// The sum of `metric` over the series whose labels include `labels`.
fn sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(value)
        .sum()
}

fn series(scrape: &prometheus_parse::Scrape, metric: &str) -> Vec<HashMap<String, String>> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .collect()
}

fn create_catalog(http: &str) {
    // A short idle timeout, so that partitions without events stop holding the watermark back.
    let source = json!({"name": "tx", "time": "ts", "allowed_lateness": "1s", "idle_timeout": "200ms",
        "fields": {"user_id": "u64", "ts": "i64", "amount": "i64"}});
    let (code, text) = post(http, "/v1/sources", "application/json", source.to_string().as_bytes());
    assert_eq!(code, 201, "{text}");
    let definition = json!({"name": "per_minute", "source": "tx", "key": "user_id", "retention": "forever",
        "features": [{"name": "n", "agg": "count", "window": {"tumbling": "1m"}},
                     {"name": "total", "agg": "sum", "field": "amount", "window": {"tumbling": "1m"}}]});
    let (code, text) = post(http, "/v1/dataflows", "application/json", definition.to_string().as_bytes());
    assert_eq!(code, 201, "{text}");
}

fn ndjson(events: &[(u64, i64, i64)]) -> String {
    events.iter().map(|(u, t, a)| format!("{{\"user_id\":{u},\"ts\":{t},\"amount\":{a}}}\n")).collect()
}

#[test]
fn metrics_count_what_was_sent_rejected_and_late() {
    let env = Env::new();
    let data = env.path("coordinator");
    let mut args = vec![
        "--log-format",
        "json",
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend(["--heartbeat-interval", "100ms", "--heartbeat-timeout", "1s"]);
    let coordinator = env.spawn("coordinator", &args);
    let (control, http) = env.coordinator_addresses();
    let w0 = env.ingest_worker("w0", &control, 2);
    let w1 = env.ingest_worker("w1", &control, 2);
    let status = wait_state(&http, "running", Duration::from_secs(60));
    // Process indices follow registration order, not the names.
    let w0_http = status["workers"][0]["ingest_addr"].as_str().unwrap().to_string();
    let w1_http = status["workers"][1]["ingest_addr"].as_str().unwrap().to_string();
    create_catalog(&http);

    // First batch, through the coordinator: 300 good events, 2 bad lines.
    let first: Vec<(u64, i64, i64)> = (0..300).map(|i| (i % 17, BASE + i as i64 * 100, i as i64)).collect();
    let mut body = ndjson(&first);
    body.push_str("{\"user_id\": \"not a number\", \"ts\": 1, \"amount\": 1}\n");
    body.push_str("not json at all\n");
    let (code, text) = post(&http, "/v1/sources/tx/events", "application/x-ndjson", body.as_bytes());
    assert_eq!(code, 200, "{text}");
    let outcome: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((outcome["accepted"].as_u64(), outcome["rejected"].as_u64()), (Some(300), Some(2)), "{outcome}");

    // Wait until the watermark has passed most of the first batch on every worker.
    let newest = BASE + 299 * 100;
    wait_for(Duration::from_secs(30), "the watermark to advance", || {
        let (_, stats) = get(&http, "/v1/stats")?;
        let watermark = stats["sources"][0]["watermark_ms"].as_i64()?;
        (watermark >= newest - 1_000).then_some(())
    });

    // Second batch, through worker 1's own endpoint: 100 on time, 40 far behind the watermark
    // (late), 3 bad lines.
    let on_time: Vec<(u64, i64, i64)> = (0..100).map(|i| (i % 5, newest + 10 + i as i64, 1)).collect();
    let late: Vec<(u64, i64, i64)> = (0..40).map(|i| (i % 5, BASE + i as i64, 1)).collect();
    let mut body = ndjson(&on_time);
    body.push_str(&ndjson(&late));
    body.push_str("{\"user_id\": 1}\n{\"user_id\": 1, \"ts\": \"x\", \"amount\": 1}\n{]\n");
    let (code, text) = post(&w1_http, "/v1/sources/tx/events", "application/x-ndjson", body.as_bytes());
    assert_eq!(code, 200, "{text}");
    let outcome: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (outcome["accepted"].as_u64(), outcome["rejected"].as_u64(), outcome["late"].as_u64()),
        (Some(100), Some(3), Some(40)),
        "{outcome}"
    );
    let epoch = outcome["epoch"].as_u64().unwrap();

    // Reads: five single keys and one lookup.
    for key in 0..5 {
        let (code, _) = get(&http, &format!("/v1/dataflows/per_minute/keys/{key}?as_of={epoch}")).unwrap();
        assert_eq!(code, 200);
    }
    let (code, text) = post(&http, "/v1/dataflows/per_minute/lookup", "application/json", br#"{"keys": [1, 2]}"#);
    assert_eq!(code, 200, "{text}");

    // The coordinator's metrics, once both workers have reported the second batch.
    let coordinator_scrape = wait_for(Duration::from_secs(20), "the workers' reports", || {
        let s = scrape(&http);
        (sum(&s, "sundial_ingest_events_total", &[("source", "tx")]) == 400.0).then_some(s)
    });
    let s = &coordinator_scrape;
    assert_eq!(sum(s, "sundial_ingest_rejected_total", &[("source", "tx")]), 5.0);
    assert_eq!(sum(s, "sundial_ingest_late_total", &[("source", "tx")]), 40.0);
    assert_eq!(sum(s, "sundial_ingest_batches_total", &[("source", "tx")]), 2.0 + 0.0);
    // Every worker reports its own series.
    let workers: std::collections::BTreeSet<String> =
        series(s, "sundial_ingest_events_total").into_iter().filter_map(|l| l.get("worker").cloned()).collect();
    assert_eq!(workers.into_iter().collect::<Vec<_>>(), vec!["0", "1"]);
    assert_eq!(sum(s, "sundial_read_duration_seconds_count", &[("endpoint", "key")]), 5.0);
    assert_eq!(sum(s, "sundial_read_duration_seconds_count", &[("endpoint", "lookup")]), 1.0);
    assert_eq!(sum(s, "sundial_cluster_generation", &[]), 1.0);
    assert_eq!(sum(s, "sundial_cluster_state", &[("state", "running")]), 1.0);
    assert_eq!(series(s, "sundial_worker_heartbeat_age_seconds").len(), 2);
    assert!(sum(s, "sundial_worker_heartbeat_age_seconds", &[]) < 2.0);
    assert!(sum(s, "sundial_dataflow_live_slots", &[("dataflow", "per_minute")]) >= 17.0);
    assert!(sum(s, "sundial_dataflow_state_bytes", &[("dataflow", "per_minute")]) > 0.0);
    assert!(sum(s, "sundial_epochs_completed_total", &[("dataflow", "per_minute")]) > 0.0);
    let watermark = sum(s, "sundial_watermark_seconds", &[("source", "tx"), ("worker", "0")]);
    assert!(watermark * 1000.0 >= (newest - 1_000) as f64, "watermark {watermark}");
    assert_eq!(sum(s, "sundial_http_ingest_requests_total", &[("status", "200")]), 1.0);

    // Each worker's own endpoint shows its share, with no worker label.
    let own: Vec<prometheus_parse::Scrape> = [&w0_http, &w1_http].iter().map(|a| scrape(a)).collect();
    let per_worker = |metric: &str| own.iter().map(|s| sum(s, metric, &[("source", "tx")])).sum::<f64>();
    assert_eq!(per_worker("sundial_ingest_events_total"), 400.0);
    assert_eq!(per_worker("sundial_ingest_rejected_total"), 5.0);
    assert_eq!(per_worker("sundial_ingest_late_total"), 40.0);
    assert_eq!(sum(&own[1], "sundial_ingest_late_total", &[("source", "tx")]), 40.0);
    assert!(series(&own[0], "sundial_ingest_events_total").iter().all(|l| !l.contains_key("worker")));
    assert_eq!(sum(&own[0], "sundial_worker_computation_running", &[]), 1.0);
    let worker_reads: f64 = own.iter().map(|s| sum(s, "sundial_worker_reads_total", &[])).sum();
    assert!(worker_reads >= 6.0, "reads served by workers: {worker_reads}");

    // A key read at the newest complete epoch asks only the process that owns the key.
    let reads = |scrapes: &[prometheus_parse::Scrape]| -> Vec<f64> {
        scrapes.iter().map(|s| sum(s, "sundial_worker_reads_total", &[])).collect()
    };
    let before = reads(&own);
    let (code, _) = get(&http, "/v1/dataflows/per_minute/keys/3").unwrap();
    assert_eq!(code, 200);
    let after = reads(&[&w0_http, &w1_http].iter().map(|a| scrape(a)).collect::<Vec<_>>());
    let grew: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(grew == [1.0, 0.0] || grew == [0.0, 1.0], "reads per worker grew by {grew:?}");

    // The summary behind the status page and `sundial status`.
    let (_, stats) = get(&http, "/v1/stats").unwrap();
    assert_eq!(stats["ingest"]["accepted"], 400);
    assert_eq!(stats["ingest"]["rejected"], 5);
    assert_eq!(stats["ingest"]["late"], 40);
    assert_eq!(stats["dataflows"][0]["name"], "per_minute");
    assert_eq!(stats["dataflows"][0]["features"].as_array().unwrap().len(), 2);
    assert!(!stats["history"].as_array().unwrap().is_empty());
    let out = Command::new(bin()).args(["--server", &format!("http://{http}"), "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("accepted 400 · rejected 5 · late 40"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("per_minute") && l.contains("tx")), "{text}");

    // Logs: the coordinator's are JSON lines, and a worker logs each batch with rejected lines
    // once, naming the first cause.
    let log = coordinator.log_text();
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "forming generation"), "{log}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "dataflow installed"), "{log}");
    let both = format!("{}{}", w0.log_text(), w1.log_text());
    let refusals: Vec<&str> = both.lines().filter(|l| l.contains("ingest batch had rejected lines")).collect();
    assert_eq!(refusals.len(), 2, "one line per batch with rejected lines:\n{}", refusals.join("\n"));
    // The second batch's first bad line is line 141 of its body.
    assert!(refusals.iter().any(|l| l.contains("line 141")), "{}", refusals.join("\n"));
}

/// A minimal WebDriver (W3C) client over HTTP.
struct Driver {
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Driver {
    fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> Value {
        let response = match (method, body) {
            ("GET", _) => agent.get(url).call(),
            ("DELETE", _) => agent.delete(url).call(),
            (_, body) => agent.post(url).send_json(body.unwrap_or(json!({}))),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {url}: {e}: {text}"));
        assert!(v["value"].get("error").is_none(), "{method} {url}: {v}");
        v["value"].clone()
    }

    fn start(port: u16, chromium: &str) -> Driver {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap().keep();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v = Driver::call(&agent, "POST", &format!("{base}/session"), Some(capabilities));
        let session = v["sessionId"].as_str().unwrap().to_string();
        Driver { base, session, agent }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        Driver::call(&self.agent, "POST", &format!("{}/session/{}{path}", self.base, self.session), Some(body))
    }

    fn get(&self, path: &str) -> Value {
        Driver::call(&self.agent, "GET", &format!("{}/session/{}{path}", self.base, self.session), None)
    }

    fn text(&self, selector: &str) -> String {
        let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;";
        self.post("/execute/sync", json!({"script": script, "args": [selector]}))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.agent.delete(&format!("{}/session/{}", self.base, self.session)).call();
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_status_page_shows_the_workers_and_a_dataflow_in_a_browser() {
    let (chromium, chromedriver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    if !std::path::Path::new(chromium).exists() || !std::path::Path::new(chromedriver).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have {chromium} and {chromedriver} (.ci/run installs the Debian packages chromium and chromium-driver)"
        );
        eprintln!("skipped: {chromium} or {chromedriver} is missing (apt-get install chromium chromium-driver)");
        return;
    }
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: _workers, http, .. } = env.running_pair(1);
    create_catalog(&http);
    let events: Vec<(u64, i64, i64)> = (0..1000).map(|i| (i % 37, BASE + i as i64 * 50, 3)).collect();
    let (code, text) = post(&http, "/v1/sources/tx/events", "application/x-ndjson", ndjson(&events).as_bytes());
    assert_eq!(code, 200, "{text}");

    let port = free_port();
    let log = std::fs::File::create(env.path("chromedriver.log")).unwrap();
    let driver_process = KillOnDrop(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(20), "chromedriver", || {
        let (_, v) = get(&format!("127.0.0.1:{port}"), "/status")?;
        (v["value"]["ready"] == true).then_some(())
    });
    let driver = Driver::start(port, chromium);
    driver.post("/url", json!({"url": format!("http://{http}/")}));

    // The page polls the API every second: wait for it to show what the cluster has.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (workers, dataflows, accepted) = loop {
        let workers = driver.text("#workers tbody");
        let dataflows = driver.text("#dataflows tbody");
        let accepted = driver.text("#accepted");
        let state = driver.text("#state-bytes");
        let rows = workers.lines().filter(|l| l.contains("running")).count();
        if rows == 2 && dataflows.contains("per_minute") && accepted == "1,000" && !state.starts_with("0 ") {
            break (workers, dataflows, accepted);
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show the cluster: workers {workers:?}, dataflows {dataflows:?}, accepted {accepted:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(driver.text("#state"), "running");
    assert!(dataflows.contains("n: count") && dataflows.contains("total: sum(amount)"), "{dataflows}");
    assert!(workers.lines().count() == 2, "{workers}");
    assert_eq!(accepted, "1,000");

    let png = driver.get("/screenshot").as_str().unwrap().to_string();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let file = artifacts.join("status-page.png");
    std::fs::write(&file, &bytes).unwrap();
    eprintln!("screenshot of the status page: {}", file.display());
    drop(driver);
    drop(driver_process);
}
