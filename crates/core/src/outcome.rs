//! What a destination reports back: upload outputs, poll states, per-job stats.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{DestinationError, ErrorCode};
use crate::job::JobId;

/// A failed or aborted job's reason: a stable code plus a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human explanation, free of secrets.
    pub message: String,
}

impl JobError {
    /// Builds a reason from its two parts.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError {
            code,
            message: message.into(),
        }
    }
}

impl From<&DestinationError> for JobError {
    fn from(e: &DestinationError) -> Self {
        JobError::new(e.code(), e.message())
    }
}

/// The final word on one job from an upload or from import stats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Delivered; an optional note (e.g. a destination warning) and remote id.
    Succeeded {
        /// Kept on the job, e.g. a Marketo warning text.
        note: Option<String>,
        /// The destination's id for the record, when it gives one.
        external_id: Option<String>,
    },
    /// Retryable failure; the router schedules a retry with backoff.
    Failed(JobError),
    /// Permanent failure; the job ends aborted with this reason.
    Aborted(JobError),
    /// The destination refused to take the job right now (rate limit). It is
    /// retried later and the upload does not count against its budget.
    Throttled(JobError),
}

impl Outcome {
    /// Plain success without note or external id.
    pub fn succeeded() -> Self {
        Outcome::Succeeded {
            note: None,
            external_id: None,
        }
    }

    /// The outcome a classified destination error gives each job it touched.
    pub fn from_destination_error(e: &DestinationError) -> Self {
        match e {
            DestinationError::Retryable { .. } => Outcome::Failed(e.into()),
            DestinationError::Throttled { .. } => Outcome::Throttled(e.into()),
            DestinationError::Permanent { .. } => Outcome::Aborted(e.into()),
        }
    }
}

/// One asynchronous import started by an upload: the opaque context the
/// destination needs to poll it later, and the jobs it covers. Persisted
/// before the first poll so a restart resumes instead of uploading again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewImport {
    /// Destination-defined JSON (remote ids, key→job maps, …).
    pub context: serde_json::Value,
    /// Jobs whose outcome this import decides.
    pub job_ids: Vec<JobId>,
}

/// The result of `upload`: every job of the batch lands in exactly one place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UploadOutput {
    /// Imports started, each with the jobs it covers.
    pub imports: Vec<NewImport>,
    /// Jobs already decided by the upload itself.
    pub outcomes: Vec<(JobId, Outcome)>,
    /// When the destination asked for a pause before the next request.
    pub retry_after: Option<Duration>,
}

impl UploadOutput {
    /// Every job gets the same outcome.
    pub fn all(job_ids: &[JobId], outcome: &Outcome) -> Self {
        let mut out = UploadOutput::default();
        out.push_all(job_ids, outcome);
        out
    }

    /// Every job succeeded (fire-and-forget delivery).
    pub fn all_succeeded(job_ids: &[JobId]) -> Self {
        Self::all(job_ids, &Outcome::succeeded())
    }

    /// Every job failed (retryable) for the same reason.
    pub fn all_failed(job_ids: &[JobId], error: JobError) -> Self {
        Self::all(job_ids, &Outcome::Failed(error))
    }

    /// Every job gets the outcome of one classified error.
    pub fn all_from_error(job_ids: &[JobId], error: &DestinationError) -> Self {
        UploadOutput {
            retry_after: error.retry_after(),
            ..Self::all(job_ids, &Outcome::from_destination_error(error))
        }
    }

    /// Adds jobs that share one outcome.
    pub fn push_all(&mut self, job_ids: &[JobId], outcome: &Outcome) {
        self.outcomes
            .extend(job_ids.iter().map(|&id| (id, outcome.clone())));
    }

    /// Adds one decided job.
    pub fn push(&mut self, job_id: JobId, outcome: Outcome) {
        self.outcomes.push((job_id, outcome));
    }

    /// Keeps the longest pause hint seen.
    pub fn note_retry_after(&mut self, hint: Option<Duration>) {
        if let Some(h) = hint {
            self.retry_after = Some(self.retry_after.map_or(h, |cur| cur.max(h)));
        }
    }

    /// Number of job ids named anywhere in the output.
    pub fn job_count(&self) -> usize {
        self.outcomes.len() + self.imports.iter().map(|i| i.job_ids.len()).sum::<usize>()
    }
}

/// A broken manager contract: the output lost or duplicated job ids.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("manager output violates the contract: {missing} job(s) missing, {duplicated} duplicated, {unknown} unknown")]
pub struct OutputViolation {
    /// Batch jobs named nowhere.
    pub missing: usize,
    /// Jobs named more than once.
    pub duplicated: usize,
    /// Ids that were not in the batch.
    pub unknown: usize,
}

/// Checks that `output` names every id of `batch` exactly once and nothing else.
pub fn validate_upload_output(
    batch: &[JobId],
    output: &UploadOutput,
) -> Result<(), OutputViolation> {
    let expected: HashSet<JobId> = batch.iter().copied().collect();
    let mut seen: HashSet<JobId> = HashSet::with_capacity(expected.len());
    let mut duplicated = 0;
    let mut unknown = 0;
    let named = output.outcomes.iter().map(|(id, _)| *id).chain(
        output
            .imports
            .iter()
            .flat_map(|i| i.job_ids.iter().copied()),
    );
    for id in named {
        if !expected.contains(&id) {
            unknown += 1;
        } else if !seen.insert(id) {
            duplicated += 1;
        }
    }
    let missing = expected.len() - seen.len();
    if missing == 0 && duplicated == 0 && unknown == 0 {
        Ok(())
    } else {
        Err(OutputViolation {
            missing,
            duplicated,
            unknown,
        })
    }
}

/// What a poll learned about one import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Still running; optional processed/total counts for progress.
    InProgress {
        /// Records processed so far, when the destination says.
        processed: Option<u64>,
        /// Records in the import, when the destination says.
        total: Option<u64>,
    },
    /// Finished; `has_failures` says whether per-record stats are worth fetching.
    Complete {
        /// Some records failed or carry warnings.
        has_failures: bool,
    },
    /// The import as a whole failed.
    Failed {
        /// Whether uploading the jobs again may succeed.
        retryable: bool,
        /// The destination's explanation.
        error: JobError,
    },
}

/// Per-job results of a finished import. Jobs not named succeeded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UploadStats {
    /// Jobs whose outcome differs from plain success (or carries a note).
    pub outcomes: Vec<(JobId, Outcome)>,
    /// Result rows the destination returned that matched no job (counted, logged).
    pub unmatched: u64,
}
