//! Requests and their outcomes. Staged lines are streamed from the file by a
//! blocking reader into a bounded channel, so memory holds one request's
//! worth of records (batch mode) or `maxInFlight` records (single mode).
//!
//! When the endpoint fails in a way that retrying later may fix (408, 429,
//! 5xx, timeouts, dropped connections), the rest of the batch is not sent:
//! those records are deferred without spending an attempt, and the router
//! pauses the destination (honouring `Retry-After`) before trying again.
//!
//! Every request carries an `Idempotency-Key` header naming the job set it
//! carries, the same on every re-send of that set (see [`idempotency_key`]),
//! so a receiver can drop the repeats the router's duplicate window produces.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use batchrouter_core::classify::{error_for_status, parse_retry_after, root_cause};
use batchrouter_core::{
    DestinationError, DestinationTelemetry, ErrorCode, JobError, JobId, Outcome, StagedBatch,
    UploadOutput,
};
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::mpsc;

use crate::config::{HttpConfig, Method, Mode};

/// Body bytes of an error answer kept for the job's reason.
const ERROR_BODY_LIMIT: usize = 2048;

/// The header carrying a request's stable key (IETF draft
/// `draft-ietf-httpapi-idempotency-key-header`, as Stripe and others use it).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` of a request carrying `records` (a contiguous run of
/// the batch's jobs in line order), in the mode's shape:
/// - batch mode, the whole batch in one request: the batch id itself (the
///   router derives it from the job ids, so a re-send of the same job set
///   gets the same id);
/// - batch mode, one of several requests: `<batch id>/<first job id>+<count>`,
///   which names the run exactly (a batch's line order is fixed);
/// - single mode: `job-<job id>`, the store's id of the record, the same
///   whatever batch the record travels in.
pub fn idempotency_key(mode: Mode, batch: &StagedBatch, records: &[JobId]) -> String {
    match (mode, records) {
        (Mode::Single, [id]) => format!("job-{id}"),
        _ if records == batch.job_ids.as_slice() => batch.batch_id.clone(),
        _ => format!(
            "{}/{}+{}",
            batch.batch_id,
            records.first().copied().unwrap_or_default(),
            records.len()
        ),
    }
}

/// Sends staged batches to one endpoint.
pub struct Client {
    http: reqwest::Client,
    cfg: HttpConfig,
    headers: HeaderMap,
    telemetry: Arc<dyn DestinationTelemetry>,
}

type Chunk = Result<Vec<(JobId, String)>, String>;

impl Client {
    /// Builds the HTTP client (no connection is made yet).
    pub fn new(cfg: HttpConfig, telemetry: Arc<dyn DestinationTelemetry>) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in &cfg.headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            let mut value = HeaderValue::from_str(v.expose())
                .map_err(|_| format!("header {k}: invalid value"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            // A redirect would turn POST into GET (dropping the records while
            // answering 2xx) and could carry secret headers to another host.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(cfg.max_in_flight.max(4))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(Client {
            http,
            cfg,
            headers,
            telemetry,
        })
    }

    /// Delivers a staged batch; every job gets exactly one outcome.
    pub async fn send_batch(&self, batch: &StagedBatch) -> UploadOutput {
        let per_message = match self.cfg.mode {
            Mode::Batch => self.cfg.max_batch_size,
            Mode::Single => 1,
        };
        let (tx, rx) = mpsc::channel::<Chunk>(match self.cfg.mode {
            Mode::Batch => 2,
            Mode::Single => self.cfg.max_in_flight * 2,
        });
        let reader_batch = batch.clone();
        let reader =
            tokio::task::spawn_blocking(move || read_chunks(&reader_batch, per_message, tx));
        let out = match self.cfg.mode {
            Mode::Batch => self.send_chunks(batch, rx).await,
            Mode::Single => self.send_singles(batch, rx).await,
        };
        reader.abort();
        out
    }

    async fn send_chunks(
        &self,
        batch: &StagedBatch,
        mut rx: mpsc::Receiver<Chunk>,
    ) -> UploadOutput {
        let mut out = UploadOutput::default();
        let mut done = 0usize;
        while let Some(chunk) = rx.recv().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    fail_rest(&mut out, &batch.job_ids[done..], &e);
                    return out;
                }
            };
            let mut body =
                Vec::with_capacity(chunk.iter().map(|(_, l)| l.len() + 1).sum::<usize>() + 2);
            body.push(b'[');
            for (i, (_, line)) in chunk.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(line.as_bytes());
            }
            body.push(b']');
            done += chunk.len();
            let ids: Vec<JobId> = chunk.iter().map(|(id, _)| *id).collect();
            let key = idempotency_key(Mode::Batch, batch, &ids);
            match self.send(body, &key).await {
                Ok(()) => chunk
                    .iter()
                    .for_each(|(id, _)| out.push(*id, Outcome::succeeded())),
                Err(e) => {
                    let outcome = Outcome::from_destination_error(&e);
                    chunk
                        .iter()
                        .for_each(|(id, _)| out.push(*id, outcome.clone()));
                    out.note_retry_after(e.retry_after());
                    if !matches!(e, DestinationError::Permanent { .. }) {
                        defer_rest(&mut out, &batch.job_ids[done..], &e);
                        return out;
                    }
                }
            }
        }
        if done < batch.job_ids.len() {
            fail_rest(&mut out, &batch.job_ids[done..], "staged file ended early");
        }
        out
    }

    async fn send_singles(&self, batch: &StagedBatch, rx: mpsc::Receiver<Chunk>) -> UploadOutput {
        let stop: Arc<Mutex<Option<DestinationError>>> = Arc::new(Mutex::new(None));
        let read_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let records =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .filter_map(|chunk| {
                    let read_error = read_error.clone();
                    async move {
                        match chunk {
                            Ok(mut c) => c.pop(),
                            Err(e) => {
                                *read_error.lock().unwrap() = Some(e);
                                None
                            }
                        }
                    }
                });
        let results: Vec<(JobId, Outcome, Option<Duration>)> = records
            .map(|(id, line)| {
                let stop = stop.clone();
                async move {
                    if let Some(e) = stop.lock().unwrap().clone() {
                        return (id, deferred(&e), None);
                    }
                    let key = idempotency_key(Mode::Single, batch, &[id]);
                    match self.send(line.into_bytes(), &key).await {
                        Ok(()) => (id, Outcome::succeeded(), None),
                        Err(e) => {
                            if !matches!(e, DestinationError::Permanent { .. }) {
                                stop.lock().unwrap().get_or_insert(e.clone());
                            }
                            (id, Outcome::from_destination_error(&e), e.retry_after())
                        }
                    }
                }
            })
            .buffer_unordered(self.cfg.max_in_flight)
            .collect()
            .await;
        let mut out = UploadOutput::default();
        let mut seen = std::collections::HashSet::with_capacity(results.len());
        for (id, outcome, hint) in results {
            seen.insert(id);
            out.push(id, outcome);
            out.note_retry_after(hint);
        }
        let missing: Vec<JobId> = batch
            .job_ids
            .iter()
            .copied()
            .filter(|id| !seen.contains(id))
            .collect();
        if !missing.is_empty() {
            let why = read_error
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| "staged file ended early".into());
            fail_rest(&mut out, &missing, &why);
        }
        out
    }

    /// One request; `Ok` on 2xx, a classified error otherwise.
    async fn send(&self, body: Vec<u8>, key: &str) -> Result<(), DestinationError> {
        let req = match self.cfg.method {
            Method::Post => self.http.post(self.cfg.url.clone()),
            Method::Put => self.http.put(self.cfg.url.clone()),
        };
        let mut headers = self.headers.clone();
        // Batch ids and job ids are ASCII digits, letters and `-/+`.
        if let Ok(v) = HeaderValue::from_str(key) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY), v);
        }
        let resp = match req.headers(headers).body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                let label = if e.is_timeout() { "timeout" } else { "error" };
                self.telemetry.request(label);
                return Err(transport_error(&e, self.cfg.timeout));
            }
        };
        let status = resp.status().as_u16();
        self.telemetry.request(resp.status().as_str());
        if resp.status().is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = read_limited(resp, ERROR_BODY_LIMIT).await;
        Err(error_for_status(status, &body, retry_after)
            .unwrap_or_else(|| DestinationError::retryable(format!("HTTP {status}"))))
    }
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> DestinationError {
    if e.is_timeout() {
        DestinationError::retryable(format!(
            "request timed out after {}s",
            timeout.as_secs_f64()
        ))
    } else if e.is_connect() {
        DestinationError::retryable(format!("connection failed: {}", root_cause(e)))
    } else {
        DestinationError::retryable(format!("request failed: {}", root_cause(e)))
    }
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let take = (limit - buf.len()).min(chunk.len());
        buf.extend_from_slice(&chunk[..take]);
        if buf.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Outcome of a record not sent because an earlier request failed
/// transiently: retried later without spending an attempt.
fn deferred(e: &DestinationError) -> Outcome {
    Outcome::Throttled(JobError::new(
        e.code(),
        format!(
            "not sent: an earlier request of this batch failed ({})",
            e.message()
        ),
    ))
}

fn defer_rest(out: &mut UploadOutput, ids: &[JobId], e: &DestinationError) {
    for id in ids {
        out.push(*id, deferred(e));
    }
}

fn fail_rest(out: &mut UploadOutput, ids: &[JobId], why: &str) {
    for id in ids {
        out.push(
            *id,
            Outcome::Failed(JobError::new(
                ErrorCode::Internal,
                format!("cannot read staged batch: {why}"),
            )),
        );
    }
}

/// Reads the staged file in chunks of `per_message` lines (blocking).
fn read_chunks(batch: &StagedBatch, per_message: usize, tx: mpsc::Sender<Chunk>) {
    let lines = match batch.lines() {
        Ok(l) => l,
        Err(e) => {
            let _ = tx.blocking_send(Err(e.to_string()));
            return;
        }
    };
    let mut chunk = Vec::with_capacity(per_message);
    for item in lines {
        match item {
            Ok(pair) => {
                chunk.push(pair);
                if chunk.len() == per_message {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(per_message));
                    if tx.blocking_send(Ok(full)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !chunk.is_empty() && tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                    return;
                }
                let _ = tx.blocking_send(Err(e.to_string()));
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}
