//! A `JobStore` wrapper that times every call into
//! `batchrouter_store_op_duration_seconds{op}`, so all store timing comes
//! from one place whatever the backend.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use batchrouter_core::store::{
    AttemptInfo, CommitReport, DestinationCounts, ImportFinish, ImportRecord, Inserted, JobRecord,
    JobTransition, LeaseRenewal, PollUpdate, RecoveryReport, RenewReport, RetryResult, SlotId,
    UploadCommit,
};
use batchrouter_core::{ImportId, Job, JobId, JobState, JobStore, NewJob, StoreError, Timestamp};
use prometheus::HistogramVec;

use crate::metrics::Metrics;

/// Times every call to the wrapped store.
pub struct TimedStore {
    inner: Arc<dyn JobStore>,
    hist: HistogramVec,
}

impl TimedStore {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: Arc<dyn JobStore>, metrics: &Metrics) -> Self {
        TimedStore {
            inner,
            hist: metrics.store_op_duration.clone(),
        }
    }

    async fn timed<T>(&self, op: &str, fut: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = fut.await;
        self.hist
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        out
    }
}

#[async_trait]
impl JobStore for TimedStore {
    async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.timed("insert_jobs", self.inner.insert_jobs(jobs, now))
            .await
    }
    async fn claim_jobs(
        &self,
        d: &str,
        o: &str,
        l: usize,
        n: Timestamp,
        u: Timestamp,
    ) -> Result<Vec<Job>, StoreError> {
        self.timed("claim_jobs", self.inner.claim_jobs(d, o, l, n, u))
            .await
    }
    async fn extend_job_leases(
        &self,
        o: &str,
        ids: &[JobId],
        u: Timestamp,
    ) -> Result<usize, StoreError> {
        self.timed("extend_job_leases", self.inner.extend_job_leases(o, ids, u))
            .await
    }
    async fn release_jobs(
        &self,
        o: &str,
        ids: &[JobId],
        n: Timestamp,
    ) -> Result<usize, StoreError> {
        self.timed("release_jobs", self.inner.release_jobs(o, ids, n))
            .await
    }
    async fn transition_executing(
        &self,
        o: &str,
        t: Vec<JobTransition>,
        n: Timestamp,
    ) -> Result<CommitReport, StoreError> {
        self.timed(
            "transition_executing",
            self.inner.transition_executing(o, t, n),
        )
        .await
    }
    async fn acquire_upload_slot(
        &self,
        d: &str,
        o: &str,
        m: u32,
        n: Timestamp,
        u: Timestamp,
    ) -> Result<Option<SlotId>, StoreError> {
        self.timed(
            "acquire_upload_slot",
            self.inner.acquire_upload_slot(d, o, m, n, u),
        )
        .await
    }
    async fn release_upload_slot(&self, s: SlotId) -> Result<(), StoreError> {
        self.timed("release_upload_slot", self.inner.release_upload_slot(s))
            .await
    }
    async fn commit_upload(&self, c: UploadCommit) -> Result<CommitReport, StoreError> {
        self.timed("commit_upload", self.inner.commit_upload(c))
            .await
    }
    async fn claim_due_imports(
        &self,
        d: &str,
        o: &str,
        l: usize,
        n: Timestamp,
        u: Timestamp,
    ) -> Result<Vec<ImportRecord>, StoreError> {
        self.timed(
            "claim_due_imports",
            self.inner.claim_due_imports(d, o, l, n, u),
        )
        .await
    }
    async fn importing_jobs(&self, i: ImportId) -> Result<Vec<AttemptInfo>, StoreError> {
        self.timed("importing_jobs", self.inner.importing_jobs(i))
            .await
    }
    async fn record_poll(&self, u: PollUpdate) -> Result<bool, StoreError> {
        self.timed("record_poll", self.inner.record_poll(u)).await
    }
    async fn finish_import(&self, f: ImportFinish) -> Result<CommitReport, StoreError> {
        self.timed("finish_import", self.inner.finish_import(f))
            .await
    }
    async fn next_poll_due(&self, d: &str) -> Result<Option<Timestamp>, StoreError> {
        self.timed("next_poll_due", self.inner.next_poll_due(d))
            .await
    }
    async fn recover(&self, n: Timestamp) -> Result<RecoveryReport, StoreError> {
        self.timed("recover", self.inner.recover(n)).await
    }
    async fn reclaim_expired(&self, n: Timestamp) -> Result<RecoveryReport, StoreError> {
        self.timed("reclaim_expired", self.inner.reclaim_expired(n))
            .await
    }
    async fn renew_leases(&self, r: LeaseRenewal) -> Result<RenewReport, StoreError> {
        self.timed("renew_leases", self.inner.renew_leases(r)).await
    }
    async fn release_earlier_runs(
        &self,
        p: &str,
        c: usize,
        o: &str,
        n: Timestamp,
    ) -> Result<RecoveryReport, StoreError> {
        self.timed(
            "release_earlier_runs",
            self.inner.release_earlier_runs(p, c, o, n),
        )
        .await
    }
    async fn expire_jobs(
        &self,
        b: Timestamp,
        m: &str,
        n: Timestamp,
        l: usize,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        self.timed("expire_jobs", self.inner.expire_jobs(b, m, n, l))
            .await
    }
    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.timed("get_job", self.inner.get_job(id)).await
    }
    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError> {
        self.timed("get_import", self.inner.get_import(id)).await
    }
    async fn destination_counts(&self) -> Result<BTreeMap<String, DestinationCounts>, StoreError> {
        self.timed("destination_counts", self.inner.destination_counts())
            .await
    }
    async fn retry_job(&self, id: JobId, n: Timestamp) -> Result<RetryResult, StoreError> {
        self.timed("retry_job", self.inner.retry_job(id, n)).await
    }
    async fn redrive(&self, d: &str, s: &[JobState], n: Timestamp) -> Result<u64, StoreError> {
        self.timed("redrive", self.inner.redrive(d, s, n)).await
    }
    async fn sweep_terminal(&self, b: Timestamp, l: usize) -> Result<u64, StoreError> {
        self.timed("sweep_terminal", self.inner.sweep_terminal(b, l))
            .await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn probe_write(&self) -> Result<(), StoreError> {
        self.timed("probe_write", self.inner.probe_write()).await
    }
}
