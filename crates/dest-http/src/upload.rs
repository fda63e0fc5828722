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

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use batchrouter_core::{
    DestinationError, DestinationTelemetry, ErrorCode, JobError, JobId, Outcome, StagedBatch,
    Timestamp, UploadOutput,
};
use batchrouter_dest_kit::http::{self as kit, BodyError, TransportKind};
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::mpsc;

use crate::config::{HttpConfig, Method, Mode};
use crate::transform::split_line;

/// Largest error answer read for the job's reason (which keeps an excerpt of
/// it). A longer one is not read, and the reason says so rather than quoting
/// a silently cut body; the status alone still decides the verdict.
pub const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The header carrying a request's stable key (IETF draft
/// `draft-ietf-httpapi-idempotency-key-header`, as Stripe and others use it).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest destination id kept as written in a key; a longer (encoded) one
/// is cut and suffixed with a hash of the whole id, so every key stays under
/// 256 characters (the limit Stripe-style receivers apply).
const KEY_DESTINATION_MAX: usize = 128;

/// The `Idempotency-Key` of a request carrying `records` (a contiguous run of
/// the batch's jobs in line order, each with its creation time), in the
/// mode's shape, always prefixed with `<destination id>/`:
/// - batch mode, the whole batch in one request: `<batch id>-<created ms>`,
///   the router's batch id (derived from the job ids) and the batch's
///   creation time (its earliest job's), both the same on a re-send of the
///   same job set;
/// - batch mode, one of several requests:
///   `<batch id>-<created ms>/<first job id>+<count>`, which names the run
///   exactly (a batch's line order is fixed);
/// - single mode: `job-<job id>-<created ms>`, the record's store id and
///   creation time, the same whatever batch the record travels in.
///
/// Job ids alone would repeat: a fresh SQLite file, a new PostgreSQL
/// database or a second environment posting to the same receiver all count
/// from 1 again, and a receiver dropping repeated keys would discard new
/// records. The creation time (ms) and the destination id tell them apart.
pub fn idempotency_key(mode: Mode, batch: &StagedBatch, records: &[(JobId, Timestamp)]) -> String {
    let dest = key_destination(&batch.destination_id);
    let set = format!("{}-{}", batch.batch_id, batch.created_at.0);
    match (mode, records) {
        (Mode::Single, [(id, created)]) => format!("{dest}/job-{id}-{}", created.0),
        _ if records.len() == batch.job_ids.len()
            && records
                .iter()
                .map(|r| r.0)
                .eq(batch.job_ids.iter().copied()) =>
        {
            format!("{dest}/{set}")
        }
        _ => format!(
            "{dest}/{set}/{}+{}",
            records.first().map(|r| r.0).unwrap_or_default(),
            records.len()
        ),
    }
}

/// The destination id as a header-safe key part: bytes other than ASCII
/// letters, digits, `-`, `_` and `.` (what config accepts) are
/// percent-encoded, and an id longer than [`KEY_DESTINATION_MAX`] is cut and
/// ends in `~` and a hash of the whole id (`~` appears nowhere else).
fn key_destination(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() <= KEY_DESTINATION_MAX {
        return out;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Cut before an escape that would be split.
    let mut cut = KEY_DESTINATION_MAX - 17;
    if let Some(p) = out[cut.saturating_sub(2)..cut].find('%') {
        cut = cut - 2 + p;
    }
    format!("{}~{h:016x}", &out[..cut])
}

/// Sends staged batches to one endpoint.
pub struct Client {
    http: reqwest::Client,
    cfg: HttpConfig,
    headers: HeaderMap,
    telemetry: Arc<dyn DestinationTelemetry>,
}

/// A staged record ready to send: its job, the job's creation time and the
/// request body part (the staged line without its creation time).
type Record = (JobId, Timestamp, String);

type Chunk = Result<Vec<Record>, String>;

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
        // Redirects are refused (see `client_builder`): one would turn POST
        // into GET and could carry secret headers to another host.
        let http = kit::build(
            kit::client_builder(cfg.connect_timeout, cfg.timeout)
                .pool_max_idle_per_host(cfg.max_in_flight.max(4)),
        )
        .map_err(|e| e.to_string())?;
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
                Vec::with_capacity(chunk.iter().map(|(_, _, l)| l.len() + 1).sum::<usize>() + 2);
            body.push(b'[');
            for (i, (_, _, line)) in chunk.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(line.as_bytes());
            }
            body.push(b']');
            done += chunk.len();
            let ids: Vec<(JobId, Timestamp)> = chunk.iter().map(|(id, at, _)| (*id, *at)).collect();
            let key = idempotency_key(Mode::Batch, batch, &ids);
            match self.send(body, &key).await {
                Ok(()) => chunk
                    .iter()
                    .for_each(|(id, _, _)| out.push(*id, Outcome::succeeded())),
                Err(e) => {
                    let outcome = Outcome::from_destination_error(&e);
                    chunk
                        .iter()
                        .for_each(|(id, _, _)| out.push(*id, outcome.clone()));
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
                                *read_error.lock().unwrap_or_else(PoisonError::into_inner) =
                                    Some(e);
                                None
                            }
                        }
                    }
                });
        let results: Vec<(JobId, Outcome, Option<Duration>)> = records
            .map(|(id, created, line)| {
                let stop = stop.clone();
                async move {
                    if let Some(e) = stop.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                        return (id, deferred(&e), None);
                    }
                    let key = idempotency_key(Mode::Single, batch, &[(id, created)]);
                    match self.send(line.into_bytes(), &key).await {
                        Ok(()) => (id, Outcome::succeeded(), None),
                        Err(e) => {
                            if !matches!(e, DestinationError::Permanent { .. }) {
                                stop.lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .get_or_insert(e.clone());
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
                .unwrap_or_else(PoisonError::into_inner)
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
        // Keys are ASCII letters, digits and `-_.%~/+` (see `key_destination`).
        if let Ok(v) = HeaderValue::from_str(key) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY), v);
        }
        let resp = kit::send(self.telemetry.as_ref(), req.headers(headers).body(body))
            .await
            .map_err(|e| {
                e.to_destination_error(match e.kind {
                    TransportKind::Timeout => format!(
                        "request timed out after {}s",
                        self.cfg.timeout.as_secs_f64()
                    ),
                    TransportKind::Connect => format!("connection failed: {e}"),
                    TransportKind::Other => format!("request failed: {e}"),
                })
            })?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(());
        }
        let retry_after = kit::retry_after(resp.headers());
        let body = error_body(kit::read_capped(resp, ERROR_BODY_LIMIT).await);
        Err(kit::error_for_status(status, &body, retry_after)
            .unwrap_or_else(|| DestinationError::retryable(format!("HTTP {status}"))))
    }
}

/// The text of an error answer for the job's reason. The status decides the
/// verdict whatever happens to the body, so a body that cannot be read is
/// described, loudly, instead of quoted.
fn error_body(read: Result<bytes::Bytes, BodyError>) -> String {
    match read {
        Ok(body) => String::from_utf8_lossy(&body).into_owned(),
        Err(e) => format!("({e})"),
    }
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

/// Reads the staged file in chunks of `per_message` records (blocking); a
/// line not in the staged format ends the read like an I/O error.
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
        let item = item.map_err(|e| e.to_string()).and_then(|(id, mut line)| {
            let (created, record) = split_line(&line)
                .ok_or_else(|| format!("line of job {id} is not `<created ms> <record>`"))?;
            let start = line.len() - record.len();
            line.drain(..start);
            Ok((id, created, line))
        });
        match item {
            Ok(record) => {
                chunk.push(record);
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
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(destination_id: &str, batch_id: String, job_ids: Vec<JobId>, at: i64) -> StagedBatch {
        StagedBatch {
            batch_id,
            destination_id: destination_id.into(),
            destination_type: "HTTP".into(),
            path: "unused.staged".into(),
            job_ids,
            bytes: 0,
            attempt: 1,
            created_at: Timestamp(at),
        }
    }

    #[tokio::test]
    async fn an_error_answer_over_the_cap_is_reported_not_cut() {
        use batchrouter_testkit::http::{Fault, HttpStandIn};
        let s = HttpStandIn::start().await;
        let cfg = crate::config::validate(&serde_json::json!({ "url": s.url() })).unwrap();
        let c = Client::new(cfg, Arc::new(batchrouter_core::NoopTelemetry)).unwrap();
        // Over the cap: the status still decides, the reason says why no
        // excerpt (it used to quote the first 2 KB as if it were the body).
        s.push_fault(Fault {
            status: 400,
            body: "x".repeat(ERROR_BODY_LIMIT + 1),
            ..Default::default()
        });
        let e = c.send(b"[]".to_vec(), "k").await.unwrap_err();
        assert!(matches!(e, DestinationError::Permanent { .. }), "{e:?}");
        assert_eq!(
            e.message(),
            format!(
                "HTTP 400: (the answer is larger than {ERROR_BODY_LIMIT} bytes, so it was not read)"
            )
        );
        // At the cap: quoted as an excerpt.
        s.push_fault(Fault {
            status: 503,
            body: "y".repeat(ERROR_BODY_LIMIT),
            ..Default::default()
        });
        let e = c.send(b"[]".to_vec(), "k").await.unwrap_err();
        assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
        assert_eq!(e.message(), format!("HTTP 503: {}…", "y".repeat(200)));
    }

    #[test]
    fn destination_ids_become_short_header_safe_key_parts() {
        assert_eq!(key_destination("events-eu_1.prod"), "events-eu_1.prod");
        assert_eq!(key_destination("a/b c~é"), "a%2Fb%20c%7E%C3%A9");
        let long = key_destination(&"é".repeat(300));
        assert_eq!(long.len(), KEY_DESTINATION_MAX);
        let (head, hash) = long.split_once('~').unwrap();
        assert!(head.starts_with("%C3%A9") && head.len() % 3 == 0, "{head}");
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{hash}");
        assert_ne!(long, key_destination(&"é".repeat(301)));
        // The cut never splits an escape, whatever its offset.
        for pad in 0..3 {
            let k = key_destination(&format!("{}{}", "a".repeat(pad), "/".repeat(100)));
            let head = k.split('~').next().unwrap();
            assert!(head.len() <= KEY_DESTINATION_MAX - 17);
            assert_eq!((head.len() - pad) % 3, 0, "{k}");
        }
    }

    #[test]
    fn keys_fit_a_header_and_stay_under_256_characters_at_the_extremes() {
        let ids: Vec<JobId> = (i64::MAX - 999_999..=i64::MAX).collect();
        let b = batch(
            &"%".repeat(500),
            format!("{}-{}-{:016x}", i64::MAX, ids.len(), u64::MAX),
            ids.clone(),
            i64::MAX,
        );
        let records: Vec<(JobId, Timestamp)> = ids[1..]
            .iter()
            .map(|id| (*id, Timestamp(i64::MIN)))
            .collect();
        for key in [
            idempotency_key(Mode::Batch, &b, &records),
            idempotency_key(Mode::Single, &b, &[(i64::MIN, Timestamp(i64::MIN))]),
        ] {
            assert!(key.len() < 256, "{} characters: {key}", key.len());
            HeaderValue::from_str(&key).unwrap();
        }
    }
}
