//! From a staged batch to Marketo imports: lay the rows out as CSV files on a
//! blocking thread (see [`crate::layout`]), then POST the files one by one,
//! streamed from disk, within the upload's time budget.
//!
//! What a failed POST means for the other files:
//! - a permanent refusal of that file's content (e.g. `1003`, HTTP 400/413)
//!   aborts that file's jobs only; the next file is sent;
//! - a throttle (606, 615, 1016, 429 …) or a transient failure (5xx,
//!   timeout) stops the upload: that file's jobs get the error's outcome and
//!   the later files are not sent (throttled: they wait for a later upload
//!   without spending an attempt);
//! - a refusal every request would get (bad credentials, 603 access denied,
//!   a wrong URL) stops the upload and aborts the later files' jobs too,
//!   each with a reason saying it was not sent and why.
//!
//! A file whose turn comes after `uploadTimeBudget` is not sent either, and a
//! POST still running when the budget ends is abandoned, so the imports
//! already created reach the router before its `uploadCallTimeout` drops
//! the upload (which would lose them: they would never be polled).

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    DestinationError, ErrorCode, JobError, NewImport, Outcome, StagedBatch, UploadOutput,
};
use tempfile::TempPath;

use crate::client::{Client, RequestError};
use crate::config::Settings;
use crate::context::{ImportContext, Keys, CONTEXT_VERSION};
use crate::layout::plan_import_files;

pub use crate::layout::MAX_FILES_PER_UPLOAD;

/// Why the files after a failed one are not sent.
#[derive(Clone, Debug)]
enum Stop {
    /// Marketo throttled file `part`.
    Throttled { part: usize, reason: String },
    /// File `part` failed transiently.
    Failed { part: usize, reason: String },
    /// File `part` got a refusal every file would get.
    Refused { part: usize, reason: String },
    /// The time budget ran out before this file's turn.
    Budget(Duration),
}

impl Stop {
    fn outcome(&self, part: usize, parts: usize) -> Outcome {
        match self {
            Stop::Throttled { part: p, reason } => Outcome::Throttled(JobError::new(
                ErrorCode::Throttled,
                format!(
                    "not sent: Marketo throttled import file {p} of {parts} of this upload \
                     ({reason}); file {part} waits for a later upload"
                ),
            )),
            Stop::Failed { part: p, reason } => Outcome::Throttled(JobError::new(
                ErrorCode::DestinationUnavailable,
                format!(
                    "not sent: import file {p} of {parts} of this upload failed ({reason}); \
                     file {part} waits for a later upload"
                ),
            )),
            Stop::Refused { part: p, reason } => Outcome::Aborted(JobError::new(
                ErrorCode::DestinationRejected,
                format!(
                    "not sent: Marketo refused import file {p} of {parts} of this upload for a \
                     reason every file gets ({reason}), so file {part} was not sent"
                ),
            )),
            Stop::Budget(budget) => Outcome::Throttled(JobError::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "not sent: the upload used its uploadTimeBudget of {}s before import file \
                     {part} of {parts}; it waits for a later upload",
                    budget.as_secs_f64()
                ),
            )),
        }
    }
}

/// Uploads a staged batch: plans the files off the runtime, then creates one
/// import per file in order (see the module documentation for failures).
pub async fn upload_batch(
    client: &Client,
    settings: &Arc<Settings>,
    batch: &StagedBatch,
) -> UploadOutput {
    upload_batch_with(client, settings, batch, Instant::now()).await
}

/// [`upload_batch`] with the instant the time budget counts from.
async fn upload_batch_with(
    client: &Client,
    settings: &Arc<Settings>,
    batch: &StagedBatch,
    started: Instant,
) -> UploadOutput {
    let budget = settings.upload_time_budget;
    let deadline = started + budget;
    let (b, s) = (batch.clone(), settings.clone());
    let plan = match tokio::task::spawn_blocking(move || plan_import_files(&b, &s)).await {
        Ok(Ok(plan)) => plan,
        Ok(Err(e)) => {
            tracing::error!(destination_id = %batch.destination_id, batch_id = %batch.batch_id, error = %e, "cannot prepare Marketo import files");
            return internal_failure(batch, e.to_string());
        }
        Err(e) => {
            tracing::error!(destination_id = %batch.destination_id, batch_id = %batch.batch_id, error = %e, "preparing Marketo import files panicked");
            return internal_failure(batch, format!("preparing import files failed: {e}"));
        }
    };
    let mut out = UploadOutput {
        outcomes: plan.decided,
        ..Default::default()
    };
    let parts = plan.files.len();
    let mut done: Vec<TempPath> = Vec::with_capacity(parts);
    let mut stop: Option<Stop> = None;
    let mut refused_files = 0usize;
    for (i, file) in plan.files.into_iter().enumerate() {
        let part = i + 1;
        // `done` keeps every file alive (and deletes it) until the upload ends.
        let path = file.path.to_path_buf();
        done.push(file.path);
        if stop.is_none() && Instant::now() >= deadline {
            tracing::warn!(
                destination_id = %batch.destination_id, batch_id = %batch.batch_id, part, parts,
                budget_s = budget.as_secs(), "Marketo upload used its time budget; later files wait"
            );
            stop = Some(Stop::Budget(budget));
        }
        if let Some(why) = &stop {
            let outcome = why.outcome(part, parts);
            out.outcomes
                .extend(file.job_ids.into_iter().map(|id| (id, outcome.clone())));
            continue;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result =
            match tokio::time::timeout(remaining, client.create_import(&path, file.bytes)).await {
                Ok(r) => r,
                Err(_) => Err(RequestError::from(DestinationError::retryable(format!(
                    "Marketo did not answer within the upload's time budget (uploadTimeBudget = \
                     {}s); whether it created the import is unknown, so the jobs are sent again",
                    budget.as_secs_f64()
                )))),
            };
        match result {
            Ok(created) => {
                tracing::debug!(destination_id = %batch.destination_id, batch_id = created.batch_id, part, rows = file.job_ids.len(), bytes = file.bytes, "created a Marketo import");
                let context = ImportContext {
                    version: CONTEXT_VERSION,
                    batch_id: created.batch_id,
                    import_id: created.import_id,
                    lookup_field: settings.lookup_field.clone(),
                    rows: file.job_ids.len() as u64,
                    file_bytes: file.bytes,
                    part: part as u32,
                    parts: parts as u32,
                    job_ids: file.job_ids,
                    keys: Keys::InRowOrder(file.keys),
                };
                let value = context.to_value();
                out.imports.push(NewImport {
                    context: value,
                    job_ids: context.job_ids,
                });
            }
            Err(RequestError {
                error,
                account_wide,
            }) => {
                out.note_retry_after(error.retry_after());
                let reason = error.message().to_string();
                let outcome = file_outcome(&error, part, parts);
                out.push_all(&file.job_ids, &outcome);
                match &error {
                    DestinationError::Permanent { .. } if !account_wide => {
                        refused_files += 1;
                        tracing::warn!(
                            destination_id = %batch.destination_id, batch_id = %batch.batch_id, part, parts,
                            jobs = file.job_ids.len(), error = %error,
                            "Marketo refused one import file; its jobs are aborted and the next file is sent"
                        );
                    }
                    DestinationError::Permanent { .. } => {
                        stop = Some(Stop::Refused { part, reason })
                    }
                    DestinationError::Throttled { .. } => {
                        stop = Some(Stop::Throttled { part, reason })
                    }
                    DestinationError::Retryable { .. } => {
                        stop = Some(Stop::Failed { part, reason })
                    }
                }
                if stop.is_some() {
                    tracing::warn!(
                        destination_id = %batch.destination_id, batch_id = %batch.batch_id, part, parts,
                        error = %error, retry_after_s = error.retry_after().map(|d| d.as_secs()),
                        "Marketo upload stopped by an error; the later files are not sent"
                    );
                }
            }
        }
    }
    // Deleting files is blocking I/O: keep it off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || drop(done)).await;
    let importing: usize = out.imports.iter().map(|i| i.job_ids.len()).sum();
    tracing::debug!(
        destination_id = %batch.destination_id, batch_id = %batch.batch_id, jobs = batch.job_ids.len(),
        files = parts, imports = out.imports.len(), importing, decided = out.outcomes.len(),
        refused_files, stopped = stop.is_some(),
        elapsed_ms = started.elapsed().as_millis() as u64, "uploaded batch to Marketo"
    );
    out
}

/// The outcome of the jobs of a file whose POST failed, naming the file when
/// the upload has several.
fn file_outcome(error: &DestinationError, part: usize, parts: usize) -> Outcome {
    let outcome = Outcome::from_destination_error(error);
    if parts <= 1 {
        return outcome;
    }
    let name = |e: JobError| JobError {
        message: format!("import file {part} of {parts}: {}", e.message),
        ..e
    };
    match outcome {
        Outcome::Failed(e) => Outcome::Failed(name(e)),
        Outcome::Aborted(e) => Outcome::Aborted(name(e)),
        Outcome::Throttled(e) => Outcome::Throttled(name(e)),
        other => other,
    }
}

fn internal_failure(batch: &StagedBatch, reason: String) -> UploadOutput {
    UploadOutput::all_failed(&batch.job_ids, JobError::new(ErrorCode::Internal, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchrouter_core::{NoopTelemetry, Timestamp};
    use serde_json::json;

    fn stop_reasons() -> Vec<(Stop, &'static str, ErrorCode)> {
        vec![
            (
                Stop::Throttled {
                    part: 2,
                    reason: "Marketo error 606: Max rate limit".into(),
                },
                "throttled",
                ErrorCode::Throttled,
            ),
            (
                Stop::Failed {
                    part: 2,
                    reason: "HTTP 503".into(),
                },
                "throttled",
                ErrorCode::DestinationUnavailable,
            ),
            (
                Stop::Refused {
                    part: 2,
                    reason: "Marketo error 603: Access denied".into(),
                },
                "aborted",
                ErrorCode::DestinationRejected,
            ),
            (
                Stop::Budget(Duration::from_secs(480)),
                "throttled",
                ErrorCode::DeadlineExceeded,
            ),
        ]
    }

    #[test]
    fn jobs_of_files_not_sent_say_so_and_why() {
        for (stop, class, code) in stop_reasons() {
            let (got, e) = match stop.outcome(4, 8) {
                Outcome::Throttled(e) => ("throttled", e),
                Outcome::Aborted(e) => ("aborted", e),
                other => panic!("{other:?}"),
            };
            assert_eq!((got, e.code), (class, code), "{stop:?}");
            assert!(e.message.starts_with("not sent: "), "{e:?}");
            assert!(e.message.contains("file 4"), "{e:?}");
            if let Stop::Budget(_) = stop {
                assert!(e.message.contains("uploadTimeBudget of 480s"), "{e:?}");
            } else {
                assert!(e.message.contains("import file 2 of 8"), "{e:?}");
            }
        }
        let e = DestinationError::permanent("Marketo error 1003: Invalid file");
        match file_outcome(&e, 3, 8) {
            Outcome::Aborted(e) => {
                assert_eq!(
                    e.message,
                    "import file 3 of 8: Marketo error 1003: Invalid file"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(file_outcome(&e, 1, 1), Outcome::from_destination_error(&e));
    }

    /// A budget already spent sends nothing and spends no attempt.
    #[tokio::test]
    async fn a_spent_budget_sends_nothing() {
        let settings = Arc::new(
            Settings::from_config(&json!({
                "munchkinId": "1-A", "clientId": "c", "clientSecret": "s",
                "passUnmappedFields": true, "baseUrl": "http://127.0.0.1:9",
                "uploadTimeBudget": "1s",
            }))
            .unwrap(),
        );
        let client = Client::new(settings.clone(), Arc::new(NoopTelemetry)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged.jsonl");
        std::fs::write(&path, "{\"email\":\"a@x.io\"}\n").unwrap();
        let batch = StagedBatch {
            batch_id: "b".into(),
            destination_id: "m".into(),
            destination_type: "MARKETO_BULK_UPLOAD".into(),
            path,
            job_ids: vec![7],
            bytes: 19,
            attempt: 1,
            created_at: Timestamp(0),
        };
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(2))
            .expect("the clock runs for more than 2 s");
        let out = upload_batch_with(&client, &settings, &batch, long_ago).await;
        assert!(out.imports.is_empty());
        match &out.outcomes[..] {
            [(7, Outcome::Throttled(e))] => {
                assert_eq!(e.code, ErrorCode::DeadlineExceeded);
                assert!(e.message.contains("uploadTimeBudget of 1s"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}
