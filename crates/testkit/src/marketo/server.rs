//! Request handling of the Marketo stand-in: the four endpoints, each
//! applying Marketo's rules in the order the real API does (scripted
//! faults, call limits, token checks, the queue limit), then answering in
//! Marketo's shapes (errors as HTTP 200 with `success:false`, status
//! bodies, result files). What a file and an import do lives in `import.rs`.
//!
//! Kept apart from `mod.rs`, which holds what tests touch (options, faults,
//! counters), so either side reads without the other.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use super::import::{active_imports, advance, complete, parse_file};
use super::{Endpoint, Import, ImportInfo, MarketoFault, Shared};

type Params = Query<HashMap<String, String>>;

fn json_response(status: u16, body: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json;charset=UTF-8")
        .body(Body::from(body.to_string()))
        .expect("valid response")
}

fn request_id() -> String {
    format!("{:x}#{:x}", fastrand::u32(..), fastrand::u64(..))
}

fn api_error(code: &str, message: &str) -> Response {
    json_response(
        200,
        json!({"requestId": request_id(), "success": false, "errors": [{"code": code, "message": message}]}),
    )
}

fn api_ok(result: Value) -> Response {
    json_response(
        200,
        json!({"requestId": request_id(), "success": true, "result": [result]}),
    )
}

/// Applies the next scripted fault of `endpoint`: `Some` answers the request.
async fn scripted(shared: &Shared, endpoint: Endpoint) -> Option<Response> {
    let fault = {
        let mut inner = shared.lock();
        *inner.requests.entry(endpoint).or_default() += 1;
        inner
            .faults
            .get_mut(&endpoint)
            .and_then(VecDeque::pop_front)
    };
    match fault? {
        MarketoFault::Api { code, message } => Some(api_error(&code, &message)),
        MarketoFault::Http {
            status,
            retry_after,
            body,
        } => {
            let mut resp = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(ra) = retry_after {
                resp = resp.header(header::RETRY_AFTER, ra);
            }
            Some(resp.body(Body::from(body)).expect("valid response"))
        }
        MarketoFault::Csv(body) => Some(
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/csv;charset=UTF-8")
                .body(Body::from(body))
                .expect("valid response"),
        ),
        MarketoFault::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        MarketoFault::DropConnection => Some(broken_answer(false)),
        MarketoFault::CutMidBody => Some(broken_answer(true)),
        MarketoFault::ExpireTokens => {
            let mut inner = shared.lock();
            let now = Instant::now();
            for exp in inner.tokens.values_mut() {
                *exp = now;
            }
            inner.current = None;
            None
        }
        MarketoFault::Pass => None,
    }
}

/// A `200` whose body breaks after its first bytes. With `flush_head`, a
/// pause first lets hyper send the head and those bytes, so the client sees
/// the status and then a broken body; without it the error comes before
/// anything is sent and the client sees the connection close unanswered.
fn broken_answer(flush_head: bool) -> Response {
    let pause = if flush_head {
        Duration::from_millis(50)
    } else {
        Duration::ZERO
    };
    let broken = futures::StreamExt::chain(
        futures::stream::iter([Ok(Bytes::from_static(b"{\"requestId\":"))]),
        futures::stream::once(async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Err(std::io::Error::other("scripted connection drop"))
        }),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(broken))
        .expect("valid response")
}

/// One API call in progress, for the concurrency limit; counted from the
/// moment the request reached the stand-in until its answer is ready.
struct Call {
    shared: Arc<Shared>,
    at_entry: usize,
}

impl Call {
    fn enter(shared: &Arc<Shared>) -> Call {
        let mut inner = shared.lock();
        inner.in_flight += 1;
        Call {
            shared: shared.clone(),
            at_entry: inner.in_flight,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.shared.lock().in_flight -= 1;
    }
}

/// Marketo's API call limits: 615 when more calls than allowed were in
/// progress as this one arrived, 606 when the sliding window is full.
fn limited(shared: &Shared, call: &Call) -> Option<Response> {
    let opts = &shared.opts;
    let mut inner = shared.lock();
    if let Some(max) = opts.max_concurrent_calls {
        if call.at_entry > max {
            inner.concurrency_limited += 1;
            return Some(api_error("615", "Concurrent access limit reached"));
        }
    }
    if let Some(max) = opts.max_calls_per_window {
        let now = Instant::now();
        while inner
            .calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= opts.rate_window)
        {
            inner.calls.pop_front();
        }
        if inner.calls.len() >= max {
            inner.rate_limited += 1;
            return Some(api_error(
                "606",
                &format!(
                    "Max rate limit '{max}' exceeded with in '{}' secs",
                    opts.rate_window.as_secs()
                ),
            ));
        }
        inner.calls.push_back(now);
    }
    None
}

/// Checks `Authorization: Bearer`; refuses the retired query parameter.
fn check_auth(
    shared: &Shared,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Option<Response> {
    let mut inner = shared.lock();
    if params.contains_key("access_token") {
        inner.query_token_uses += 1;
        inner.token_errors += 1;
        return Some(api_error("601", "Access token invalid"));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        inner.token_errors += 1;
        return Some(api_error("600", "Access token missing"));
    };
    match inner.tokens.get(token).copied() {
        Some(exp) if Instant::now() < exp => None,
        Some(_) => {
            inner.token_errors += 1;
            Some(api_error("602", "Access token expired"))
        }
        None => {
            inner.token_errors += 1;
            Some(api_error("601", "Access token invalid"))
        }
    }
}

pub(super) async fn token(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    if let Some(r) = scripted(&shared, Endpoint::Token).await {
        return r;
    }
    if params.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return json_response(
            400,
            json!({"error": "invalid_request", "error_description": "grant_type must be client_credentials"}),
        );
    }
    let opts = &shared.opts;
    if params.get("client_id") != Some(&opts.client_id)
        || params.get("client_secret") != Some(&opts.client_secret)
    {
        return json_response(
            401,
            json!({"error": "unauthorized", "error_description": "Bad client credentials"}),
        );
    }
    let mut inner = shared.lock();
    let now = Instant::now();
    let live = inner
        .current
        .as_ref()
        .and_then(|t| inner.tokens.get(t).map(|exp| (t.clone(), *exp)))
        .filter(|(_, exp)| now < *exp);
    let (token, expires) = match live {
        Some(t) => t,
        None => {
            let t = format!("{:016x}{:016x}:ab", fastrand::u64(..), fastrand::u64(..));
            let exp = now + opts.token_lifetime;
            inner.tokens.insert(t.clone(), exp);
            inner.current = Some(t.clone());
            inner.tokens_issued += 1;
            (t, exp)
        }
    };
    json_response(
        200,
        json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": expires.saturating_duration_since(now).as_secs(),
            "scope": "apiuser@standin.example",
        }),
    )
}

struct Upload {
    format: Option<String>,
    lookup: Option<String>,
    list_id: Option<String>,
    partition: Option<String>,
    file: Option<Bytes>,
}

async fn read_upload(mut multipart: Multipart) -> Result<Upload, String> {
    let mut up = Upload {
        format: None,
        lookup: None,
        list_id: None,
        partition: None,
        file: None,
    };
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "file" => up.file = Some(field.bytes().await.map_err(|e| e.to_string())?),
            "format" => up.format = Some(field.text().await.map_err(|e| e.to_string())?),
            "lookupField" => up.lookup = Some(field.text().await.map_err(|e| e.to_string())?),
            "listId" => up.list_id = Some(field.text().await.map_err(|e| e.to_string())?),
            "partitionName" => up.partition = Some(field.text().await.map_err(|e| e.to_string())?),
            _ => {
                let _ = field.bytes().await;
            }
        }
    }
    Ok(up)
}

pub(super) async fn create_import(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
    multipart: Multipart,
) -> Response {
    // The body is read before answering, as Marketo does, so a scripted
    // answer reaches the client instead of a reset mid-upload.
    let call = Call::enter(&shared);
    let up = read_upload(multipart).await;
    if let Some(r) = scripted(&shared, Endpoint::CreateImport).await {
        return r;
    }
    if let Some(r) = limited(&shared, &call) {
        return r;
    }
    if let Some(r) = check_auth(&shared, &headers, &params) {
        return r;
    }
    let up = match up {
        Ok(u) => u,
        Err(e) => return api_error("613", &format!("Invalid multipart request: {e}")),
    };
    let Some(file) = up.file else {
        return api_error("1003", "Missing file");
    };
    match up.format.as_deref() {
        Some("csv") => {}
        Some(other) => {
            return api_error(
                "1003",
                &format!("Unsupported format '{other}' (this stand-in reads csv)"),
            )
        }
        None => return api_error("1003", "Missing format"),
    }
    if file.len() >= shared.opts.max_file_bytes {
        return api_error("1003", "File size exceeds the 10 MB limit");
    }
    {
        let inner = shared.lock();
        let active = active_imports(&inner);
        if active >= shared.opts.max_queued {
            return api_error("1016", "Too many imports");
        }
    }
    let lookup = up.lookup.unwrap_or_else(|| "email".into());
    let (fail_rules, warn_rules) = {
        let inner = shared.lock();
        (inner.fail_rules.clone(), inner.warn_rules.clone())
    };
    let track = shared.opts.track_leads;
    let lookup2 = lookup.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        parse_file(&file, &lookup2, &fail_rules, &warn_rules, track)
    })
    .await
    .unwrap_or_else(|e| Err(format!("parser panicked: {e}")));
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return api_error("1003", &e),
    };
    let mut inner = shared.lock();
    // Checked again: another upload may have taken the last slot meanwhile.
    if active_imports(&inner) >= shared.opts.max_queued {
        return api_error("1016", "Too many imports");
    }
    let batch_id = inner.next_batch;
    inner.next_batch += 1;
    inner.rows_received += parsed.info.rows;
    let mut imp = Import {
        info: ImportInfo {
            batch_id,
            status: "Queued".into(),
            lookup_field: lookup,
            list_id: up.list_id,
            partition_name: up.partition,
            ..parsed.info
        },
        polls: 0,
        processed: 0,
        message: String::new(),
        failures: parsed.failures,
        warnings: parsed.warnings,
        pending_keys: parsed.pending_keys,
        accepted_rows: parsed.accepted_rows,
    };
    if shared.opts.polls_to_complete == 0 {
        complete(&mut inner, &mut imp);
    }
    inner.imports.insert(batch_id, imp);
    let active = active_imports(&inner);
    inner.max_active = inner.max_active.max(active);
    drop(inner);
    api_ok(json!({"batchId": batch_id, "importId": batch_id.to_string(), "status": "Queued"}))
}

pub(super) async fn batch_status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
    Path(file): Path<String>,
) -> Response {
    let call = Call::enter(&shared);
    if let Some(r) = scripted(&shared, Endpoint::Status).await {
        return r;
    }
    if let Some(r) = limited(&shared, &call) {
        return r;
    }
    if let Some(r) = check_auth(&shared, &headers, &params) {
        return r;
    }
    let Some(batch_id) = file
        .strip_suffix(".json")
        .and_then(|id| id.parse::<u64>().ok())
    else {
        return api_error("610", "Requested resource not found");
    };
    let mut inner = shared.lock();
    if !inner.imports.contains_key(&batch_id) {
        return api_error("1013", "Batch not found");
    }
    advance(&shared, &mut inner, batch_id);
    let imp = &inner.imports[&batch_id];
    let message = match imp.info.status.as_str() {
        "Failed" => imp.message.clone(),
        "Complete" => format!(
            "Import completed with {} rows failed and {} rows with warnings",
            imp.info.failed_rows, imp.info.warning_rows
        ),
        _ => String::new(),
    };
    api_ok(json!({
        "batchId": batch_id,
        "importId": batch_id.to_string(),
        "status": imp.info.status,
        "numOfLeadsProcessed": imp.processed,
        "numOfRowsFailed": if imp.info.status == "Complete" { imp.info.failed_rows } else { 0 },
        "numOfRowsWithWarning": if imp.info.status == "Complete" { imp.info.warning_rows } else { 0 },
        "message": message,
    }))
}

pub(super) async fn result_file(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
    Path((id, file)): Path<(String, String)>,
) -> Response {
    let (endpoint, reason_col) = match file.as_str() {
        "failures.json" => (Endpoint::Failures, "Import Failure Reason"),
        "warnings.json" => (Endpoint::Warnings, "Import Warning Reason"),
        _ => return api_error("610", "Requested resource not found"),
    };
    let call = Call::enter(&shared);
    if let Some(r) = scripted(&shared, endpoint).await {
        return r;
    }
    if let Some(r) = limited(&shared, &call) {
        return r;
    }
    if let Some(r) = check_auth(&shared, &headers, &params) {
        return r;
    }
    let Ok(batch_id) = id.parse::<u64>() else {
        return api_error("610", "Requested resource not found");
    };
    let inner = shared.lock();
    let Some(imp) = inner.imports.get(&batch_id) else {
        return api_error("1013", "Batch not found");
    };
    if imp.info.status != "Complete" {
        return api_error("1003", "Import is not complete yet");
    }
    let rows = if endpoint == Endpoint::Failures {
        &imp.failures
    } else {
        &imp.warnings
    };
    let rows = &rows[..rows.len().saturating_sub(inner.withheld_result_rows)];
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    let mut header_row = imp.info.columns.clone();
    header_row.push(reason_col.to_string());
    let written = w
        .write_record(&header_row)
        .and_then(|_| rows.iter().try_for_each(|r| w.write_record(r)));
    if written.is_err() {
        return api_error("611", "System error");
    }
    let body = w.into_inner().unwrap_or_default();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/csv;charset=UTF-8")
        .body(Body::from(body))
        .expect("valid response")
}
