//! Ingest through the workers' own endpoints (`sundial worker --ingest`) and through `sundial
//! ingest`, which sends batches to every worker in parallel: the export equals the naive model;
//! bad input on a worker's endpoint gets a clear error while good lines are kept; a worker's
//! endpoint answers 503 while the cluster re-forms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use util::*;

const BASE: i64 = 1_700_000_000_000;

fn stream(n: usize) -> Vec<(u64, i64, i64)> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n).map(|i| (next() % 200, BASE + i as i64 * 40 - (next() % 3_000) as i64, (next() % 500) as i64)).collect()
}

fn model(evs: &[(u64, i64, i64)]) -> BTreeMap<(String, String, i64), Value> {
    let mut w: BTreeMap<(u64, i64), (u64, i64)> = BTreeMap::new();
    for (u, t, a) in evs {
        let e = w.entry((*u, t.div_euclid(60_000) * 60_000)).or_default();
        e.0 += 1;
        e.1 += a;
    }
    let mut out = BTreeMap::new();
    for ((u, s), (c, sum)) in w {
        out.insert((u.to_string(), "n".to_string(), s), json!(c));
        out.insert((u.to_string(), "total".to_string(), s), json!(sum));
    }
    out
}

fn export(http: &str, as_of: u64) -> BTreeMap<(String, String, i64), Value> {
    export_paged(http, as_of, 20_000)
}

/// The export, asking each process for `page_keys` keys at a time.
fn export_paged(http: &str, as_of: u64, page_keys: u32) -> BTreeMap<(String, String, i64), Value> {
    let (code, text) = get_text(http, &format!("/v1/dataflows/per_minute/export?as_of={as_of}&page_keys={page_keys}"));
    assert_eq!(code, 200, "{text}");
    parse_export(&text)
}

/// Sends a request head announcing `length` bytes of body, then `partial` of them, and returns
/// whatever the server answers.
fn raw_http(addr: &str, request_line: &str, length: usize, partial: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "{request_line} HTTP/1.1\r\nhost: test\r\ncontent-type: application/x-ndjson\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(partial);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Creates the source `tx` and the dataflow `per_minute` (count and sum per user and minute).
fn create_per_minute(http: &str) {
    let source = json!({"name": "tx", "time": "ts", "allowed_lateness": "5s",
        "fields": {"user_id": "u64", "ts": "i64", "amount": "i64"}});
    assert_eq!(post(http, "/v1/sources", "application/json", source.to_string().as_bytes()).0, 201);
    let definition = json!({"name": "per_minute", "source": "tx", "key": "user_id", "retention": "forever",
        "features": [{"name": "n", "agg": "count", "window": {"tumbling": "1m"}},
                     {"name": "total", "agg": "sum", "field": "amount", "window": {"tumbling": "1m"}}]});
    assert_eq!(post(http, "/v1/dataflows", "application/json", definition.to_string().as_bytes()).0, 201);
}

#[test]
fn workers_ingest_directly_and_the_cli_ingests_in_parallel() {
    let env = Env::new();
    let _coordinator = env.coordinator(2, "127.0.0.1:0", "127.0.0.1:0");
    let (control, http) = env.coordinator_addresses();
    let _w0 = env.ingest_worker("w0", &control, 1);
    let mut w1 = env.ingest_worker("w1", &control, 1);
    let status = wait_state(&http, "running", Duration::from_secs(60));
    let endpoints: Vec<String> =
        status["workers"].as_array().unwrap().iter().map(|w| w["ingest_addr"].as_str().unwrap().to_string()).collect();
    assert_eq!(endpoints.len(), 2);

    create_per_minute(&http);

    // The CLI, in parallel over both workers' endpoints.
    let evs = stream(20_000);
    let file = env.path("events.csv");
    let mut csv = String::from("user_id,ts,amount\n");
    for (u, t, a) in &evs {
        csv.push_str(&format!("{u},{t},{a}\n"));
    }
    std::fs::write(&file, csv).unwrap();
    let out = Command::new(bin())
        .args(["--server", &format!("http://{http}"), "ingest", "tx", file.to_str().unwrap(), "--batch-lines", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("accepted 20000, rejected 0, late 0; visible at epoch "), "{stdout}");
    assert!(stdout.contains("over 2 endpoints"), "{stdout}");
    let epoch: u64 = stdout.split("epoch ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(export(&http, epoch), model(&evs));
    assert_eq!(export_paged(&http, epoch, 7), model(&evs), "an export of many small pages is the same");

    // Two readers at the same epoch get identical answers while ingest continues.
    let feeder = {
        let endpoint = endpoints[0].clone();
        std::thread::spawn(move || {
            for chunk in stream(30_000)[20_000..].chunks(500) {
                let body: String = chunk
                    .iter()
                    .map(|(u, t, a)| format!("{}\n", json!({"user_id": u, "ts": t, "amount": a})))
                    .collect();
                assert_eq!(post(&endpoint, "/v1/sources/tx/events", "application/x-ndjson", body.as_bytes()).0, 200);
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let http = http.clone();
            std::thread::spawn(move || {
                let keys = json!({"keys": (0..200).collect::<Vec<u64>>(), "as_of": epoch});
                (0..5)
                    .map(|_| {
                        let (code, text) = post(
                            &http,
                            "/v1/dataflows/per_minute/lookup",
                            "application/json",
                            keys.to_string().as_bytes(),
                        );
                        assert_eq!(code, 200, "{text}");
                        text
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let answers: Vec<Vec<String>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    feeder.join().unwrap();
    assert!(answers.iter().flatten().all(|a| *a == answers[0][0]), "every read at epoch {epoch} is the same snapshot");
    assert_eq!(export(&http, epoch), model(&evs), "and still the model of what was sent before it");

    // A worker's endpoint directly: good lines are kept, bad ones are listed with their reason.
    let fed: Vec<(u64, i64, i64)> = stream(30_000).split_off(20_000);
    let more = stream(30_100).split_off(30_000);
    let mut body = String::new();
    for (i, (u, t, a)) in more.iter().enumerate() {
        body.push_str(&json!({"user_id": u, "ts": t, "amount": a}).to_string());
        body.push('\n');
        if i == 10 {
            body.push_str("{\"user_id\": \"seven\", \"ts\": 1}\n");
            body.push_str(&format!("{{\"user_id\": 1, \"ts\": {BASE}, \"amount\": \"{}\"}}\n", "x".repeat(1 << 20)));
        }
    }
    let (code, text) = post(&endpoints[1], "/v1/sources/tx/events", "application/x-ndjson", body.as_bytes());
    assert_eq!(code, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((reply["accepted"].as_u64(), reply["rejected"].as_u64()), (Some(100), Some(2)), "{reply}");
    assert_eq!(reply["errors"][0]["line"], 12);
    assert!(reply["errors"][0]["reason"].as_str().unwrap().contains("must be u64"), "{reply}");
    assert!(reply["errors"][1]["reason"].as_str().unwrap().contains("over the limit"), "{reply}");
    let all: Vec<_> = evs.iter().cloned().chain(fed).chain(more).collect();
    assert_eq!(export(&http, reply["epoch"].as_u64().unwrap()), model(&all));

    // Bad requests.
    let (code, text) = post(&endpoints[0], "/v1/sources/nope/events", "text/csv", b"user_id,ts\n1,2\n");
    assert_eq!(code, 404, "{text}");
    assert_eq!(post(&endpoints[0], "/v1/sources/tx/events", "application/x-ndjson", &[0xff, 0xfe, b'\n']).0, 400);
    assert_eq!(post(&endpoints[0], "/v1/sources/tx/events", "image/png", b"x").0, 415);
    let (code, text) = post(&endpoints[0], "/v1/sources/tx/events", "text/csv", b"user_id,amount\n1,2\n");
    assert_eq!(code, 200);
    assert!(text.contains("no column for the event time"), "{text}");
    // A body of 100 MB is refused from its Content-Length, before it is sent; a client that
    // goes away in the middle of a body changes nothing.
    for addr in [&endpoints[0], &http] {
        let answer = raw_http(addr, "POST /v1/sources/tx/events", 100 << 20, b"{\"user_id\": 1");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("larger than"), "{answer}");
        let mut cut = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut cut, b"POST /v1/sources/tx/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\ncontent-length: 1000\r\n\r\n{\"user_id\": 1,").unwrap();
        drop(cut);
    }
    assert_eq!(export(&http, reply["epoch"].as_u64().unwrap()), model(&all), "nothing of the cut bodies was taken");

    // A batch through the coordinator is answered with an epoch that covers every batch
    // acknowledged before it, on any path: the workers' clocks need not agree, and the process
    // taking it may be behind the one that took the batch before.
    let mut all = all;
    let mut t = BASE + 40 * 30_100;
    let mut last = 0;
    for round in 0..24 {
        let mut batch = |endpoint: &str| {
            t += 40;
            let ev = (round % 200, t, round as i64);
            all.push(ev);
            let body = json!({"user_id": ev.0, "ts": ev.1, "amount": ev.2}).to_string();
            let (code, text) = post(endpoint, "/v1/sources/tx/events", "application/x-ndjson", body.as_bytes());
            assert_eq!(code, 200, "{text}");
            serde_json::from_str::<Value>(&text).unwrap()["epoch"].as_u64().unwrap()
        };
        // A few batches straight to one worker (each moves its process's epoch to its clock),
        // then one through the coordinator, which takes turns between the processes.
        let endpoint = &endpoints[(round as usize / 2) % 2];
        let mut direct = 0;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(2));
            direct = direct.max(batch(endpoint));
        }
        let through = batch(&http);
        assert!(through >= direct, "round {round}: the coordinator answered epoch {through} after {direct}");
        last = through;
    }
    assert_eq!(export(&http, last), model(&all), "a read at the last reply's epoch sees every batch");

    // While the cluster re-forms, the surviving worker's endpoint answers 503 with Retry-After.
    let survivor = status["workers"].as_array().unwrap().iter().position(|w| w["pid"] != w1.pid()).unwrap();
    w1.kill9();
    wait_state(&http, "degraded", Duration::from_secs(10));
    let answer = raw_http(&endpoints[survivor], "POST /v1/sources/tx/events", 4, b"x\n\n\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
}

#[test]
fn the_line_port_takes_a_stream_and_cuts_off_bad_clients() {
    use std::io::{BufRead, BufReader, Write};
    let env = Env::new();
    let _coordinator = env.coordinator(1, "127.0.0.1:0", "127.0.0.1:0");
    let (control, http) = env.coordinator_addresses();
    let data = env.path("w0");
    let _w0 = env.spawn(
        "w0",
        &[
            "worker",
            "--coordinator",
            &control,
            "--threads",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
            "--lines",
            "127.0.0.1:0",
        ],
    );
    let status = wait_state(&http, "running", Duration::from_secs(60));
    let port = status["workers"][0]["lines_addr"].as_str().unwrap().to_string();
    create_per_minute(&http);

    // A stream of 25,000 events with one bad line, then the producer closes its side.
    let evs = stream(25_000);
    let mut conn = std::net::TcpStream::connect(&port).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut text = String::from("{\"source\": \"tx\"}\n");
    for (i, (u, t, a)) in evs.iter().enumerate() {
        text.push_str(&json!({"user_id": u, "ts": t, "amount": a}).to_string());
        text.push('\n');
        if i == 99 {
            text.push_str("{\"user_id\": -1, \"ts\": 5}\n");
        }
    }
    conn.write_all(text.as_bytes()).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let replies: Vec<Value> =
        BufReader::new(conn).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(replies.len() >= 3, "batches of at most 10000 lines: {replies:?}");
    let sum = |k: &str| replies.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!((sum("accepted"), sum("rejected"), sum("late")), (25_000, 1, 0), "{replies:?}");
    let bad = replies.iter().flat_map(|r| r["errors"].as_array().cloned().unwrap_or_default()).next().unwrap();
    assert_eq!(bad["line"], 101, "{bad}");
    let epoch = replies.iter().map(|r| r["epoch"].as_u64().unwrap()).max().unwrap();
    assert_eq!(export(&http, epoch), model(&evs));

    // A wrong first line, and a client that never announces its source: an error line, then
    // the connection is closed.
    let mut wrong = std::net::TcpStream::connect(&port).unwrap();
    wrong.write_all(b"hello\n").unwrap();
    let mut answer = String::new();
    BufReader::new(&wrong).read_line(&mut answer).unwrap();
    assert!(answer.contains("the first line must be"), "{answer}");
    let silent = std::net::TcpStream::connect(&port).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let mut lines = BufReader::new(silent).lines();
    let answer = lines.next().unwrap().unwrap();
    assert!(answer.contains("no source announced within"), "{answer}");
    assert!(lines.next().is_none(), "closed after the error");
    assert!(started.elapsed() < Duration::from_secs(20));

    // Meanwhile the port kept serving.
    let mut again = std::net::TcpStream::connect(&port).unwrap();
    again.write_all(b"{\"source\": \"tx\"}\n{\"user_id\": 1, \"ts\": 1700001000000, \"amount\": 1}\n").unwrap();
    again.shutdown(std::net::Shutdown::Write).unwrap();
    let reply: Value = serde_json::from_str(&BufReader::new(again).lines().next().unwrap().unwrap()).unwrap();
    assert_eq!(reply["accepted"], 1, "{reply}");
}
