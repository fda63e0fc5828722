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

/// Implements `JobStore` for `TimedStore`: every listed method forwards to
/// the wrapped store, timed under its own name as the `op` label.
macro_rules! timed_methods {
    ($(fn $op:ident(&self $(, $arg:ident: $ty:ty)*) -> $out:ty;)*) => {
        #[async_trait]
        impl JobStore for TimedStore {
            $(
                async fn $op(&self $(, $arg: $ty)*) -> Result<$out, StoreError> {
                    self.timed(stringify!($op), self.inner.$op($($arg),*)).await
                }
            )*
        }
    };
}

timed_methods! {
    fn insert_jobs(&self, jobs: Vec<NewJob>, now: Timestamp) -> Vec<Inserted>;
    fn claim_jobs(&self, d: &str, o: &str, l: usize, n: Timestamp, u: Timestamp) -> Vec<Job>;
    fn extend_job_leases(&self, o: &str, ids: &[JobId], u: Timestamp) -> usize;
    fn release_jobs(&self, o: &str, ids: &[JobId], n: Timestamp) -> usize;
    fn transition_executing(&self, o: &str, t: Vec<JobTransition>, n: Timestamp) -> CommitReport;
    fn acquire_upload_slot(
        &self, d: &str, o: &str, m: u32, n: Timestamp, u: Timestamp
    ) -> Option<SlotId>;
    fn release_upload_slot(&self, s: SlotId) -> ();
    fn commit_upload(&self, c: UploadCommit) -> CommitReport;
    fn claim_due_imports(
        &self, d: &str, o: &str, l: usize, n: Timestamp, u: Timestamp
    ) -> Vec<ImportRecord>;
    fn importing_jobs(&self, i: ImportId) -> Vec<AttemptInfo>;
    fn record_poll(&self, u: PollUpdate) -> bool;
    fn finish_import(&self, f: ImportFinish) -> CommitReport;
    fn next_poll_due(&self, d: &str) -> Option<Timestamp>;
    fn recover(&self, n: Timestamp) -> RecoveryReport;
    fn reclaim_expired(&self, n: Timestamp) -> RecoveryReport;
    fn renew_leases(&self, r: LeaseRenewal) -> RenewReport;
    fn release_earlier_runs(&self, p: &str, c: usize, o: &str, n: Timestamp) -> RecoveryReport;
    fn expire_jobs(&self, b: Timestamp, m: &str, n: Timestamp, l: usize) -> BTreeMap<String, u64>;
    fn get_job(&self, id: JobId) -> Option<JobRecord>;
    fn get_import(&self, id: ImportId) -> Option<ImportRecord>;
    fn destination_counts(&self) -> BTreeMap<String, DestinationCounts>;
    fn retry_job(&self, id: JobId, n: Timestamp) -> RetryResult;
    fn redrive(&self, d: &str, s: &[JobState], n: Timestamp) -> u64;
    fn sweep_terminal(&self, b: Timestamp, l: usize) -> u64;
    fn ping(&self) -> ();
    fn probe_write(&self) -> ();
}
