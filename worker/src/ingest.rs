//! The worker's HTTP endpoint (`sundial worker --http ADDR`): `POST /v1/sources/{source}/events`,
//! the same contract as the coordinator's, served by the worker process so that ingest scales
//! with the workers instead of funnelling through the coordinator; and `GET /metrics`, the
//! worker's Prometheus metrics.
//! A batch goes to this worker's computation (one of its threads, in turn); while no computation
//! runs (the cluster re-forms) the answer is 503 with `Retry-After`.

use std::net::TcpListener;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::oneshot;

use sundial_protocol::IngestOutcome;

use crate::metrics::WorkerMetrics;
use crate::supervisor::Event;

/// What the handlers share.
#[derive(Clone)]
struct Http {
    events: Sender<Event>,
    metrics: Arc<WorkerMetrics>,
}

async fn metrics(State(http): State<Http>) -> Response {
    ([(header::CONTENT_TYPE, sundial_metrics::CONTENT_TYPE)], http.metrics.render()).into_response()
}

/// The largest body accepted (as on the coordinator).
pub const MAX_BODY_BYTES: usize = sundial_protocol::MAX_INGEST_BODY_BYTES;
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the supervisor answers for a local ingest: the outcome, or a status and a message.
pub type IngestResult = Result<IngestOutcome, (u16, String)>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut response = (status, Json(json!({"error": message.into()}))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn ingest(
    State(Http { events, .. }): State<Http>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY_BYTES} bytes; send it in smaller batches"),
            )
        }
        Err(e) => return error(e.status(), e.body_text()),
    };
    let csv = match sundial_protocol::ingest_format(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())) {
        Ok(csv) => csv,
        Err(e) => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, e),
    };
    let body = match String::from_utf8(body.to_vec()) {
        Ok(text) => text,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not UTF-8: {e}")),
    };
    let batch = match headers.get(sundial_protocol::BATCH_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(id)) => match sundial_protocol::check_batch_id(id) {
            Ok(()) => Some(id.to_string()),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "the x-sundial-batch header is not ASCII"),
    };
    let (tx, rx) = oneshot::channel();
    if events.send(Event::LocalIngest { source, csv, body, batch, reply: tx }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the worker is shutting down");
    }
    match tokio::time::timeout(TIMEOUT, rx).await {
        Ok(Ok(Ok(outcome))) => Json(outcome).into_response(),
        Ok(Ok(Err((status, message)))) => {
            error(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), message)
        }
        Ok(Err(_)) => error(StatusCode::SERVICE_UNAVAILABLE, "the computation ended before it answered"),
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, format!("no answer from the computation within {TIMEOUT:?}")),
    }
}

/// Refuses a body whose announced length is over the limit before reading any of it.
async fn refuse_large_bodies(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes; send it in smaller batches"),
        );
    }
    next.run(request).await
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(StatusCode::NOT_FOUND, format!("no such endpoint: {method} {}", uri.path()))
}

/// Serves the endpoint on `listener` (already bound) in a thread of its own, forwarding batches
/// to the supervisor's event loop.
pub fn spawn(listener: TcpListener, events: Sender<Event>, metrics: Arc<WorkerMetrics>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("sundial:ingest-http".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("ingest endpoint: {e}");
                    return;
                }
            };
            let app = Router::new()
                .route("/v1/sources/{source}/events", post(ingest))
                .route("/metrics", get(self::metrics))
                .fallback(not_found)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
                .layer(axum::middleware::from_fn(refuse_large_bodies))
                .with_state(Http { events, metrics });
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("ingest endpoint stopped: {e}");
            }
        })
    })?;
    Ok(())
}
