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

mod import;
mod server;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use self::server::{batch_status, create_import, result_file, token};

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
