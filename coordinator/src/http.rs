//! The coordinator's HTTP API (JSON). Every error is `{"error": "..."}` with a status that says
//! whose fault it is: 400 bad input, 404 unknown name, 409 conflict, 413 body too large,
//! 415 unsupported media type, 503 cluster not ready (with `Retry-After`), 504 no reply in time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use sundial_definition::{format_duration, validate_definition, validate_source, DefinitionSpec, SourceSpec};
use sundial_protocol::plan::{DataflowPlan, FieldType};
use sundial_protocol::value::{parse_key, Datum, Key, F64};
use sundial_protocol::{CheckReport, Command, IngestOutcome, KeyResult, Reply, Request};

use crate::catalog::DataflowEntry;
use crate::server::{Ready, RequestError, Shared};

/// The largest ingest body accepted.
pub const MAX_BODY_BYTES: usize = sundial_protocol::MAX_INGEST_BODY_BYTES;

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    problems: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), problems: Vec::new() }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Refused input is logged once per request, with its cause; unknown names (404) are
        // ordinary answers and only logged at debug level.
        match self.status {
            StatusCode::NOT_FOUND => tracing::debug!(status = self.status.as_u16(), "{}", self.message),
            s if s.is_client_error() => {
                tracing::warn!(status = s.as_u16(), problems = ?self.problems, "refused a request: {}", self.message)
            }
            s => tracing::warn!(status = s.as_u16(), "request failed: {}", self.message),
        }
        let body = if self.problems.is_empty() {
            json!({"error": self.message})
        } else {
            json!({"error": self.message, "problems": self.problems})
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match e {
            RequestError::NotReady(_) | RequestError::Abandoned => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Failed(ref m) if m.contains("did not complete in time") => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Failed(ref m) if m.contains("compacted") => StatusCode::BAD_REQUEST,
            RequestError::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Refused(status, _) => StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(e.status(), format!("bad JSON body: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad(e.body_text())
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/check", get(check))
        .route("/v1/sources", post(create_source).get(list_sources))
        .route("/v1/sources/{source}/events", post(ingest))
        .route("/v1/sources/{source}/late", get(late))
        .route("/v1/dataflows", post(submit).get(list_dataflows))
        .route("/v1/dataflows/{name}", get(show_dataflow).delete(drop_dataflow))
        .route("/v1/dataflows/{name}/keys/{*key}", get(read_one))
        .route("/v1/dataflows/{name}/lookup", post(lookup))
        .route("/v1/dataflows/{name}/export", get(export))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&shared), observe))
        .with_state(shared)
}

/// The status page: one static file, compiled into the binary, that polls `GET /v1/stats` and
/// `GET /v1/cluster`.
const STATUS_PAGE: &str = include_str!("status.html");

async fn status_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], STATUS_PAGE)
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let status = shared.status();
    let text = {
        let catalog = shared.catalog();
        shared.ops.render(&status, &catalog)
    };
    ([(header::CONTENT_TYPE, sundial_metrics::CONTENT_TYPE)], text).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let status = shared.status();
    let catalog = shared.catalog();
    Json(shared.ops.summary(&status, &catalog))
}

/// Which read endpoint a request is for, if any.
fn read_endpoint(method: &Method, path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v1/dataflows/")?;
    let (_, tail) = rest.split_once('/')?;
    match (method, tail) {
        (&Method::GET, t) if t.starts_with("keys/") => Some("key"),
        (&Method::POST, "lookup") => Some("lookup"),
        (&Method::GET, "export") => Some("export"),
        _ => None,
    }
}

/// Measures reads and counts ingest requests.
async fn observe(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let path = request.uri().path();
    let read = read_endpoint(request.method(), path);
    let ingest = request.method() == Method::POST && path.starts_with("/v1/sources/") && path.ends_with("/events");
    let response = next.run(request).await;
    if let Some(endpoint) = read {
        shared.ops.read_seconds.with_label_values(&[endpoint]).observe(started.elapsed().as_secs_f64());
    }
    if ingest {
        shared.ops.ingest_requests.with_label_values(&[response.status().as_str()]).inc();
    }
    response
}

async fn cluster(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.status())
}

#[derive(Deserialize)]
struct CheckParams {
    records_per_pair: Option<u32>,
}

/// The diagnostic exchange's result as the API shows it.
#[derive(Serialize)]
struct CheckBody {
    /// True when every worker thread received every record from every worker thread.
    ok: bool,
    #[serde(flatten)]
    report: CheckReport,
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

async fn check(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<CheckParams>, QueryRejection>,
) -> Result<Json<CheckBody>, ApiError> {
    let Query(params) = params?;
    let records_per_pair = params.records_per_pair.unwrap_or(16);
    if !(1..=10_000).contains(&records_per_pair) {
        return Err(ApiError::bad("records_per_pair must be between 1 and 10000"));
    }
    match shared.request(Request::Check { records_per_pair }, CHECK_TIMEOUT).await? {
        Reply::Check(report) => Ok(Json(CheckBody { ok: report.all_to_all(), report })),
        other => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("unexpected reply {other:?}"))),
    }
}

// ---- sources ----------------------------------------------------------------------------------

fn source_json(plan: &sundial_protocol::plan::SourcePlan) -> Value {
    let fields: serde_json::Map<String, Value> =
        plan.fields.iter().map(|f| (f.name.clone(), Value::from(f.ty.name()))).collect();
    json!({
        "name": plan.name,
        "time": plan.fields[plan.time].name,
        "time_unit": plan.time_unit,
        "allowed_lateness": format_duration(plan.allowed_lateness_ms),
        "idle_timeout": format_duration(plan.idle_timeout_ms),
        "fields": fields,
    })
}

async fn create_source(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(value) = body?;
    let spec: SourceSpec = serde_json::from_value(value.clone()).map_err(|e| ApiError::bad(format!("source: {e}")))?;
    let plan = validate_source(&spec).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: e.to_string(),
        problems: e.problems.clone(),
    })?;
    if let Some(existing) = shared.catalog().source(&plan.name) {
        if existing.plan == plan {
            return Ok((StatusCode::OK, Json(source_json(&plan))).into_response());
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("source {:?} exists with another definition; sources cannot be redefined", plan.name),
        ));
    }
    let entry = crate::catalog::SourceEntry { spec: value, plan: plan.clone() };
    shared
        .change_catalog(
            |catalog| match catalog.source(&plan.name) {
                Some(_) => Err(ApiError::new(StatusCode::CONFLICT, format!("source {:?} was just created", plan.name))),
                None => Ok(Command::CreateSource(plan.clone())),
            },
            |catalog| catalog.sources.push(entry),
        )
        .await?;
    tracing::info!(source = %plan.name, "source created");
    Ok((StatusCode::CREATED, Json(source_json(&plan))).into_response())
}

async fn list_sources(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let sources: Vec<Value> = shared.catalog().sources.iter().map(|s| source_json(&s.plan)).collect();
    Json(json!({ "sources": sources }))
}

// ---- dataflows --------------------------------------------------------------------------------

fn dataflow_json(spec: &Value, plan: &DataflowPlan) -> Value {
    let key: Vec<&str> = plan.key.iter().map(|&i| plan.source.fields[i].name.as_str()).collect();
    json!({
        "name": plan.name,
        "source": plan.source.name,
        "key": key,
        "features": plan.features.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        "retention": plan.retention_ms.map_or("forever".to_string(), format_duration),
        "definition": spec,
    })
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(value) = body?;
    let spec: DefinitionSpec =
        serde_json::from_value(value.clone()).map_err(|e| ApiError::bad(format!("definition: {e}")))?;
    let plan = {
        let catalog = shared.catalog();
        validate_definition(&spec, |name| catalog.source(name).map(|s| &s.plan)).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            problems: e.problems.clone(),
        })?
    };
    let entry = DataflowEntry { spec: value.clone(), plan: plan.clone() };
    shared
        .change_catalog(
            |catalog| match catalog.dataflow(&plan.name) {
                Some(_) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("dataflow {:?} exists; drop it first to replace it", plan.name),
                )),
                None => Ok(Command::InstallDataflow(DataflowPlan { id: catalog.next_id(), ..plan.clone() })),
            },
            |catalog| {
                let id = catalog.next_id();
                catalog.last_id = id;
                catalog.dataflows.push(DataflowEntry { plan: DataflowPlan { id, ..entry.plan }, ..entry });
            },
        )
        .await?;
    tracing::info!(dataflow = %plan.name, "dataflow installed");
    Ok((StatusCode::CREATED, Json(dataflow_json(&value, &plan))).into_response())
}

async fn list_dataflows(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let list: Vec<Value> = shared.catalog().dataflows.iter().map(|d| dataflow_json(&d.spec, &d.plan)).collect();
    Json(json!({ "dataflows": list }))
}

fn find_dataflow(shared: &Shared, name: &str) -> Result<DataflowPlan, ApiError> {
    shared
        .catalog()
        .dataflow(name)
        .map(|d| d.plan.clone())
        .ok_or_else(|| ApiError::not_found(format!("no dataflow named {name:?}")))
}

async fn show_dataflow(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let catalog = shared.catalog();
    let entry = catalog.dataflow(&name).ok_or_else(|| ApiError::not_found(format!("no dataflow named {name:?}")))?;
    Ok(Json(dataflow_json(&entry.spec, &entry.plan)))
}

async fn drop_dataflow(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    find_dataflow(&shared, &name)?;
    shared
        .change_catalog(
            |catalog| match catalog.dataflow(&name) {
                Some(_) => Ok(Command::DropDataflow { name: name.clone() }),
                None => Err(ApiError::not_found(format!("no dataflow named {name:?}"))),
            },
            |catalog| catalog.dataflows.retain(|d| d.plan.name != name),
        )
        .await?;
    tracing::info!(dataflow = %name, "dataflow dropped");
    Ok(Json(json!({ "dropped": name })))
}

// ---- ingest -----------------------------------------------------------------------------------

const INGEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an ingest waits for the processes' acknowledged epochs (answered on arrival).
const ACKED_TIMEOUT: Duration = Duration::from_secs(2);

async fn ingest(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestOutcome>, ApiError> {
    if shared.catalog().source(&source).is_none() {
        return Err(ApiError::not_found(format!("no source named {source:?}")));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes; send it in smaller batches"),
        ),
        status => ApiError::new(status, e.body_text()),
    })?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let csv = sundial_protocol::ingest_format(content_type)
        .map_err(|e| ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e))?;
    // Taken over, not copied (the buffer is usually this request's alone).
    let text = String::from_utf8(Vec::from(body))
        .map_err(|e| ApiError::bad(format!("the body is not UTF-8: {}", e.utf8_error())))?;
    let batch = batch_id(&headers)?;
    let ready = shared.ready()?;
    // A request goes whole to one process, in turn (and there to one worker thread, in turn):
    // every ingest partition then sees an ordered stream in order, so the watermark (the
    // minimum over active partitions) never passes events of a request still being ingested.
    // A batch with an id always goes to the same process, which answers its retries.
    let turn = match &batch {
        Some(id) => sundial_protocol::value::fnv1a(id.as_bytes()) as usize,
        None => shared.next_ingest(),
    };
    let conn = ready.conns[turn % ready.conns.len()];
    let min_epoch = shared.newest_epoch();
    let request = Request::Ingest { after: ready.after, source, csv, body: text, first_line: 1, min_epoch, batch };
    // In a task of its own: a client that goes away does not cut the request off mid-way.
    let ingested = {
        let shared = Arc::clone(&shared);
        let generation = ready.generation;
        tokio::spawn(async move { shared.request_to(conn, generation, request, INGEST_TIMEOUT).await })
    };
    // Meanwhile, each process's newest acknowledged epoch: batches acknowledged before this one
    // through the workers' own endpoints have epochs of their processes' clocks, which may be
    // ahead of the one taking this batch. The reply names an epoch that covers them too.
    // (The process taking the batch counts its own acknowledged epochs already.)
    let others = |p: usize| if ready.conns[p] == conn { Ask::Skip } else { Ask::Await(ACKED_TIMEOUT) };
    let acked = fan_out_to(&shared, &ready, others, |_| Request::Acked).await;
    let mut outcome = match ingested.await {
        Ok(Ok(Reply::Ingested(outcome))) => outcome,
        Ok(Ok(other)) => return Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("unexpected reply {other:?}"))),
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    match acked {
        Ok(replies) => {
            for reply in replies {
                match reply {
                    Reply::Acked { epoch } => outcome.epoch = outcome.epoch.max(epoch),
                    other => tracing::warn!("unexpected reply to Acked: {other:?}"),
                }
            }
        }
        // The batch is in; only the cover of other paths' batches is missing (a process went
        // away or is stalled, and the cluster re-forms).
        Err(e) => tracing::warn!("ingest reply without the other processes' acknowledged epochs: {}", e.message),
    }
    shared.saw_epoch(outcome.epoch);
    Ok(Json(outcome))
}

/// The producer's batch id from the `x-sundial-batch` header, if any.
fn batch_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(sundial_protocol::BATCH_HEADER) else { return Ok(None) };
    let text = value.to_str().map_err(|_| ApiError::bad("the x-sundial-batch header is not ASCII"))?;
    sundial_protocol::check_batch_id(text).map_err(ApiError::bad)?;
    Ok(Some(text.to_string()))
}

async fn late(State(shared): State<Arc<Shared>>, Path(source): Path<String>) -> Result<Response, ApiError> {
    if shared.catalog().source(&source).is_none() {
        return Err(ApiError::not_found(format!("no source named {source:?}")));
    }
    let ready = shared.ready()?;
    let replies = fan_out(&shared, &ready, |_| Request::Late { after: ready.after, source: source.clone() }).await?;
    let mut out = String::new();
    for reply in replies {
        if let Reply::Late { lines } = reply {
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    Ok(ndjson(out))
}

// ---- reads ------------------------------------------------------------------------------------

const DEFAULT_READ_TIMEOUT_MS: u64 = 10_000;

#[derive(Deserialize)]
struct ReadParams {
    as_of: Option<u64>,
    timeout_ms: Option<u64>,
    /// Exports: keys per page asked of each process.
    page_keys: Option<u32>,
}

impl ReadParams {
    fn timeout_ms(&self) -> Result<u64, ApiError> {
        match self.timeout_ms {
            None => Ok(DEFAULT_READ_TIMEOUT_MS),
            Some(t) if t <= 120_000 => Ok(t),
            Some(_) => Err(ApiError::bad("timeout_ms must be at most 120000")),
        }
    }
}

/// Sends one request per process (built by `request`) and returns the replies by process.
async fn fan_out(
    shared: &Arc<Shared>,
    ready: &Ready,
    request: impl Fn(usize) -> Request,
) -> Result<Vec<Reply>, ApiError> {
    fan_out_to(shared, ready, |_| Ask::Await(FAN_OUT_TIMEOUT), request).await
}

/// What a fan-out does with one process.
#[derive(Clone, Copy)]
enum Ask {
    Skip,
    /// Send the request; nothing waits for its reply, which is given up after this long.
    Tell(Duration),
    /// Send the request and wait this long at most for its reply.
    Await(Duration),
}

/// How long a fan-out of reads and commands waits for each process.
const FAN_OUT_TIMEOUT: Duration = Duration::from_secs(130);

/// Sends one request (built by `request`) to each process `ask` does not skip, and returns the
/// replies of those it awaits, in process order.
async fn fan_out_to(
    shared: &Arc<Shared>,
    ready: &Ready,
    ask: impl Fn(usize) -> Ask,
    request: impl Fn(usize) -> Request,
) -> Result<Vec<Reply>, ApiError> {
    let mut awaited = Vec::with_capacity(ready.conns.len());
    for (p, &conn) in ready.conns.iter().enumerate() {
        let generation = ready.generation;
        match ask(p) {
            Ask::Skip => {}
            Ask::Tell(timeout) => {
                let (shared, request) = (Arc::clone(shared), request(p));
                tokio::spawn(async move {
                    if let Err(e) = shared.request_to(conn, generation, request, timeout).await {
                        tracing::debug!(process = p, "a request nobody waits for failed: {e}");
                    }
                });
            }
            // Awaited here, together, rather than in tasks of their own: each task would add a
            // wake-up (and often a switch between the runtime's threads) to every read.
            Ask::Await(timeout) => awaited.push(shared.request_to(conn, generation, request(p), timeout)),
        }
    }
    // The first error answers at once (the other requests are dropped, and with them their
    // waiters).
    Ok(futures_util::future::try_join_all(awaited).await?)
}

/// The epoch to read at: the one asked for, or the newest complete on every process.
async fn resolve_as_of(
    shared: &Arc<Shared>,
    ready: &Ready,
    dataflow: &str,
    as_of: Option<u64>,
) -> Result<u64, ApiError> {
    if let Some(e) = as_of {
        // Epochs before the generation's recovery hold less than what was accepted by then.
        return Ok(e.max(ready.recovered_at));
    }
    // Processes report their complete epochs as they advance; fall back to asking them.
    if let Some(e) = shared.newest_complete(ready, dataflow) {
        return Ok(e);
    }
    let replies =
        fan_out(shared, ready, |_| Request::Frontier { after: ready.after, dataflow: dataflow.to_string() }).await?;
    let mut newest: Option<u64> = None;
    for reply in replies {
        match reply {
            Reply::Frontier { complete: Some(c) } => newest = Some(newest.map_or(c, |n| n.min(c))),
            Reply::Frontier { complete: None } => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no epoch of this dataflow is complete yet"))
            }
            other => return Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("unexpected reply {other:?}"))),
        }
    }
    newest.ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no process answered"))
}

fn owner_process(key: &Key, ready: &Ready) -> usize {
    let peers = (ready.conns.len() * ready.threads).max(1) as u64;
    (key.hash64() % peers) as usize / ready.threads.max(1)
}

/// Reads `keys` at `as_of`; results in the order of `keys` (`None` for keys with no data).
async fn read_keys(
    shared: &Arc<Shared>,
    ready: &Ready,
    dataflow: &str,
    keys: &[Key],
    as_of: u64,
    timeout_ms: u64,
) -> Result<(Option<i64>, Vec<Option<KeyResult>>), ApiError> {
    let mut by_process: BTreeMap<usize, Vec<Key>> = BTreeMap::new();
    for key in keys {
        by_process.entry(owner_process(key, ready)).or_default().push(key.clone());
    }
    // The answer waits only for the processes that own a key (with no keys, for all: each
    // answers at once). The others are told of the read only while `as_of` may not be complete
    // on every process: hearing of it moves their epochs past it, so that it completes without
    // waiting for their next tick; their (empty) answers are not waited for.
    let complete = shared.newest_complete(ready, dataflow).is_some_and(|c| c >= as_of);
    let tell = Duration::from_millis(timeout_ms.saturating_add(1_000));
    let ask = |p: usize| match (by_process.is_empty() || by_process.contains_key(&p), complete) {
        (true, _) => Ask::Await(FAN_OUT_TIMEOUT),
        (false, true) => Ask::Skip,
        (false, false) => Ask::Tell(tell),
    };
    let replies = fan_out_to(shared, ready, ask, |p| Request::Read {
        after: ready.after,
        dataflow: dataflow.to_string(),
        as_of,
        keys: Some(by_process.get(&p).cloned().unwrap_or_default()),
        timeout_ms,
        page: None,
    })
    .await?;
    let mut watermark = None;
    let mut found: BTreeMap<Key, KeyResult> = BTreeMap::new();
    for reply in replies {
        match reply {
            Reply::Read { watermark: w, results, .. } => {
                watermark = watermark.max(w);
                found.extend(results.into_iter().map(|r| (r.key.clone(), r)));
            }
            other => return Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("unexpected reply {other:?}"))),
        }
    }
    Ok((watermark, keys.iter().map(|k| found.get(k).cloned()).collect()))
}

/// The features of one key: a list of windows per feature, except for a sliding feature, which
/// has one window (ending with the tile of "now") or `null`.
fn features_json(plan: Option<&DataflowPlan>, result: Option<&KeyResult>) -> Value {
    let sliding = |name: &str| {
        plan.and_then(|p| p.features.iter().find(|f| f.name == name))
            .is_some_and(|f| matches!(f.window, sundial_protocol::plan::Window::Sliding { .. }))
    };
    let mut map = serde_json::Map::new();
    if let Some(r) = result {
        for (name, windows) in &r.features {
            let value = if sliding(name) {
                // Say that the span is whole tiles: the oldest tile may reach before now - size.
                let mut window = windows.first().and_then(|w| serde_json::to_value(w).ok()).unwrap_or(Value::Null);
                if let Value::Object(map) = &mut window {
                    map.insert("tile_aligned".into(), Value::Bool(true));
                }
                window
            } else {
                serde_json::to_value(windows).unwrap_or(Value::Null)
            };
            map.insert(name.clone(), value);
        }
    }
    Value::Object(map)
}

/// Decodes `%XX` escapes of a path segment.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(|| format!("bad percent escape in {text:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent escape in {text:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

async fn read_one(
    State(shared): State<Arc<Shared>>,
    Path((name, _)): Path<(String, String)>,
    uri: Uri,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params?;
    let plan = find_dataflow(&shared, &name)?;
    // The raw segment: split composite keys at `,` before decoding, so parts may contain `%2C`.
    let raw = uri.path().rsplit_once("/keys/").map(|(_, k)| k).unwrap_or_default();
    let types: Vec<FieldType> = plan.key.iter().map(|&i| plan.source.fields[i].ty).collect();
    let parts: Vec<String> = if types.len() == 1 {
        vec![percent_decode(raw).map_err(ApiError::bad)?]
    } else {
        raw.split(',').map(percent_decode).collect::<Result<_, _>>().map_err(ApiError::bad)?
    };
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let key = parse_key(&refs, &types).map_err(|e| ApiError::bad(format!("key: {e}")))?;
    let ready = shared.ready()?;
    let as_of = resolve_as_of(&shared, &ready, &name, params.as_of).await?;
    let (watermark, results) =
        read_keys(&shared, &ready, &name, std::slice::from_ref(&key), as_of, params.timeout_ms()?).await?;
    Ok(Json(json!({
        "dataflow": name,
        "key": key.to_json(),
        "as_of": as_of,
        "watermark": watermark,
        "features": features_json(Some(&plan), results.first().and_then(Option::as_ref)),
    })))
}

#[derive(Deserialize)]
struct LookupBody {
    keys: Vec<Value>,
    as_of: Option<u64>,
    timeout_ms: Option<u64>,
}

fn json_key(value: &Value, types: &[FieldType]) -> Result<Key, String> {
    let parts: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        scalar => vec![scalar],
    };
    if parts.len() != types.len() {
        return Err(format!("key {value} has {} parts but the dataflow's key has {}", parts.len(), types.len()));
    }
    let datums = parts
        .iter()
        .zip(types)
        .map(|(v, ty)| match (v, ty) {
            (Value::String(s), ty) => Datum::parse(s, *ty),
            (Value::Number(n), FieldType::I64) => n.as_i64().map(Datum::Int).ok_or(format!("{n} is not an i64")),
            (Value::Number(n), FieldType::U64) => n.as_u64().map(Datum::UInt).ok_or(format!("{n} is not a u64")),
            (Value::Number(n), FieldType::F64) => {
                n.as_f64().map(|f| Datum::Float(F64(f))).ok_or(format!("{n} is not an f64"))
            }
            (Value::Bool(b), FieldType::Bool) => Ok(Datum::Bool(*b)),
            (other, ty) => Err(format!("{other} is not a {}", ty.name())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Key::from_parts(datums))
}

async fn lookup(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Result<Json<LookupBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let plan = find_dataflow(&shared, &name)?;
    if body.keys.len() > 10_000 {
        return Err(ApiError::bad("at most 10000 keys per lookup"));
    }
    let types: Vec<FieldType> = plan.key.iter().map(|&i| plan.source.fields[i].ty).collect();
    let keys = body
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| json_key(k, &types).map_err(|e| ApiError::bad(format!("keys[{i}]: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout_ms = ReadParams { as_of: None, timeout_ms: body.timeout_ms, page_keys: None }.timeout_ms()?;
    let ready = shared.ready()?;
    let as_of = resolve_as_of(&shared, &ready, &name, body.as_of).await?;
    let (watermark, results) = read_keys(&shared, &ready, &name, &keys, as_of, timeout_ms).await?;
    let results: Vec<Value> = keys
        .iter()
        .zip(&results)
        .map(|(k, r)| json!({"key": k.to_json(), "features": features_json(Some(&plan), r.as_ref())}))
        .collect();
    Ok(Json(json!({"dataflow": name, "as_of": as_of, "watermark": watermark, "results": results})))
}

fn ndjson(text: String) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from(text)).into_response()
}

/// Keys per page of an export.
const EXPORT_PAGE_KEYS: u32 = 20_000;
/// How long workers keep an export's epoch readable between two pages.
const EXPORT_HOLD_MS: u64 = 60_000;

fn export_lines(results: &[KeyResult]) -> String {
    let mut out = String::new();
    for r in results {
        let key = r.key.to_json();
        for (feature, windows) in &r.features {
            for w in windows {
                let line = json!({"key": key, "feature": feature, "start": w.start, "end": w.end, "value": w.value, "closed": w.closed});
                out.push_str(&line.to_string());
                out.push('\n');
            }
        }
    }
    out
}

/// `GET /v1/dataflows/{name}/export`: every process is read page by page (a page is the next
/// keys in key order), all at the same epoch, which the workers keep readable while the export
/// runs; the NDJSON is streamed as pages arrive. Errors before the first byte get a status; an
/// error later ends the stream with a line `{"error": ...}`.
async fn export(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    find_dataflow(&shared, &name)?;
    let timeout_ms = params.timeout_ms()?;
    let limit = params.page_keys.unwrap_or(EXPORT_PAGE_KEYS);
    if !(1..=1_000_000).contains(&limit) {
        return Err(ApiError::bad("page_keys must be between 1 and 1000000"));
    }
    let ready = shared.ready()?;
    let as_of = resolve_as_of(&shared, &ready, &name, params.as_of).await?;
    let page = |start_after: Option<Key>| Request::Read {
        after: ready.after,
        dataflow: name.clone(),
        as_of,
        keys: None,
        timeout_ms,
        page: Some(sundial_protocol::Page { start_after, limit, hold_ms: EXPORT_HOLD_MS }),
    };
    // The first page of every process before answering, so that errors get a status.
    let firsts = fan_out(&shared, &ready, |_| page(None)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let task_shared = Arc::clone(&shared);
    let task_ready = ready.clone();
    let task_name = name.clone();
    tokio::spawn(async move {
        for (p, first) in firsts.into_iter().enumerate() {
            let mut reply = first;
            loop {
                let (results, more) = match reply {
                    Reply::Read { results, more, .. } => (results, more),
                    other => {
                        let line = json!({"error": format!("unexpected reply {other:?}")}).to_string() + "\n";
                        let _ = tx.send(Ok(Bytes::from(line))).await;
                        return;
                    }
                };
                let last = results.last().map(|r| r.key.clone());
                if tx.send(Ok(Bytes::from(export_lines(&results)))).await.is_err() {
                    return; // the client went away
                }
                let (true, Some(last)) = (more, last) else { break };
                let request = Request::Read {
                    after: task_ready.after,
                    dataflow: task_name.clone(),
                    as_of,
                    keys: None,
                    timeout_ms,
                    page: Some(sundial_protocol::Page { start_after: Some(last), limit, hold_ms: EXPORT_HOLD_MS }),
                };
                reply = match task_shared
                    .request_to(task_ready.conns[p], task_ready.generation, request, Duration::from_secs(130))
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let line = json!({"error": e.to_string()}).to_string() + "\n";
                        let _ = tx.send(Ok(Bytes::from(line))).await;
                        return;
                    }
                };
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response();
    if let Ok(v) = HeaderValue::from_str(&as_of.to_string()) {
        response.headers_mut().insert("x-sundial-as-of", v);
    }
    Ok(response)
}

/// Refuses a body whose announced length is over the limit before reading any of it.
async fn refuse_large_bodies(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes; send it in smaller batches"),
        )
        .into_response();
    }
    next.run(request).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Cb%20c").as_deref(), Ok("a,b c"));
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
    }

    #[test]
    fn json_keys_take_numbers_and_strings() {
        assert_eq!(json_key(&json!(42), &[FieldType::U64]), Ok(Key::One(Datum::UInt(42))));
        assert_eq!(json_key(&json!(["42"]), &[FieldType::U64]), Ok(Key::One(Datum::UInt(42))));
        assert!(json_key(&json!([1, 2]), &[FieldType::U64]).is_err());
        assert!(json_key(&json!(-1), &[FieldType::U64]).is_err());
    }
}
