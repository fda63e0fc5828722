//! A stand-in for Marketo's bulk lead import API on 127.0.0.1.
//!
//! It implements the token endpoint, import creation, batch status and the
//! failures/warnings result files with the real shapes and quirks: errors as
//! HTTP 200 with `success:false` and string codes, tokens handed back
//! unchanged while alive (601 unknown, 602 expired), the `access_token`
//! query parameter refused, files of 10 MB or more refused, at most 10
//! imports queued of which 2 import at once (the 11th gets 1016), the API
//! call limits (by default, as Marketo: 100 calls per 20 s, the next gets
//! 606; 10 calls at once, the 11th gets 615; the token endpoint is not
//! counted), imports that take several polls to finish, and result files
//! whose lookup values come back trimmed and lower-cased. Faults are
//! scriptable per endpoint, and counters let tests assert that each lead was
//! imported exactly once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Marketo's file size limit: a file must be under 10 MB.
pub const MAX_FILE_BYTES: usize = 10_000_000;

/// An endpoint faults can be scripted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/identity/oauth/token`.
    Token,
    /// `POST /bulk/v1/leads.json`.
    CreateImport,
    /// `GET /bulk/v1/leads/batch/{id}.json`.
    Status,
    /// `GET /bulk/v1/leads/batch/{id}/failures.json`.
    Failures,
    /// `GET /bulk/v1/leads/batch/{id}/warnings.json`.
    Warnings,
}

/// One scripted answer, consumed by the next request to its endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum MarketoFault {
    /// HTTP 200 with `success:false` and this error code and message.
    Api {
        /// Marketo error code, e.g. `606`.
        code: String,
        /// Marketo's message.
        message: String,
    },
    /// Any HTTP status with an optional `Retry-After` and a body.
    Http {
        /// Status to answer.
        status: u16,
        /// `Retry-After` value, verbatim.
        retry_after: Option<String>,
        /// Body to send.
        body: String,
    },
    /// HTTP 200 `text/csv;charset=UTF-8` with this body, as a result file
    /// answers (for malformed result files).
    Csv(String),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Break the connection before any answer arrives (the error comes
    /// before hyper has flushed the head).
    DropConnection,
    /// Send `200`, the headers and the first bytes of the body, then break
    /// the connection (a server or proxy dying mid-answer).
    CutMidBody,
    /// Expire every token, then handle the request normally (it gets 602).
    ExpireTokens,
    /// No fault: lets a test script "the second request fails".
    Pass,
}

impl MarketoFault {
    /// A Marketo error answer (HTTP 200, `success:false`).
    pub fn api(code: &str, message: &str) -> Self {
        MarketoFault::Api {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An HTTP status with a short JSON body.
    pub fn http(status: u16) -> Self {
        MarketoFault::Http {
            status,
            retry_after: None,
            body: format!("{{\"error\":\"scripted status {status}\"}}"),
        }
    }

    /// An HTTP status with a `Retry-After` header.
    pub fn http_retry_after(status: u16, retry_after: &str) -> Self {
        MarketoFault::Http {
            status,
            retry_after: Some(retry_after.into()),
            body: String::new(),
        }
    }
}

/// Settings of a stand-in instance.
#[derive(Clone, Debug)]
pub struct MarketoOptions {
    /// Accepted client id.
    pub client_id: String,
    /// Accepted client secret.
    pub client_secret: String,
    /// How long a token lives.
    pub token_lifetime: Duration,
    /// Status polls an import needs (while importing) to complete; 0 completes at once.
    pub polls_to_complete: u32,
    /// Largest accepted file (exclusive).
    pub max_file_bytes: usize,
    /// Imports queued at most (importing ones included).
    pub max_queued: usize,
    /// Imports processed at once.
    pub max_importing: usize,
    /// Count imports per lead (turn off for million-lead benchmarks).
    pub track_leads: bool,
    /// API calls accepted per `rate_window` (Marketo: 100); the next one in
    /// the window gets 606. `None` turns the limit off. Calls answered by a
    /// scripted fault or refused by a limit are not counted.
    pub max_calls_per_window: Option<usize>,
    /// The sliding window of `max_calls_per_window` (Marketo: 20 s).
    pub rate_window: Duration,
    /// API calls processed at once (Marketo: 10); a call arriving while that
    /// many are in progress gets 615. `None` turns the limit off.
    pub max_concurrent_calls: Option<usize>,
}

impl Default for MarketoOptions {
    fn default() -> Self {
        MarketoOptions {
            client_id: "standin-client".into(),
            client_secret: format!("standin-secret-{:016x}", fastrand::u64(..)),
            token_lifetime: Duration::from_secs(3600),
            polls_to_complete: 2,
            max_file_bytes: MAX_FILE_BYTES,
            max_queued: 10,
            max_importing: 2,
            track_leads: true,
            max_calls_per_window: Some(100),
            rate_window: Duration::from_secs(20),
            max_concurrent_calls: Some(10),
        }
    }
}

/// What the stand-in knows about one import, for assertions.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportInfo {
    /// Batch id.
    pub batch_id: u64,
    /// `Queued`, `Importing`, `Complete` or `Failed`.
    pub status: String,
    /// Data rows in the file.
    pub rows: u64,
    /// The file's header.
    pub columns: Vec<String>,
    /// `lookupField` sent (default `email`).
    pub lookup_field: String,
    /// `listId` sent.
    pub list_id: Option<String>,
    /// `partitionName` sent.
    pub partition_name: Option<String>,
    /// File size in bytes.
    pub file_bytes: usize,
    /// Rows whose lookup value already appeared in the same file.
    pub duplicate_keys: u64,
    /// Rows rejected by a failure rule.
    pub failed_rows: u64,
    /// Rows imported with a warning.
    pub warning_rows: u64,
}

#[derive(Clone, Debug)]
struct RowRule {
    pattern: String,
    reason: String,
}

#[derive(Debug)]
struct Import {
    info: ImportInfo,
    polls: u32,
    processed: u64,
    message: String,
    failures: Vec<Vec<String>>,
    warnings: Vec<Vec<String>>,
    pending_keys: Vec<String>,
    accepted_rows: u64,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, Instant>,
    current: Option<String>,
    faults: HashMap<Endpoint, VecDeque<MarketoFault>>,
    fail_rules: Vec<RowRule>,
    warn_rules: Vec<RowRule>,
    imports: BTreeMap<u64, Import>,
    next_batch: u64,
    imported: HashMap<String, u32>,
    rows_imported: u64,
    rows_received: u64,
    requests: HashMap<Endpoint, u64>,
    tokens_issued: u64,
    token_errors: u64,
    query_token_uses: u64,
    max_active: usize,
    calls: VecDeque<Instant>,
    in_flight: usize,
    rate_limited: u64,
    concurrency_limited: u64,
    withheld_result_rows: usize,
}

struct Shared {
    opts: MarketoOptions,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running stand-in; stops when dropped.
pub struct MarketoStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl MarketoStandIn {
    /// Starts with default options on a free port.
    pub async fn start() -> Self {
        Self::start_with(MarketoOptions::default()).await
    }

    /// Starts with explicit options on a free port.
    pub async fn start_with(opts: MarketoOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            opts,
            inner: Mutex::new(Inner {
                next_batch: 1001,
                ..Default::default()
            }),
        });
        let app = Router::new()
            .route("/identity/oauth/token", get(token).post(token))
            .route("/bulk/v1/leads.json", post(create_import))
            .route("/bulk/v1/leads/batch/{file}", get(batch_status))
            .route("/bulk/v1/leads/batch/{id}/{file}", get(result_file))
            .layer(DefaultBodyLimit::max(4 * MAX_FILE_BYTES))
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        MarketoStandIn {
            addr,
            shared,
            stop: Some(stop),
        }
    }

    /// The instance root to configure as `baseUrl`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The accepted client id.
    pub fn client_id(&self) -> &str {
        &self.shared.opts.client_id
    }

    /// The accepted client secret.
    pub fn client_secret(&self) -> &str {
        &self.shared.opts.client_secret
    }

    /// Queues a fault for the next request to `endpoint` (in order).
    pub fn push_fault(&self, endpoint: Endpoint, fault: MarketoFault) {
        self.shared
            .lock()
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    /// Rejects rows whose normalised lookup value contains `pattern`.
    pub fn fail_rows_matching(&self, pattern: &str, reason: &str) {
        self.shared.lock().fail_rules.push(RowRule {
            pattern: pattern.to_lowercase(),
            reason: reason.into(),
        });
    }

    /// Imports rows whose normalised lookup value contains `pattern` with a warning.
    pub fn warn_rows_matching(&self, pattern: &str, reason: &str) {
        self.shared.lock().warn_rules.push(RowRule {
            pattern: pattern.to_lowercase(),
            reason: reason.into(),
        });
    }

    /// Expires every token now: the next API call with one gets 602.
    pub fn expire_tokens(&self) {
        let mut inner = self.shared.lock();
        let now = Instant::now();
        for exp in inner.tokens.values_mut() {
            *exp = now;
        }
        inner.current = None;
    }

    /// Leaves the last `rows` rows out of every result file while the
    /// import's counts stay, as a result file that lags behind its counts
    /// would; 0 sends complete files again.
    pub fn withhold_result_rows(&self, rows: usize) {
        self.shared.lock().withheld_result_rows = rows;
    }

    /// Calls answered 606 by the enforced rate limit.
    pub fn rate_limited(&self) -> u64 {
        self.shared.lock().rate_limited
    }

    /// Calls answered 615 by the enforced concurrency limit.
    pub fn concurrency_limited(&self) -> u64 {
        self.shared.lock().concurrency_limited
    }

    /// Marks an import `Failed` with `message` (as Marketo does for a bad file).
    pub fn fail_import(&self, batch_id: u64, message: &str) {
        let mut inner = self.shared.lock();
        if let Some(imp) = inner.imports.get_mut(&batch_id) {
            imp.info.status = "Failed".into();
            imp.message = message.into();
        }
    }

    /// How often a lead (normalised lookup value) was imported by a completed import.
    pub fn imported_count(&self, key: &str) -> u32 {
        self.shared
            .lock()
            .imported
            .get(&key.trim().to_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Snapshot of imports per lead.
    pub fn imported(&self) -> HashMap<String, u32> {
        self.shared.lock().imported.clone()
    }

    /// Rows imported by completed imports (warnings included, failures not).
    pub fn rows_imported(&self) -> u64 {
        self.shared.lock().rows_imported
    }

    /// Data rows received in accepted import files.
    pub fn rows_received(&self) -> u64 {
        self.shared.lock().rows_received
    }

    /// Every import created so far, by batch id.
    pub fn imports(&self) -> Vec<ImportInfo> {
        self.shared
            .lock()
            .imports
            .values()
            .map(|i| i.info.clone())
            .collect()
    }

    /// Requests received by an endpoint.
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.shared
            .lock()
            .requests
            .get(&endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Tokens issued (a token handed back again while alive is not counted).
    pub fn tokens_issued(&self) -> u64 {
        self.shared.lock().tokens_issued
    }

    /// Every token ever issued, so tests can assert none leaks into logs.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().tokens.keys().cloned().collect()
    }

    /// API calls answered 600/601/602 (missing, unknown or expired token).
    pub fn token_errors(&self) -> u64 {
        self.shared.lock().token_errors
    }

    /// Calls that tried the retired `access_token` query parameter.
    pub fn query_token_uses(&self) -> u64 {
        self.shared.lock().query_token_uses
    }

    /// Most imports queued or importing at the same time.
    pub fn max_active_imports(&self) -> usize {
        self.shared.lock().max_active
    }
}

impl Drop for MarketoStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

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

async fn token(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
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

async fn create_import(
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

fn active_imports(inner: &Inner) -> usize {
    inner
        .imports
        .values()
        .filter(|i| i.info.status == "Queued" || i.info.status == "Importing")
        .count()
}

struct Parsed {
    info: ImportInfo,
    failures: Vec<Vec<String>>,
    warnings: Vec<Vec<String>>,
    pending_keys: Vec<String>,
    accepted_rows: u64,
}

fn parse_file(
    file: &[u8],
    lookup: &str,
    fail_rules: &[RowRule],
    warn_rules: &[RowRule],
    track: bool,
) -> Result<Parsed, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| format!("Invalid file: {e}"))?
        .iter()
        .map(String::from)
        .collect();
    let key_col = columns
        .iter()
        .position(|c| c.eq_ignore_ascii_case(lookup))
        .ok_or_else(|| format!("Lookup field '{lookup}' not found in file header"))?;
    let email_col = columns.iter().position(|c| c.eq_ignore_ascii_case("email"));
    let mut seen = std::collections::HashSet::new();
    let mut out = Parsed {
        info: ImportInfo {
            batch_id: 0,
            status: String::new(),
            rows: 0,
            columns: columns.clone(),
            lookup_field: String::new(),
            list_id: None,
            partition_name: None,
            file_bytes: file.len(),
            duplicate_keys: 0,
            failed_rows: 0,
            warning_rows: 0,
        },
        failures: Vec::new(),
        warnings: Vec::new(),
        pending_keys: Vec::new(),
        accepted_rows: 0,
    };
    for record in reader.records() {
        let record = record.map_err(|e| format!("Invalid file: {e}"))?;
        out.info.rows += 1;
        let key = record.get(key_col).unwrap_or("").trim().to_lowercase();
        if !seen.insert(key.clone()) {
            out.info.duplicate_keys += 1;
        }
        // Marketo normalises what it echoes: trimmed, lower-cased lookup values and emails.
        let echo = || -> Vec<String> {
            record
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if i == key_col || Some(i) == email_col {
                        v.trim().to_lowercase()
                    } else {
                        v.to_string()
                    }
                })
                .collect()
        };
        if let Some(rule) = fail_rules.iter().find(|r| key.contains(&r.pattern)) {
            let mut row = echo();
            row.push(rule.reason.clone());
            out.failures.push(row);
            out.info.failed_rows += 1;
            continue;
        }
        if let Some(rule) = warn_rules.iter().find(|r| key.contains(&r.pattern)) {
            let mut row = echo();
            row.push(rule.reason.clone());
            out.warnings.push(row);
            out.info.warning_rows += 1;
        }
        out.accepted_rows += 1;
        if track {
            out.pending_keys.push(key);
        }
    }
    Ok(out)
}

fn complete(inner: &mut Inner, imp: &mut Import) {
    imp.info.status = "Complete".into();
    imp.processed = imp.info.rows;
    inner.rows_imported += imp.accepted_rows;
    for key in std::mem::take(&mut imp.pending_keys) {
        *inner.imported.entry(key).or_insert(0) += 1;
    }
}

/// One poll's worth of progress: FIFO promotion into the importing slots,
/// then the polled import advances if it is importing.
fn advance(shared: &Shared, inner: &mut Inner, batch_id: u64) {
    let promote = |inner: &mut Inner| {
        let mut importing = inner
            .imports
            .values()
            .filter(|i| i.info.status == "Importing")
            .count();
        for imp in inner.imports.values_mut() {
            if importing >= shared.opts.max_importing {
                break;
            }
            if imp.info.status == "Queued" {
                imp.info.status = "Importing".into();
                importing += 1;
            }
        }
    };
    promote(inner);
    let Some(mut imp) = inner.imports.remove(&batch_id) else {
        return;
    };
    if imp.info.status == "Importing" {
        imp.polls += 1;
        let needed = shared.opts.polls_to_complete.max(1);
        if imp.polls >= needed {
            complete(inner, &mut imp);
        } else {
            imp.processed = imp.info.rows * u64::from(imp.polls) / u64::from(needed);
        }
    }
    inner.imports.insert(batch_id, imp);
    promote(inner);
}

async fn batch_status(
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

async fn result_file(
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
