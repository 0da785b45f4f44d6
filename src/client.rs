//! Client commands: talk to the coordinator's HTTP API and print for people (or `--json`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

/// `sundial status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the coordinator's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also run the diagnostic exchange, which proves that every worker thread of every process
    /// exchanges data with every other; exits non-zero if it does not.
    #[arg(long)]
    check: bool,
}

/// A response of the API: status code and parsed JSON body.
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

/// The methods client commands use.
pub enum Method<'a> {
    Get,
    Delete,
    /// POST with a content type and a body.
    Post(&'a str, &'a [u8]),
    /// POST with a content type, a body and more headers.
    PostWith(&'a str, &'a [u8], &'a [(&'a str, &'a str)]),
}

/// Calls `path` on the coordinator at `server`; returns the status and the raw body text.
pub fn call(server: &str, method: Method<'_>, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let base = server.trim_end_matches('/');
    let url = format!("{base}{path}");
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let response = match method {
        Method::Get => agent.get(&url).call(),
        Method::Delete => agent.delete(&url).call(),
        Method::Post(content_type, body) => agent.post(&url).header("content-type", content_type).send(body),
        Method::PostWith(content_type, body, headers) => {
            let mut request = agent.post(&url).header("content-type", content_type);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.send(body)
        }
    };
    let mut response = response.with_context(|| {
        format!("cannot reach the coordinator at {base} (is `sundial local` running? --server or SUNDIAL_SERVER selects another)")
    })?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .with_context(|| format!("reading the answer of {url}"))?;
    Ok((status, text))
}

/// Calls `path` and parses the JSON answer.
pub fn call_json(server: &str, method: Method<'_>, path: &str, timeout: Duration) -> anyhow::Result<ApiResponse> {
    let (status, text) = call(server, method, path, timeout)?;
    let body = serde_json::from_str(&text)
        .with_context(|| format!("{path} answered {status} with something that is not JSON"))?;
    Ok(ApiResponse { status, body })
}

/// GETs `path` from the coordinator at `server`.
pub fn get(server: &str, path: &str, timeout: Duration) -> anyhow::Result<ApiResponse> {
    call_json(server, Method::Get, path, timeout)
}

pub fn expect_ok(response: ApiResponse, what: &str) -> anyhow::Result<Value> {
    if (200..300).contains(&response.status) {
        return Ok(response.body);
    }
    let message = response.body.get("error").and_then(Value::as_str).unwrap_or("no error message");
    bail!("{what}: the coordinator answered {}: {message}", response.status)
}

/// Prints the cluster's health; with `--check`, also runs the diagnostic exchange.
pub fn status(server: &str, args: &StatusArgs) -> anyhow::Result<()> {
    let cluster = expect_ok(get(server, "/v1/cluster", Duration::from_secs(10))?, "cluster status")?;
    let stats = expect_ok(get(server, "/v1/stats", Duration::from_secs(10))?, "cluster stats")?;
    let check = if args.check {
        Some(expect_ok(get(server, "/v1/cluster/check", Duration::from_secs(30))?, "exchange check")?)
    } else {
        None
    };
    let check_ok = check.as_ref().map(|c| c.get("ok").and_then(Value::as_bool) == Some(true));
    if args.json {
        let mut out = serde_json::json!({"cluster": cluster, "stats": stats});
        if let Some(check) = check {
            out["check"] = check;
        }
        emit(&format!("{}\n", serde_json::to_string_pretty(&out)?));
    } else {
        let mut out = String::new();
        print_cluster(&mut out, &cluster);
        print_stats(&mut out, &stats);
        if let Some(check) = &check {
            print_check(&mut out, check);
        }
        emit(&out);
    }
    if check_ok == Some(false) {
        bail!("the exchange check failed: some worker thread did not receive every record");
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`sundial status | head`) is not an error.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_cluster(out: &mut String, c: &Value) {
    let _ = writeln!(
        out,
        "cluster {} · generation {} · {}/{} workers · {} threads each",
        text(c, "state"),
        text(c, "generation"),
        text(c, "registered_workers"),
        text(c, "expected_workers"),
        text(c, "threads_per_worker"),
    );
    if let Some(reason) = c.get("reason").and_then(Value::as_str) {
        let _ = writeln!(out, "reason: {reason}");
    }
    let _ = writeln!(
        out,
        "{:<6} {:<9} {:<16} {:<22} {:<8} {:<10} ID",
        "INDEX", "STATE", "HOST", "DATA ADDR", "PID", "HEARTBEAT"
    );
    for w in c.get("workers").and_then(Value::as_array).into_iter().flatten() {
        let heartbeat = w
            .get("last_heartbeat_ms_ago")
            .and_then(Value::as_u64)
            .map_or("-".to_string(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0));
        let _ = writeln!(
            out,
            "{:<6} {:<9} {:<16} {:<22} {:<8} {:<10} {}",
            text(w, "index"),
            text(w, "state"),
            text(w, "host"),
            text(w, "data_addr"),
            text(w, "pid"),
            heartbeat,
            text(w, "id"),
        );
        if let Some(reason) = w.get("lost_reason").and_then(Value::as_str) {
            let _ = writeln!(out, "       lost: {reason}");
        }
    }
}

/// A count with thousands separators.
fn count(v: Option<u64>) -> String {
    let Some(n) = v else { return "-".into() };
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn per_second(v: Option<f64>) -> String {
    match v {
        Some(r) if r >= 1e6 => format!("{:.2}M/s", r / 1e6),
        Some(r) if r >= 1e3 => format!("{:.1}k/s", r / 1e3),
        Some(r) => format!("{r:.0}/s"),
        None => "-".into(),
    }
}

fn size(v: Option<u64>) -> String {
    let Some(n) = v else { return "-".into() };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

fn millis(v: Option<u64>) -> String {
    match v {
        Some(ms) if ms >= 1000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{ms}ms"),
        None => "-".into(),
    }
}

/// The health summary of `GET /v1/stats`: rates, totals, and per dataflow and source.
fn print_stats(out: &mut String, s: &Value) {
    let ingest = &s["ingest"];
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "ingest {} · reads {} · accepted {} · rejected {} · late {} · state {}",
        per_second(ingest["events_per_second"].as_f64()),
        per_second(s["reads"]["per_second"].as_f64()),
        count(ingest["accepted"].as_u64()),
        count(ingest["rejected"].as_u64()),
        count(ingest["late"].as_u64()),
        size(s["state_bytes"].as_u64()),
    );
    let dataflows = s["dataflows"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !dataflows.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>9} {:>12} {:>11} {:>12}",
            "DATAFLOW", "SOURCE", "FEATURES", "LIVE GROUPS", "STATE", "READ LAG"
        );
        for d in dataflows {
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:>9} {:>12} {:>11} {:>12}",
                text(d, "name"),
                text(d, "source"),
                d["features"].as_array().map_or(0, Vec::len),
                count(d["live_slots"].as_u64()),
                size(d["state_bytes"].as_u64()),
                millis(d["epoch_lag_ms"].as_u64()),
            );
        }
    }
    let sources = s["sources"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !sources.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:>14} {:>10} {:>10} {:>15}",
            "SOURCE", "ACCEPTED", "REJECTED", "LATE", "WATERMARK LAG"
        );
        for src in sources {
            let _ = writeln!(
                out,
                "{:<24} {:>14} {:>10} {:>10} {:>15}",
                text(src, "name"),
                count(src["accepted"].as_u64()),
                count(src["rejected"].as_u64()),
                count(src["late"].as_u64()),
                millis(src["watermark_lag_ms"].as_u64()),
            );
        }
    }
}

fn print_check(out: &mut String, check: &Value) {
    let rows: Vec<Vec<u64>> = check
        .get("received")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .map(|r| r.as_array().map(|r| r.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    let ok = check.get("ok").and_then(Value::as_bool) == Some(true);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "exchange check (generation {}): {} · {} processes × {} threads · {} records per pair",
        text(check, "generation"),
        if ok { "OK, all-to-all" } else { "FAILED" },
        text(check, "processes"),
        text(check, "threads"),
        text(check, "records_per_pair"),
    );
    let _ = writeln!(out, "records received by worker (row) from worker (column):");
    for (to, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|n| format!("{n:>5}")).collect();
        let _ = writeln!(out, "  w{to:<3}{}", cells.join(""));
    }
}
