//! Several daemons sharing one PostgreSQL store: each router here has its
//! own owner name and its own connection pool, as separate processes would.
//! A throwaway cluster is started for the test process (or
//! `BATCHROUTER_TEST_POSTGRES_URL` is used); without either the tests skip
//! loudly, or fail when `BATCHROUTER_REQUIRE_REAL_SERVERS=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, DestinationError, ImportHandle, Job, JobState, JobStore, NewImport,
    PollStatus, StagedBatch, Timestamp, TransformError, UploadOutput, UploadStats,
};
use batchrouter_router::{Metrics, Router, RouterBuilder, RouterOptions, RouterSettings};
use batchrouter_store::PostgresStore;
use batchrouter_testkit::http::HttpStandIn;
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::postgres::TestDatabase;
use common::{counts, fast, http_manager, n, readable, settle, Behaviour, Recording};
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::Row;

/// One daemon's store: its own pool on the shared database.
async fn store(db: &TestDatabase) -> Arc<dyn JobStore> {
    Arc::new(PostgresStore::open(db.url()).await.unwrap())
}

fn options(dir: &Path, owner: &str, maintenance: Duration) -> RouterOptions {
    RouterOptions {
        owner: owner.into(),
        staging_dir: dir.join(owner),
        maintenance_interval: maintenance,
        ..RouterOptions::new()
    }
}

async fn daemon(
    db: &TestDatabase,
    dir: &Path,
    owner: &str,
    maintenance: Duration,
    dest: (&str, &str, Arc<dyn AsyncDestinationManager>, RouterSettings),
) -> (Router, Arc<Metrics>) {
    let metrics = Metrics::new();
    let router = RouterBuilder::new(
        store(db).await,
        metrics.clone(),
        options(dir, owner, maintenance),
    )
    .destination(dest.0, dest.1, dest.2, dest.3)
    .start()
    .await
    .unwrap();
    (router, metrics)
}

async fn insert_in_chunks(store: &Arc<dyn JobStore>, dest: &str, total: usize, chunk: usize) {
    let mut done = 0;
    let mut part = 0;
    while done < total {
        let k = chunk.min(total - done);
        store
            .insert_jobs(
                numbered_jobs(dest, &format!("p{part}"), k),
                Timestamp::now(),
            )
            .await
            .unwrap();
        done += k;
        part += 1;
    }
}

/// Jobs of the multi-daemon test. 200,000 fit in well under a
/// minute on two cores (see the report in docs/store.md).
const CLUSTER_JOBS: usize = 200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_deliver_every_job_exactly_once() {
    let Some(db) = TestDatabase::create("three_daemons").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let standin = HttpStandIn::start().await;
    let seed = store(&db).await;
    let t_insert = Instant::now();
    insert_in_chunks(&seed, "pg", CLUSTER_JOBS, 20_000).await;
    let insert = t_insert.elapsed();

    let settings = RouterSettings {
        max_events_in_batch: 10_000,
        max_concurrent_imports: 3,
        ..fast()
    };
    let t0 = Instant::now();
    let mut routers = Vec::new();
    for owner in ["daemon-a", "daemon-b", "daemon-c"] {
        let manager = http_manager("pg", json!({"url": standin.url(), "maxBatchSize": 10_000}));
        routers.push(
            daemon(
                &db,
                dir.path(),
                owner,
                Duration::from_secs(1),
                ("pg", "HTTP", manager, settings.clone()),
            )
            .await,
        );
    }
    let limit = Duration::from_secs(120);
    while standin.accepted_records() < CLUSTER_JOBS as u64 {
        assert!(
            t0.elapsed() < limit,
            "only {} records arrived",
            standin.accepted_records()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = settle(&seed, "pg", Duration::from_secs(60)).await;
    let routed = t0.elapsed();
    assert_eq!(
        n(&c, JobState::Succeeded),
        CLUSTER_JOBS as u64,
        "{:?}",
        readable(&c)
    );

    let accepted = standin.accepted();
    assert_eq!(accepted.len(), CLUSTER_JOBS, "every record arrived");
    let twice: Vec<_> = accepted.iter().filter(|(_, &v)| v != 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "records delivered more than once: {twice:?}"
    );
    let staged: Vec<u64> = routers
        .iter()
        .map(|(_, m)| m.staged_jobs.with_label_values(&["HTTP", "pg"]).get())
        .collect();
    assert_eq!(
        staged.iter().sum::<u64>(),
        CLUSTER_JOBS as u64,
        "each job staged once: {staged:?}"
    );
    assert!(
        staged.iter().filter(|&&s| s > 0).count() >= 2,
        "the daemons shared the work: {staged:?}"
    );
    let fenced: u64 = routers
        .iter()
        .map(|(_, m)| {
            m.fenced_writes_rejected
                .with_label_values(&["HTTP", "pg"])
                .get()
        })
        .sum();
    assert_eq!(fenced, 0, "no daemon wrote over another");
    eprintln!(
        "{CLUSTER_JOBS} jobs: insert {insert:.2?}, routed by 3 daemons in {routed:.2?} ({:.0} jobs/s); staged per daemon {staged:?}",
        CLUSTER_JOBS as f64 / routed.as_secs_f64()
    );
    for (r, _) in routers {
        assert!(r.shutdown().await.clean);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_daemons_import_is_finished_by_another_without_uploading_again() {
    let Some(db) = TestDatabase::create("failover").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = store(&db).await;
    let ids = seed
        .insert_jobs(numbered_jobs("f", "f", 40), Timestamp::now())
        .await
        .unwrap();
    let lease = Duration::from_secs(2);
    let settings = RouterSettings {
        lease_timeout: lease,
        ..fast()
    };
    let maintenance = Duration::from_millis(100);

    // A uploads and keeps polling an import that never finishes there.
    let a = Arc::new(Recording::default());
    *a.behaviour.lock().unwrap() = Behaviour::ImportForever;
    let (router_a, _) = daemon(
        &db,
        dir.path(),
        "daemon-a",
        maintenance,
        ("f", "TEST", a.clone(), settings.clone()),
    )
    .await;
    common::wait_for("A to poll its import", Duration::from_secs(20), || async {
        a.polls.load(Ordering::SeqCst) >= 2
    })
    .await;
    let import_id = seed
        .get_job(ids[0].job_id)
        .await
        .unwrap()
        .unwrap()
        .import_id
        .expect("importing");

    // B comes up, then A dies mid-import.
    let b = Arc::new(Recording::default());
    *b.behaviour.lock().unwrap() = Behaviour::Import { polls: 1 };
    let (router_b, metrics_b) = daemon(
        &db,
        dir.path(),
        "daemon-b",
        maintenance,
        ("f", "TEST", b.clone(), settings),
    )
    .await;
    router_a.abort();
    let died = Instant::now();
    tokio::time::sleep(lease / 2).await;
    assert_eq!(
        b.polls.load(Ordering::SeqCst),
        0,
        "B leaves A's import alone while A's lease runs"
    );

    let c = settle(&seed, "f", Duration::from_secs(20)).await;
    let took_over = died.elapsed();
    assert_eq!(n(&c, JobState::Succeeded), 40, "{:?}", readable(&c));
    assert!(took_over >= lease / 2, "{took_over:?}");
    assert_eq!(a.uploads.load(Ordering::SeqCst), 1);
    assert_eq!(
        b.uploads.load(Ordering::SeqCst),
        0,
        "the import was polled, never uploaded again"
    );
    assert!(b.polls.load(Ordering::SeqCst) >= 1);
    for i in &ids {
        let j = seed.get_job(i.job_id).await.unwrap().unwrap();
        assert_eq!(
            (j.state, j.attempts, j.import_id),
            (JobState::Succeeded, 1, Some(import_id))
        );
    }
    let imp = seed.get_import(import_id).await.unwrap().unwrap();
    assert_eq!(imp.succeeded, 40);
    let polls_b = metrics_b
        .polls_total
        .with_label_values(&["TEST", "f", "complete"])
        .get();
    assert_eq!(polls_b, 1, "B finished the import on its first poll");
    router_b.shutdown().await;
}

/// An upload's answer: one import of the whole batch, named by its batch id.
fn one_import(batch: &StagedBatch) -> UploadOutput {
    UploadOutput {
        imports: vec![NewImport {
            context: json!({"batch": batch.batch_id}),
            job_ids: batch.job_ids.clone(),
        }],
        ..Default::default()
    }
}

/// Counts uploads and imports in flight across every daemon.
#[derive(Default)]
struct Gauge {
    in_flight: AtomicUsize,
    max: AtomicUsize,
    finished: Mutex<HashSet<String>>,
    polls: Mutex<HashMap<String, usize>>,
}

/// A manager that starts one import per batch and completes it on the
/// second poll, recording how many were in flight at once.
struct Counting {
    gauge: Arc<Gauge>,
    uploads: AtomicUsize,
}

#[async_trait]
impl AsyncDestinationManager for Counting {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        Ok(job.payload.clone())
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        let now = self.gauge.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.gauge.max.fetch_max(now, Ordering::SeqCst);
        self.uploads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(15)).await;
        one_import(batch)
    }

    async fn poll(&self, import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        let key = import.context["batch"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let seen = {
            let mut polls = self.gauge.polls.lock().unwrap();
            let n = polls.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        if seen < 2 {
            return Ok(PollStatus::InProgress {
                processed: None,
                total: None,
            });
        }
        if self.gauge.finished.lock().unwrap().insert(key) {
            self.gauge.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(PollStatus::Complete {
            has_failures: false,
        })
    }

    async fn get_upload_stats(
        &self,
        _import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        Ok(UploadStats::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_imports_holds_across_daemons() {
    let Some(db) = TestDatabase::create("cluster_concurrency").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = store(&db).await;
    seed.insert_jobs(numbered_jobs("m", "m", 1_200), Timestamp::now())
        .await
        .unwrap();
    let settings = RouterSettings {
        max_events_in_batch: 50,
        max_concurrent_imports: 1,
        ..fast()
    };
    let gauge = Arc::new(Gauge::default());
    let mut routers = Vec::new();
    let mut managers = Vec::new();
    for owner in ["daemon-a", "daemon-b", "daemon-c"] {
        let m = Arc::new(Counting {
            gauge: gauge.clone(),
            uploads: AtomicUsize::new(0),
        });
        managers.push(m.clone());
        routers.push(
            daemon(
                &db,
                dir.path(),
                owner,
                Duration::from_millis(500),
                ("m", "TEST", m, settings.clone()),
            )
            .await,
        );
    }
    // The store's own view, sampled while the daemons work.
    let sampler = {
        let seed = seed.clone();
        tokio::spawn(async move {
            let mut worst = 0;
            loop {
                let c = counts(&seed, "m").await;
                worst = worst.max(c.imports_in_flight);
                if n(&c, JobState::Succeeded) == 1_200 {
                    return worst;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let c = settle(&seed, "m", Duration::from_secs(60)).await;
    assert_eq!(n(&c, JobState::Succeeded), 1_200, "{:?}", readable(&c));
    let worst_in_store = sampler.await.unwrap();
    assert_eq!(
        gauge.max.load(Ordering::SeqCst),
        1,
        "never two uploads or imports at once across daemons"
    );
    assert!(
        worst_in_store <= 1,
        "the store saw {worst_in_store} imports in flight"
    );
    let per_daemon: Vec<usize> = managers
        .iter()
        .map(|m| m.uploads.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        per_daemon.iter().sum::<usize>(),
        24,
        "1,200 jobs in batches of 50: {per_daemon:?}"
    );
    assert!(
        per_daemon.iter().all(|&u| u > 0),
        "every daemon took turns: {per_daemon:?}"
    );
    for (r, _) in routers {
        r.shutdown().await;
    }
}

/// A manager whose upload and poll each take `slow`, so a lease shorter than
/// either only survives if it is renewed while the work runs.
struct Slow {
    slow: Duration,
    /// 0 idle, 1 uploading, 2 polling, 3 done.
    phase: AtomicUsize,
    uploads: AtomicUsize,
    polls: AtomicUsize,
}

#[async_trait]
impl AsyncDestinationManager for Slow {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        Ok(job.payload.clone())
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        self.uploads.fetch_add(1, Ordering::SeqCst);
        self.phase.store(1, Ordering::SeqCst);
        tokio::time::sleep(self.slow).await;
        self.phase.store(0, Ordering::SeqCst);
        one_import(batch)
    }

    async fn poll(&self, _import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.phase.store(2, Ordering::SeqCst);
        tokio::time::sleep(self.slow).await;
        self.phase.store(3, Ordering::SeqCst);
        Ok(PollStatus::Complete {
            has_failures: false,
        })
    }

    async fn get_upload_stats(
        &self,
        _import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        Ok(UploadStats::default())
    }
}

/// Every lease expiry the store holds, in ms from now (jobs, imports, slots).
/// `now` is read after the query, so a lease renewed while the query ran
/// cannot seem to reach further ahead than it does.
async fn lease_horizons(db: &PgPool) -> Vec<(String, i64)> {
    let rows = sqlx::query(
        "SELECT 'job', lease_expires_at FROM jobs WHERE state = 'executing' \
         UNION ALL SELECT 'import', lease_expires_at FROM imports \
             WHERE state IN ('pending', 'processing') AND lease_owner IS NOT NULL \
         UNION ALL SELECT 'slot', lease_expires_at FROM upload_slots",
    )
    .fetch_all(db)
    .await
    .unwrap();
    let now = Timestamp::now().0;
    rows.iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) - now))
        .collect()
}

/// While `phase` holds, another daemon keeps trying to take the work over:
/// nothing may be taken back, and no lease may reach past `leaseTimeout`.
/// Returns how many of those checks ran once every lease held when the
/// phase began would have run out unless renewed.
async fn watch_leases(
    seed: &Arc<dyn JobStore>,
    pool: &PgPool,
    manager: &Slow,
    phase: usize,
    lease: Duration,
    what: &str,
) -> usize {
    common::wait_for(what, Duration::from_secs(20), || async {
        manager.phase.load(Ordering::SeqCst) == phase
    })
    .await;
    // Every lease held now was taken or renewed before this instant.
    let began = Instant::now();
    let mut past_expiry = 0;
    while manager.phase.load(Ordering::SeqCst) == phase {
        let checked_at = Instant::now();
        let r = seed.reclaim_expired(Timestamp::now()).await.unwrap();
        assert_eq!(
            r,
            Default::default(),
            "{what}: another daemon took back leases that were still renewed"
        );
        assert!(
            seed.claim_due_imports(
                "s",
                "intruder",
                10,
                Timestamp::now(),
                Timestamp::now() + lease
            )
            .await
            .unwrap()
            .is_empty(),
            "{what}: another daemon could claim the import being polled"
        );
        let horizons = lease_horizons(pool).await;
        // (The work may have ended, and released its leases, meanwhile.)
        let still = manager.phase.load(Ordering::SeqCst) == phase;
        assert!(!still || !horizons.is_empty(), "{what}: some lease is held");
        for (kind, ms) in &horizons {
            assert!(
                *ms <= lease.as_millis() as i64,
                "{what}: a {kind} lease reaches {ms} ms ahead, more than leaseTimeout ({lease:?})"
            );
        }
        if checked_at.duration_since(began) > lease {
            past_expiry += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    past_expiry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_and_polls_keep_short_leases_alive_by_renewing_them() {
    let Some(db) = TestDatabase::create("lease_heartbeat").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = store(&db).await;
    let pg = PostgresStore::open(db.url()).await.unwrap();
    seed.insert_jobs(numbered_jobs("s", "s", 10), Timestamp::now())
        .await
        .unwrap();
    // Job leases are renewed once half used up and import leases every
    // third, so a renewal may come up to half the lease late before the
    // lease runs out: 4 s leaves 2 s for a loaded two-core machine (with
    // PostgreSQL on it) to answer, where 2 s once failed. Each call outlasts
    // the lease by half, so only renewal keeps the work.
    let lease = Duration::from_secs(4);
    let settings = RouterSettings {
        lease_timeout: lease,
        upload_timeout: Duration::from_secs(60),
        ..fast()
    };
    let slow = Arc::new(Slow {
        slow: lease * 3 / 2,
        phase: AtomicUsize::new(0),
        uploads: AtomicUsize::new(0),
        polls: AtomicUsize::new(0),
    });
    let (router, metrics) = daemon(
        &db,
        dir.path(),
        "daemon-a",
        Duration::from_millis(100),
        ("s", "TEST", slow.clone(), settings),
    )
    .await;
    let during_upload = watch_leases(&seed, pg.pool(), &slow, 1, lease, "upload").await;
    let during_poll = watch_leases(&seed, pg.pool(), &slow, 2, lease, "poll").await;
    assert!(
        during_upload >= 1 && during_poll >= 1,
        "checked {during_upload} and {during_poll} times after an unrenewed lease would have run out"
    );
    let c = settle(&seed, "s", Duration::from_secs(20)).await;
    assert_eq!(n(&c, JobState::Succeeded), 10, "{:?}", readable(&c));
    assert_eq!(
        slow.uploads.load(Ordering::SeqCst),
        1,
        "never uploaded again"
    );
    assert_eq!(slow.polls.load(Ordering::SeqCst), 1);
    assert_eq!(
        metrics
            .fenced_writes_rejected
            .with_label_values(&["TEST", "s"])
            .get(),
        0
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_nobody_can_send_expire_after_job_retention() {
    let Some(db) = TestDatabase::create("job_expiry").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = store(&db).await;
    let now = Timestamp::now();
    let retention = Duration::from_secs(3600);
    // `ghost` is configured nowhere: no worker will ever claim its jobs.
    let old = seed
        .insert_jobs(numbered_jobs("ghost", "old", 3), now - retention * 2)
        .await
        .unwrap();
    let fresh = seed
        .insert_jobs(numbered_jobs("ghost", "new", 1), now)
        .await
        .unwrap();
    seed.insert_jobs(numbered_jobs("live", "live", 2), now)
        .await
        .unwrap();
    let metrics = Metrics::new();
    let router = RouterBuilder::new(
        store(&db).await,
        metrics.clone(),
        RouterOptions {
            job_retention: retention,
            ..options(dir.path(), "daemon-a", Duration::from_millis(100))
        },
    )
    .destination("live", "TEST", Arc::new(Recording::default()), fast())
    .start()
    .await
    .unwrap();
    common::wait_for(
        "the old jobs to expire",
        Duration::from_secs(10),
        || async { n(&counts(&seed, "ghost").await, JobState::Aborted) == 3 },
    )
    .await;
    for i in &old {
        let j = seed.get_job(i.job_id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Aborted);
        let e = j.error.unwrap();
        assert_eq!(e.code, batchrouter_core::ErrorCode::Expired);
        assert!(e.message.contains("jobRetention (1h)"), "{}", e.message);
    }
    assert_eq!(
        seed.get_job(fresh[0].job_id).await.unwrap().unwrap().state,
        JobState::Waiting,
        "a job younger than jobRetention waits on"
    );
    let c = settle(&seed, "live", Duration::from_secs(10)).await;
    assert_eq!(n(&c, JobState::Succeeded), 2, "{:?}", readable(&c));
    assert_eq!(
        metrics
            .jobs_total
            .with_label_values(&["unconfigured", "ghost", "aborted"])
            .get(),
        3
    );
    assert_eq!(
        metrics
            .job_errors
            .with_label_values(&["unconfigured", "ghost", "expired"])
            .get(),
        3
    );
    router.shutdown().await;
}
