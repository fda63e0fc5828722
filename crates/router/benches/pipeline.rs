//! End-to-end throughput: N jobs through SQLite → stage → HTTP stand-in
//! (batch mode) → succeeded, with the store's own claim/commit rate for the
//! same jobs measured in the same run as the baseline.
//!
//! `cargo bench -p batchrouter-router --bench pipeline -- [JOBS] [CONCURRENCY]`
//! (defaults: 100000 jobs, maxConcurrentImports 2). Run it once per N in a
//! fresh process: peak RSS is a process-wide high-water mark.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::store::{JobTransition, Transition, UploadCommit};
use batchrouter_core::{DestinationContext, JobState, JobStore, NoopTelemetry, Timestamp};
use batchrouter_router::{Metrics, RouterBuilder, RouterOptions, RouterSettings};
use batchrouter_store::SqliteStore;
use batchrouter_testkit::http::{HttpStandIn, HttpStandInOptions};
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::measure::{peak_rss_kib, rate, rss_kib};

const INSERT_CHUNK: usize = 20_000;

async fn fill(store: &Arc<dyn JobStore>, dest: &str, n: usize) -> Duration {
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let k = INSERT_CHUNK.min(n - done);
        let jobs = numbered_jobs(dest, dest, k);
        store.insert_jobs(jobs, Timestamp::now()).await.unwrap();
        done += k;
    }
    t0.elapsed()
}

/// The store alone: claim 10k → commit succeeded, until every job is done.
async fn store_cycle(store: &Arc<dyn JobStore>, dest: &str) -> (usize, Duration) {
    let t0 = Instant::now();
    let mut total = 0;
    loop {
        let now = Timestamp::now();
        let jobs = store
            .claim_jobs(
                dest,
                "baseline",
                10_000,
                now,
                now + Duration::from_secs(300),
            )
            .await
            .unwrap();
        if jobs.is_empty() {
            break;
        }
        total += jobs.len();
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        store
            .commit_upload(UploadCommit {
                destination_id: dest.into(),
                owner: "baseline".into(),
                now,
                attempted: ids.clone(),
                imports: vec![],
                transitions: ids
                    .iter()
                    .map(|&job_id| JobTransition {
                        job_id,
                        to: Transition::Succeeded {
                            note: None,
                            external_id: None,
                        },
                    })
                    .collect(),
                slot: None,
                import_lease_until: now,
            })
            .await
            .unwrap();
    }
    (total, t0.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let concurrency: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n, concurrency));
}

async fn run(n: usize, concurrency: u32) {
    let dir = tempfile::tempdir().unwrap();
    let rss_start = rss_kib().unwrap_or(0);

    // Baseline: the store's own claim → commit rate on the same data size,
    // in its own database file so the routed run starts from the same state.
    let (ins, base) = {
        let baseline: Arc<dyn JobStore> = Arc::new(
            SqliteStore::open(dir.path().join("baseline.db"))
                .await
                .unwrap(),
        );
        let ins = fill(&baseline, "baseline", n).await;
        let (done, base) = store_cycle(&baseline, "baseline").await;
        assert_eq!(done, n);
        (ins, base)
    };
    let store: Arc<dyn JobStore> = Arc::new(
        SqliteStore::open(dir.path().join("bench.db"))
            .await
            .unwrap(),
    );

    let standin = HttpStandIn::start_with(HttpStandInOptions {
        track_keys: false,
        ..Default::default()
    })
    .await;
    let enqueue = fill(&store, "bench", n).await;
    let metrics = Metrics::new();
    let manager = batchrouter_destinations::REGISTRY
        .build(
            &DestinationContext {
                id: "bench".into(),
                destination_type: "HTTP".into(),
                telemetry: Arc::new(NoopTelemetry),
            },
            &serde_json::json!({"url": standin.url(), "maxBatchSize": 10_000}),
        )
        .unwrap();
    let settings = RouterSettings {
        upload_freq: Duration::from_millis(200),
        min_idle_sleep: Duration::from_millis(50),
        max_concurrent_imports: concurrency,
        ..RouterSettings::default()
    };
    let t0 = Instant::now();
    let router = RouterBuilder::new(
        store.clone(),
        metrics,
        RouterOptions {
            staging_dir: dir.path().join("staging"),
            ..RouterOptions::new()
        },
    )
    .destination("bench", "HTTP", manager, settings)
    .start()
    .await
    .unwrap();
    let mut peak_mid = 0;
    // Cheap wait first (an atomic in the stand-in), then confirm in the store.
    while standin.accepted_records() < n as u64 {
        peak_mid = peak_mid.max(rss_kib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    loop {
        let c = store.destination_counts().await.unwrap();
        let ok = c
            .get("bench")
            .and_then(|c| c.by_state.get(&JobState::Succeeded))
            .copied()
            .unwrap_or(0);
        if ok as usize == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e2e = t0.elapsed();
    router.shutdown().await;
    assert_eq!(
        standin.accepted_records(),
        n as u64,
        "every record delivered once"
    );

    println!("jobs                         {n}");
    println!("maxConcurrentImports         {concurrency}");
    println!(
        "enqueue (insert)             {:>10.0} jobs/s",
        rate(n as u64, enqueue)
    );
    println!(
        "baseline insert              {:>10.0} jobs/s",
        rate(n as u64, ins)
    );
    println!(
        "baseline store claim+commit  {:>10.0} jobs/s  ({base:.2?})",
        rate(n as u64, base)
    );
    println!(
        "end to end                   {:>10.0} jobs/s  ({e2e:.2?})",
        rate(n as u64, e2e)
    );
    println!(
        "end to end / store baseline  {:>10.2}",
        base.as_secs_f64() / e2e.as_secs_f64()
    );
    println!("bytes received by stand-in   {}", standin.body_bytes());
    println!("RSS at start                 {rss_start} KiB");
    println!("RSS peak while routing       {peak_mid} KiB");
    println!(
        "peak RSS (VmHWM)             {} KiB",
        peak_rss_kib().unwrap_or(0)
    );
}
