//! The per-destination upload worker: claim due jobs, stage them, cut a
//! batch by count, bytes or time, take an upload slot, upload, and write
//! every job's outcome back in one transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::store::{
    AttemptInfo, ImportToCreate, JobTransition, LeaseRenewal, SlotId, UploadCommit,
};
use batchrouter_core::{
    validate_upload_output, ErrorCode, JobError, JobId, StagedBatch, StoreError, Timestamp,
    UploadOutput,
};
use tempfile::TempPath;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::decide::{self, JobInfos};
use crate::events::{
    BatchStaged, FencedWritesRejected, StateChanges, UploadFinished, UploadResult,
};
use crate::staging::{batch_id, Carry, CutLimits, StagingFile};
use crate::{Destination, Shared};

/// A cut batch waiting for (or holding) an upload slot.
struct Staged {
    batch_id: String,
    path: TempPath,
    jobs: Vec<AttemptInfo>,
    bytes: u64,
    created_at: Timestamp,
    lease_until: Timestamp,
}

/// Jobs (and the upload slot, while uploading) this worker holds under its
/// lease, renewed before it runs out: every lease lasts `leaseTimeout` and
/// this heartbeat keeps it alive however long the work takes.
struct Held {
    lease_until: Timestamp,
    slot: Option<SlotId>,
}

impl Held {
    fn new(lease_until: Timestamp) -> Self {
        Held {
            lease_until,
            slot: None,
        }
    }

    /// Renews the lease of `ids` (and the slot) once half of it is used up.
    async fn renew_if_due(&mut self, dest: &Destination, shared: &Shared, ids: &[JobId]) {
        let lease = dest.settings.lease_timeout;
        let now = Timestamp::now();
        if (ids.is_empty() && self.slot.is_none()) || now + lease / 2 < self.lease_until {
            return;
        }
        let until = now + lease;
        let renewal = LeaseRenewal {
            owner: shared.owner.clone(),
            jobs: ids.to_vec(),
            imports: Vec::new(),
            slots: self.slot.into_iter().collect(),
            lease_until: until,
        };
        match shared.store.renew_leases(renewal).await {
            Ok(r) => {
                self.lease_until = until;
                let lost = ids.len().saturating_sub(r.jobs as usize);
                if lost > 0 {
                    FencedWritesRejected {
                        stage: "lease",
                        count: lost,
                    }
                    .emit(&dest.events);
                }
                if self.slot.is_some() && r.slots == 0 {
                    tracing::warn!(destination_id = %dest.id, "Upload slot lease was lost (the store took it back); the upload goes on.");
                    self.slot = None;
                }
            }
            Err(e) => {
                tracing::warn!(destination_id = %dest.id, error = %e, "Could not renew job leases.")
            }
        }
    }
}

pub(crate) async fn run(dest: Arc<Destination>, shared: Arc<Shared>) {
    let mut uploads: JoinSet<()> = JoinSet::new();
    let mut carry: Vec<Carry> = Vec::new();
    let mut carry_lease = Held::new(Timestamp::now());
    loop {
        while let Some(r) = uploads.try_join_next() {
            if let Err(e) = r {
                tracing::error!(destination_id = %dest.id, error = %e, "Upload task failed.");
            }
        }
        if shared.shutdown.is_cancelled() {
            break;
        }
        if dest.pause.active(Timestamp::now()).is_some() && !carry.is_empty() {
            // A pause can outlast the lease: hand the carry back rather than
            // hold jobs nobody renews.
            let ids: Vec<JobId> = carry.drain(..).map(|c| c.info.job_id).collect();
            release(&dest, &shared, &ids).await;
        }
        if !wait_while_paused(&dest, &shared).await {
            break;
        }
        let staged = match build_batch(&dest, &shared, &mut carry, &mut carry_lease).await {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(destination_id = %dest.id, error = %e, "Staging failed; retrying shortly.");
                sleep_or_shutdown(&shared, dest.settings.min_idle_sleep).await;
                continue;
            }
        };
        let Some((slot, staged)) = acquire_slot(&dest, &shared, staged, &carry).await else {
            break;
        };
        uploads.spawn(upload(dest.clone(), shared.clone(), staged, slot));
    }
    // Shutdown: hand back what was never uploaded, let uploads in flight finish.
    let ids: Vec<JobId> = carry.iter().map(|c| c.info.job_id).collect();
    release(&dest, &shared, &ids).await;
    let deadline = tokio::time::sleep(dest.settings.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = uploads.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(
                    destination_id = %dest.id, in_flight = uploads.len(),
                    "Shutdown timeout reached with uploads in flight; their jobs return to waiting at the next start."
                );
                uploads.abort_all();
                break;
            }
        }
    }
    dest.manager.close().await;
}

async fn release(dest: &Destination, shared: &Shared, ids: &[JobId]) {
    if ids.is_empty() {
        return;
    }
    match shared
        .store
        .release_jobs(&shared.owner, ids, Timestamp::now())
        .await
    {
        Ok(n) => {
            tracing::info!(destination_id = %dest.id, jobs = n, "Released claimed jobs back to waiting.")
        }
        Err(e) => tracing::warn!(
            destination_id = %dest.id, error = %e,
            "Could not release claimed jobs; they return when their lease expires."
        ),
    }
}

async fn sleep_or_shutdown(shared: &Shared, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shared.shutdown.cancelled() => false,
    }
}

/// Waits out a throttle pause; false when shutting down.
async fn wait_while_paused(dest: &Destination, shared: &Shared) -> bool {
    loop {
        let Some(left) = dest.pause.remaining(Timestamp::now()) else {
            return true;
        };
        tracing::debug!(destination_id = %dest.id, wait_ms = left.as_millis() as u64, "Destination paused by throttling.");
        if !sleep_or_shutdown(shared, left).await {
            return false;
        }
    }
}

/// Claims, transforms and stages until a cut condition holds. Returns
/// `None` at shutdown (after releasing what it held). On an error every job
/// this batch held (carry included) goes back to `waiting` at once instead
/// of waiting out its lease.
async fn build_batch(
    dest: &Arc<Destination>,
    shared: &Arc<Shared>,
    carry: &mut Vec<Carry>,
    carry_lease: &mut Held,
) -> Result<Option<Staged>, StoreError> {
    let mut holding: Vec<JobId> = carry.iter().map(|c| c.info.job_id).collect();
    let result = build_batch_inner(dest, shared, carry, carry_lease, &mut holding).await;
    if result.is_err() {
        carry.clear();
        release(dest, shared, &holding).await;
    }
    result
}

async fn build_batch_inner(
    dest: &Arc<Destination>,
    shared: &Arc<Shared>,
    carry: &mut Vec<Carry>,
    carry_lease: &mut Held,
    holding: &mut Vec<JobId>,
) -> Result<Option<Staged>, StoreError> {
    let s = &dest.settings;
    let limits = CutLimits {
        max_events: s.max_events_in_batch,
        max_bytes: s.max_upload_bytes,
    };
    let mut file: Option<StagingFile> = None;
    // Earliest lease expiry among the jobs this batch holds.
    let mut held = Held::new(if carry.is_empty() {
        Timestamp(i64::MAX)
    } else {
        carry_lease.lease_until
    });
    loop {
        if shared.shutdown.is_cancelled() {
            if let Some(f) = file.take() {
                release(dest, shared, &f.job_ids()).await;
            }
            return Ok(None);
        }
        let now = Timestamp::now();
        let room = limits.max_events - file.as_ref().map_or(0, |f| f.count());
        let claimed = if carry.is_empty() && room > 0 {
            let lease_until = now + s.lease_timeout;
            let jobs = shared
                .store
                .claim_jobs(&dest.id, &shared.owner, room, now, lease_until)
                .await?;
            if !jobs.is_empty() {
                held.lease_until = held.lease_until.min(lease_until);
                holding.extend(jobs.iter().map(|j| j.id));
                crate::crash::point("after_claim");
            }
            jobs
        } else {
            Vec::new()
        };
        let claimed_n = claimed.len();
        if claimed_n > 0 || !carry.is_empty() {
            let f = match file.take() {
                Some(f) => f,
                None => {
                    let dir = shared.staging_dir.join(&*dest.id);
                    tokio::task::spawn_blocking(move || StagingFile::create(&dir))
                        .await
                        .map_err(|e| StoreError::Backend(e.to_string()))?
                        .map_err(|e| {
                            StoreError::Backend(format!("cannot create staging file: {e}"))
                        })?
                }
            };
            let manager = dest.manager.clone();
            let pending = std::mem::take(carry);
            let span = dest.events.span("transform");
            let (f, result) = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                let mut f = f;
                let r = f.stage(&manager, pending, claimed, limits, Timestamp::now());
                (f, r)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("staging task failed: {e}")))?;
            let result =
                result.map_err(|e| StoreError::Backend(format!("staging write failed: {e}")))?;
            if !result.aborted.is_empty() {
                persist_pre_upload_aborts(dest, shared, result.aborted).await;
            }
            *carry = result.carry;
            if !carry.is_empty() {
                carry_lease.lease_until = held.lease_until;
            }
            file = Some(f);
        }
        let Some(f) = file.as_ref() else {
            // Nothing staged: sleep until woken or the idle interval passes.
            tokio::select! {
                _ = tokio::time::sleep(s.min_idle_sleep) => {}
                _ = dest.wake_worker.notified() => {}
                _ = shared.shutdown.cancelled() => {}
            }
            continue;
        };
        let now = Timestamp::now();
        let cut = if f.count() >= limits.max_events {
            Some("count")
        } else if !carry.is_empty() || f.bytes >= limits.max_bytes {
            Some("bytes")
        } else if f
            .first_line_at
            .is_some_and(|t| now.since(t) >= s.upload_freq)
        {
            Some("time")
        } else {
            None
        };
        if let Some(cut) = cut {
            let Some(f) = file.take() else {
                continue; // unreachable: `file` was Some above; loop as if idle
            };
            // The earliest job's creation time: the same for a retry of the
            // same jobs, so date macros in remote paths do not move.
            let created_at = f.jobs.iter().map(|j| j.created_at).min().unwrap_or(now);
            let (path, jobs, bytes) = tokio::task::spawn_blocking(move || f.finish())
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))?
                .map_err(|e| StoreError::Backend(format!("staging flush failed: {e}")))?;
            let ids: Vec<JobId> = jobs.iter().map(|j| j.job_id).collect();
            let staged = Staged {
                batch_id: batch_id(&ids),
                path,
                jobs,
                bytes,
                created_at,
                lease_until: held.lease_until,
            };
            BatchStaged {
                batch_id: &staged.batch_id,
                jobs: staged.jobs.len(),
                bytes,
                cut,
            }
            .emit(&dest.events);
            crate::crash::point("after_staging");
            return Ok(Some(staged));
        }
        if f.count() == 0 {
            file = None;
            continue;
        }
        if claimed_n == room && claimed_n > 0 {
            continue; // a full claim: more jobs are probably waiting
        }
        let mut ids = f.job_ids();
        ids.extend(carry.iter().map(|c| c.info.job_id));
        held.renew_if_due(dest, shared, &ids).await;
        let until_cut = f
            .first_line_at
            .map(|t| (t + s.upload_freq).since(now))
            .unwrap_or(s.min_idle_sleep);
        tokio::select! {
            // Wake often enough to renew the held jobs' lease in time.
            _ = tokio::time::sleep(until_cut.min(s.min_idle_sleep).min(s.lease_timeout / 4)) => {}
            _ = dest.wake_worker.notified() => {}
            _ = shared.shutdown.cancelled() => {}
        }
    }
}

async fn persist_pre_upload_aborts(
    dest: &Destination,
    shared: &Shared,
    aborted: Vec<JobTransition>,
) {
    let now = Timestamp::now();
    match shared
        .store
        .transition_executing(&shared.owner, aborted.clone(), now)
        .await
    {
        Ok(report) => {
            FencedWritesRejected {
                stage: "transform",
                count: report.rejected.len(),
            }
            .emit(&dest.events);
            let applied: Vec<JobTransition> = aborted
                .into_iter()
                .filter(|t| !report.rejected.contains(&t.job_id))
                .collect();
            StateChanges {
                stage: "transform",
                transitions: &applied,
                jobs: &JobInfos::default(),
                importing: 0,
                now,
            }
            .emit(&dest.events);
        }
        Err(e) => tracing::error!(
            destination_id = %dest.id, error = %e, jobs = aborted.len(),
            "Could not record transform failures; the jobs return when their lease expires and are tried again."
        ),
    }
}

/// Waits for an upload slot, renewing the staged jobs' leases meanwhile.
/// Returns `None` at shutdown after releasing the batch.
async fn acquire_slot(
    dest: &Destination,
    shared: &Shared,
    staged: Staged,
    carry: &[Carry],
) -> Option<(SlotId, Staged)> {
    let s = &dest.settings;
    let mut held = Held::new(staged.lease_until);
    loop {
        let now = Timestamp::now();
        // A throttle pause holds back every upload, this one included.
        let paused = dest.pause.active(now);
        let attempt = if paused.is_some() {
            Ok(None)
        } else {
            shared
                .store
                .acquire_upload_slot(
                    &dest.id,
                    &shared.owner,
                    s.max_concurrent_imports,
                    now,
                    now + s.lease_timeout,
                )
                .await
        };
        match attempt {
            Ok(Some(slot)) => {
                let mut staged = staged;
                staged.lease_until = held.lease_until;
                return Some((slot, staged));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(destination_id = %dest.id, error = %e, "Could not take an upload slot.")
            }
        }
        let mut ids: Vec<JobId> = staged.jobs.iter().map(|j| j.job_id).collect();
        ids.extend(carry.iter().map(|c| c.info.job_id));
        held.renew_if_due(dest, shared, &ids).await;
        let nap = paused
            .map(|t| t.since(now))
            .unwrap_or(s.poll_interval)
            .min(Duration::from_secs(1))
            .min(s.lease_timeout / 4)
            .max(Duration::from_millis(5));
        tokio::select! {
            _ = dest.wake_worker.notified() => {}
            _ = tokio::time::sleep(nap) => {}
            _ = shared.shutdown.cancelled() => {
                let ids: Vec<JobId> = staged.jobs.iter().map(|j| j.job_id).collect();
                release(dest, shared, &ids).await;
                return None;
            }
        }
    }
}

/// Uploads one staged batch and commits every job's outcome.
async fn upload(dest: Arc<Destination>, shared: Arc<Shared>, staged: Staged, slot: SlotId) {
    let s = &dest.settings;
    let ids: Vec<JobId> = staged.jobs.iter().map(|j| j.job_id).collect();
    let attempt = staged.jobs.iter().map(|j| j.attempts).max().unwrap_or(0) + 1;
    let batch = StagedBatch {
        batch_id: staged.batch_id.clone(),
        destination_id: dest.id.to_string(),
        destination_type: dest.kind.to_string(),
        path: staged.path.to_path_buf(),
        job_ids: ids.clone(),
        bytes: staged.bytes,
        attempt,
        created_at: staged.created_at,
    };
    let started = Instant::now();
    let mut held = Held::new(staged.lease_until);
    held.slot = Some(slot);
    let call = tokio::time::timeout(
        s.upload_timeout,
        dest.manager
            .upload(&batch)
            .instrument(dest.events.span("upload")),
    );
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tokio::time::sleep(s.lease_timeout / 4) => held.renew_if_due(&dest, &shared, &ids).await,
        }
    };
    let duration = started.elapsed();
    let now = Timestamp::now();
    let (output, forced) = match result {
        Err(_) => (
            UploadOutput::all_failed(
                &ids,
                JobError::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "upload did not finish within uploadCallTimeout ({})",
                        crate::settings::fmt_duration(s.upload_timeout)
                    ),
                ),
            ),
            Some(UploadResult::Timeout),
        ),
        Ok(out) => match validate_upload_output(&ids, &out) {
            Ok(()) => (out, None),
            Err(violation) => {
                tracing::error!(destination_id = %dest.id, batch_id = %batch.batch_id, %violation, "Manager output rejected.");
                (
                    UploadOutput::all_failed(
                        &ids,
                        JobError::new(ErrorCode::InvalidOutput, violation.to_string()),
                    ),
                    Some(UploadResult::InvalidOutput),
                )
            }
        },
    };

    crate::crash::upload_answered(&output, forced.is_none());
    let infos = JobInfos::new(&staged.jobs);
    let mut random = fastrand::f64;
    let decision = decide::upload(
        &mut decide::Context {
            settings: s,
            now,
            random: &mut random,
        },
        &infos,
        &output,
    );
    if let Some(until) = decision.pause_until {
        dest.pause.extend_to(until);
    }
    let imports: Vec<ImportToCreate> = output
        .imports
        .iter()
        .map(|imp| ImportToCreate {
            batch_id: batch.batch_id.clone(),
            context: imp.context.clone(),
            job_ids: imp.job_ids.clone(),
            next_poll_at: now + s.poll_interval,
            deadline_at: now + s.import_deadline,
        })
        .collect();
    let importing = decision.importing;
    let result = forced.unwrap_or_else(|| decision.result(ids.len()));
    UploadFinished {
        batch_id: &batch.batch_id,
        jobs: ids.len(),
        bytes: staged.bytes,
        duration,
        result,
        imports: imports.len(),
        retry_after: output.retry_after,
    }
    .emit(&dest.events);

    let commit = UploadCommit {
        destination_id: dest.id.to_string(),
        owner: shared.owner.clone(),
        now,
        attempted: decision.attempted,
        imports,
        transitions: decision.transitions,
        slot: Some(slot),
        import_lease_until: now + s.lease_timeout,
    };
    match commit_with_retry(&dest, &shared, commit.clone()).await {
        Some(report) => {
            FencedWritesRejected {
                stage: "upload",
                count: report.rejected.len(),
            }
            .emit(&dest.events);
            let applied: Vec<JobTransition> = if report.rejected.is_empty() {
                commit.transitions
            } else {
                commit
                    .transitions
                    .into_iter()
                    .filter(|t| !report.rejected.contains(&t.job_id))
                    .collect()
            };
            StateChanges {
                stage: "upload",
                transitions: &applied,
                jobs: &infos,
                importing,
                now,
            }
            .emit(&dest.events);
            if !report.import_ids.is_empty() {
                dest.wake_poller.notify_one();
            }
        }
        None => {
            // The outcome could not be stored; the jobs stay claimed and come
            // back when their lease expires (or at the next start).
            let _ = shared.store.release_upload_slot(slot).await;
        }
    }
    drop(staged.path);
    dest.wake_worker.notify_one();
}

/// Commits with a few retries: losing an upload's outcome means the jobs are
/// uploaded again later, so a transient store error deserves another try.
async fn commit_with_retry(
    dest: &Destination,
    shared: &Shared,
    commit: UploadCommit,
) -> Option<batchrouter_core::store::CommitReport> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match shared.store.commit_upload(commit.clone()).await {
            Ok(r) => return Some(r),
            Err(e) => {
                tracing::error!(destination_id = %dest.id, attempt, error = %e, "Could not record upload outcome.");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    None
}
