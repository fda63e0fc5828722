//! The HTTP API: job intake, job and import status, per-destination counts,
//! the dead-letter pair (retry, redrive), metrics and health. This file
//! holds the routes, shared state, errors and auth; the handlers for jobs
//! and imports are in `api/jobs.rs`, for destinations in
//! `api/destinations.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batchrouter_core::{JobStore, Secret, StoreError, Timestamp};
use batchrouter_router::{Metrics, RouterHandle};
use serde_json::{json, Value};

use crate::readiness::Readiness;

mod destinations;
mod jobs;

use destinations::{list_destinations, redrive, retry_job};
use jobs::{get_import, get_job, submit_jobs};

/// A configured destination as the API knows it.
#[derive(Clone, Debug)]
pub struct DestinationInfo {
    /// Type name.
    pub kind: String,
    /// Whether its worker runs.
    pub enabled: bool,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The job store (timed).
    pub store: Arc<dyn JobStore>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// The running router, for wake-ups and readiness.
    pub router: RouterHandle,
    /// Configured destinations by id.
    pub destinations: Arc<BTreeMap<String, DestinationInfo>>,
    /// Bearer token for `/v1/*`, when set.
    pub auth_token: Option<Secret>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest wait for a whole request body (slow or stalled clients).
    pub body_read_timeout: Duration,
    /// Cached write probes of the store and staging, for `/readyz`.
    pub readiness: Readiness,
}

/// An API error: status plus the `{"error":{"code","message"}}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Ask the client to close the connection (its request was cut short).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            close: false,
        }
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A store error: the store refusing the request itself (`Invalid`) is
    /// the client's problem (400); anything else is the store's (503).
    fn store(e: StoreError) -> Self {
        if let StoreError::Invalid(reason) = &e {
            return Self::malformed(reason.clone());
        }
        tracing::error!(error = %e, "API request failed on the store.");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the job store failed: {e}"),
        )
    }
}

/// The error code an HTTP status stands for, for errors the handlers did not
/// shape themselves (axum's extractor rejections, hyper's).
fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "malformed_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        503 => "unavailable",
        s if s >= 500 => "internal_error",
        _ => "bad_request",
    }
}

/// Rewrites any error response that is not already JSON (axum's plain-text
/// rejections: a path that is not UTF-8, a query string that does not
/// parse) into the `{"error":{"code","message"}}` shape every client expects.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    let mut out = (
        status,
        Json(json!({"error": {"code": code_for(status), "message": message}})),
    )
        .into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The router: `/v1/*` behind the token, the rest open.
pub fn routes(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/jobs", post(submit_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/retry", post(retry_job))
        .route("/v1/imports/{id}", get(get_import))
        .route("/v1/destinations", get(list_destinations))
        .route("/v1/destinations/{id}/redrive", post(redrive))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.auth_token {
        let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
        let (first, second) = (values.next(), values.next());
        if second.is_some() {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "more than one Authorization header",
            )
            .into_response();
        }
        let Some(given) = first else {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            )
            .into_response();
        };
        // The whole header value, byte for byte: `Bearer <token>` and
        // nothing else (no extra spaces, no other scheme spelling).
        let expected = format!("Bearer {}", token.expose());
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn rfc3339(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.as_millis())
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Accepts canonical ids only (`1`, never `+1`, `01` or ` 1`), so one job
/// has one URL.
fn parse_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    let canonical = raw.bytes().all(|b| b.is_ascii_digit()) && !raw.starts_with('0');
    canonical
        .then(|| raw.parse::<i64>().ok())
        .flatten()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found(format!("no {what} `{raw}`")))
}

async fn metrics(State(st): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if let Err(reason) = st.readiness.check().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response();
    }
    if !st.router.healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "a destination worker stopped"})),
        )
            .into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare_is_correct() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn only_canonical_ids_resolve() {
        assert_eq!(parse_id("1", "job").unwrap(), 1);
        assert_eq!(parse_id("9223372036854775807", "job").unwrap(), i64::MAX);
        for raw in [
            "+1",
            "01",
            "0",
            "-1",
            " 1",
            "1 ",
            "1.0",
            "",
            "9223372036854775808",
        ] {
            let e = parse_id(raw, "job").unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_FOUND, "{raw:?}");
        }
    }

    #[test]
    fn store_refusals_are_the_clients_problem() {
        let e = ApiError::store(StoreError::Invalid("messageId contains a NUL".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "malformed_request")
        );
        let e = ApiError::store(StoreError::Unavailable("down".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        );
        assert_eq!(code_for(StatusCode::BAD_REQUEST), "malformed_request");
        assert_eq!(
            code_for(StatusCode::METHOD_NOT_ALLOWED),
            "method_not_allowed"
        );
    }

    #[test]
    fn every_code_for_a_status_is_documented() {
        let doc = include_str!("../../../docs/api.md");
        for status in 400..=599u16 {
            let code = code_for(StatusCode::from_u16(status).unwrap());
            assert!(
                doc.contains(&format!("| `{code}` | ")),
                "docs/api.md lacks a row for `{code}` (status {status})"
            );
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(Timestamp(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Timestamp(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
