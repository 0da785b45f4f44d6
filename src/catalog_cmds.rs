//! Client commands for the catalog and the data: `source create`, `submit`, `drop`, `list`,
//! `ingest`, `query`, `export`.

use std::io::{BufRead, BufReader, Read};
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
    /// Lines per request.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
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

/// `sundial ingest SOURCE FILE|-`: sends the file in batches of lines and prints the totals and
/// the epoch at which everything is visible.
pub fn ingest(server: &str, args: &IngestArgs) -> anyhow::Result<()> {
    let csv = match args.format.as_deref() {
        Some("csv") => true,
        Some("ndjson") | Some("json") => false,
        Some(other) => bail!("--format {other:?} is not csv or ndjson"),
        None => args.file.to_ascii_lowercase().ends_with(".csv"),
    };
    if args.batch_lines == 0 {
        bail!("--batch-lines must be at least 1");
    }
    let reader: Box<dyn Read> = if args.file == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file))?)
    };
    let mut lines = BufReader::new(reader).lines();
    let header = if csv {
        match lines.next() {
            Some(line) => Some(line.context("reading the CSV header")?),
            None => bail!("{} is empty: a CSV file needs a header", args.file),
        }
    } else {
        None
    };
    let path = format!("/v1/sources/{}/events", encode(&args.source));
    let content_type = if csv { "text/csv" } else { "application/x-ndjson" };
    let (mut accepted, mut rejected, mut late, mut epoch) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut first_line: u64 = if csv { 2 } else { 1 };
    loop {
        let mut body = String::new();
        if let Some(h) = &header {
            body.push_str(h);
            body.push('\n');
        }
        let mut n = 0;
        for line in lines.by_ref() {
            body.push_str(&line.context("reading the input")?);
            body.push('\n');
            n += 1;
            if n == args.batch_lines {
                break;
            }
        }
        if n == 0 {
            break;
        }
        let response = call_json(server, Method::Post(content_type, body.as_bytes()), &path, TIMEOUT)?;
        let reply = expect_ok(response, "ingest")?;
        accepted += reply["accepted"].as_u64().unwrap_or(0);
        rejected += reply["rejected"].as_u64().unwrap_or(0);
        late += reply["late"].as_u64().unwrap_or(0);
        epoch = epoch.max(reply["epoch"].as_u64().unwrap_or(0));
        // Line numbers in a reply count from the batch's first line.
        for e in reply["errors"].as_array().into_iter().flatten() {
            if errors.len() < 10 {
                let line = e["line"].as_u64().unwrap_or(0) + first_line - if csv { 2 } else { 1 };
                errors.push(format!("line {line}: {}", e["reason"].as_str().unwrap_or("?")));
            }
        }
        first_line += n as u64;
    }
    let mut out = format!("accepted {accepted}, rejected {rejected}, late {late}; visible at epoch {epoch}\n");
    for e in &errors {
        out.push_str(&format!("  {e}\n"));
    }
    emit(&out);
    Ok(())
}
