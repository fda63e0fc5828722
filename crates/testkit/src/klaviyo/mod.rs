//! A stand-in for Klaviyo's bulk profile import API (`KLAVIYO_BULK_UPLOAD`).
//!
//! Real paths (`/api/profile-bulk-import-jobs[/{id}[/import-errors]]`, a
//! trailing slash accepted), real headers (`Authorization: Klaviyo-API-Key`,
//! a dated `revision`, the JSON:API media type) and real error shapes
//! (JSON:API `errors` with `source.pointer`), limits (10,000 profiles →
//! 400, 5 MB → 413, ~100 KB per profile → 400 naming the profile),
//! per-profile validation errors that reject the whole request, imports
//! that progress over several polls and may end `cancelled`, per-profile
//! import errors behind cursor pagination (`page[size]` 1–100, default 20,
//! like the vendor; the links keep the size), optional enforcement of the
//! rate limits, and scriptable faults (429 storms with `Retry-After`, 5xx,
//! delays, dropped connections). It counts the profiles each import really
//! applied, per key, so tests can assert exactly-once delivery.

mod imports;
mod server;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The API key the stand-in accepts unless told otherwise.
pub const DEFAULT_API_KEY: &str = "pk_standin_0123456789abcdef";
/// The oldest `revision` accepted by default; older ones are refused.
pub const DEFAULT_OLDEST_REVISION: &str = "2023-02-22";
/// The largest `page[size]` of import errors (the vendor's maximum); a
/// larger or non-positive one is refused with 400.
pub const MAX_ERRORS_PAGE_SIZE: usize = 100;

/// How the stand-in behaves; the defaults are the vendor's figures.
#[derive(Clone, Debug)]
pub struct KlaviyoStandInOptions {
    /// Accepted private API key.
    pub api_key: String,
    /// Oldest accepted `revision` date (`YYYY-MM-DD`).
    pub oldest_revision: String,
    /// Most profiles per create request (vendor: 10,000; more → 400).
    pub max_profiles: usize,
    /// Largest create request body in bytes (vendor: 5 MB; more → 413).
    pub max_body_bytes: usize,
    /// Largest profile, as compact JSON (vendor: about 100 KB; more → 400
    /// with an error pointing at the profile, rejecting the request).
    pub max_profile_bytes: usize,
    /// Import errors per page when the request names no `page[size]`
    /// (vendor: 20; a `page[size]` of 1 to [`MAX_ERRORS_PAGE_SIZE`] is honoured).
    pub errors_page_size: usize,
    /// Status polls an import needs to end (0: it ends at creation).
    pub polls_to_complete: u32,
    /// Remember every imported key (turn off for million-profile benchmarks).
    pub track_keys: bool,
    /// Enforce (per second, per minute) request limits with 429 answers.
    pub rate_limit: Option<(u32, u32)>,
}

impl Default for KlaviyoStandInOptions {
    fn default() -> Self {
        KlaviyoStandInOptions {
            api_key: DEFAULT_API_KEY.to_string(),
            oldest_revision: DEFAULT_OLDEST_REVISION.to_string(),
            max_profiles: 10_000,
            max_body_bytes: 5_000_000,
            max_profile_bytes: 100_000,
            errors_page_size: 20,
            polls_to_complete: 3,
            track_keys: true,
            rate_limit: None,
        }
    }
}

/// Which requests a scripted fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Every request.
    Any,
    /// `POST /api/profile-bulk-import-jobs`.
    Create,
    /// `GET /api/profile-bulk-import-jobs/{id}`.
    Status,
    /// `GET /api/profile-bulk-import-jobs/{id}/import-errors`.
    Errors,
    /// Anything else (404).
    Other,
}

/// One scripted answer, used instead of the normal handling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KlaviyoFault {
    /// Status to answer (ignored when `drop_connection`).
    pub status: u16,
    /// `Retry-After` header, verbatim.
    pub retry_after: Option<String>,
    /// Wait before answering.
    pub delay: Option<Duration>,
    /// Close the connection without an answer.
    pub drop_connection: bool,
    /// Raw body instead of the JSON:API error for `status`.
    pub body: Option<String>,
    /// Send the status, the headers and half the body, then break the
    /// connection (a server or proxy dying mid-answer).
    pub truncate_body: bool,
    /// Handle the request normally (lets scripts target the n-th request).
    pub pass: bool,
}

impl KlaviyoFault {
    /// Answer `status` with the JSON:API error Klaviyo sends for it.
    pub fn status(status: u16) -> Self {
        KlaviyoFault {
            status,
            ..Default::default()
        }
    }

    /// 429 with `Retry-After: <seconds>`, as Klaviyo throttles.
    pub fn throttled(retry_after_secs: u64) -> Self {
        KlaviyoFault {
            status: 429,
            retry_after: Some(retry_after_secs.to_string()),
            ..Default::default()
        }
    }

    /// No fault: the request is handled normally (a placeholder in a queue).
    pub fn pass() -> Self {
        KlaviyoFault {
            pass: true,
            ..Default::default()
        }
    }

    /// Close the connection without answering.
    pub fn dropped() -> Self {
        KlaviyoFault {
            drop_connection: true,
            ..Default::default()
        }
    }

    /// Answer `status` with exactly `body` (e.g. malformed JSON).
    pub fn raw(status: u16, body: impl Into<String>) -> Self {
        KlaviyoFault {
            status,
            body: Some(body.into()),
            ..Default::default()
        }
    }

    /// Cut the answer mid-body: headers and half the body, then the
    /// connection closes (see [`KlaviyoFault::truncate_body`]).
    pub fn truncated(mut self) -> Self {
        self.truncate_body = true;
        self
    }

    /// Wait `d` before answering.
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
}

/// A profile rule: the profile's `attributes.<field>` (a string) contains `needle`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRule {
    /// Attribute to look at (`email`, `phone_number`, …).
    pub field: String,
    /// Substring that triggers the rule.
    pub needle: String,
}

impl ProfileRule {
    fn hit<'a>(&self, attributes: &'a Value) -> Option<&'a str> {
        attributes
            .get(&self.field)
            .and_then(Value::as_str)
            .filter(|v| v.contains(&self.needle))
    }
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Arrival time.
    pub at: Instant,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Which endpoint it was.
    pub route: Route,
    /// Status answered (0 for a dropped connection).
    pub status: u16,
}

/// One accepted create request.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateRecord {
    /// The import job id handed out.
    pub import_id: String,
    /// Profiles in the request.
    pub profiles: usize,
    /// Request body size.
    pub body_bytes: usize,
    /// `relationships.lists` ids, `None` when the request had no relationship.
    pub list_ids: Option<Vec<String>>,
}

/// An import's state, for assertions.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportInfo {
    /// Klaviyo-style job id.
    pub id: String,
    /// `queued`, `processing`, `complete` or `cancelled`.
    pub status: String,
    /// Profiles in the import.
    pub total: u64,
    /// Profiles that fail in the import.
    pub failed: u64,
    /// Status polls so far.
    pub polls: u32,
}

#[derive(Default)]
struct Script {
    faults: VecDeque<(Route, KlaviyoFault)>,
    invalid: Vec<ProfileRule>,
    fail_in_import: Vec<ProfileRule>,
    known_lists: Option<HashSet<String>>,
    cancel_next: u32,
    links_origin: Option<String>,
    omit_original_payload: bool,
    key_revoked: bool,
}

struct Import {
    id: String,
    status: &'static str,
    total: u64,
    errors: Vec<Value>,
    ok_keys: Vec<String>,
    ok_count: u64,
    polls: u32,
    cancel: bool,
    created_at: String,
    completed_at: Option<String>,
}

struct State {
    opts: KlaviyoStandInOptions,
    addr: SocketAddr,
    script: Mutex<Script>,
    imports: Mutex<HashMap<String, Import>>,
    next_import: AtomicU64,
    imported: Mutex<HashMap<String, u32>>,
    imported_total: AtomicU64,
    log: Mutex<Vec<RequestRecord>>,
    creates: Mutex<Vec<CreateRecord>>,
    last_headers: Mutex<Vec<(String, String)>>,
    recent: Mutex<VecDeque<Instant>>,
    limited: AtomicU64,
}

/// A running Klaviyo stand-in on 127.0.0.1; stops when dropped.
pub struct KlaviyoStandIn {
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

impl KlaviyoStandIn {
    /// Starts with the vendor's defaults on a free port.
    pub async fn start() -> Self {
        Self::start_with(KlaviyoStandInOptions::default()).await
    }

    /// Starts with explicit options.
    pub async fn start_with(opts: KlaviyoStandInOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            opts,
            addr,
            script: Mutex::new(Script::default()),
            imports: Mutex::new(HashMap::new()),
            next_import: AtomicU64::new(1),
            imported: Mutex::new(HashMap::new()),
            imported_total: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            creates: Mutex::new(Vec::new()),
            last_headers: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::new()),
            limited: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(server::serve(listener, state.clone(), stopped));
        KlaviyoStandIn { state, stop }
    }

    /// `http://127.0.0.1:PORT`, the manager's `baseUrl`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// The accepted API key.
    pub fn api_key(&self) -> &str {
        &self.state.opts.api_key
    }

    /// Revokes (`true`) or restores the accepted API key: while revoked,
    /// every request gets Klaviyo's real 401 `not_authenticated` answer, as
    /// when an account owner deletes the key mid-import.
    pub fn set_key_revoked(&self, revoked: bool) {
        self.state.script.lock().unwrap().key_revoked = revoked;
    }

    /// Answers the next request of `route` with `fault` (queued in order).
    pub fn push_fault(&self, route: Route, fault: KlaviyoFault) {
        self.push_faults(route, fault, 1);
    }

    /// Answers the next `n` requests of `route` with `fault` (a storm).
    pub fn push_faults(&self, route: Route, fault: KlaviyoFault, n: usize) {
        let mut s = self.state.script.lock().unwrap();
        for _ in 0..n {
            s.faults.push_back((route, fault.clone()));
        }
    }

    /// Rejects any create request holding a profile whose `field` contains
    /// `needle`: 400 with one error per such profile, pointer included.
    pub fn reject_profiles_where(&self, field: &str, needle: &str) {
        self.state.script.lock().unwrap().invalid.push(ProfileRule {
            field: field.into(),
            needle: needle.into(),
        });
    }

    /// Accepts such profiles, but the import fails them (import-errors).
    pub fn fail_in_import_where(&self, field: &str, needle: &str) {
        self.state
            .script
            .lock()
            .unwrap()
            .fail_in_import
            .push(ProfileRule {
                field: field.into(),
                needle: needle.into(),
            });
    }

    /// Only these list ids exist; others are refused (400, list pointer).
    pub fn set_known_lists(&self, ids: &[&str]) {
        self.state.script.lock().unwrap().known_lists =
            Some(ids.iter().map(|s| s.to_string()).collect());
    }

    /// The next `n` imports created end `cancelled` instead of `complete`.
    pub fn cancel_next_imports(&self, n: u32) {
        self.state.script.lock().unwrap().cancel_next += n;
    }

    /// Import errors of imports created from now on carry no
    /// `original_payload` (only the pointer names the profile).
    pub fn omit_original_payload(&self, omit: bool) {
        self.state.script.lock().unwrap().omit_original_payload = omit;
    }

    /// Pagination links use this origin instead of the stand-in's own.
    pub fn set_links_origin(&self, origin: Option<&str>) {
        self.state.script.lock().unwrap().links_origin = origin.map(str::to_string);
    }

    /// Drops every fault, rule, pending cancellation and links override: the
    /// API is healthy again (the known lists stay).
    pub fn heal(&self) {
        let mut s = self.state.script.lock().unwrap();
        let lists = s.known_lists.take();
        *s = Script::default();
        s.known_lists = lists;
    }

    /// How many times profiles with this key (email, else phone, else
    /// external id, as sent) were applied by completed imports.
    pub fn imported_count(&self, key: &str) -> u32 {
        self.state
            .imported
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Snapshot of imported keys and their counts.
    pub fn imported(&self) -> HashMap<String, u32> {
        self.state.imported.lock().unwrap().clone()
    }

    /// Profiles applied by completed imports (duplicates included).
    pub fn imported_total(&self) -> u64 {
        self.state.imported_total.load(Ordering::Relaxed)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests of one route so far.
    pub fn request_count(&self, route: Route) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| route == Route::Any || r.route == route)
            .count()
    }

    /// Accepted create requests, in order.
    pub fn creates(&self) -> Vec<CreateRecord> {
        self.state.creates.lock().unwrap().clone()
    }

    /// Every import, sorted by id.
    pub fn imports(&self) -> Vec<ImportInfo> {
        let imports = self.state.imports.lock().unwrap();
        let mut out: Vec<ImportInfo> = imports
            .values()
            .map(|i| ImportInfo {
                id: i.id.clone(),
                status: i.status.to_string(),
                total: i.total,
                failed: i.errors.len() as u64,
                polls: i.polls,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Headers of the last request (lower-case names).
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.state.last_headers.lock().unwrap().clone()
    }

    /// Requests answered 429 by the enforced rate limit (not by scripts).
    pub fn rate_limited(&self) -> u64 {
        self.state.limited.load(Ordering::Relaxed)
    }
}

impl Drop for KlaviyoStandIn {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The most requests that arrived within any `window`.
pub fn max_requests_in_window(records: &[RequestRecord], window: Duration) -> usize {
    let mut times: Vec<Instant> = records.iter().map(|r| r.at).collect();
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}
