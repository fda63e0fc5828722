//! Internal events: each notable transition is one struct whose `emit`
//! writes the log line and updates the metrics together, so the two never
//! disagree. Logs are per batch or per import, never per job at info level.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::store::{JobTransition, Tally, Transition};
use batchrouter_core::{ErrorCode, Timestamp};

use crate::metrics::Metrics;

/// Metrics and log context bound to one destination.
#[derive(Clone)]
pub struct DestinationEvents {
    /// Destination id.
    pub id: Arc<str>,
    /// Destination type.
    pub kind: Arc<str>,
    metrics: Arc<Metrics>,
}

impl DestinationEvents {
    /// Binds `metrics` to a destination.
    pub fn new(metrics: Arc<Metrics>, kind: &str, id: &str) -> Self {
        DestinationEvents {
            id: id.into(),
            kind: kind.into(),
            metrics,
        }
    }

    fn labels(&self) -> [&str; 2] {
        [&self.kind, &self.id]
    }

    fn labels3<'a>(&'a self, third: &'a str) -> [&'a str; 3] {
        [&self.kind, &self.id, third]
    }

    /// The shared metric families.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A span around one manager call (`op`: `transform`, `upload`), so the
    /// destination's own log lines carry the router's field names.
    pub fn span(&self, op: &'static str) -> tracing::Span {
        tracing::info_span!("manager", op, destination_id = %self.id, destination_type = %self.kind)
    }

    /// A span around one manager call on an import (`poll`,
    /// `get_upload_stats`), carrying its `import_id` too.
    pub fn import_span(&self, op: &'static str, import_id: i64) -> tracing::Span {
        tracing::info_span!(
            "manager", op, destination_id = %self.id, destination_type = %self.kind, import_id
        )
    }
}

/// New jobs the API accepted for one destination (duplicates excluded).
pub struct JobsReceived<'a> {
    /// Destination id.
    pub destination_id: &'a str,
    /// Destination type; empty when no running destination has the id.
    pub destination_type: &'a str,
    /// Jobs newly inserted.
    pub count: u64,
}

impl JobsReceived<'_> {
    /// Counts the jobs and logs at debug (per request, never per job at info).
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .jobs_received
            .with_label_values(&[self.destination_type, self.destination_id])
            .inc_by(self.count);
        tracing::debug!(
            destination_id = self.destination_id,
            destination_type = self.destination_type,
            count = self.count,
            "Jobs received."
        );
    }
}

/// Per-record results of one import that matched no job of it.
pub struct UnmatchedResults {
    /// Import id.
    pub import_id: i64,
    /// Results the destination returned that matched no job.
    pub unmatched: u64,
    /// Stats keyed by job ids that are not in this import.
    pub unknown: u64,
}

impl UnmatchedResults {
    /// Counts both kinds in `unmatched_results_total` and warns once each.
    pub fn emit(&self, ev: &DestinationEvents) {
        if self.unknown > 0 {
            tracing::warn!(
                destination_id = %ev.id, destination_type = %ev.kind, import_id = self.import_id,
                count = self.unknown, "Upload stats named jobs that are not in this import; ignored."
            );
        }
        if self.unmatched > 0 {
            tracing::warn!(
                destination_id = %ev.id, destination_type = %ev.kind, import_id = self.import_id,
                count = self.unmatched, "Destination returned per-record results that matched no job."
            );
        }
        let total = self.unmatched + self.unknown;
        if total > 0 {
            ev.metrics
                .unmatched_results
                .with_label_values(&ev.labels())
                .inc_by(total);
        }
    }
}

/// How an upload went, as the `result` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadResult {
    /// Every job succeeded or is importing.
    Success,
    /// Some jobs failed, were aborted or throttled.
    Partial,
    /// Every job failed, was aborted or throttled.
    Failed,
    /// The destination throttled the whole batch.
    Throttled,
    /// The upload exceeded `uploadCallTimeout`.
    Timeout,
    /// The manager broke the output contract.
    InvalidOutput,
}

impl UploadResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadResult::Success => "success",
            UploadResult::Partial => "partial",
            UploadResult::Failed => "failed",
            UploadResult::Throttled => "throttled",
            UploadResult::Timeout => "timeout",
            UploadResult::InvalidOutput => "invalid_output",
        }
    }
}

/// A batch was staged and is about to be uploaded.
pub struct BatchStaged<'a> {
    /// Batch id.
    pub batch_id: &'a str,
    /// Jobs in it.
    pub jobs: usize,
    /// Staged bytes.
    pub bytes: u64,
    /// Why it was cut: `count` (`maxEventsInABatch`), `bytes`
    /// (`MaxUploadLimit`, or the next job would not fit) or `time`
    /// (`asyncUploadTimeout`); a shutdown cuts nothing, it releases the
    /// staged jobs.
    pub cut: &'static str,
}

impl BatchStaged<'_> {
    /// Logs at debug and counts staged jobs.
    pub fn emit(&self, ev: &DestinationEvents) {
        ev.metrics
            .staged_jobs
            .with_label_values(&ev.labels())
            .inc_by(self.jobs as u64);
        tracing::debug!(
            destination_id = %ev.id, batch_id = self.batch_id, jobs = self.jobs,
            bytes = self.bytes, cut = self.cut, "Batch staged."
        );
    }
}

/// An upload returned (or timed out).
pub struct UploadFinished<'a> {
    /// Batch id.
    pub batch_id: &'a str,
    /// Jobs in the batch.
    pub jobs: usize,
    /// Staged bytes.
    pub bytes: u64,
    /// Wall time of the upload call.
    pub duration: Duration,
    /// Overall result.
    pub result: UploadResult,
    /// Imports started.
    pub imports: usize,
    /// Pause requested by the destination.
    pub retry_after: Option<Duration>,
}

impl UploadFinished<'_> {
    /// Logs one line and updates the upload metrics.
    pub fn emit(&self, ev: &DestinationEvents) {
        let m = &ev.metrics;
        m.uploads_total
            .with_label_values(&ev.labels3(self.result.as_str()))
            .inc();
        m.upload_duration
            .with_label_values(&ev.labels())
            .observe(self.duration.as_secs_f64());
        m.upload_bytes
            .with_label_values(&ev.labels())
            .inc_by(self.bytes);
        let retry_after_ms = self.retry_after.map(|d| d.as_millis() as u64);
        match self.result {
            UploadResult::Success | UploadResult::Partial => tracing::info!(
                destination_id = %ev.id, destination_type = %ev.kind, batch_id = self.batch_id,
                jobs = self.jobs, bytes = self.bytes, imports = self.imports,
                duration_ms = self.duration.as_millis() as u64, result = self.result.as_str(),
                retry_after_ms, "Upload finished."
            ),
            UploadResult::InvalidOutput => tracing::error!(
                destination_id = %ev.id, destination_type = %ev.kind, batch_id = self.batch_id,
                jobs = self.jobs, "Upload output broke the manager contract; the batch's jobs failed and will be retried. This is a bug in the destination."
            ),
            _ => tracing::warn!(
                destination_id = %ev.id, destination_type = %ev.kind, batch_id = self.batch_id,
                jobs = self.jobs, bytes = self.bytes, duration_ms = self.duration.as_millis() as u64,
                result = self.result.as_str(), retry_after_ms, "Upload did not deliver the batch."
            ),
        }
    }
}

/// A set of jobs changed state in one write.
pub struct StateChanges<'a> {
    /// Where the change came from (`transform`, `upload`, `import`).
    pub stage: &'static str,
    /// The transitions written (rejected ones excluded by the caller).
    pub transitions: &'a [JobTransition],
    /// The jobs changed (their creation times, for latency).
    pub jobs: &'a crate::decide::JobInfos,
    /// Jobs moved to `importing`.
    pub importing: usize,
    /// Write time.
    pub now: Timestamp,
}

impl StateChanges<'_> {
    /// Counts terminal outcomes, retries and error codes; logs one line.
    pub fn emit(&self, ev: &DestinationEvents) {
        let m = &ev.metrics;
        let Tally {
            succeeded: ok,
            failed,
            aborted,
        } = Tally::of(self.transitions);
        let mut codes: BTreeMap<ErrorCode, u64> = BTreeMap::new();
        let latency = m.job_latency.with_label_values(&ev.labels());
        for t in self.transitions {
            match &t.to {
                Transition::Succeeded { .. } => {
                    if let Some(c) = self.jobs.created_at(t.job_id) {
                        latency.observe(self.now.since(c).as_secs_f64());
                    }
                }
                Transition::Failed { error, .. } => {
                    *codes.entry(error.code).or_default() += 1;
                }
                Transition::Aborted { error } => {
                    *codes.entry(error.code).or_default() += 1;
                    if let Some(c) = self.jobs.created_at(t.job_id) {
                        latency.observe(self.now.since(c).as_secs_f64());
                    }
                }
            }
        }
        if ok > 0 {
            m.jobs_total
                .with_label_values(&ev.labels3("succeeded"))
                .inc_by(ok);
        }
        if aborted > 0 {
            m.jobs_total
                .with_label_values(&ev.labels3("aborted"))
                .inc_by(aborted);
        }
        if failed > 0 {
            m.retries_total
                .with_label_values(&ev.labels())
                .inc_by(failed);
        }
        for (code, n) in &codes {
            m.job_errors
                .with_label_values(&ev.labels3(code.as_str()))
                .inc_by(*n);
        }
        if ok + failed + aborted + self.importing as u64 == 0 {
            return;
        }
        let top_error = self.transitions.iter().find_map(|t| match &t.to {
            Transition::Aborted { error } | Transition::Failed { error, .. } => Some(error),
            Transition::Succeeded { .. } => None,
        });
        tracing::info!(
            destination_id = %ev.id, stage = self.stage, succeeded = ok, failed, aborted,
            importing = self.importing,
            first_error_code = top_error.map(|e| e.code.as_str()),
            first_error = top_error.map(|e| e.message.as_str()),
            "Job states changed."
        );
    }
}

/// How a poll went, as the `result` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollResult {
    /// Still running.
    InProgress,
    /// Finished (stats applied).
    Complete,
    /// The destination says the import failed.
    Failed,
    /// The poll or stats call itself failed; retried later.
    Error,
    /// The import passed its deadline.
    DeadlineExceeded,
}

impl PollResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PollResult::InProgress => "in_progress",
            PollResult::Complete => "complete",
            PollResult::Failed => "failed",
            PollResult::Error => "error",
            PollResult::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// One poll of one import.
pub struct PollFinished<'a> {
    /// Import id.
    pub import_id: i64,
    /// Result.
    pub result: PollResult,
    /// Progress, when known.
    pub progress: Option<u8>,
    /// Error text for failures and poll errors.
    pub error: Option<&'a str>,
    /// Consecutive poll errors so far.
    pub poll_errors: u32,
}

impl PollFinished<'_> {
    /// Logs one line and counts the poll.
    pub fn emit(&self, ev: &DestinationEvents) {
        ev.metrics
            .polls_total
            .with_label_values(&ev.labels3(self.result.as_str()))
            .inc();
        match self.result {
            PollResult::InProgress => tracing::debug!(
                destination_id = %ev.id, import_id = self.import_id, progress = self.progress,
                "Import in progress."
            ),
            PollResult::Complete => tracing::info!(
                destination_id = %ev.id, destination_type = %ev.kind, import_id = self.import_id,
                "Import complete."
            ),
            PollResult::Error => tracing::warn!(
                destination_id = %ev.id, import_id = self.import_id, error = self.error,
                poll_errors = self.poll_errors, "Poll failed; the import is kept and polled again later."
            ),
            PollResult::Failed | PollResult::DeadlineExceeded => tracing::warn!(
                destination_id = %ev.id, import_id = self.import_id, result = self.result.as_str(),
                error = self.error, "Import failed."
            ),
        }
    }
}

/// Writes the store refused because another owner holds the rows now.
pub struct FencedWritesRejected {
    /// Where (`upload`, `import`, `transform`).
    pub stage: &'static str,
    /// Rows refused.
    pub count: usize,
}

impl FencedWritesRejected {
    /// Warns and counts; nothing is lost, the new owner decides those jobs.
    pub fn emit(&self, ev: &DestinationEvents) {
        if self.count == 0 {
            return;
        }
        ev.metrics
            .fenced_writes_rejected
            .with_label_values(&ev.labels())
            .inc_by(self.count as u64);
        tracing::warn!(
            destination_id = %ev.id, stage = self.stage, count = self.count,
            "Store refused writes for jobs this process no longer holds (lease expired and taken over)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_and_unmatched_results_count_through_their_events() {
        let metrics = Metrics::new();
        let ev = DestinationEvents::new(metrics.clone(), "HTTP", "d");
        JobsReceived {
            destination_id: "d",
            destination_type: "HTTP",
            count: 3,
        }
        .emit(&metrics);
        UnmatchedResults {
            import_id: 7,
            unmatched: 2,
            unknown: 1,
        }
        .emit(&ev);
        UnmatchedResults {
            import_id: 8,
            unmatched: 0,
            unknown: 0,
        }
        .emit(&ev);
        let labels = ["HTTP", "d"];
        assert_eq!(metrics.jobs_received.with_label_values(&labels).get(), 3);
        assert_eq!(
            metrics.unmatched_results.with_label_values(&labels).get(),
            3
        );
    }
}
