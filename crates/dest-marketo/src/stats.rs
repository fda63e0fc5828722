//! Per-row results of a completed import: failures.json and warnings.json
//! (CSV) matched to jobs by the normalised lookup value, through the key map
//! persisted in the import context, so a restart loses nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, JobId, Outcome, UploadStats,
};

use crate::client::{Client, ResultFile};
use crate::context::ImportContext;
use crate::transform::normalise_key;

/// One result row: the normalised lookup value and Marketo's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultRow {
    /// Lookup value, normalised like the keys in the context.
    pub key: String,
    /// `Import Failure Reason` / `Import Warning Reason`.
    pub reason: String,
}

/// Fetches and matches the per-row results of a completed import.
pub async fn upload_stats(
    client: &Client,
    handle: &ImportHandle,
) -> Result<UploadStats, DestinationError> {
    let ctx = match ImportContext::from_value(&handle.context) {
        Ok(c) => c,
        Err(reason) => {
            // Without the key map no row can be matched: send the jobs again
            // rather than calling failed rows succeeded.
            tracing::error!(destination_id = %handle.destination_id, import_id = handle.id, %reason, "cannot read Marketo results");
            let outcome = Outcome::Failed(JobError::new(ErrorCode::Internal, reason));
            return Ok(UploadStats {
                outcomes: handle
                    .job_ids
                    .iter()
                    .map(|&id| (id, outcome.clone()))
                    .collect(),
                unmatched: 0,
            });
        }
    };
    let status = client.batch_status(ctx.batch_id).await?;
    if status.status != "Complete" {
        return Err(DestinationError::retryable(format!(
            "Marketo import {} is {:?}, not Complete; results are fetched later",
            ctx.batch_id, status.status
        )));
    }
    let failed = status.num_of_rows_failed.unwrap_or(0);
    let warned = status.num_of_rows_with_warning.unwrap_or(0);
    let failures = if failed > 0 {
        fetch_rows(
            client,
            ctx.batch_id,
            ResultFile::Failures,
            &ctx.lookup_field,
        )
        .await?
    } else {
        Vec::new()
    };
    let warnings = if warned > 0 {
        fetch_rows(
            client,
            ctx.batch_id,
            ResultFile::Warnings,
            &ctx.lookup_field,
        )
        .await?
    } else {
        Vec::new()
    };
    if failures.len() as u64 != failed || warnings.len() as u64 != warned {
        tracing::warn!(
            destination_id = %handle.destination_id, import_id = handle.id, batch_id = ctx.batch_id,
            failed, failure_rows = failures.len(), warned, warning_rows = warnings.len(),
            "Marketo's result files do not hold as many rows as its counts say"
        );
    }
    check_counts(ctx.batch_id, failed, failures.len(), warned, warnings.len())?;
    let stats = match_rows(&ctx, &handle.job_ids, &failures, &warnings);
    if stats.unmatched > 0 {
        tracing::warn!(
            destination_id = %handle.destination_id, import_id = handle.id, batch_id = ctx.batch_id,
            unmatched = stats.unmatched, "Marketo result rows matched no job of the import"
        );
    }
    tracing::debug!(
        destination_id = %handle.destination_id, import_id = handle.id, batch_id = ctx.batch_id,
        failed, warned, outcomes = stats.outcomes.len(), unmatched = stats.unmatched,
        "fetched Marketo import results"
    );
    Ok(stats)
}

/// Refuses results that list fewer rows than Marketo counted: the missing
/// rows would end `succeeded` although Marketo rejected or warned about them,
/// so the results are fetched again later (the router retries until the
/// import deadline). More rows than counted are used as they are.
pub fn check_counts(
    batch_id: u64,
    failed: u64,
    failure_rows: usize,
    warned: u64,
    warning_rows: usize,
) -> Result<(), DestinationError> {
    let missing = |what: &str, counted: u64, listed: usize| {
        DestinationError::retryable(format!(
            "Marketo counts {counted} {what} for import {batch_id} but its result file lists \
             {listed}; the results are fetched again later"
        ))
    };
    if failed > failure_rows as u64 {
        return Err(missing("failed rows", failed, failure_rows));
    }
    if warned > warning_rows as u64 {
        return Err(missing("rows with warnings", warned, warning_rows));
    }
    Ok(())
}

/// Turns result rows into outcomes: a failure aborts the job (code
/// `record_rejected`), a warning keeps it succeeded with the text as note;
/// a failure wins over a warning. Rows for jobs no longer importing are
/// ignored; rows whose value maps to no job are counted as unmatched.
pub fn match_rows(
    ctx: &ImportContext,
    importing: &[JobId],
    failures: &[ResultRow],
    warnings: &[ResultRow],
) -> UploadStats {
    let importing: HashSet<JobId> = importing.iter().copied().collect();
    let keys = ctx.lookup();
    let mut outcomes: HashMap<JobId, Outcome> = HashMap::new();
    let mut unmatched = 0u64;
    let mut lookup = |row: &ResultRow| -> Option<JobId> {
        match keys.get(row.key.as_str()) {
            Some(id) if importing.contains(id) => Some(*id),
            Some(id) => {
                tracing::debug!(job = id, "Marketo result row for a job already decided");
                None
            }
            None => {
                unmatched += 1;
                None
            }
        }
    };
    for row in failures {
        if let Some(id) = lookup(row) {
            tracing::debug!(job = id, reason = %row.reason, "Marketo rejected a lead");
            outcomes.entry(id).or_insert_with(|| {
                Outcome::Aborted(JobError::new(
                    ErrorCode::RecordRejected,
                    format!(
                        "Marketo rejected the lead: {}",
                        reason_or_default(&row.reason)
                    ),
                ))
            });
        }
    }
    for row in warnings {
        if let Some(id) = lookup(row) {
            tracing::debug!(job = id, reason = %row.reason, "Marketo imported a lead with a warning");
            outcomes.entry(id).or_insert_with(|| Outcome::Succeeded {
                note: Some(reason_or_default(&row.reason).to_string()),
                external_id: None,
            });
        }
    }
    let mut outcomes: Vec<(JobId, Outcome)> = outcomes.into_iter().collect();
    outcomes.sort_by_key(|(id, _)| *id);
    UploadStats {
        outcomes,
        unmatched,
    }
}

fn reason_or_default(reason: &str) -> &str {
    if reason.trim().is_empty() {
        "no reason given"
    } else {
        reason.trim()
    }
}

async fn fetch_rows(
    client: &Client,
    batch_id: u64,
    which: ResultFile,
    lookup_field: &str,
) -> Result<Vec<ResultRow>, DestinationError> {
    let (file, path) = tempfile::Builder::new()
        .prefix("marketo-results-")
        .suffix(".csv")
        .tempfile()
        .map_err(|e| {
            DestinationError::retryable(format!("cannot create a temp file for results: {e}"))
        })?
        .into_parts();
    drop(file);
    client.download_result(batch_id, which, &path).await?;
    let lookup = lookup_field.to_string();
    tokio::task::spawn_blocking(move || {
        let rows = parse_result_file(&path, &lookup, which);
        drop(path);
        rows
    })
    .await
    .map_err(|e| DestinationError::retryable(format!("parsing Marketo results failed: {e}")))?
}

/// Reads a result CSV: finds the lookup column and the reason column (named
/// `Import Failure Reason` / `Import Warning Reason`, else the last one).
pub fn parse_result_file(
    path: &Path,
    lookup_field: &str,
    which: ResultFile,
) -> Result<Vec<ResultRow>, DestinationError> {
    let malformed = |what: String| {
        DestinationError::retryable(format!("malformed Marketo result file: {what}"))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(path)
        .map_err(|e| malformed(e.to_string()))?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| malformed(e.to_string()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    let key_col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case(lookup_field))
        .ok_or_else(|| malformed(format!("no `{lookup_field}` column in {headers:?}")))?;
    let reason_name = match which {
        ResultFile::Failures => "Import Failure Reason",
        ResultFile::Warnings => "Import Warning Reason",
    };
    let reason_col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case(reason_name))
        .unwrap_or(headers.len().saturating_sub(1));
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| malformed(e.to_string()))?;
        rows.push(ResultRow {
            key: normalise_key(record.get(key_col).unwrap_or("")),
            reason: record.get(reason_col).unwrap_or("").to_string(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Keys, CONTEXT_VERSION};

    fn ctx() -> ImportContext {
        ImportContext {
            version: CONTEXT_VERSION,
            batch_id: 1,
            import_id: "1".into(),
            lookup_field: "email".into(),
            rows: 4,
            file_bytes: 1,
            part: 1,
            parts: 1,
            // Row order, not id order: pairing is by position.
            job_ids: vec![3, 1, 4, 2],
            keys: Keys::InRowOrder(vec![
                "c@x.io".into(),
                "a@x.io".into(),
                "d@x.io".into(),
                "b@x.io".into(),
            ]),
        }
    }

    #[test]
    fn fewer_rows_than_counted_are_fetched_again() {
        assert!(check_counts(9, 2, 2, 1, 1).is_ok());
        assert!(
            check_counts(9, 0, 1, 0, 3).is_ok(),
            "more rows than counted are used"
        );
        let e = check_counts(9, 3, 2, 0, 0).unwrap_err();
        assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
        assert!(
            e.message()
                .contains("counts 3 failed rows for import 9 but its result file lists 2"),
            "{e}"
        );
        let e = check_counts(9, 0, 0, 2, 1).unwrap_err();
        assert!(e.message().contains("2 rows with warnings"), "{e}");
    }

    fn row(key: &str, reason: &str) -> ResultRow {
        ResultRow {
            key: key.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn failures_abort_warnings_note_and_strangers_count() {
        let stats = match_rows(
            &ctx(),
            &[1, 2, 3],
            &[row("a@x.io", "1004 bad"), row("zzz@x.io", "x")],
            &[
                row("a@x.io", "dup"),
                row("b@x.io", "1017 Field truncated"),
                row("d@x.io", "not importing"),
            ],
        );
        assert_eq!(stats.unmatched, 1);
        assert_eq!(stats.outcomes.len(), 2);
        assert!(
            matches!(&stats.outcomes[0], (1, Outcome::Aborted(e)) if e.code == ErrorCode::RecordRejected && e.message == "Marketo rejected the lead: 1004 bad")
        );
        assert_eq!(
            stats.outcomes[1],
            (
                2,
                Outcome::Succeeded {
                    note: Some("1017 Field truncated".into()),
                    external_id: None
                }
            )
        );
    }

    #[test]
    fn result_files_are_read_by_column_name_with_normalised_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        std::fs::write(
            &p,
            "\u{feff}firstName,Email,Import Failure Reason,extra\r\nAnn,\" A@X.IO \",\"1006, Field not found\",z\r\n",
        )
        .unwrap();
        let rows = parse_result_file(&p, "email", ResultFile::Failures).unwrap();
        assert_eq!(rows, vec![row("a@x.io", "1006, Field not found")]);
        std::fs::write(&p, "firstName,reason\r\nAnn,x\r\n").unwrap();
        let e = parse_result_file(&p, "email", ResultFile::Warnings).unwrap_err();
        assert!(e.message().contains("no `email` column"), "{e}");
    }
}
