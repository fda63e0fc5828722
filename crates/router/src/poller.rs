//! The per-destination poll loop: polls imports in flight, fetches per-job
//! stats when they complete and writes every job's outcome. A poll that
//! errors never fails an import: it is retried until the import deadline.
//! Past the deadline an unfinished import is retried (uploaded again) and a
//! completed one whose results cannot be read is aborted (`results_unavailable`)
//! once their fetch has failed `STATS_FAILURES_PAST_DEADLINE` times in a row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::store::{
    AttemptInfo, ImportFinish, ImportRecord, ImportState, JobTransition, PollUpdate, Transition,
};
use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, JobId, Outcome, PollStatus, Timestamp,
    UploadStats,
};

use crate::events::{FencedWritesRejected, PollFinished, PollResult, StateChanges};
use crate::retry;
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
        Ok(v) => v,
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
    let polled = match tokio::time::timeout(s.upload_timeout, dest.manager.poll(&handle)).await {
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
            PollFinished {
                import_id: imp.id,
                result: PollResult::Failed,
                progress: None,
                error: Some(&error.message),
                poll_errors: imp.poll_errors,
            }
            .emit(&dest.events);
            let transitions = if retryable {
                retry_all(s, &infos, &error)
            } else {
                infos
                    .iter()
                    .map(|j| JobTransition {
                        job_id: j.job_id,
                        to: Transition::Aborted {
                            error: error.clone(),
                        },
                    })
                    .collect()
            };
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
                match tokio::time::timeout(s.upload_timeout, dest.manager.get_upload_stats(&handle))
                    .await
                {
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

/// Every job of a failed import back to `failed` (or `aborted` when its
/// budget is spent), with one jitter so the batch comes due together.
fn retry_all(
    s: &crate::RouterSettings,
    infos: &[AttemptInfo],
    error: &JobError,
) -> Vec<JobTransition> {
    let now = Timestamp::now();
    let jitter = fastrand::f64();
    infos
        .iter()
        .map(|j| JobTransition {
            job_id: j.job_id,
            to: retry::after_failure(s, j, error.clone(), now, None, jitter),
        })
        .collect()
}

async fn deadline_passed(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &[AttemptInfo],
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
    let transitions = retry_all(s, infos, &error);
    PollFinished {
        import_id: imp.id,
        result: PollResult::DeadlineExceeded,
        progress: None,
        error: Some(&error.message),
        poll_errors: imp.poll_errors,
    }
    .emit(&dest.events);
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
    infos: &[AttemptInfo],
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
    PollFinished {
        import_id: imp.id,
        result: PollResult::DeadlineExceeded,
        progress: None,
        error: Some(&error.message),
        poll_errors: imp.poll_errors + 1,
    }
    .emit(&dest.events);
    let transitions = infos
        .iter()
        .map(|j| JobTransition {
            job_id: j.job_id,
            to: Transition::Aborted {
                error: error.clone(),
            },
        })
        .collect();
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

async fn poll_error(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    e: &DestinationError,
    what: &str,
) {
    let error = JobError::new(e.code(), format!("{what} failed: {}", e.message()));
    PollFinished {
        import_id: imp.id,
        result: PollResult::Error,
        progress: None,
        error: Some(&error.message),
        poll_errors: imp.poll_errors + 1,
    }
    .emit(&dest.events);
    let wait = e
        .retry_after()
        .unwrap_or(dest.settings.poll_interval)
        .max(dest.settings.poll_interval);
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
    infos: &[AttemptInfo],
    stats: UploadStats,
) {
    let s = &dest.settings;
    let now = Timestamp::now();
    let by_id: HashMap<JobId, &AttemptInfo> = infos.iter().map(|j| (j.job_id, j)).collect();
    let mut decided: HashMap<JobId, Outcome> = HashMap::with_capacity(stats.outcomes.len());
    let mut unknown = 0u64;
    for (id, outcome) in stats.outcomes {
        if by_id.contains_key(&id) {
            decided.insert(id, outcome);
        } else {
            unknown += 1;
        }
    }
    if unknown > 0 {
        tracing::warn!(
            destination_id = %dest.id, import_id = imp.id, count = unknown,
            "Upload stats named jobs that are not in this import; ignored."
        );
    }
    if stats.unmatched > 0 || unknown > 0 {
        dest.events
            .metrics()
            .unmatched_results
            .with_label_values(&[&*dest.kind, &*dest.id])
            .inc_by(stats.unmatched + unknown);
        if stats.unmatched > 0 {
            tracing::warn!(
                destination_id = %dest.id, import_id = imp.id, count = stats.unmatched,
                "Destination returned per-record results that matched no job."
            );
        }
    }
    let mut ok = 0usize;
    let jitter = fastrand::f64();
    let transitions: Vec<JobTransition> = infos
        .iter()
        .map(|j| {
            let to = match decided.remove(&j.job_id) {
                None => Transition::Succeeded {
                    note: None,
                    external_id: None,
                },
                Some(Outcome::Succeeded { note, external_id }) => {
                    Transition::Succeeded { note, external_id }
                }
                Some(Outcome::Aborted(error)) => Transition::Aborted { error },
                Some(Outcome::Failed(error)) | Some(Outcome::Throttled(error)) => {
                    retry::after_failure(s, j, error, now, None, jitter)
                }
            };
            if matches!(to, Transition::Succeeded { .. }) {
                ok += 1;
            }
            JobTransition {
                job_id: j.job_id,
                to,
            }
        })
        .collect();
    let state = if ok == infos.len() {
        ImportState::Completed
    } else if ok == 0 {
        ImportState::Failed
    } else {
        ImportState::Partial
    };
    finish(dest, shared, imp, infos, state, None, transitions).await;
}

async fn finish(
    dest: &Destination,
    shared: &Shared,
    imp: &ImportRecord,
    infos: &[AttemptInfo],
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
            let created: BTreeMap<JobId, Timestamp> =
                infos.iter().map(|j| (j.job_id, j.created_at)).collect();
            let applied: Vec<JobTransition> = transitions
                .into_iter()
                .filter(|t| !report.rejected.contains(&t.job_id))
                .collect();
            StateChanges {
                stage: "import",
                transitions: &applied,
                created_at: &created,
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
