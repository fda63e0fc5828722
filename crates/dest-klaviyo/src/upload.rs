//! Uploading a staged batch. A blocking thread (`pack.rs`) streams the
//! staged file (never the async runtime) and packs the lines into request
//! bodies of at most `maxProfilesPerRequest` profiles and `maxRequestBytes`
//! encoded bytes (measured exactly: the body is the staged lines themselves
//! inside a fixed envelope), one body ahead of the sender; each accepted
//! request becomes its own Klaviyo import job with its own persisted context.
//!
//! Answers: 2xx → importing; 400 whose errors all point at profiles →
//! those jobs aborted, the rest resubmitted once; 413 → the request is split
//! in halves; 429 → throttled (this request and the rest of the batch);
//! 5xx, timeouts, transport → failed (the rest of the batch is not sent);
//! other 4xx → aborted with Klaviyo's detail, and the rest of the batch
//! aborted unsent with the same reason (every request of a batch shares the
//! key, revision and list, which is what such an answer is about).
//!
//! No request starts later than `uploadTimeBudget` after the upload began:
//! what is left is throttled unsent, so the call returns (with the imports
//! already created) well before the router's `uploadCallTimeout` would
//! drop it and lose them.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Instant;

use batchrouter_core::{
    DestinationError, ErrorCode, JobError, JobId, NewImport, Outcome, StagedBatch, UploadOutput,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::client::{profile_index, Answer, RequestError};
use crate::context::{ImportContext, CONTEXT_VERSION};
use crate::pack::{read_staged, Chunk, Envelope, Item, Packing};
use crate::poll::JobDocument;
use crate::KlaviyoManager;

/// Where bulk import jobs are created.
pub const CREATE_PATH: &str = "/api/profile-bulk-import-jobs";
/// Why the rest of a batch is not sent.
#[derive(Clone)]
enum Stop {
    Throttled(JobError),
    Failed(JobError),
    Aborted(JobError),
}

impl Stop {
    fn outcome(&self) -> Outcome {
        match self {
            Stop::Throttled(e) => Outcome::Throttled(e.clone()),
            Stop::Failed(e) => Outcome::Failed(e.clone()),
            Stop::Aborted(e) => Outcome::Aborted(e.clone()),
        }
    }
}

/// One upload call's running state.
struct Run<'a> {
    m: &'a KlaviyoManager,
    envelope: Envelope,
    url: String,
    /// No request starts after this (`uploadTimeBudget` from the start).
    deadline: tokio::time::Instant,
    out: UploadOutput,
    stop: Option<Stop>,
    requests: u32,
    aborted: usize,
    failed: usize,
    throttled: usize,
}

/// Uploads one staged batch; see the module docs for the outcomes.
pub async fn upload(m: &KlaviyoManager, batch: &StagedBatch) -> UploadOutput {
    let started = Instant::now();
    let envelope = Envelope::new(m.cfg.list_id.as_deref());
    let mut run = Run {
        m,
        envelope: envelope.clone(),
        url: m.client.url(CREATE_PATH),
        deadline: tokio::time::Instant::now() + m.cfg.upload_time_budget,
        out: UploadOutput::default(),
        stop: None,
        requests: 0,
        aborted: 0,
        failed: 0,
        throttled: 0,
    };
    let packing = Packing {
        envelope,
        max_profiles: m.cfg.max_profiles_per_request,
        max_bytes: m.cfg.max_request_bytes,
    };
    // One body ready while another is in flight: memory stays at a few
    // request bodies whatever the batch size.
    let (tx, mut rx) = mpsc::channel(1);
    let reader = tokio::task::spawn_blocking({
        let batch = batch.clone();
        move || read_staged(batch, packing, tx)
    });
    let mut covered: HashSet<JobId> = HashSet::with_capacity(batch.job_ids.len());
    let mut broken: Option<String> = None;
    while let Some(item) = rx.recv().await {
        match item {
            Item::Chunk(chunk) => {
                covered.extend(chunk.jobs.iter().copied());
                run.send(chunk).await;
                if run.stop.is_some() {
                    break;
                }
            }
            Item::Decided(job, outcome) => {
                covered.insert(job);
                run.decide(job, outcome);
            }
            Item::Broken(why) => broken = Some(why),
        }
    }
    drop(rx);
    if let Err(e) = reader.await {
        broken.get_or_insert_with(|| format!("staged file reader failed: {e}"));
    }
    let stop = run
        .stop
        .clone()
        .or_else(|| broken.map(|why| Stop::Failed(JobError::new(ErrorCode::Internal, why))));
    let unsent: Vec<JobId> = batch
        .job_ids
        .iter()
        .copied()
        .filter(|j| !covered.contains(j))
        .collect();
    if !unsent.is_empty() {
        let stop = stop.unwrap_or_else(|| {
            Stop::Failed(JobError::new(
                ErrorCode::Internal,
                "the staged file ended before these jobs' lines".to_string(),
            ))
        });
        for job in unsent {
            run.decide(job, stop.outcome());
        }
    }
    let importing: usize = run.out.imports.iter().map(|i| i.job_ids.len()).sum();
    debug!(
        destination_id = %m.destination_id,
        batch_id = %batch.batch_id,
        attempt = batch.attempt,
        jobs = batch.job_ids.len(),
        imports = run.out.imports.len(),
        importing,
        aborted = run.aborted,
        failed = run.failed,
        throttled = run.throttled,
        requests = run.requests,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "klaviyo upload"
    );
    run.out
}

impl Run<'_> {
    /// Records one job's final word from this upload.
    fn decide(&mut self, job: JobId, outcome: Outcome) {
        match &outcome {
            Outcome::Aborted(e) => {
                self.aborted += 1;
                debug!(destination_id = %self.m.destination_id, job, code = %e.code, reason = %e.message, "klaviyo job aborted");
            }
            Outcome::Failed(e) => {
                self.failed += 1;
                debug!(destination_id = %self.m.destination_id, job, code = %e.code, reason = %e.message, "klaviyo job failed");
            }
            Outcome::Throttled(_) => self.throttled += 1,
            Outcome::Succeeded { .. } => {}
        }
        self.out.push(job, outcome);
    }

    fn decide_all(&mut self, jobs: &[JobId], outcome: &Outcome) {
        for &job in jobs {
            self.decide(job, outcome.clone());
        }
    }

    /// Sends one chunk (splitting it on 413, resubmitting once after
    /// stripping invalid profiles) and records every job's outcome.
    async fn send(&mut self, chunk: Chunk) {
        let mut queue: VecDeque<(Chunk, bool)> = VecDeque::from([(chunk, true)]);
        while let Some((chunk, may_resubmit)) = queue.pop_front() {
            if let Some(stop) = &self.stop {
                let outcome = stop.outcome();
                self.decide_all(&chunk.jobs, &outcome);
                continue;
            }
            self.requests += 1;
            let answer = match self
                .m
                .client
                .post(&self.url, chunk.body.clone(), Some(self.deadline))
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    self.request_failed(&chunk.jobs, &e);
                    continue;
                }
            };
            if answer.is_success() {
                self.accepted(chunk, &answer);
                continue;
            }
            match answer.status {
                413 if chunk.len() > 1 => {
                    let (left, right) = chunk.split(&self.envelope);
                    warn!(destination_id = %self.m.destination_id, profiles = left.len() + right.len(), "klaviyo refused the request as too large (413); splitting it");
                    queue.push_front((right, may_resubmit));
                    queue.push_front((left, may_resubmit));
                }
                413 => {
                    let e = JobError::new(
                        ErrorCode::DestinationRejected,
                        format!(
                            "profile is too large for Klaviyo even alone: {}",
                            answer.summary()
                        ),
                    );
                    self.decide_all(&chunk.jobs, &Outcome::Aborted(e));
                }
                429 => {
                    let e = JobError::new(ErrorCode::Throttled, answer.summary());
                    self.out.note_retry_after(answer.retry_after);
                    self.decide_all(&chunk.jobs, &Outcome::Throttled(e.clone()));
                    self.stop = Some(Stop::Throttled(not_sent(&e)));
                }
                400..=499 if !matches!(answer.status, 401 | 403 | 408) => {
                    match attributable(&answer, chunk.len()) {
                        Some(bad) => self.strip(chunk, bad, may_resubmit, &answer, &mut queue),
                        None => {
                            // Nothing names a profile: the refusal is about
                            // what every request of the batch shares (list,
                            // revision, envelope), so the rest would get it too.
                            let e = JobError::new(ErrorCode::DestinationRejected, answer.summary());
                            warn!(destination_id = %self.m.destination_id, status = answer.status, profiles = chunk.len(), reason = %e.message, "klaviyo refused a request for a reason naming no profile; the rest of the batch is not sent");
                            self.decide_all(&chunk.jobs, &Outcome::Aborted(e.clone()));
                            self.stop = Some(Stop::Aborted(refused_batch(&e)));
                        }
                    }
                }
                _ => match answer.to_destination_error() {
                    Some(DestinationError::Permanent { message }) => {
                        // 401/403 hold for every request of the batch: stop here.
                        let e = JobError::new(ErrorCode::DestinationRejected, message);
                        self.decide_all(&chunk.jobs, &Outcome::Aborted(e.clone()));
                        if matches!(answer.status, 401 | 403) {
                            self.stop = Some(Stop::Aborted(e));
                        }
                    }
                    Some(other) => {
                        let e = JobError::from(&other);
                        self.out.note_retry_after(other.retry_after());
                        self.decide_all(&chunk.jobs, &Outcome::from_destination_error(&other));
                        self.stop = Some(Stop::Failed(not_sent(&e)));
                    }
                    None => {}
                },
            }
        }
    }

    fn request_failed(&mut self, jobs: &[JobId], e: &RequestError) {
        let de = e.to_destination_error();
        let je = JobError::from(&de);
        self.out.note_retry_after(de.retry_after());
        self.decide_all(jobs, &Outcome::from_destination_error(&de));
        self.stop = Some(match (e, de) {
            // Out of time: nothing failed, the rest is simply not sent either.
            (RequestError::OutOfTime(_), _) => {
                info!(destination_id = %self.m.destination_id, budget_ms = self.m.cfg.upload_time_budget.as_millis() as u64, imports = self.out.imports.len(), "klaviyo upload reached uploadTimeBudget; the rest of the batch is throttled unsent");
                Stop::Throttled(je)
            }
            (_, DestinationError::Throttled { .. }) => Stop::Throttled(not_sent(&je)),
            _ => Stop::Failed(not_sent(&je)),
        });
    }

    fn accepted(&mut self, chunk: Chunk, answer: &Answer) {
        match JobDocument::parse(answer) {
            Ok(doc) if crate::context::valid_job_id(&doc.data.id) => {
                let context = ImportContext {
                    v: CONTEXT_VERSION,
                    klaviyo_job_id: doc.data.id,
                    profiles: chunk.keys,
                }
                .to_value();
                self.out.imports.push(NewImport {
                    context,
                    job_ids: chunk.jobs,
                });
            }
            Ok(doc) => {
                let e = JobError::new(
                    ErrorCode::DestinationUnavailable,
                    format!(
                        "Klaviyo accepted the import but named an unusable job id {:?}",
                        doc.data.id
                    ),
                );
                self.decide_all(&chunk.jobs, &Outcome::Failed(e));
            }
            Err(why) => {
                let e = JobError::new(
                    ErrorCode::DestinationUnavailable,
                    format!("Klaviyo accepted the import but its answer had no job id: {why}"),
                );
                self.decide_all(&chunk.jobs, &Outcome::Failed(e));
            }
        }
    }

    /// Aborts the profiles Klaviyo named and resubmits the rest once.
    fn strip(
        &mut self,
        chunk: Chunk,
        bad: BTreeMap<usize, Vec<String>>,
        may_resubmit: bool,
        answer: &Answer,
        queue: &mut VecDeque<(Chunk, bool)>,
    ) {
        for (&i, texts) in &bad {
            let e = JobError::new(
                ErrorCode::DestinationRejected,
                format!("Klaviyo rejected the profile: {}", texts.join("; ")),
            );
            self.decide(chunk.jobs[i], Outcome::Aborted(e));
        }
        let rest = chunk.subset(&self.envelope, |i| !bad.contains_key(&i));
        warn!(
            destination_id = %self.m.destination_id,
            status = answer.status,
            invalid = bad.len(),
            remaining = rest.len(),
            resubmit = may_resubmit,
            "klaviyo rejected a request for invalid profiles"
        );
        if rest.len() == 0 {
            return;
        }
        if may_resubmit {
            queue.push_front((rest, false));
        } else {
            let e = JobError::new(
                ErrorCode::DestinationUnavailable,
                format!(
                    "not imported: Klaviyo rejected the request again after invalid profiles were removed ({}); retrying later",
                    answer.summary()
                ),
            );
            self.decide_all(&rest.jobs, &Outcome::Failed(e));
        }
    }
}

/// Per-profile error texts when every error points at a profile of the request.
fn attributable(answer: &Answer, profiles: usize) -> Option<BTreeMap<usize, Vec<String>>> {
    let errors = answer.errors();
    if errors.is_empty() {
        return None;
    }
    let mut bad: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for e in &errors {
        let i = e
            .pointer()
            .and_then(profile_index)
            .filter(|i| *i < profiles)?;
        bad.entry(i).or_default().push(e.describe());
    }
    Some(bad)
}

fn not_sent(e: &JobError) -> JobError {
    JobError::new(
        e.code,
        format!(
            "not sent: an earlier request of this batch failed: {}",
            e.message
        ),
    )
}

fn refused_batch(e: &JobError) -> JobError {
    JobError::new(
        e.code,
        format!(
            "not sent: Klaviyo refused an earlier request of this batch for a reason that holds for every request: {}",
            e.message
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn only_fully_attributable_errors_strip_profiles() {
        let answer = |body: &str| Answer {
            status: 400,
            body: Bytes::from(body.to_string()),
            retry_after: None,
        };
        let a = answer(
            r#"{"errors":[
                {"code":"invalid","detail":"bad email","source":{"pointer":"/data/attributes/profiles/data/1/attributes/email"}},
                {"code":"invalid","detail":"bad phone","source":{"pointer":"/data/attributes/profiles/data/1/attributes/phone_number"}},
                {"code":"invalid","detail":"bad id","source":{"pointer":"/data/attributes/profiles/data/3"}}]}"#,
        );
        let bad = attributable(&a, 4).unwrap();
        assert_eq!(bad.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(bad[&1], vec!["bad email (invalid)", "bad phone (invalid)"]);
        assert!(
            attributable(&a, 3).is_none(),
            "index 3 is outside a 3-profile request"
        );
        let mixed = answer(
            r#"{"errors":[
                {"detail":"bad email","source":{"pointer":"/data/attributes/profiles/data/0/attributes/email"}},
                {"detail":"list not found","source":{"pointer":"/data/relationships/lists/data/0/id"}}]}"#,
        );
        assert!(attributable(&mixed, 4).is_none());
        assert!(attributable(&answer("not json"), 4).is_none());
    }
}
