//! Client commands for the catalog and the data: `source create`, `submit`, `drop`, `list`,
//! `ingest`, `query`, `export`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use sundial_definition::{parse_document, Format};

use crate::client::{call, call_json, emit, expect_ok, Method};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `sundial source ...`
#[derive(Subcommand, Debug)]
pub enum SourceCmd {
    /// Create a source from a JSON, TOML or YAML file.
    Create {
        /// The file.
        file: PathBuf,
    },
}

/// `sundial ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// The source.
    source: String,
    /// CSV with a header or NDJSON; `-` reads standard input.
    file: String,
    /// `csv` or `ndjson`; by default from the file's extension (`.csv`), else NDJSON.
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// Lines per request. Each endpoint takes one request at a time, and each request costs a
    /// log sync and an epoch: 50,000 lines (1.5 MB of the benchmark's CSV) ingest about 1.4
    /// times as fast as 20,000 (BENCHMARKS.md).
    #[arg(long, value_name = "N", default_value_t = 50_000)]
    batch_lines: usize,
}

/// `sundial query`.
#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The dataflow.
    dataflow: String,
    /// The key; parts of a composite key joined by `,`.
    key: String,
    /// Read at this epoch (from an ingest reply) instead of the newest complete one.
    #[arg(long, value_name = "EPOCH")]
    as_of: Option<u64>,
}

fn document(file: &Path) -> anyhow::Result<Value> {
    let format = Format::from_path(file)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    parse_document::<Value>(&text, format).with_context(|| format!("{} does not parse", file.display()))
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(value)?));
    Ok(())
}

fn post_json(server: &str, path: &str, body: &Value, what: &str) -> anyhow::Result<Value> {
    let bytes = serde_json::to_vec(body)?;
    let response = call_json(server, Method::Post("application/json", &bytes), path, TIMEOUT)?;
    if !(200..300).contains(&response.status) {
        let message = response.body.get("error").and_then(Value::as_str).unwrap_or("no error message");
        bail!("{what}: the coordinator answered {}: {message}", response.status);
    }
    Ok(response.body)
}

/// `sundial source create FILE`.
pub fn source(server: &str, cmd: &SourceCmd) -> anyhow::Result<()> {
    let SourceCmd::Create { file } = cmd;
    let created = post_json(server, "/v1/sources", &document(file)?, "creating the source")?;
    print_json(&created)
}

/// `sundial submit FILE`.
pub fn submit(server: &str, file: &Path) -> anyhow::Result<()> {
    let created = post_json(server, "/v1/dataflows", &document(file)?, "submitting the dataflow")?;
    print_json(&created)
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `sundial drop NAME`.
pub fn drop(server: &str, name: &str) -> anyhow::Result<()> {
    let response = call_json(server, Method::Delete, &format!("/v1/dataflows/{}", encode(name)), TIMEOUT)?;
    expect_ok(response, "dropping the dataflow")?;
    emit(&format!("dropped {name}\n"));
    Ok(())
}

/// `sundial list`.
pub fn list(server: &str) -> anyhow::Result<()> {
    let sources = expect_ok(call_json(server, Method::Get, "/v1/sources", TIMEOUT)?, "listing sources")?;
    let dataflows = expect_ok(call_json(server, Method::Get, "/v1/dataflows", TIMEOUT)?, "listing dataflows")?;
    let mut out = String::from("SOURCES\n");
    for s in sources["sources"].as_array().into_iter().flatten() {
        let fields: Vec<String> = s["fields"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or("?"))).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<20} time={} fields={}\n",
            s["name"].as_str().unwrap_or("?"),
            s["time"],
            fields.join(",")
        ));
    }
    out.push_str("DATAFLOWS\n");
    for d in dataflows["dataflows"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<20} source={} key={} features={} retention={}\n",
            d["name"].as_str().unwrap_or("?"),
            d["source"].as_str().unwrap_or("?"),
            d["key"],
            d["features"],
            d["retention"].as_str().unwrap_or("?"),
        ));
    }
    emit(&out);
    Ok(())
}

/// `sundial query DATAFLOW KEY`.
pub fn query(server: &str, args: &QueryArgs) -> anyhow::Result<()> {
    let mut path = format!("/v1/dataflows/{}/keys/{}", encode(&args.dataflow), encode(&args.key));
    if let Some(e) = args.as_of {
        path.push_str(&format!("?as_of={e}"));
    }
    let value = expect_ok(call_json(server, Method::Get, &path, TIMEOUT)?, "query")?;
    print_json(&value)
}

/// `sundial export DATAFLOW`.
pub fn export(server: &str, dataflow: &str) -> anyhow::Result<()> {
    let (status, text) = call(server, Method::Get, &format!("/v1/dataflows/{}/export", encode(dataflow)), TIMEOUT)?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| text.clone());
        bail!("export: the coordinator answered {status}: {message}");
    }
    emit(&text);
    Ok(())
}

/// One batch of lines on its way to a worker.
struct Batch {
    /// The header (CSV) and the lines, UTF-8.
    body: Vec<u8>,
    /// The input line number of the batch's first event line.
    first_line: u64,
    /// Its batch id: this run's producer id and the batch's number.
    id: String,
    lines: u64,
    bytes: u64,
}

#[derive(Default)]
struct Totals {
    accepted: u64,
    rejected: u64,
    late: u64,
    epoch: u64,
    errors: Vec<(u64, String)>,
    failed: Option<String>,
}

/// Where batches go: every worker's own ingest endpoint when they all have one (by process
/// index; a restarted worker may come back at another address, so they are looked up again
/// after a failure), else the coordinator.
struct Targets {
    server: String,
    workers: bool,
    addresses: std::sync::Mutex<Vec<String>>,
}

impl Targets {
    fn lookup(server: &str) -> Option<Vec<String>> {
        let r = call_json(server, Method::Get, "/v1/cluster", TIMEOUT).ok()?;
        r.body["workers"]
            .as_array()
            .map(|ws| ws.iter().map(|w| w["ingest_addr"].as_str().map(|a| format!("http://{a}"))).collect())
            .and_then(|v: Vec<Option<String>>| v.into_iter().collect())
            .filter(|v: &Vec<String>| !v.is_empty())
    }

    fn new(server: &str) -> Targets {
        let (workers, addresses) = match Targets::lookup(server) {
            Some(ws) => (true, ws),
            None => (false, vec![server.to_string()]),
        };
        Targets { server: server.to_string(), workers, addresses: std::sync::Mutex::new(addresses) }
    }

    fn len(&self) -> usize {
        self.addresses.lock().map_or(1, |a| a.len())
    }

    fn address(&self, index: usize) -> String {
        self.addresses.lock().ok().and_then(|a| a.get(index).cloned()).unwrap_or_else(|| self.server.clone())
    }

    /// Looks the workers' addresses up again (after a failure).
    fn refresh(&self) {
        if !self.workers {
            return;
        }
        if let Some(fresh) = Targets::lookup(&self.server) {
            if let Ok(mut a) = self.addresses.lock() {
                if fresh.len() == a.len() {
                    *a = fresh;
                }
            }
        }
    }
}

/// Posts one batch to the process at `index`, with its batch id, retrying for up to a minute
/// while the cluster answers 503 (re-forming) or 409 (an earlier attempt is still running), or
/// the process cannot be reached (it may be restarting, perhaps at another address). The batch
/// id makes the retries safe: a batch that was logged but whose answer was lost is answered from
/// the log, not ingested twice.
fn post_batch(
    targets: &Targets,
    index: usize,
    path: &str,
    content_type: &str,
    body: &[u8],
    batch: &str,
) -> Result<Value, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut pause = Duration::from_millis(100);
    let headers = [(sundial_protocol::BATCH_HEADER, batch)];
    loop {
        let target = targets.address(index);
        let outcome = call_json(&target, Method::PostWith(content_type, body, &headers), path, TIMEOUT);
        let retry = match &outcome {
            Ok(r) if (200..300).contains(&r.status) => return Ok(r.body.clone()),
            Ok(r) if r.status == 503 || r.status == 409 => {
                format!("{}: {}", r.status, r.body["error"].as_str().unwrap_or("not ready"))
            }
            Ok(r) => {
                return Err(format!("{} answered {}: {}", target, r.status, r.body["error"].as_str().unwrap_or("?")))
            }
            Err(e) => format!("{e:#}"),
        };
        if std::time::Instant::now() + pause > deadline {
            return Err(format!("{target}: gave up after a minute: {retry}"));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
        targets.refresh();
    }
}

/// `sundial ingest SOURCE FILE|-`: sends the file in batches of lines, to every worker's ingest
/// endpoint in parallel (each worker gets every n-th batch, in order, so each ingest partition
/// sees the stream in order), with a progress bar on a terminal; prints the totals and the epoch
/// at which everything is visible.
pub fn ingest(server: &str, args: &IngestArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let csv = match args.format.as_deref() {
        Some("csv") => true,
        Some("ndjson") | Some("json") => false,
        Some(other) => bail!("--format {other:?} is not csv or ndjson"),
        None => args.file.to_ascii_lowercase().ends_with(".csv"),
    };
    if args.batch_lines == 0 {
        bail!("--batch-lines must be at least 1");
    }
    let (reader, total_bytes): (Box<dyn Read>, Option<u64>) = if args.file == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file))?;
        let len = file.metadata().ok().map(|m| m.len());
        (Box::new(file), len)
    };
    let mut input = crate::batches::LineBatches::new(reader, args.batch_lines);
    if csv && input.read_header().context("reading the CSV header")?.is_none() {
        bail!("{} is empty: a CSV file needs a header", args.file);
    }
    let path = format!("/v1/sources/{}/events", encode(&args.source));
    let content_type = if csv { "text/csv" } else { "application/x-ndjson" };
    let targets = Arc::new(Targets::new(server));
    let producer = format!("{:016x}", rand::random::<u64>());

    let totals = Arc::new(Mutex::new(Totals::default()));
    let done_events = Arc::new(AtomicU64::new(0));
    let done_bytes = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for index in 0..targets.len() {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
        senders.push(tx);
        let (targets, path, totals) = (Arc::clone(&targets), path.clone(), Arc::clone(&totals));
        let (done_events, done_bytes) = (Arc::clone(&done_events), Arc::clone(&done_bytes));
        threads.push(std::thread::spawn(move || {
            for batch in rx {
                let result = post_batch(&targets, index, &path, content_type, &batch.body, &batch.id);
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(reply) => {
                        t.accepted += reply["accepted"].as_u64().unwrap_or(0);
                        t.rejected += reply["rejected"].as_u64().unwrap_or(0);
                        t.late += reply["late"].as_u64().unwrap_or(0);
                        t.epoch = t.epoch.max(reply["epoch"].as_u64().unwrap_or(0));
                        // Line numbers in a reply count from the batch body's first line (the
                        // CSV header is line 1 there).
                        for e in reply["errors"].as_array().into_iter().flatten() {
                            let line = e["line"].as_u64().unwrap_or(0) + batch.first_line - if csv { 2 } else { 1 };
                            t.errors.push((line, e["reason"].as_str().unwrap_or("?").to_string()));
                        }
                    }
                    Err(e) => {
                        t.failed.get_or_insert(e);
                    }
                }
                done_events.fetch_add(batch.lines, Ordering::Relaxed);
                done_bytes.fetch_add(batch.bytes, Ordering::Relaxed);
            }
        }));
    }

    let started = std::time::Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal {
        let bar = match total_bytes {
            Some(total) => indicatif::ProgressBar::new(total),
            None => indicatif::ProgressBar::new_spinner(),
        };
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Some(bar)
    } else {
        None
    };
    let mut last_report = std::time::Instant::now();
    let report = |bar: &Option<indicatif::ProgressBar>, last: &mut std::time::Instant, force: bool| {
        let events = done_events.load(Ordering::Relaxed);
        let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-9);
        match bar {
            Some(bar) => {
                bar.set_position(done_bytes.load(Ordering::Relaxed));
                bar.set_message(format!("{events} events, {rate:.0} events/s"));
            }
            None if force || last.elapsed() >= Duration::from_secs(2) => {
                eprintln!("ingested {events} events ({rate:.0} events/s)");
                *last = std::time::Instant::now();
            }
            None => {}
        }
    };

    let mut first_line: u64 = if csv { 2 } else { 1 };
    let mut k = 0usize;
    let mut read_error = None;
    loop {
        match input.next_batch() {
            Ok(Some(cut)) => {
                let id = format!("{producer}-{k}");
                let batch = Batch { body: cut.body, first_line, lines: cut.lines, bytes: cut.bytes, id };
                first_line += cut.lines;
                if senders[k % senders.len()].send(batch).is_err() {
                    break;
                }
                k += 1;
                report(&bar, &mut last_report, false);
            }
            Ok(None) => break,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    std::mem::drop(senders);
    for t in threads {
        let _ = t.join();
    }
    report(&bar, &mut last_report, true);
    if let Some(bar) = &bar {
        bar.finish();
    }
    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
    t.errors.sort();
    let secs = started.elapsed().as_secs_f64();
    let mut out = format!(
        "accepted {}, rejected {}, late {}; visible at epoch {} ({:.0} events/s over {} endpoint{})\n",
        t.accepted,
        t.rejected,
        t.late,
        t.epoch,
        (t.accepted + t.rejected + t.late) as f64 / secs.max(1e-9),
        targets.len(),
        if targets.len() == 1 { "" } else { "s" }
    );
    for (line, reason) in t.errors.iter().take(10) {
        out.push_str(&format!("  line {line}: {reason}\n"));
    }
    emit(&out);
    if let Some(e) = read_error {
        bail!("reading {}: {e} (the lines before were sent)", args.file);
    }
    if let Some(e) = &t.failed {
        bail!("some batches were not ingested: {e}");
    }
    Ok(())
}
