//! Polling one import: Marketo's batch status mapped to the router's
//! [`PollStatus`]. A poll that does not work is an `Err` (poll again later),
//! never a failed import.

use batchrouter_core::{DestinationError, ErrorCode, ImportHandle, JobError, PollStatus};

use crate::client::{BatchStatus, Client};
use crate::context::ContextHeader;

/// Asks Marketo how the import in `handle` is doing.
pub async fn poll_import(
    client: &Client,
    handle: &ImportHandle,
) -> Result<PollStatus, DestinationError> {
    // Only the header: the lookup values are not decoded on every poll.
    let ctx = match ContextHeader::from_value(&handle.context) {
        Ok(c) => c,
        Err(reason) => {
            // Polling again cannot repair a context; sending the jobs again can.
            tracing::error!(destination_id = %handle.destination_id, import_id = handle.id, %reason, "cannot poll a Marketo import");
            return Ok(PollStatus::Failed {
                retryable: true,
                error: JobError::new(ErrorCode::Internal, reason),
            });
        }
    };
    let status = match client.batch_status(ctx.batch_id).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(destination_id = %handle.destination_id, import_id = handle.id, batch_id = ctx.batch_id, error = %e, "Marketo poll did not work; polling again later");
            return Err(e);
        }
    };
    let mapped = map_status(&ctx, &status)?;
    tracing::debug!(
        destination_id = %handle.destination_id, import_id = handle.id, batch_id = ctx.batch_id,
        status = %status.status, processed = status.num_of_leads_processed, total = ctx.rows,
        failed = status.num_of_rows_failed, warnings = status.num_of_rows_with_warning,
        "polled Marketo import"
    );
    Ok(mapped)
}

/// Maps Marketo's status words; an unknown word is a poll that did not work.
pub fn map_status(
    ctx: &ContextHeader,
    status: &BatchStatus,
) -> Result<PollStatus, DestinationError> {
    match status.status.as_str() {
        "Queued" | "Importing" => Ok(PollStatus::InProgress {
            processed: status.num_of_leads_processed,
            total: Some(ctx.rows),
        }),
        "Complete" => Ok(PollStatus::Complete {
            has_failures: status.num_of_rows_failed.unwrap_or(0) > 0
                || status.num_of_rows_with_warning.unwrap_or(0) > 0,
        }),
        "Failed" => Ok(PollStatus::Failed {
            retryable: true,
            error: JobError::new(
                ErrorCode::ImportFailed,
                format!(
                    "Marketo import {} failed: {}",
                    ctx.batch_id,
                    status
                        .message
                        .as_deref()
                        .filter(|m| !m.is_empty())
                        .unwrap_or("no reason given")
                ),
            ),
        }),
        other => Err(DestinationError::retryable(format!(
            "Marketo reported unknown status {other:?} for import {}",
            ctx.batch_id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::CONTEXT_VERSION;

    fn ctx() -> ContextHeader {
        ContextHeader {
            version: CONTEXT_VERSION,
            batch_id: 5,
            rows: 10,
        }
    }

    fn st(status: &str, failed: u64, warned: u64) -> BatchStatus {
        BatchStatus {
            status: status.into(),
            num_of_leads_processed: Some(4),
            num_of_rows_failed: Some(failed),
            num_of_rows_with_warning: Some(warned),
            message: Some("Import failed: bad file".into()),
        }
    }

    #[test]
    fn statuses_map_to_poll_states() {
        let c = ctx();
        assert_eq!(
            map_status(&c, &st("Queued", 0, 0)).unwrap(),
            PollStatus::InProgress {
                processed: Some(4),
                total: Some(10)
            }
        );
        assert!(matches!(
            map_status(&c, &st("Importing", 0, 0)).unwrap(),
            PollStatus::InProgress { .. }
        ));
        assert_eq!(
            map_status(&c, &st("Complete", 0, 0)).unwrap(),
            PollStatus::Complete {
                has_failures: false
            }
        );
        assert_eq!(
            map_status(&c, &st("Complete", 1, 0)).unwrap(),
            PollStatus::Complete { has_failures: true }
        );
        assert_eq!(
            map_status(&c, &st("Complete", 0, 2)).unwrap(),
            PollStatus::Complete { has_failures: true }
        );
        match map_status(&c, &st("Failed", 0, 0)).unwrap() {
            PollStatus::Failed { retryable, error } => {
                assert!(retryable);
                assert_eq!(error.code, ErrorCode::ImportFailed);
                assert!(error.message.contains("bad file"));
            }
            other => panic!("{other:?}"),
        }
        assert!(map_status(&c, &st("Exploded", 0, 0)).is_err());
    }
}
