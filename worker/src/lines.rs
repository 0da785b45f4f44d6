//! The worker's raw TCP line port (`sundial worker --lines ADDR`), for producers that stream
//! continuously.
//!
//! A connection announces its source in a first line, `{"source": "transactions"}`, then sends
//! NDJSON events, one per line. The worker ingests them in batches (every [`BATCH_LINES`] lines,
//! after [`BATCH_WAIT`] without new lines, and at the end) and writes one JSON line per batch:
//! `{"batch": n, "accepted": .., "rejected": .., "late": .., "epoch": .., "errors": [..]}`, where
//! error line numbers count from the connection's first event line. A batch is answered before
//! the next is read, so a producer faster than the computation is slowed down by TCP itself.
//! A connection that does not announce its source within [`HEADER_TIMEOUT`], or stays silent for
//! [`IDLE_TIMEOUT`], gets an error line and is closed; so does one that sends a line longer than
//! [`MAX_LINE_BYTES`] (the rest of it is not buffered).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use sundial_protocol::IngestOutcome;

use crate::supervisor::Event;

/// Lines per batch.
pub const BATCH_LINES: usize = 10_000;
/// A batch is sent after this long without a new line.
pub const BATCH_WAIT: Duration = Duration::from_millis(50);
/// The first line must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest line accepted.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Connections served at once; more are refused with an error line.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves the line port on `listener`, one thread per connection.
pub fn spawn(listener: TcpListener, events: Sender<Event>) -> std::io::Result<()> {
    let active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new().name("sundial:lines-accept".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if active.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
                let _ = writeln!(stream, "{}", json!({"error": "too many connections; try again later"}));
                continue;
            }
            active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (events, active) = (events.clone(), std::sync::Arc::clone(&active));
            let spawned = std::thread::Builder::new().name("sundial:lines".into()).spawn(move || {
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(reason) = serve(stream, &events) {
                    tracing::info!(%peer, "line connection closed: {reason}");
                }
                active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
            if spawned.is_err() {
                tracing::warn!("cannot spawn a thread for a line connection");
            }
        }
    })?;
    Ok(())
}

enum Line {
    Text(String),
    TooLong,
    Timeout,
    End,
}

/// Reads one line of at most `MAX_LINE_BYTES`, without buffering more than that.
fn read_line(reader: &mut BufReader<TcpStream>) -> Result<Line, String> {
    let mut buf = Vec::new();
    let started = Instant::now();
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                if buf.is_empty() {
                    return Ok(Line::Timeout);
                }
                // In the middle of a line: wait for the rest, but not forever.
                if started.elapsed() >= IDLE_TIMEOUT {
                    return Err("timed out in the middle of a line".into());
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() { Line::End } else { Line::Text(String::from_utf8_lossy(&buf).into_owned()) });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if buf.len() + chunk.len() > MAX_LINE_BYTES {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(chunk);
        let consumed = done.unwrap_or(chunk.len());
        reader.consume(consumed);
        if done.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return match String::from_utf8(buf) {
                Ok(s) => Ok(Line::Text(s)),
                Err(_) => Ok(Line::Text("\u{fffd} (invalid UTF-8)".into())),
            };
        }
    }
}

fn send_line(stream: &mut TcpStream, value: &Value) -> Result<(), String> {
    let mut text = value.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

fn ingest(events: &Sender<Event>, source: &str, body: String) -> Result<IngestOutcome, (u16, String)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    events
        .send(Event::LocalIngest { source: source.to_string(), csv: false, body, batch: None, reply: tx })
        .map_err(|_| (503, "the worker is shutting down".to_string()))?;
    rx.blocking_recv().map_err(|_| (503, "the computation ended before it answered".to_string()))?
}

fn serve(stream: TcpStream, events: &Sender<Event>) -> Result<(), String> {
    let mut out = stream.try_clone().map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(HEADER_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let source = match read_line(&mut reader)? {
        Line::Text(header) => {
            match serde_json::from_str::<Value>(&header).ok().and_then(|v| v["source"].as_str().map(String::from)) {
                Some(source) => source,
                None => {
                    send_line(&mut out, &json!({"error": "the first line must be {\"source\": \"NAME\"}"}))?;
                    return Err("no source announced".into());
                }
            }
        }
        Line::Timeout => {
            send_line(&mut out, &json!({"error": format!("no source announced within {HEADER_TIMEOUT:?}")}))?;
            return Err("header timeout".into());
        }
        Line::TooLong => {
            send_line(&mut out, &json!({"error": "the first line is too long"}))?;
            return Err("header too long".into());
        }
        Line::End => return Err("closed before the header".into()),
    };
    reader.get_ref().set_read_timeout(Some(BATCH_WAIT)).map_err(|e| e.to_string())?;
    let mut batch = Batch { body: String::new(), lines: 0, number: 0, first_line: 1, started: Instant::now() };
    let mut last_data = Instant::now();
    loop {
        match read_line(&mut reader)? {
            Line::Text(text) => {
                last_data = Instant::now();
                if batch.lines == 0 {
                    batch.started = Instant::now();
                }
                batch.body.push_str(&text);
                batch.body.push('\n');
                batch.lines += 1;
                if batch.lines >= BATCH_LINES || batch.started.elapsed() >= BATCH_WAIT * 4 {
                    batch.flush(events, &source, &mut out)?;
                }
            }
            Line::Timeout if batch.lines > 0 => batch.flush(events, &source, &mut out)?,
            Line::Timeout if last_data.elapsed() >= IDLE_TIMEOUT => {
                send_line(&mut out, &json!({"error": format!("no data for {IDLE_TIMEOUT:?}; closing")}))?;
                return Err("idle".into());
            }
            Line::Timeout => {}
            Line::End => {
                batch.flush(events, &source, &mut out)?;
                return Ok(());
            }
            Line::TooLong => {
                batch.flush(events, &source, &mut out)?;
                let line = batch.first_line;
                send_line(
                    &mut out,
                    &json!({"error": format!("line {line} is longer than {MAX_LINE_BYTES} bytes; closing")}),
                )?;
                return Err("line too long".into());
            }
        }
    }
}

/// The lines read since the last batch was sent.
struct Batch {
    body: String,
    lines: usize,
    /// Batches sent so far.
    number: u64,
    /// The connection's line number of this batch's first line.
    first_line: u64,
    started: Instant,
}

impl Batch {
    /// Ingests the lines (if any) and writes the batch's reply line.
    fn flush(&mut self, events: &Sender<Event>, source: &str, out: &mut TcpStream) -> Result<(), String> {
        if self.lines == 0 {
            return Ok(());
        }
        self.number += 1;
        let reply = match ingest(events, source, std::mem::take(&mut self.body)) {
            Ok(mut outcome) => {
                for e in &mut outcome.errors {
                    e.line += self.first_line - 1;
                }
                let mut v = serde_json::to_value(outcome).unwrap_or(Value::Null);
                v["batch"] = json!(self.number);
                v
            }
            Err((status, message)) => json!({"batch": self.number, "error": message, "status": status}),
        };
        self.first_line += self.lines as u64;
        self.lines = 0;
        send_line(out, &reply)
    }
}
