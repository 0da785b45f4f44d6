//! The coordinator's HTTP API (JSON). Every error is `{"error": "..."}` with a status that says
//! whose fault it is: 400 bad input, 404 unknown name, 503 cluster not ready, 504 no reply in time.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use sundial_protocol::{CheckReport, Reply, Request};

use crate::server::{RequestError, Shared};

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: &self.message })).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match e {
            RequestError::NotReady(_) | RequestError::Abandoned => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/check", get(check))
        .fallback(not_found)
        .with_state(shared)
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
    params: Result<Query<CheckParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CheckBody>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let records_per_pair = params.records_per_pair.unwrap_or(16);
    if !(1..=10_000).contains(&records_per_pair) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "records_per_pair must be between 1 and 10000"));
    }
    match shared.request(Request::Check { records_per_pair }, CHECK_TIMEOUT).await? {
        Reply::Check(report) => Ok(Json(CheckBody { ok: report.all_to_all(), report })),
        Reply::Error { message } => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {method} {}", uri.path()))
}
