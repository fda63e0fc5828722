//! A stand-in for a user's own HTTP endpoint (destination type `HTTP`).
//!
//! It accepts a JSON array of records (batch mode) or one JSON object (single
//! mode), remembers which records it accepted, and can be scripted to fail
//! the way real endpoints do: any status code, `Retry-After`, slow answers,
//! connections dropped without an answer, and per-record rejection.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One scripted answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Status to answer (ignored when `drop_connection`).
    pub status: u16,
    /// `Retry-After` header value, verbatim.
    pub retry_after: Option<String>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Close the connection without any answer.
    pub drop_connection: bool,
    /// Body to send.
    pub body: String,
    /// `Location` header (for redirects).
    pub location: Option<String>,
    /// Send the status, the headers and half the body, then break the
    /// connection (a server or proxy dying mid-answer).
    pub truncate_body: bool,
}

impl Fault {
    /// Answer with `status` and a short JSON body.
    pub fn status(status: u16) -> Self {
        Fault {
            status,
            body: format!("{{\"error\":\"scripted status {status}\"}}"),
            ..Default::default()
        }
    }

    /// Answer 429 (or any status) with a `Retry-After` header.
    pub fn with_retry_after(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }

    /// Delay the answer.
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }

    /// Answer with a redirect to `location`.
    pub fn redirect(status: u16, location: impl Into<String>) -> Self {
        Fault {
            status,
            location: Some(location.into()),
            ..Default::default()
        }
    }

    /// Cut the answer mid-body (see [`Fault::truncate_body`]).
    pub fn truncated(mut self) -> Self {
        self.truncate_body = true;
        self
    }

    /// Drop the connection without answering.
    pub fn dropped() -> Self {
        Fault {
            drop_connection: true,
            ..Default::default()
        }
    }
}

/// Reject any request holding a record whose `field` starts with `prefix`.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectRule {
    /// Record field to look at (top level).
    pub field: String,
    /// Matching prefix of its string value.
    pub prefix: String,
    /// Status to answer.
    pub status: u16,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Fault>,
    default: Option<Fault>,
    rules: Vec<RejectRule>,
}

struct State {
    key_field: String,
    track_keys: bool,
    script: Mutex<Script>,
    accepted: Mutex<HashMap<String, u32>>,
    accepted_records: AtomicU64,
    requests: AtomicU64,
    rejected_requests: AtomicU64,
    bodies_bytes: AtomicU64,
    headers_seen: Mutex<Vec<(String, String)>>,
    idempotency_keys: Mutex<Vec<Option<String>>>,
    last_method: Mutex<String>,
    arrivals: Mutex<Vec<std::time::Instant>>,
}

/// A running stand-in; stops when dropped.
pub struct HttpStandIn {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

/// Options for [`HttpStandIn::start_with`].
#[derive(Clone, Debug)]
pub struct HttpStandInOptions {
    /// Record field that identifies a record (default `id`).
    pub key_field: String,
    /// Remember every accepted key (turn off for million-record benchmarks).
    pub track_keys: bool,
}

impl Default for HttpStandInOptions {
    fn default() -> Self {
        HttpStandInOptions {
            key_field: "id".into(),
            track_keys: true,
        }
    }
}

impl HttpStandIn {
    /// Starts on 127.0.0.1 with a free port, remembering keys from field `id`.
    pub async fn start() -> Self {
        Self::start_with(HttpStandInOptions::default()).await
    }

    /// Starts with explicit options.
    pub async fn start_with(opts: HttpStandInOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            key_field: opts.key_field,
            track_keys: opts.track_keys,
            script: Mutex::new(Script::default()),
            accepted: Mutex::new(HashMap::new()),
            accepted_records: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rejected_requests: AtomicU64::new(0),
            bodies_bytes: AtomicU64::new(0),
            headers_seen: Mutex::new(Vec::new()),
            idempotency_keys: Mutex::new(Vec::new()),
            last_method: Mutex::new(String::new()),
            arrivals: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, state.clone(), stopped, handle));
        HttpStandIn { addr, state, stop }
    }

    /// The ingest URL (`http://127.0.0.1:PORT/ingest`).
    pub fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the next request with `fault` (queued in order).
    pub fn push_fault(&self, fault: Fault) {
        self.state.script.lock().unwrap().queue.push_back(fault);
    }

    /// Answers every request with `fault` once the queue is empty (None: 200).
    pub fn set_default(&self, fault: Option<Fault>) {
        self.state.script.lock().unwrap().default = fault;
    }

    /// Adds a per-record rejection rule.
    pub fn reject_when(&self, field: &str, prefix: &str, status: u16) {
        self.state.script.lock().unwrap().rules.push(RejectRule {
            field: field.into(),
            prefix: prefix.into(),
            status,
        });
    }

    /// Removes every scripted fault and rule: the endpoint is healthy again.
    pub fn heal(&self) {
        *self.state.script.lock().unwrap() = Script::default();
    }

    /// How many times a record key was accepted.
    pub fn accepted_count(&self, key: &str) -> u32 {
        self.state
            .accepted
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Snapshot of accepted keys and their counts.
    pub fn accepted(&self) -> HashMap<String, u32> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// Records accepted in total (duplicates included).
    pub fn accepted_records(&self) -> u64 {
        self.state.accepted_records.load(Ordering::Relaxed)
    }

    /// Requests received (any outcome).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests answered with a non-2xx status or dropped.
    pub fn rejected_requests(&self) -> u64 {
        self.state.rejected_requests.load(Ordering::Relaxed)
    }

    /// Request body bytes received.
    pub fn body_bytes(&self) -> u64 {
        self.state.bodies_bytes.load(Ordering::Relaxed)
    }

    /// When each request arrived, in order.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.state.arrivals.lock().unwrap().clone()
    }

    /// Method of the last request.
    pub fn last_method(&self) -> String {
        self.state.last_method.lock().unwrap().clone()
    }

    /// The `Idempotency-Key` header of every request, in arrival order
    /// (`None` where a request had none).
    pub fn idempotency_keys(&self) -> Vec<Option<String>> {
        self.state.idempotency_keys.lock().unwrap().clone()
    }

    /// Headers of the last request (lower-case names), for header tests.
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.state.headers_seen.lock().unwrap().clone()
    }
}

impl Drop for HttpStandIn {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A scripted connection drop: hyper closes the socket when the service
/// errors (shared by every stand-in's handler).
#[derive(Debug)]
pub(crate) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted connection drop")
    }
}

impl std::error::Error for Dropped {}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    *st.last_method.lock().unwrap() = req.method().to_string();
    st.arrivals.lock().unwrap().push(std::time::Instant::now());
    st.idempotency_keys.lock().unwrap().push(
        req.headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    );
    *st.headers_seen.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    st.bodies_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let fault = {
        let mut s = st.script.lock().unwrap();
        s.queue.pop_front().or_else(|| s.default.clone())
    };
    if let Some(f) = &fault {
        if let Some(d) = f.delay {
            tokio::time::sleep(d).await;
        }
        if f.drop_connection {
            st.rejected_requests.fetch_add(1, Ordering::Relaxed);
            return Err(Dropped);
        }
        if !(200..300).contains(&f.status) {
            st.rejected_requests.fetch_add(1, Ordering::Relaxed);
            let mut resp = Response::builder().status(f.status);
            if let Some(ra) = &f.retry_after {
                resp = resp.header("retry-after", ra);
            }
            if let Some(loc) = &f.location {
                resp = resp.header("location", loc);
            }
            return Ok(resp
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(f.body.clone())))
                .map(|mut r| {
                    if f.truncate_body {
                        r.extensions_mut().insert(CutMidBody);
                    }
                    r
                })
                .unwrap());
        }
    }
    let records: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(items)) => items,
        Ok(v @ Value::Object(_)) => vec![v],
        Ok(_) | Err(_) => {
            st.rejected_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(json_response(
                400,
                "{\"error\":\"body must be a JSON object or array\"}",
            ));
        }
    };
    let rules = st.script.lock().unwrap().rules.clone();
    for r in &records {
        for rule in &rules {
            let hit = r
                .get(&rule.field)
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with(&rule.prefix));
            if hit {
                st.rejected_requests.fetch_add(1, Ordering::Relaxed);
                let key = record_key(&st.key_field, r);
                return Ok(json_response(
                    rule.status,
                    &format!(
                        "{{\"error\":\"record {key} rejected: {} starts with {}\"}}",
                        rule.field, rule.prefix
                    ),
                ));
            }
        }
    }
    st.accepted_records
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    if st.track_keys {
        let mut acc = st.accepted.lock().unwrap();
        for r in &records {
            *acc.entry(record_key(&st.key_field, r)).or_insert(0) += 1;
        }
    }
    let status = fault.as_ref().map(|f| f.status).unwrap_or(200);
    let resp = json_response(status, "{\"status\":\"ok\"}");
    let mut resp = resp;
    if fault.is_some_and(|f| f.truncate_body) {
        resp.extensions_mut().insert(CutMidBody);
    }
    Ok(resp)
}

fn record_key(field: &str, record: &Value) -> String {
    match record.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::from("<no key>"),
    }
}

fn json_response(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Accepts connections on `listener` until `stopped` flips, answering every
/// request with `handle` (then [`finish_answer`]): the stand-ins' one loop.
pub(crate) async fn serve<S, E, H, Fut>(
    listener: TcpListener,
    state: Arc<S>,
    mut stopped: watch::Receiver<bool>,
    handle: H,
) where
    S: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    H: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stopped.changed() => return,
        };
        let st = state.clone();
        let mut stopped_conn = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { handle(st, req).await.map(finish_answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stopped_conn.changed() => {}
            }
        });
    }
}

/// Marks a stand-in answer to be cut mid-body by [`finish_answer`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct CutMidBody;

/// A stand-in answer as it goes on the wire.
pub(crate) type WireBody = BoxBody<Bytes, std::io::Error>;

/// Turns a stand-in's answer into what hyper sends. An answer marked
/// [`CutMidBody`] sends its status, headers and the first half of its body
/// (chunked, so nothing announces the rest), then the connection breaks:
/// what a client sees when a server or proxy dies mid-answer.
pub(crate) fn finish_answer(resp: Response<Full<Bytes>>) -> Response<WireBody> {
    let cut = resp.extensions().get::<CutMidBody>().is_some();
    let (mut parts, body) = resp.into_parts();
    if !cut {
        return Response::from_parts(parts, body.map_err(|never| match never {}).boxed());
    }
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    // A `Full` body is one ready frame.
    let full = futures::executor::block_on(body.collect())
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let half = full.slice(..full.len() / 2);
    // The pause lets hyper flush the head and the first half before the
    // error breaks the connection.
    let frames = futures::StreamExt::chain(
        futures::stream::iter([Ok(Frame::data(half))]),
        futures::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            Err(std::io::Error::other("scripted connection drop mid-body"))
        }),
    );
    Response::from_parts(parts, StreamBody::new(frames).boxed())
}
