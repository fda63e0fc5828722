//! The per-destination poll loop: polls imports in flight, fetches per-job
//! stats when they complete and writes every job's outcome. A poll that
//! errors never fails an import: it is retried until the import deadline.
//! Past the deadline an unfinished import is retried (uploaded again) and a
//! completed one whose results cannot be read is aborted (`results_unavailable`)
//! once their fetch has failed `STATS_FAILURES_PAST_DEADLINE` times in a row.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use batchrouter_core::store::{ImportFinish, ImportRecord, ImportState, JobTransition, PollUpdate};
use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, PollStatus, Timestamp, UploadStats,
};

use crate::decide::{self, JobInfos};
use crate::events::{
    FencedWritesRejected, PollFinished, PollResult, StateChanges, UnmatchedResults,
};
use crate::{Destination, Shared};

/// Imports are claimed one at a time, right before they are polled, for
/// `leaseTimeout`; [`with_import_lease`] renews the lease while the poll,
/// the stats fetch and the outcome write run, so a slow destination never
/// needs a long lease and a dead poller's import is free within `leaseTimeout`.
fn import_lease(s: &crate::RouterSettings) -> std::time::Duration {
    s.lease_timeout
}

/// Runs `work` on import `import_id` while renewing its lease every third of
/// `leaseTimeout` (a heartbeat; fenced, so a lease another daemon took over
/// is never renewed).
async fn with_import_lease<T>(
    dest: &Destination,
    shared: &Shared,
    import_id: batchrouter_core::ImportId,
    work: impl std::future::Future<Output = T>,
) -> T {
    let every = (dest.settings.lease_timeout / 3).max(Duration::from_millis(10));
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(every) => {
                let renewal = batchrouter_core::store::LeaseRenewal {
                    owner: shared.owner.clone(),
                    imports: vec![import_id],
                    lease_until: Timestamp::now() + dest.settings.lease_timeout,
                    ..Default::default()
                };
                match shared.store.renew_leases(renewal).await {
                    Ok(r) if r.imports == 0 => FencedWritesRejected {
                        stage: "lease",
                        count: 1,
                    }
                    .emit(&dest.events),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        destination_id = %dest.id, import_id, error = %e,
                        "Could not renew an import's lease."
                    ),
                }
            }
        }
    }
}

pub(crate) async fn run(dest: Arc<Destination>, shared: Arc<Shared>) {
    let s = &dest.settings;
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        let now = Timestamp::now();
        let claimed = match shared
            .store
            .claim_due_imports(&dest.id, &shared.owner, 1, now, now + import_lease(s))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(destination_id = %dest.id, error = %e, "Could not claim imports to poll.");
                Vec::new()
            }
        };
        if let Some(imp) = claimed.into_iter().next() {
            with_import_lease(&dest, &shared, imp.id, poll_one(&dest, &shared, imp)).await;
            continue;
        }
        let now = Timestamp::now();
        let wait = match shared.store.next_poll_due(&dest.id).await {
            Ok(Some(t)) if t > now => t.since(now).min(s.poll_interval),
            // Due but not ours (another daemon holds the lease) or unknown.
            Ok(Some(_)) | Err(_) => s.poll_interval.min(Duration::from_secs(1)),
            Ok(None) => s.poll_interval,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
            _ = dest.wake_poller.notified() => {}
            _ = shared.shutdown.cancelled() => {}
        }
    }
}

async fn poll_one(dest: &Arc<Destination>, shared: &Arc<Shared>, imp: ImportRecord) {
    let s = &dest.settings;
    let infos = match shared.store.importing_jobs(imp.id).await {
        Ok(v) => JobInfos::new(&v),
        Err(e) => {
            tracing::warn!(destination_id = %dest.id, import_id = imp.id, error = %e, "Could not read an import's jobs.");
            return;
        }
    };
    if infos.is_empty() {
        // Every job was decided elsewhere (e.g. re-driven); nothing to poll.
        finish(
            dest,
            shared,
            &imp,
            &infos,
            ImportState::Completed,
            None,
            Vec::new(),
        )
        .await;
        return;
    }
    let handle = ImportHandle {
        id: imp.id,
        destination_id: imp.destination_id.clone(),
        batch_id: imp.batch_id.clone(),
        context: imp.context.clone(),
        job_ids: infos.iter().map(|j| j.job_id).collect(),
        started_at: imp.started_at,
    };
    let poll = dest
        .manager
        .poll(&handle)
        .instrument(dest.events.import_span("poll", imp.id));
    let polled = match tokio::time::timeout(s.upload_timeout, poll).await {
        Ok(r) => r,
        Err(_) => Err(DestinationError::retryable("poll timed out")),
    };
    // The deadline only ends an import the destination has not finished: a
    // daemon that was down past it polls once before giving up.
    let unfinished = matches!(polled, Err(_) | Ok(PollStatus::InProgress { .. }));
    if unfinished && Timestamp::now() >= imp.deadline_at {
        deadline_passed(dest, shared, &imp, &infos).await;
        return;
    }
    match polled {
        Err(e) => poll_error(dest, shared, &imp, &e, "poll").await,
        Ok(PollStatus::InProgress { processed, total }) => {
            let progress = match (processed, total) {
                (Some(p), Some(t)) if t > 0 => Some(((p.min(t) * 100) / t) as u8),
                _ => None,
            };
            PollFinished {
                import_id: imp.id,
                result: PollResult::InProgress,
                progress,
                error: None,
                poll_errors: imp.poll_errors,
            }
            .emit(&dest.events);
            reschedule(
                dest,
                shared,
                &imp,
                ImportState::Processing,
                progress,
                None,
                s.poll_interval,
            )
            .await;
        }
        Ok(PollStatus::Failed { retryable, error }) => {
            poll_failed(dest, &imp, PollResult::Failed, &error, imp.poll_errors);
            let transitions = import_failed(s, &infos, &error, retryable);
            finish(
                dest,
                shared,
                &imp,
                &infos,
                ImportState::Failed,
                Some(error),
                transitions,
            )
            .await;
        }
        Ok(PollStatus::Complete { has_failures }) => {
            crate::crash::point("after_poll_complete");
            let stats = if has_failures {
                let fetch = dest
                    .manager
                    .get_upload_stats(&handle)
                    .instrument(dest.events.import_span("get_upload_stats", imp.id));
                match tokio::time::timeout(s.upload_timeout, fetch).await {
                    Ok(r) => r,
                    Err(_) => Err(DestinationError::retryable(
                        "fetching upload stats timed out",
                    )),
                }
            } else {
                Ok(UploadStats::default())
            };
            match stats {
                // The destination imported the batch; only its per-record
                // results are missing. Past the deadline the import ends
                // (its slot is freed and its jobs are not uploaded again)
                // once the fetch has failed several times in a row, so a
                // daemon back from downtime past the deadline still tries.
                Err(e) => {
                    let failures = note_stats_failure(dest, imp.id);
                    if Timestamp::now() >= imp.deadline_at
                        && failures >= STATS_FAILURES_PAST_DEADLINE
                    {
                        forget_stats_failures(dest, imp.id);
                        results_unavailable(dest, shared, &imp, &infos, &e).await
                    } else {
                        poll_error(dest, shared, &imp, &e, "stats").await
                    }
                }
                Ok(stats) => {
                    forget_stats_failures(dest, imp.id);
                    crate::crash::point("after_stats");
                    PollFinished {
                        import_id: imp.id,
                        result: PollResult::Complete,
                        progress: Some(100),
                        error: None,
                        poll_errors: imp.poll_errors,
                    }
                    .emit(&dest.events);
                    apply_stats(dest, shared, &imp, &infos, stats).await;
                }
            }
        }
    }
}

async fn deadline_passed(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &JobInfos,
) {
    let s = &dest.settings;
    let error = JobError::new(
        ErrorCode::DeadlineExceeded,
        format!(
            "import {} still in progress after asyncImportDeadline ({})",
            imp.id,
            crate::settings::fmt_duration(s.import_deadline)
        ),
    );
    fail_past_deadline(dest, shared, imp, infos, error, true, imp.poll_errors).await;
}

/// Ends an import past `asyncImportDeadline` as `failed`: one
/// `deadline_exceeded` poll line, then its jobs retried with `error` (as
/// any failure) when `retry`, else aborted with it.
async fn fail_past_deadline(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &JobInfos,
    error: JobError,
    retry: bool,
    poll_errors: u32,
) {
    poll_failed(dest, imp, PollResult::DeadlineExceeded, &error, poll_errors);
    let transitions = import_failed(&dest.settings, infos, &error, retry);
    finish(
        dest,
        shared,
        imp,
        infos,
        ImportState::Failed,
        Some(error),
        transitions,
    )
    .await;
}

/// Logs and counts a poll of `imp` that ended in `result` with `error`.
fn poll_failed(
    dest: &Destination,
    imp: &ImportRecord,
    result: PollResult,
    error: &JobError,
    poll_errors: u32,
) {
    PollFinished {
        import_id: imp.id,
        result,
        progress: None,
        error: Some(&error.message),
        poll_errors,
    }
    .emit(&dest.events);
}

/// Every job of an import that failed as a whole: retried under the usual
/// budget when `retryable`, else aborted ([`decide::import_failed`], now,
/// with one jitter so the batch comes due together).
fn import_failed(
    s: &crate::RouterSettings,
    infos: &JobInfos,
    error: &JobError,
    retryable: bool,
) -> Vec<JobTransition> {
    let mut random = fastrand::f64;
    let mut ctx = decide::Context {
        settings: s,
        now: Timestamp::now(),
        random: &mut random,
    };
    decide::import_failed(&mut ctx, infos, error, retryable)
}

/// Failed results fetches in a row (seen by this process) after which an
/// import past its deadline ends with `results_unavailable`.
pub(crate) const STATS_FAILURES_PAST_DEADLINE: u32 = 3;

/// Counts one more failed stats fetch for `import`; answers the count.
fn note_stats_failure(dest: &Destination, import: batchrouter_core::ImportId) -> u32 {
    let mut m = dest
        .stats_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Imports another daemon finished leave entries behind: keep it small.
    if m.len() >= 4096 && !m.contains_key(&import) {
        m.clear();
    }
    let n = m.entry(import).or_insert(0);
    *n += 1;
    *n
}

fn forget_stats_failures(dest: &Destination, import: batchrouter_core::ImportId) {
    dest.stats_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&import);
}

/// An import that completed but whose per-record results could not be read
/// before `asyncImportDeadline`: it ends `failed` and every job is aborted
/// with `results_unavailable` (re-drivable, never re-uploaded automatically,
/// since the destination did import them).
async fn results_unavailable(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &JobInfos,
    last: &DestinationError,
) {
    let error = JobError::new(
        ErrorCode::ResultsUnavailable,
        format!(
            "import {} completed but its per-record results could not be read within \
             asyncImportDeadline ({}); not uploaded again, re-drive to send again; \
             last error fetching them ({}): {}",
            imp.id,
            crate::settings::fmt_duration(dest.settings.import_deadline),
            last.code(),
            last.message()
        ),
    );
    fail_past_deadline(dest, shared, imp, infos, error, false, imp.poll_errors + 1).await;
}

async fn poll_error(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    e: &DestinationError,
    what: &str,
) {
    let error = JobError::new(e.code(), format!("{what} failed: {}", e.message()));
    poll_failed(dest, imp, PollResult::Error, &error, imp.poll_errors + 1);
    let wait = decide::poll_retry_wait(&dest.settings, e.retry_after());
    reschedule(dest, shared, imp, imp.state, None, Some(error), wait).await;
}

async fn reschedule(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    state: ImportState,
    progress: Option<u8>,
    poll_error: Option<JobError>,
    wait: Duration,
) {
    let now = Timestamp::now();
    let update = PollUpdate {
        import_id: imp.id,
        owner: shared.owner.clone(),
        state,
        progress,
        poll_error,
        next_poll_at: now + wait,
        lease_until: now + dest.settings.lease_timeout,
        now,
    };
    match shared.store.record_poll(update).await {
        Ok(true) => {}
        Ok(false) => FencedWritesRejected {
            stage: "poll",
            count: 1,
        }
        .emit(&dest.events),
        Err(e) => {
            tracing::warn!(destination_id = %dest.id, import_id = imp.id, error = %e, "Could not record poll result.")
        }
    }
}

async fn apply_stats(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &JobInfos,
    stats: UploadStats,
) {
    let unmatched = stats.unmatched;
    let mut random = fastrand::f64;
    let decision = decide::import_stats(
        &mut decide::Context {
            settings: &dest.settings,
            now: Timestamp::now(),
            random: &mut random,
        },
        infos,
        stats,
    );
    UnmatchedResults {
        import_id: imp.id,
        unmatched,
        unknown: decision.unknown,
    }
    .emit(&dest.events);
    finish(
        dest,
        shared,
        imp,
        infos,
        decision.state,
        None,
        decision.transitions,
    )
    .await;
}

async fn finish(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &JobInfos,
    state: ImportState,
    error: Option<JobError>,
    transitions: Vec<JobTransition>,
) {
    let now = Timestamp::now();
    let f = ImportFinish {
        import_id: imp.id,
        owner: shared.owner.clone(),
        state,
        error,
        transitions: transitions.clone(),
        now,
    };
    match shared.store.finish_import(f).await {
        Ok(report) => {
            if report.applied == 0 && !transitions.is_empty() {
                FencedWritesRejected {
                    stage: "import",
                    count: transitions.len(),
                }
                .emit(&dest.events);
                return;
            }
            FencedWritesRejected {
                stage: "import",
                count: report.rejected.len(),
            }
            .emit(&dest.events);
            let applied: Vec<JobTransition> = transitions
                .into_iter()
                .filter(|t| !report.rejected.contains(&t.job_id))
                .collect();
            StateChanges {
                stage: "import",
                transitions: &applied,
                jobs: infos,
                importing: 0,
                now,
            }
            .emit(&dest.events);
            dest.wake_worker.notify_one();
        }
        Err(e) => tracing::warn!(
            destination_id = %dest.id, import_id = imp.id, error = %e,
            "Could not record an import's outcome; it will be polled again."
        ),
    }
}
