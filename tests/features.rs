//! Features end to end on a cluster of 2 worker processes × 2 threads over loopback: sources and
//! definitions through the HTTP API (with their validation errors), a generated out-of-order
//! stream ingested through the coordinator in batches, and the export compared with a naive
//! model computed in this test; reads of one key and of many keys at the epoch an ingest reply
//! named (read-your-writes); dropping a dataflow; and the catalog replayed to a new generation
//! after a worker is killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use util::*;

const BASE: i64 = 1_700_000_000_000;

fn request(http: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{http}{path}");
    let mut response = match method {
        "POST" => agent.post(&url).header("content-type", content_type).send(body).unwrap(),
        "DELETE" => agent.delete(&url).call().unwrap(),
        _ => agent.get(&url).call().unwrap(),
    };
    let status = response.status().as_u16();
    (status, response.body_mut().with_config().limit(1 << 30).read_to_string().unwrap())
}

fn post_json(http: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = request(http, "POST", path, "application/json", body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A deterministic stream: (user, ts, amount, merchant), event time advancing with jitter.
fn events(n: usize) -> Vec<(u64, i64, i64, String)> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| {
            let user = next() % 50;
            let ts = BASE + i as i64 * 1_500 - (next() % 4_000) as i64;
            let amount = (next() % 1_000) as i64 + 1;
            let merchant = format!("m{}", next() % 7);
            (user, ts, amount, merchant)
        })
        .collect()
}

type Model = BTreeMap<(String, String, i64), Value>;

fn model(evs: &[(u64, i64, i64, String)]) -> Model {
    let mut out: Model = BTreeMap::new();
    let mut w1: BTreeMap<(u64, i64), (u64, i64)> = BTreeMap::new();
    let mut w2: BTreeMap<(u64, i64), (u64, i64, i64)> = BTreeMap::new();
    for (user, ts, amount, _) in evs {
        let minute = ts.div_euclid(60_000) * 60_000;
        let e = w1.entry((*user, minute)).or_default();
        e.0 += 1;
        e.1 += amount;
        for k in 0..10 {
            let e = w2.entry((*user, minute - k * 60_000)).or_insert((0, 0, i64::MIN));
            e.0 += 1;
            e.1 += amount;
            e.2 = e.2.max(*amount);
        }
    }
    for ((user, start), (count, sum)) in w1 {
        out.insert((user.to_string(), "count_1m".into(), start), json!(count));
        out.insert((user.to_string(), "sum_1m".into(), start), json!(sum));
    }
    for ((user, start), (count, sum, max)) in w2 {
        out.insert((user.to_string(), "count_10m".into(), start), json!(count));
        out.insert((user.to_string(), "sum_10m".into(), start), json!(sum));
        out.insert((user.to_string(), "max_10m".into(), start), json!(max));
    }
    out
}

fn export(http: &str, dataflow: &str, as_of: Option<u64>) -> Model {
    match as_of {
        Some(e) => export_query(http, dataflow, &format!("as_of={e}")),
        None => export_query(http, dataflow, ""),
    }
}

fn export_query(http: &str, dataflow: &str, query: &str) -> Model {
    let path = format!("/v1/dataflows/{dataflow}/export?{query}");
    let (status, text) = request(http, "GET", &path, "", b"");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let key = v["key"][0].as_str().unwrap().to_string();
            (
                (key, v["feature"].as_str().unwrap().to_string(), v["start"].as_i64().unwrap_or(i64::MIN)),
                v["value"].clone(),
            )
        })
        .collect()
}

#[test]
fn a_cluster_computes_what_the_model_computes() {
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: [_w0, mut w1], control, http, .. } = env.running_pair(2);

    // Validation errors name the offending part; nothing is installed.
    let source = json!({"name": "tx", "time": "ts", "allowed_lateness": "5s",
        "fields": {"user_id": "u64", "ts": "i64", "amount": "i64", "merchant": "string"}});
    let (code, body) = post_json(
        &http,
        "/v1/dataflows",
        &json!({"name": "x", "source": "tx", "key": "user_id",
        "features": [{"name": "c", "agg": "count", "window": "global"}]}),
    );
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("no source named \"tx\""), "{body}");
    let (code, _) = post_json(&http, "/v1/sources", &source);
    assert_eq!(code, 201);
    let (code, _) = post_json(&http, "/v1/sources", &source);
    assert_eq!(code, 200, "the same source again is accepted");
    let mut other = source.clone();
    other["fields"]["amount"] = json!("f64");
    assert_eq!(post_json(&http, "/v1/sources", &other).0, 409);
    let (code, body) = post_json(
        &http,
        "/v1/dataflows",
        &json!({"name": "x", "source": "tx", "key": "user_id",
        "features": [{"name": "s", "agg": "sum", "field": "merchant", "window": {"hopping": {"size": "10m", "hop": "3m"}}}]}),
    );
    assert_eq!(code, 400);
    let problems = body["problems"].as_array().unwrap();
    assert!(problems
        .iter()
        .any(|p| p.as_str().unwrap().contains("sum needs a numeric field, but \"merchant\" is string")));
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("hop 3m does not divide size 10m")));
    let (code, body) = post_json(&http, "/v1/dataflows", &json!({"name": "x"}));
    assert_eq!(code, 400, "{body}");

    let definition = json!({"name": "spend", "source": "tx", "key": ["user_id"], "retention": "forever",
    "features": [
        {"name": "count_1m", "agg": "count", "window": {"tumbling": "1m"}},
        {"name": "sum_1m", "agg": "sum", "field": "amount", "window": {"tumbling": "1m"}},
        {"name": "count_10m", "agg": "count", "window": {"hopping": {"size": "10m", "hop": "1m"}}},
        {"name": "sum_10m", "agg": "sum", "field": "amount", "window": {"hopping": {"size": "10m", "hop": "1m"}}},
        {"name": "max_10m", "agg": "max", "field": "amount", "window": {"hopping": {"size": "10m", "hop": "1m"}}}
    ]});
    let (code, body) = post_json(&http, "/v1/dataflows", &definition);
    assert_eq!(code, 201, "{body}");
    assert_eq!(post_json(&http, "/v1/dataflows", &definition).0, 409);
    let (code, body) = post_json(
        &http,
        "/v1/dataflows",
        &json!({"name": "big_spenders", "source": "tx", "key": "merchant",
        "filter": "amount > 900", "features": [{"name": "n", "agg": "count", "window": "global"}]}),
    );
    assert_eq!(code, 201, "{body}");

    // Ingest in batches, NDJSON and CSV; every batch is readable at the epoch of its reply.
    let evs = events(3_000);
    let mut last_epoch = 0;
    for (b, chunk) in evs.chunks(500).enumerate() {
        let (content_type, body) = if b % 2 == 0 {
            let lines: String = chunk
                .iter()
                .map(|(u, t, a, m)| format!("{}\n", json!({"user_id": u, "ts": t, "amount": a, "merchant": m})))
                .collect();
            ("application/x-ndjson", lines)
        } else {
            let mut csv = String::from("user_id,ts,amount,merchant\n");
            for (u, t, a, m) in chunk {
                csv.push_str(&format!("{u},{t},{a},{m}\n"));
            }
            ("text/csv", csv)
        };
        let (code, text) = request(&http, "POST", "/v1/sources/tx/events", content_type, body.as_bytes());
        assert_eq!(code, 200, "{text}");
        let reply: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["accepted"], 500, "{reply}");
        assert_eq!(reply["rejected"], 0);
        assert_eq!(reply["late"], 0);
        let epoch = reply["epoch"].as_u64().unwrap();
        assert!(epoch >= last_epoch);
        last_epoch = epoch;
        // Read-your-writes: the model of everything sent so far, at the reply's epoch.
        if b == 2 {
            let sent = &evs[..(b + 1) * 500];
            assert_eq!(export(&http, "spend", Some(epoch)), model(sent));
        }
    }
    assert_eq!(export(&http, "spend", Some(last_epoch)), model(&evs));
    // The same export in pages of 3 keys per process (each process merges its two threads' pages).
    assert_eq!(export_query(&http, "spend", &format!("page_keys=3&as_of={last_epoch}")), model(&evs));

    // One key, and many keys in request order, at the same epoch.
    let (code, text) = request(&http, "GET", &format!("/v1/dataflows/spend/keys/7?as_of={last_epoch}"), "", b"");
    assert_eq!(code, 200, "{text}");
    let one: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(one["as_of"], last_epoch);
    assert_eq!(one["key"], json!(["7"]));
    let want = model(&evs);
    for w in one["features"]["sum_10m"].as_array().unwrap() {
        assert_eq!(want[&("7".to_string(), "sum_10m".to_string(), w["start"].as_i64().unwrap())], w["value"]);
    }
    let (code, many) =
        post_json(&http, "/v1/dataflows/spend/lookup", &json!({"keys": [[7], "3", [999]], "as_of": last_epoch}));
    assert_eq!(code, 200, "{many}");
    let results = many["results"].as_array().unwrap();
    assert_eq!(results[0]["features"], one["features"]);
    assert_eq!(results[1]["key"], json!(["3"]));
    assert_eq!(results[2]["features"], json!({}), "a key with no data has an empty feature set");

    // Errors of reads.
    assert_eq!(request(&http, "GET", "/v1/dataflows/nope/keys/1", "", b"").0, 404);
    assert_eq!(request(&http, "GET", "/v1/dataflows/spend/keys/abc", "", b"").0, 400);
    let (code, text) = request(&http, "GET", "/v1/dataflows/spend/keys/1?as_of=99999999999999&timeout_ms=500", "", b"");
    assert!(code == 504, "{code} {text}");
    let (code, text) =
        request(&http, "POST", "/v1/sources/tx/events", "application/x-ndjson", b"{\"user_id\": 1}\nnot json\n");
    assert_eq!(code, 200);
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["rejected"], 2, "{reply}");
    assert_eq!(reply["errors"][1]["line"], 2, "{reply}");
    assert_eq!(request(&http, "POST", "/v1/sources/nope/events", "text/csv", b"a\n").0, 404);
    assert_eq!(request(&http, "POST", "/v1/sources/tx/events", "image/png", b"x").0, 415);

    // An event far behind the watermark is late: dropped, counted, and kept for inspection.
    let old = json!({"user_id": 1, "ts": BASE - 3_600_000, "amount": 5, "merchant": "late"});
    let (code, text) =
        request(&http, "POST", "/v1/sources/tx/events", "application/x-ndjson", format!("{old}\n").as_bytes());
    assert_eq!(code, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((reply["accepted"].as_u64(), reply["late"].as_u64()), (Some(0), Some(1)), "{reply}");
    let (code, text) = request(&http, "GET", "/v1/sources/tx/late", "", b"");
    assert_eq!(code, 200);
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, vec![old]);
    assert_eq!(export(&http, "spend", None), model(&evs), "the late event changed nothing");

    // The filtered dataflow counts only amounts over 900, per merchant.
    let big = export(&http, "big_spenders", Some(last_epoch));
    let mut want_big: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, a, m) in &evs {
        if *a > 900 {
            *want_big.entry(m.clone()).or_default() += 1;
        }
    }
    let got_big: BTreeMap<String, u64> = big.into_iter().map(|((k, _, _), v)| (k, v.as_u64().unwrap())).collect();
    assert_eq!(got_big, want_big);

    // Drop one dataflow while events flow into the source it shares with another: the other
    // keeps every event.
    let more: Vec<(u64, i64, i64, String)> = events(4_000).split_off(3_000);
    let feeder = {
        let http = http.clone();
        let more = more.clone();
        std::thread::spawn(move || {
            let mut epoch = 0;
            for chunk in more.chunks(100) {
                let lines: String = chunk
                    .iter()
                    .map(|(u, t, a, m)| format!("{}\n", json!({"user_id": u, "ts": t, "amount": a, "merchant": m})))
                    .collect();
                let (code, text) =
                    request(&http, "POST", "/v1/sources/tx/events", "application/x-ndjson", lines.as_bytes());
                assert_eq!(code, 200, "{text}");
                let reply: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(reply["accepted"], 100, "{reply}");
                epoch = reply["epoch"].as_u64().unwrap();
            }
            epoch
        })
    };
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(request(&http, "DELETE", "/v1/dataflows/big_spenders", "", b"").0, 200);
    let final_epoch = feeder.join().unwrap();
    let mut all: Vec<_> = evs.iter().cloned().chain(more).collect();
    assert_eq!(export(&http, "spend", Some(final_epoch)), model(&all));
    assert_eq!(request(&http, "GET", "/v1/dataflows/big_spenders/export", "", b"").0, 404);
    assert_eq!(request(&http, "DELETE", "/v1/dataflows/big_spenders", "", b"").0, 404);

    // Created again under the same name with another feature: key reads, which the
    // computations answer from what their worker threads publish, see the new dataflow only
    // (the dropped one counted m1's large amounts, the new one counts from its creation on).
    let (code, body) = post_json(
        &http,
        "/v1/dataflows",
        &json!({"name": "big_spenders", "source": "tx", "key": "merchant",
        "features": [{"name": "n_all", "agg": "count", "window": "global"}]}),
    );
    assert_eq!(code, 201, "{body}");
    let newest = all.iter().map(|e| e.1).max().unwrap();
    let line = format!("{}\n", json!({"user_id": 1, "ts": newest, "amount": 1, "merchant": "m1"}));
    let (code, text) = request(&http, "POST", "/v1/sources/tx/events", "application/x-ndjson", line.as_bytes());
    assert_eq!(code, 200, "{text}");
    let epoch = serde_json::from_str::<Value>(&text).unwrap()["epoch"].as_u64().unwrap();
    all.push((1, newest, 1, "m1".to_string()));
    let read_m1 = |query: &str| {
        let (code, read) = get(&http, &format!("/v1/dataflows/big_spenders/keys/m1{query}")).unwrap();
        assert_eq!(code, 200, "{read}");
        read
    };
    // At the reply's epoch (waiting for it), and without `as_of` once the newest complete epoch
    // has passed it (such a read does not wait).
    let newest_read = wait_for(Duration::from_secs(10), "the newest complete epoch to pass the reply's", || {
        let read = read_m1("");
        (read["as_of"].as_u64().unwrap() >= epoch).then_some(read)
    });
    for read in [read_m1(&format!("?as_of={epoch}")), newest_read] {
        let features = read["features"].as_object().unwrap();
        assert_eq!(features.keys().collect::<Vec<_>>(), ["n_all"], "{read}");
        assert_eq!(features["n_all"][0]["value"], 1, "{read}");
    }
    assert_eq!(request(&http, "DELETE", "/v1/dataflows/big_spenders", "", b"").0, 200);

    // A new generation gets the catalog back, and its state from the workers' ingest logs: the
    // export equals the model again, also at an epoch from before the crash.
    w1.kill9();
    wait_state(&http, "degraded", Duration::from_secs(10));
    let (code, _) = request(&http, "GET", "/v1/dataflows/spend/export", "", b"");
    assert_eq!(code, 503);
    let _w1 = env.worker("w1", &control, 2);
    wait_for(Duration::from_secs(60), "generation 2 serving", || {
        let (_, v) = get(&http, "/v1/cluster")?;
        (v["state"] == "running" && v["generation"] == 2).then_some(())
    });
    let (got, want) = (export(&http, "spend", Some(final_epoch)), model(&all));
    if got != want {
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .take(8)
            .map(|(k, v)| format!("{k:?}: want {v}, got {:?}", got.get(k)))
            .collect();
        let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
        panic!("recovered from the ingest logs: {} differ, {extra} extra, e.g. {wrong:#?}", wrong.len());
    }
    let newest = all.iter().map(|e| e.1).max().unwrap();
    let (code, text) = request(
        &http,
        "POST",
        "/v1/sources/tx/events",
        "application/x-ndjson",
        format!("{}\n", json!({"user_id": 5, "ts": newest, "amount": 10, "merchant": "m"})).as_bytes(),
    );
    assert_eq!(code, 200, "{text}");
    let epoch = serde_json::from_str::<Value>(&text).unwrap()["epoch"].as_u64().unwrap();
    let mut with_new = all.clone();
    with_new.push((5, newest, 10, "m".to_string()));
    assert_eq!(export(&http, "spend", Some(epoch)), model(&with_new));
    assert_eq!(request(&http, "GET", "/v1/dataflows/big_spenders", "", b"").0, 404, "the drop survived");
}

#[test]
fn sliding_and_cumulating_windows_through_the_http_api_equal_the_model() {
    let env = Env::new();
    let Pair { coordinator: _coordinator, workers: _workers, http, .. } = env.running_pair(2);
    let source = json!({"name": "tx", "time": "ts", "allowed_lateness": "1h",
        "fields": {"user_id": "u64", "ts": "i64", "amount": "i64", "merchant": "string"}});
    assert_eq!(post_json(&http, "/v1/sources", &source).0, 201);
    let definition = json!({"name": "recent", "source": "tx", "key": "user_id",
        "features": [
            {"name": "spend_1h", "agg": "sum", "field": "amount", "window": {"sliding": {"size": "1h", "tile": "1m"}}},
            {"name": "largest_1h", "agg": "max", "field": "amount", "window": {"sliding": {"size": "1h", "tile": "1m"}}},
            {"name": "count_day", "agg": "count", "window": {"cumulate": {"step": "1h", "max": "1d"}}}]});
    let (code, body) = post_json(&http, "/v1/dataflows", &definition);
    assert_eq!(code, 201, "{body}");

    // Three hours of events for 20 users, one every 700 ms.
    let evs: Vec<(u64, i64, i64)> =
        (0..15_000i64).map(|i| ((i * 7) as u64 % 20, BASE + i * 700, (i * 37) % 1_000)).collect();
    let mut epoch = 0;
    for chunk in evs.chunks(1_000) {
        let lines: String = chunk
            .iter()
            .map(|(u, t, a)| format!("{}\n", json!({"user_id": u, "ts": t, "amount": a, "merchant": "m"})))
            .collect();
        let (code, text) = request(&http, "POST", "/v1/sources/tx/events", "application/x-ndjson", lines.as_bytes());
        assert_eq!(code, 200, "{text}");
        epoch = serde_json::from_str::<Value>(&text).unwrap()["epoch"].as_u64().unwrap();
    }

    // The model: "now" is the largest event time; the sliding window is the hour of tiles ending
    // with the tile that holds it.
    let now = evs.iter().map(|e| e.1).max().unwrap();
    let end = now.div_euclid(60_000) * 60_000 + 60_000;
    let start = end - 3_600_000;
    for user in [0u64, 7, 13] {
        let mine: Vec<&(u64, i64, i64)> = evs.iter().filter(|e| e.0 == user).collect();
        let inside: Vec<i64> = mine.iter().filter(|e| e.1 >= start && e.1 < end).map(|e| e.2).collect();
        let (code, text) = request(&http, "GET", &format!("/v1/dataflows/recent/keys/{user}?as_of={epoch}"), "", b"");
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let f = &v["features"];
        assert_eq!(
            f["spend_1h"],
            json!({"start": start, "end": end, "value": inside.iter().sum::<i64>(), "closed": false, "tile_aligned": true})
        );
        assert_eq!(f["largest_1h"]["value"], json!(inside.iter().max().unwrap()));
        // Cumulating windows: per day with events, [day, day + k hours) from the first hour
        // that has an event to the end of the day.
        let (hour, day) = (3_600_000i64, 86_400_000i64);
        let mut want = Vec::new();
        let mut days: Vec<i64> = mine.iter().map(|e| e.1.div_euclid(day) * day).collect();
        days.dedup();
        for base in days {
            let first =
                mine.iter().filter(|e| e.1.div_euclid(day) * day == base).map(|e| (e.1 - base) / hour).min().unwrap();
            for k in first + 1..=24 {
                let n = mine.iter().filter(|x| x.1 >= base && x.1 < base + k * hour).count();
                want.push((base, base + k * hour, json!(n)));
            }
        }
        let got: Vec<(i64, i64, Value)> = f["count_day"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap(), w["value"].clone()))
            .collect();
        assert_eq!(got, want);
    }
    // Lookup shows the same, as one object per sliding feature.
    let (code, many) = post_json(&http, "/v1/dataflows/recent/lookup", &json!({"keys": [[0], [999]], "as_of": epoch}));
    assert_eq!(code, 200, "{many}");
    assert_eq!(many["results"][0]["features"]["spend_1h"]["start"], json!(start));
    assert_eq!(many["results"][1]["features"], json!({}));
}
