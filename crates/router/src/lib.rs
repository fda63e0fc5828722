//! The batchrouter engine.
//!
//! Per destination it runs an upload worker (claim → transform → stage →
//! cut → upload → commit) and a poll loop (poll imports → fetch stats →
//! commit), so one slow or broken destination never stalls another. A
//! maintenance task takes back expired leases, refreshes gauges and sweeps
//! old terminal jobs. Every decision is persisted in the [`JobStore`]
//! before it matters, so a restart resumes instead of starting over.
//!
//! ```text
//! job ─▶ claim ─▶ transform ─▶ stage ─▶ upload ─┬─▶ succeeded | failed | aborted
//!                                               └─▶ import ─▶ poll ─▶ stats ─▶ outcome
//! ```

pub mod crash;
pub mod decide;
pub mod events;
pub mod metrics;
pub mod retry;
pub mod settings;
pub mod staging;
pub mod timed_store;

mod pause;
mod poller;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, ErrorCode, JobState, JobStore, StoreError, Timestamp,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use events::DestinationEvents;
pub use metrics::Metrics;
pub use settings::RouterSettings;
pub use timed_store::TimedStore;

/// One destination's runtime state, shared by its worker and poll loop.
pub(crate) struct Destination {
    pub(crate) id: Arc<str>,
    pub(crate) kind: Arc<str>,
    pub(crate) manager: Arc<dyn AsyncDestinationManager>,
    pub(crate) settings: RouterSettings,
    pub(crate) events: DestinationEvents,
    /// New jobs, a freed upload slot or a finished import.
    pub(crate) wake_worker: Notify,
    /// A new import to poll.
    pub(crate) wake_poller: Notify,
    /// The destination asked us to pause (throttling) until then.
    pub(crate) pause: pause::Pause,
    /// Failed results (stats) fetches in a row per completed import, seen
    /// by this process: past the deadline an import needs
    /// `poller::STATS_FAILURES_PAST_DEADLINE` of them before it is given up.
    pub(crate) stats_failures: Mutex<std::collections::HashMap<batchrouter_core::ImportId, u32>>,
}

/// What every task of one router shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) owner: String,
    /// This owner's staging folder (`staging::owner_dir`).
    pub(crate) staging_dir: PathBuf,
    /// Holds the folder's lock while any task may still stage into it.
    pub(crate) _staging: staging::OwnerStaging,
    pub(crate) shutdown: CancellationToken,
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The store failed during start-up recovery.
    #[error("start-up recovery failed: {0}")]
    Recovery(#[from] StoreError),
    /// Two destinations share an id.
    #[error("destination id `{0}` is configured twice")]
    DuplicateDestination(String),
    /// The staging directory is unusable.
    #[error("staging directory {0}: {1}")]
    Staging(PathBuf, std::io::Error),
}

/// Router-wide options.
#[derive(Clone, Debug)]
pub struct RouterOptions {
    /// Lease owner name (this daemon's identity): unique among the daemons
    /// running on one store. An instance one (see [`instance_owner`]) lets a
    /// restarted daemon take back its earlier runs' leases at once.
    pub owner: String,
    /// Where staged files go (`by-owner/<owner>/<destination>/` under it).
    pub staging_dir: PathBuf,
    /// Terminal jobs completed longer ago than this are deleted (`finishedJobRetention`).
    pub finished_job_retention: Duration,
    /// `waiting`/`failed` jobs older than this are aborted with code
    /// `expired` (`jobRetention`, RudderStack's meaning), configured
    /// destination or not.
    pub job_retention: Duration,
    /// How often maintenance runs at most (lease reclaim, gauges, expiry,
    /// retention); it also runs at least twice per shortest `leaseTimeout`.
    pub maintenance_interval: Duration,
}

/// Default `finishedJobRetention`: 7 days.
pub const DEFAULT_FINISHED_JOB_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// Default `jobRetention` (RudderStack's): 720 hours.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(720 * 3_600);

impl RouterOptions {
    /// Defaults with a unique owner and staging under the system temp dir.
    pub fn new() -> Self {
        RouterOptions {
            owner: default_owner(),
            staging_dir: std::env::temp_dir().join("batchrouter-staging"),
            finished_job_retention: DEFAULT_FINISHED_JOB_RETENTION,
            job_retention: DEFAULT_JOB_RETENTION,
            maintenance_interval: Duration::from_secs(10),
        }
    }
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Characters of the per-start nonce ending an instance owner (hex).
pub const INSTANCE_NONCE_CHARS: usize = 16;

/// The lease owner for a configured instance id (e.g. a StatefulSet pod
/// name): `instance:<id>:<nonce>`, the nonce random per start. At start the
/// router takes back at once what earlier runs of the same id held (see
/// [`instance_owner_prefix`]), and an earlier run still alive (a zombie pod)
/// is fenced out, as its owner name differs from ours.
pub fn instance_owner(instance_id: &str) -> String {
    format!("instance:{}:{:016x}", instance_id.trim(), fastrand::u64(..))
}

/// The part of an [`instance_owner`] shared by every run of that instance
/// (`instance:<id>:`), or `None` for other owner names.
pub fn instance_owner_prefix(owner: &str) -> Option<&str> {
    let cut = owner.len().checked_sub(INSTANCE_NONCE_CHARS)?;
    let (prefix, nonce) = (owner.get(..cut)?, owner.get(cut..)?);
    let well_formed = prefix.starts_with("instance:")
        && prefix.len() > "instance::".len()
        && prefix.ends_with(':')
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then_some(prefix)
}

/// A unique lease owner: host, pid and a random suffix.
pub fn default_owner() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    format!(
        "{}:{}:{:08x}",
        host.trim(),
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Collects destinations, then starts the engine.
pub struct RouterBuilder {
    store: Arc<dyn JobStore>,
    metrics: Arc<Metrics>,
    options: RouterOptions,
    destinations: Vec<(
        String,
        String,
        Arc<dyn AsyncDestinationManager>,
        RouterSettings,
    )>,
}

impl RouterBuilder {
    /// Starts a builder; the store is wrapped so every call is timed.
    pub fn new(store: Arc<dyn JobStore>, metrics: Arc<Metrics>, options: RouterOptions) -> Self {
        RouterBuilder {
            store: Arc::new(TimedStore::new(store, &metrics)),
            metrics,
            options,
            destinations: Vec::new(),
        }
    }

    /// Adds a destination with its manager and resolved settings (the
    /// manager's own limits are applied on top).
    pub fn destination(
        mut self,
        id: impl Into<String>,
        kind: impl Into<String>,
        manager: Arc<dyn AsyncDestinationManager>,
        settings: RouterSettings,
    ) -> Self {
        let settings = settings.with_limits(manager.limits());
        self.destinations
            .push((id.into(), kind.into(), manager, settings));
        self
    }

    /// Recovers leases and starts every task.
    pub async fn start(self) -> Result<Router, RouterError> {
        let mut seen = std::collections::HashSet::new();
        for (id, ..) in &self.destinations {
            if !seen.insert(id.clone()) {
                return Err(RouterError::DuplicateDestination(id.clone()));
            }
        }
        std::fs::create_dir_all(&self.options.staging_dir)
            .map_err(|e| RouterError::Staging(self.options.staging_dir.clone(), e))?;
        let now = Timestamp::now();
        let expired = self.store.recover(now).await?;
        // Whatever this identity held belongs to an earlier run of this
        // daemon (a crash or kill): nothing of it is in progress any more.
        let own = match instance_owner_prefix(&self.options.owner) {
            Some(prefix) => {
                self.store
                    .release_earlier_runs(prefix, INSTANCE_NONCE_CHARS, &self.options.owner, now)
                    .await?
            }
            // A per-process owner has no earlier runs.
            None => batchrouter_core::store::RecoveryReport::default(),
        };
        tracing::info!(
            owner = %self.options.owner,
            jobs_released = expired.jobs_released + own.jobs_released,
            imports_resumed = expired.imports_released + own.imports_released,
            slots_released = expired.slots_released + own.slots_released,
            own_leases_released = own.jobs_released + own.imports_released + own.slots_released,
            "Router recovered leases from earlier runs."
        );
        // Staged files a crash left behind: this identity's, and those of
        // every identity no running process holds (see `staging`).
        let (root, owner) = (self.options.staging_dir.clone(), self.options.owner.clone());
        let (own_staging, removed) = tokio::task::spawn_blocking(move || {
            staging::OwnerStaging::open(&root, &owner, Duration::from_secs(3))
        })
        .await
        .map_err(|e| RouterError::Staging(self.options.staging_dir.clone(), e.into()))?
        .map_err(|e| RouterError::Staging(self.options.staging_dir.clone(), e))?;
        tracing::info!(
            dir = %own_staging.dir().display(),
            files_removed = removed.files,
            bytes_removed = removed.bytes,
            stopped_owners_removed = removed.stopped_owners,
            live_owners_kept = removed.live_owners,
            "Removed staged files left by stopped runs."
        );
        let shared = Arc::new(Shared {
            store: self.store.clone(),
            owner: self.options.owner.clone(),
            staging_dir: own_staging.dir().to_path_buf(),
            _staging: own_staging,
            shutdown: CancellationToken::new(),
        });
        let mut dests = BTreeMap::new();
        let mut tasks = Vec::new();
        for (id, kind, manager, settings) in self.destinations {
            let d = Arc::new(Destination {
                events: DestinationEvents::new(self.metrics.clone(), &kind, &id),
                id: id.as_str().into(),
                kind: kind.as_str().into(),
                manager,
                settings,
                wake_worker: Notify::new(),
                wake_poller: Notify::new(),
                pause: pause::Pause::default(),
                stats_failures: Mutex::new(Default::default()),
            });
            tracing::info!(destination_id = %id, destination_type = %kind, "Starting destination worker and poll loop.");
            tasks.push(tokio::spawn(worker::run(d.clone(), shared.clone())));
            tasks.push(tokio::spawn(poller::run(d.clone(), shared.clone())));
            dests.insert(id, d);
        }
        // Takeover of a dead daemon's jobs happens within leaseTimeout plus
        // one maintenance round, so a round never lasts long next to a lease.
        let shortest_lease = dests
            .values()
            .map(|d| d.settings.lease_timeout)
            .min()
            .unwrap_or(self.options.maintenance_interval);
        let every = self
            .options
            .maintenance_interval
            .min(shortest_lease / 2)
            .max(Duration::from_millis(50));
        let maintenance = tokio::spawn(maintenance(
            shared.clone(),
            dests.clone(),
            self.metrics.clone(),
            Retention {
                finished: self.options.finished_job_retention,
                unprocessed: self.options.job_retention,
            },
            every,
        ));
        let handle = RouterHandle {
            shared: shared.clone(),
            dests: dests.clone(),
            tasks: Arc::new(tasks.iter().map(|t| t.abort_handle()).collect()),
        };
        Ok(Router {
            shared,
            dests,
            tasks,
            maintenance,
            handle,
        })
    }
}

/// A running engine.
pub struct Router {
    shared: Arc<Shared>,
    dests: BTreeMap<String, Arc<Destination>>,
    tasks: Vec<JoinHandle<()>>,
    maintenance: JoinHandle<()>,
    handle: RouterHandle,
}

/// A cheap, cloneable view of a running router for the API: wake workers
/// and report health without owning the router.
#[derive(Clone)]
pub struct RouterHandle {
    shared: Arc<Shared>,
    dests: BTreeMap<String, Arc<Destination>>,
    tasks: Arc<Vec<tokio::task::AbortHandle>>,
}

impl RouterHandle {
    /// Wakes a destination's worker (new or re-driven jobs).
    pub fn wake(&self, destination_id: &str) {
        if let Some(d) = self.dests.get(destination_id) {
            d.wake_worker.notify_one();
        }
    }

    /// Whether every worker and poll loop is still running.
    pub fn healthy(&self) -> bool {
        !self.shared.shutdown.is_cancelled() && self.tasks.iter().all(|t| !t.is_finished())
    }
}

/// What a graceful shutdown achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every task stopped within the timeout.
    pub clean: bool,
}

impl Router {
    /// Wakes a destination's worker (new jobs were just inserted).
    pub fn wake(&self, destination_id: &str) {
        self.handle.wake(destination_id)
    }

    /// Whether every worker and poll loop is still running.
    pub fn healthy(&self) -> bool {
        self.handle.healthy()
    }

    /// A cloneable handle for wake-ups and health checks.
    pub fn handle(&self) -> RouterHandle {
        self.handle.clone()
    }

    /// The lease owner name of this router.
    pub fn owner(&self) -> &str {
        &self.shared.owner
    }

    /// The store as the router uses it (timed).
    pub fn store(&self) -> Arc<dyn JobStore> {
        self.shared.store.clone()
    }

    /// A handle that begins a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Graceful shutdown: stop claiming, release what was never uploaded,
    /// let uploads in flight finish within each destination's
    /// `shutdownTimeout`, then stop.
    pub async fn shutdown(self) -> ShutdownReport {
        self.shared.shutdown.cancel();
        let limit = self
            .dests
            .values()
            .map(|d| d.settings.shutdown_timeout)
            .max()
            .unwrap_or(Duration::from_secs(30))
            + Duration::from_secs(2);
        let all = futures::future::join_all(self.tasks);
        let clean = tokio::time::timeout(limit, all).await.is_ok();
        self.maintenance.abort();
        tracing::info!(clean, "Router stopped.");
        ShutdownReport { clean }
    }

    /// Stops every task at once without persisting anything, as a crash
    /// would (for tests of recovery).
    pub fn abort(self) {
        self.shared.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
        self.maintenance.abort();
    }
}

/// How long jobs are kept, by kind.
#[derive(Clone, Copy)]
struct Retention {
    /// Terminal jobs are deleted this long after they completed.
    finished: Duration,
    /// Unprocessed jobs are aborted (`expired`) this long after they were created.
    unprocessed: Duration,
}

async fn maintenance(
    shared: Arc<Shared>,
    dests: BTreeMap<String, Arc<Destination>>,
    metrics: Arc<Metrics>,
    retention: Retention,
    every: Duration,
) {
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        let now = Timestamp::now();
        match shared.store.reclaim_expired(now).await {
            Ok(r) if r.jobs_released + r.imports_released + r.slots_released > 0 => {
                tracing::warn!(
                    jobs = r.jobs_released,
                    imports = r.imports_released,
                    slots = r.slots_released,
                    "Took back work whose lease expired (its holder stopped renewing)."
                );
                for d in dests.values() {
                    d.wake_worker.notify_one();
                    d.wake_poller.notify_one();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Lease reclaim failed."),
        }
        refresh_gauges(&shared, &dests, &metrics).await;
        if last_sweep.is_none_or(|t| t.elapsed() >= Duration::from_secs(600).min(every * 60)) {
            last_sweep = Some(std::time::Instant::now());
            expire(&shared, &dests, &metrics, now, retention.unprocessed).await;
            sweep(&shared, now - retention.finished).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

async fn refresh_gauges(
    shared: &Shared,
    dests: &BTreeMap<String, Arc<Destination>>,
    metrics: &Metrics,
) {
    let counts = match shared.store.destination_counts().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Could not refresh state gauges.");
            return;
        }
    };
    for (id, d) in dests {
        let c = counts.get(id);
        for state in JobState::ALL {
            let n = c.and_then(|c| c.by_state.get(&state)).copied().unwrap_or(0);
            metrics
                .jobs_in_state
                .with_label_values(&[&*d.kind, id.as_str(), state.as_str()])
                .set(n as i64);
        }
        metrics
            .imports_in_progress
            .with_label_values(&[&*d.kind, id.as_str()])
            .set(c.map_or(0, |c| c.imports_in_flight) as i64);
    }
}

/// Aborts `waiting`/`failed` jobs older than `jobRetention` (code
/// `expired`), for every destination id in the store, configured or not:
/// a job nobody can send must not wait forever. Counted per destination in
/// `jobs_total{state="aborted"}` and `job_errors_total{code="expired"}`
/// (destination type `unconfigured` when no destination has that id).
async fn expire(
    shared: &Shared,
    dests: &BTreeMap<String, Arc<Destination>>,
    metrics: &Metrics,
    now: Timestamp,
    retention: Duration,
) {
    const BATCH: usize = 10_000;
    let Some(before) = now
        .as_millis()
        .checked_sub(retention.as_millis().min(i64::MAX as u128) as i64)
    else {
        return;
    };
    let message = format!(
        "waited longer than jobRetention ({}) without being delivered; re-drive it to try again",
        settings::fmt_duration(retention)
    );
    loop {
        let counts = match shared
            .store
            .expire_jobs(Timestamp(before), &message, now, BATCH)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Expiry of old unprocessed jobs failed.");
                return;
            }
        };
        let total: u64 = counts.values().sum();
        for (id, n) in &counts {
            let kind = dests.get(id).map_or("unconfigured", |d| &*d.kind);
            metrics
                .jobs_total
                .with_label_values(&[kind, id.as_str(), JobState::Aborted.as_str()])
                .inc_by(*n);
            metrics
                .job_errors
                .with_label_values(&[kind, id.as_str(), ErrorCode::Expired.as_str()])
                .inc_by(*n);
            tracing::warn!(
                destination_id = %id,
                destination_type = kind,
                configured = dests.contains_key(id),
                jobs = n,
                job_retention = %settings::fmt_duration(retention),
                "Aborted jobs that waited longer than jobRetention (error code expired)."
            );
        }
        if (total as usize) < BATCH || shared.shutdown.is_cancelled() {
            return;
        }
    }
}

async fn sweep(shared: &Shared, before: Timestamp) {
    const BATCH: usize = 10_000;
    let mut total = 0u64;
    loop {
        match shared.store.sweep_terminal(before, BATCH).await {
            Ok(n) => {
                total += n;
                if (n as usize) < BATCH || shared.shutdown.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Retention sweep failed.");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            deleted = total,
            "Retention sweep deleted old terminal jobs."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_owners_differ_per_start_and_share_their_prefix() {
        let (a, b) = (instance_owner(" pod:0 "), instance_owner("pod:0"));
        assert_ne!(a, b, "a random nonce per start");
        assert_eq!(instance_owner_prefix(&a), Some("instance:pod:0:"));
        assert_eq!(instance_owner_prefix(&b), Some("instance:pod:0:"));
        assert_eq!(a.len(), "instance:pod:0:".len() + INSTANCE_NONCE_CHARS);
        assert_eq!(instance_owner_prefix(&default_owner()), None);
        assert_eq!(instance_owner_prefix("instance::0123456789abcdef"), None);
        assert_eq!(instance_owner_prefix("instance:x:0123456789abcdeg"), None);
        assert_eq!(instance_owner_prefix("short"), None);
    }
}
