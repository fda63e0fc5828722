//! Polling one import: `GET /api/profile-bulk-import-jobs/{id}` and the
//! mapping of Klaviyo's job status to the router's poll states. A poll that
//! does not work is an `Err` (the router keeps the import); only a verdict
//! from Klaviyo about the import itself ends it.

use std::time::Duration;

use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, PollStatus, Timestamp,
};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::client::Answer;
use crate::context::ImportContext;
use crate::KlaviyoManager;

/// A `profile-bulk-import-job` document (create and status answers).
#[derive(Debug, Deserialize)]
pub struct JobDocument {
    /// The job resource.
    pub data: JobResource,
}

/// The job resource.
#[derive(Debug, Deserialize)]
pub struct JobResource {
    /// Klaviyo's job id.
    pub id: String,
    /// Status and counts.
    #[serde(default)]
    pub attributes: JobAttributes,
}

/// Status and counts of an import job.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobAttributes {
    /// `queued`, `processing`, `complete`, `cancelled`.
    pub status: Option<String>,
    /// Profiles in the job.
    pub total_count: Option<u64>,
    /// Profiles processed so far.
    pub completed_count: Option<u64>,
    /// Profiles that failed.
    pub failed_count: Option<u64>,
    /// Set once the job ended.
    pub completed_at: Option<String>,
}

impl JobDocument {
    /// Parses a 2xx answer's body.
    pub fn parse(answer: &Answer) -> Result<Self, String> {
        serde_json::from_slice::<JobDocument>(&answer.body).map_err(|e| {
            format!(
                "malformed answer from Klaviyo ({e}): {}",
                batchrouter_core::render::excerpt(&String::from_utf8_lossy(&answer.body), 200)
            )
        })
    }
}

/// How long after an import's creation a 404 for it is taken as "this import
/// is gone" (and its jobs uploaded again) rather than as a lookup that may
/// work later (replication lag, a proxy's hiccup). Before that a 404 is a
/// poll error: the import is kept and polled again.
pub const NOT_FOUND_GRACE: Duration = Duration::from_secs(10 * 60);

/// Whether a 404 for `import` means it is really gone (see [`NOT_FOUND_GRACE`]).
pub fn gone_for_good(import: &ImportHandle) -> bool {
    Timestamp::now().since(import.started_at) >= NOT_FOUND_GRACE
}

/// The poll error for a 404 within [`NOT_FOUND_GRACE`].
pub fn not_found_yet(import: &ImportHandle, klaviyo_job_id: &str) -> DestinationError {
    let age = Timestamp::now().since(import.started_at).as_secs();
    DestinationError::retryable(format!(
        "Klaviyo does not know import job {klaviyo_job_id} (HTTP 404) {age}s after it was created; asking again (it is given up {}s after creation)",
        NOT_FOUND_GRACE.as_secs()
    ))
}

/// The path of one import job.
pub fn job_path(klaviyo_job_id: &str) -> String {
    format!("/api/profile-bulk-import-jobs/{klaviyo_job_id}")
}

/// Asks Klaviyo how one import is doing.
pub async fn poll(
    m: &KlaviyoManager,
    import: &ImportHandle,
) -> Result<PollStatus, DestinationError> {
    let ctx = match ImportContext::from_value(&import.context) {
        Ok(c) => c,
        Err(e) => {
            // Nothing will ever make this context readable: let the jobs be
            // uploaded again rather than wait for the import deadline.
            warn!(destination_id = %m.destination_id, import_id = import.id, error = %e, "klaviyo import context unreadable");
            return Ok(PollStatus::Failed {
                retryable: true,
                error: JobError::new(ErrorCode::ImportFailed, e.to_string()),
            });
        }
    };
    let url = m.client.url(&job_path(&ctx.klaviyo_job_id));
    let answer = m.client.get(&url, None).await.map_err(|e| {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, error = %e, "klaviyo poll failed");
        e.to_destination_error()
    })?;
    if answer.status == 404 && !gone_for_good(import) {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, "klaviyo import job not found (yet); polling again");
        return Err(not_found_yet(import, &ctx.klaviyo_job_id));
    }
    if answer.status == 404 {
        let msg = format!(
            "Klaviyo no longer knows import job {} (HTTP 404: expired or deleted); the jobs will be uploaded again",
            ctx.klaviyo_job_id
        );
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, "klaviyo import job not found");
        return Ok(PollStatus::Failed {
            retryable: true,
            error: JobError::new(ErrorCode::ImportFailed, msg),
        });
    }
    if let Some(e) = answer.to_destination_error() {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, status = answer.status, error = %e, "klaviyo poll refused");
        return Err(e);
    }
    let doc = JobDocument::parse(&answer).map_err(DestinationError::retryable)?;
    let a = &doc.data.attributes;
    let status = a.status.as_deref().unwrap_or("");
    let result = status_to_poll(&ctx.klaviyo_job_id, a);
    debug!(
        destination_id = %m.destination_id,
        import_id = import.id,
        klaviyo_job = %ctx.klaviyo_job_id,
        status,
        completed = a.completed_count.unwrap_or(0),
        failed = a.failed_count.unwrap_or(0),
        total = a.total_count.unwrap_or(0),
        "klaviyo poll"
    );
    result
}

/// Maps Klaviyo's job status to the router's poll state.
pub fn status_to_poll(job_id: &str, a: &JobAttributes) -> Result<PollStatus, DestinationError> {
    let status = a.status.as_deref().unwrap_or("");
    match status {
        "queued" | "processing" => Ok(PollStatus::InProgress {
            processed: a.completed_count,
            total: a.total_count,
        }),
        "complete" => Ok(PollStatus::Complete {
            has_failures: a.failed_count.unwrap_or(0) > 0,
        }),
        "cancelled" => Ok(PollStatus::Failed {
            retryable: true,
            error: JobError::new(
                ErrorCode::ImportFailed,
                format!(
                    "Klaviyo cancelled import job {job_id} after {} of {} profiles; the jobs will be uploaded again",
                    a.completed_count.unwrap_or(0),
                    a.total_count.unwrap_or(0)
                ),
            ),
        }),
        other if a.completed_at.is_some() => Ok(PollStatus::Failed {
            retryable: true,
            error: JobError::new(
                ErrorCode::ImportFailed,
                format!("Klaviyo import job {job_id} ended with status {other:?}, which is not `complete`; the jobs will be uploaded again"),
            ),
        }),
        // A status this daemon does not know, on a job that has not ended:
        // keep polling (until the import deadline) rather than guess.
        other => Err(DestinationError::retryable(format!(
            "Klaviyo import job {job_id} reports unknown status {other:?}; polling again"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(status: &str, completed: u64, failed: u64, done: bool) -> JobAttributes {
        JobAttributes {
            status: Some(status.into()),
            total_count: Some(10),
            completed_count: Some(completed),
            failed_count: Some(failed),
            completed_at: done.then(|| "2025-01-01T00:00:00+00:00".to_string()),
        }
    }

    #[test]
    fn statuses_map_to_poll_states() {
        assert_eq!(
            status_to_poll("j", &attrs("queued", 0, 0, false)).unwrap(),
            PollStatus::InProgress {
                processed: Some(0),
                total: Some(10)
            }
        );
        assert_eq!(
            status_to_poll("j", &attrs("processing", 4, 0, false)).unwrap(),
            PollStatus::InProgress {
                processed: Some(4),
                total: Some(10)
            }
        );
        assert_eq!(
            status_to_poll("j", &attrs("complete", 10, 0, true)).unwrap(),
            PollStatus::Complete {
                has_failures: false
            }
        );
        assert_eq!(
            status_to_poll("j", &attrs("complete", 8, 2, true)).unwrap(),
            PollStatus::Complete { has_failures: true }
        );
        match status_to_poll("j", &attrs("cancelled", 3, 0, true)).unwrap() {
            PollStatus::Failed { retryable, error } => {
                assert!(retryable);
                assert_eq!(error.code, ErrorCode::ImportFailed);
                assert!(
                    error
                        .message
                        .contains("cancelled import job j after 3 of 10"),
                    "{}",
                    error.message
                );
            }
            other => panic!("{other:?}"),
        }
        match status_to_poll("j", &attrs("exploded", 3, 0, true)).unwrap() {
            PollStatus::Failed {
                retryable: true,
                error,
            } => assert!(error.message.contains("\"exploded\"")),
            other => panic!("{other:?}"),
        }
        let e = status_to_poll("j", &attrs("validating", 0, 0, false)).unwrap_err();
        assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
    }
}
