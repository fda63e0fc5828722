//! Job transitions per second on one PostgreSQL database with 1, 2 and 3
//! router instances (each with its own owner and connection pool, as
//! separate daemons would have), beside the database's own limit for the
//! same statements: the store calls the router makes (claim → commit as
//! importing → claim due import → finish as succeeded) in a tight loop with
//! as many concurrent loops, no router, no staging, no destination.
//!
//! Every job makes three transitions: waiting → executing → importing →
//! succeeded. The manager completes each import on its first poll, so the
//! engine's cost is what is measured.
//!
//! `cargo bench -p batchrouter-router --bench postgres_transitions -- [JOBS]`
//! (default 100000 jobs per run). Uses `BATCHROUTER_TEST_POSTGRES_URL` when
//! set, else a throwaway local cluster (fsync off: the figures are the
//! engine's and the statements', not the disk's).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use batchrouter_core::store::{
    ImportFinish, ImportState, ImportToCreate, JobTransition, Transition, UploadCommit,
};
use batchrouter_core::{
    AsyncDestinationManager, DestinationError, ImportHandle, Job, JobState, JobStore, NewImport,
    PollStatus, StagedBatch, Timestamp, TransformError, UploadOutput, UploadStats,
};
use batchrouter_router::{Metrics, RouterBuilder, RouterOptions, RouterSettings};
use batchrouter_store::PostgresStore;
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::measure::rate;
use batchrouter_testkit::postgres::TestDatabase;

const INSERT_CHUNK: usize = 20_000;
const BATCH: usize = 10_000;
const DEST: &str = "bench";

/// One import per batch, complete at the first poll.
struct Completing;

#[async_trait]
impl AsyncDestinationManager for Completing {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        Ok(job.payload.clone())
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        UploadOutput {
            imports: vec![NewImport {
                context: serde_json::json!({"batch": batch.batch_id}),
                job_ids: batch.job_ids.clone(),
            }],
            ..Default::default()
        }
    }

    async fn poll(&self, _import: &ImportHandle) -> Result<PollStatus, DestinationError> {
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

async fn open(db: &TestDatabase) -> Arc<PostgresStore> {
    Arc::new(PostgresStore::open(db.url()).await.expect("open store"))
}

async fn fill(store: &PostgresStore, n: usize) -> Duration {
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let k = INSERT_CHUNK.min(n - done);
        store
            .insert_jobs(
                numbered_jobs(DEST, &format!("p{done}"), k),
                Timestamp::now(),
            )
            .await
            .expect("insert");
        done += k;
    }
    t0.elapsed()
}

/// The router's store calls for one batch after another, until no job is due.
async fn store_loop(store: Arc<PostgresStore>, owner: String) -> usize {
    let lease = Duration::from_secs(300);
    let mut total = 0;
    loop {
        let now = Timestamp::now();
        let jobs = store
            .claim_jobs(DEST, &owner, BATCH, now, now + lease)
            .await
            .expect("claim");
        if jobs.is_empty() {
            return total;
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        total += ids.len();
        let report = store
            .commit_upload(UploadCommit {
                destination_id: DEST.into(),
                owner: owner.clone(),
                now,
                attempted: ids.clone(),
                imports: vec![ImportToCreate {
                    batch_id: format!("{owner}-{total}"),
                    context: serde_json::json!({"batch": total}),
                    job_ids: ids.clone(),
                    next_poll_at: now,
                    deadline_at: now + lease,
                }],
                transitions: vec![],
                slot: None,
                import_lease_until: now + lease,
            })
            .await
            .expect("commit");
        let now = Timestamp::now();
        let due = store
            .claim_due_imports(DEST, &owner, 32, now, now + lease)
            .await
            .expect("claim imports");
        for imp in due
            .into_iter()
            .filter(|i| report.import_ids.contains(&i.id))
        {
            let mine = store.importing_jobs(imp.id).await.expect("importing jobs");
            let finish = ImportFinish {
                import_id: imp.id,
                owner: owner.clone(),
                state: ImportState::Completed,
                error: None,
                transitions: mine
                    .iter()
                    .map(|j| JobTransition {
                        job_id: j.job_id,
                        to: Transition::Succeeded {
                            note: None,
                            external_id: None,
                        },
                    })
                    .collect(),
                now,
            };
            let r = store.finish_import(finish).await.expect("finish");
            assert!(r.rejected.is_empty(), "no other loop touches these jobs");
        }
    }
}

/// The database's limit: `instances` concurrent loops of the same statements.
async fn store_only(n: usize, instances: usize) -> Duration {
    let db = TestDatabase::create("bench_store_only")
        .await
        .expect("database");
    fill(&*open(&db).await, n).await;
    let mut stores = Vec::new();
    for _ in 0..instances {
        stores.push(open(&db).await);
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(store_loop(s, format!("loop-{i}"))))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("loop");
    }
    let took = t0.elapsed();
    assert_eq!(total, n, "every job went through once");
    took
}

/// `instances` routers on one database until every job succeeded.
async fn routed(n: usize, instances: usize) -> (Duration, Vec<u64>) {
    let db = TestDatabase::create("bench_routed")
        .await
        .expect("database");
    let seed = open(&db).await;
    fill(&seed, n).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = RouterSettings {
        max_events_in_batch: BATCH,
        upload_freq: Duration::from_millis(50),
        min_idle_sleep: Duration::from_millis(10),
        poll_interval: Duration::from_millis(10),
        max_concurrent_imports: 8,
        ..RouterSettings::default()
    };
    let t0 = Instant::now();
    let mut routers = Vec::new();
    for i in 0..instances {
        let metrics = Metrics::new();
        let owner = format!("router-{i}");
        let router = RouterBuilder::new(
            open(&db).await,
            metrics.clone(),
            RouterOptions {
                staging_dir: dir.path().join(&owner),
                owner,
                maintenance_interval: Duration::from_secs(5),
                ..RouterOptions::new()
            },
        )
        .destination(DEST, "BENCH", Arc::new(Completing), settings.clone())
        .start()
        .await
        .expect("router start");
        routers.push((router, metrics));
    }
    let done = |routers: &[(batchrouter_router::Router, Arc<Metrics>)]| -> Vec<u64> {
        routers
            .iter()
            .map(|(_, m)| {
                m.jobs_total
                    .with_label_values(&["BENCH", DEST, "succeeded"])
                    .get()
            })
            .collect()
    };
    loop {
        if done(&routers).iter().sum::<u64>() >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    let per_router = done(&routers);
    for (r, _) in routers {
        r.shutdown().await;
    }
    let counts = seed.destination_counts().await.expect("counts");
    assert_eq!(
        counts[DEST].by_state[&JobState::Succeeded],
        n as u64,
        "every job succeeded once"
    );
    (took, per_router)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(n));
}

async fn run(n: usize) {
    if let Err(why) = TestDatabase::create_blocking("bench_probe") {
        batchrouter_testkit::skip_or_fail("postgres_transitions benchmark", &why);
        return;
    }
    println!(
        "jobs per run: {n}; batch {BATCH}; 3 transitions per job (claim, importing, succeeded)"
    );
    println!();
    println!("instances | routed jobs/s | transitions/s | scaling | store-only jobs/s | scaling | routed/store | jobs per router");
    println!("----------|---------------|---------------|---------|-------------------|---------|--------------|----------------");
    let mut first: Option<(f64, f64)> = None;
    for instances in 1..=3 {
        let (took, per_router) = routed(n, instances).await;
        let base = store_only(n, instances).await;
        let r = rate(n as u64, took);
        let b = rate(n as u64, base);
        let (r1, b1) = *first.get_or_insert((r, b));
        println!(
            "{instances:>9} | {r:>13.0} | {:>13.0} | {:>6.2}x | {b:>17.0} | {:>6.2}x | {:>12.2} | {per_router:?}",
            r * 3.0,
            r / r1,
            b / b1,
            r / b,
        );
    }
}
