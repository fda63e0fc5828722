//! 1M profiles through the Klaviyo manager and the stand-in over loopback:
//! transform + stage into 10k-line files (as the router does), upload,
//! poll to completion and read stats. Prints jobs/s and peak RSS.
//!
//! The vendor's 150 requests/min would make this a rate-limiter benchmark
//! (100 imports need ~300 requests ≈ 2 minutes of waiting), so the limiter
//! is configured far above it here. `KLAVIYO_BENCH_PROFILES` overrides the
//! profile count, `KLAVIYO_BENCH_BATCH` the staged batch size (memory must
//! not grow with it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, ImportHandle, Job, NoopTelemetry, PollStatus,
    StagedBatch, Timestamp,
};
use batchrouter_dest_klaviyo::KlaviyoManager;
use batchrouter_testkit::klaviyo::{KlaviyoStandIn, KlaviyoStandInOptions};
use batchrouter_testkit::measure::{peak_rss_kib, rate};
use serde_json::json;

fn main() {
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let total = env("KLAVIYO_BENCH_PROFILES", 1_000_000);
    let batch = env("KLAVIYO_BENCH_BATCH", 10_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(total, batch));
}

async fn run(total: usize, batch_size: usize) {
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        track_keys: false,
        polls_to_complete: 1,
        ..Default::default()
    })
    .await;
    let ctx = DestinationContext {
        id: "bench".into(),
        destination_type: batchrouter_dest_klaviyo::DESTINATION_TYPE.into(),
        telemetry: Arc::new(NoopTelemetry),
    };
    let config = json!({
        "privateApiKey": standin.api_key(),
        "baseUrl": standin.base_url(),
        "rateLimitPerSecond": 1_000_000,
        "rateLimitPerMinute": 60_000_000,
    });
    let m = Arc::new(KlaviyoManager::new(&ctx, &config).expect("config"));
    let dir = tempfile::tempdir().expect("tempdir");

    let started = Instant::now();
    let (mut stage_time, mut upload_time, mut finish_time) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut imports, mut staged_bytes) = (0usize, 0u64);
    let mut next_id: i64 = 1;
    let mut done = 0usize;
    while done < total {
        let n = batch_size.min(total - done);
        let t = Instant::now();
        let first = next_id;
        let path = dir.path().join(format!("batch-{first}.jsonl"));
        let stager = m.clone();
        let batch = tokio::task::spawn_blocking(move || stage(stager.as_ref(), path, first, n))
            .await
            .expect("staging");
        next_id += n as i64;
        stage_time += t.elapsed();
        staged_bytes += batch.bytes;

        let t = Instant::now();
        let out = m.upload(&batch).await;
        upload_time += t.elapsed();
        assert!(out.outcomes.is_empty(), "{:?}", out.outcomes.first());
        assert_eq!(
            out.imports.iter().map(|i| i.job_ids.len()).sum::<usize>(),
            n
        );

        let t = Instant::now();
        for (k, imp) in out.imports.iter().enumerate() {
            imports += 1;
            let h = ImportHandle {
                id: (imports + k) as i64,
                destination_id: "bench".into(),
                batch_id: batch.batch_id.clone(),
                context: imp.context.clone(),
                job_ids: imp.job_ids.clone(),
                started_at: Timestamp::now(),
            };
            loop {
                match m.poll(&h).await.expect("poll") {
                    PollStatus::InProgress { .. } => continue,
                    PollStatus::Complete { .. } => break,
                    other => panic!("{other:?}"),
                }
            }
            let stats = m.get_upload_stats(&h).await.expect("stats");
            assert!(stats.outcomes.is_empty());
        }
        finish_time += t.elapsed();
        tokio::fs::remove_file(&batch.path)
            .await
            .expect("remove staged file");
        done += n;
    }
    let elapsed = started.elapsed();
    assert_eq!(
        standin.imported_total(),
        total as u64,
        "every profile imported once"
    );

    println!(
        "klaviyo_upload: {total} profiles in staged batches of {batch_size}, {imports} imports, {} MB staged",
        staged_bytes / 1_000_000
    );
    println!(
        "  total {:.2}s  => {:.0} jobs/s (transform+stage {:.2}s, upload {:.2}s, poll+stats {:.2}s)",
        elapsed.as_secs_f64(),
        rate(total as u64, elapsed),
        stage_time.as_secs_f64(),
        upload_time.as_secs_f64(),
        finish_time.as_secs_f64()
    );
    println!(
        "  peak RSS {} MiB (manager and stand-in in one process; rate limiter set to 1M/s, not the vendor's 150/min)",
        peak_rss_kib().map_or("?".to_string(), |k| (k / 1024).to_string())
    );
}

/// Transforms `n` generated jobs and writes their lines, like the router.
fn stage(
    m: &dyn AsyncDestinationManager,
    path: std::path::PathBuf,
    first: i64,
    n: usize,
) -> StagedBatch {
    let mut file = std::io::BufWriter::with_capacity(
        256 * 1024,
        std::fs::File::create(&path).expect("create"),
    );
    let mut job_ids = Vec::with_capacity(n);
    let mut bytes = 0u64;
    for k in 0..n as i64 {
        let id = first + k;
        let payload = json!({
            "email": format!("user{id}@example.com"),
            "first_name": "Bench",
            "last_name": format!("User{id}"),
            "location": {"city": "Lyon", "country": "FR", "zip": "69001"},
            "properties": {"plan": if id % 3 == 0 { "pro" } else { "free" }, "score": id % 100},
            "signup_source": "bench",
        });
        let job = Job {
            id,
            destination_id: "bench".into(),
            payload: payload.to_string(),
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at: Timestamp::now(),
        };
        let line = m.transform(&job).expect("transform");
        file.write_all(line.as_bytes()).expect("write");
        file.write_all(b"\n").expect("write");
        bytes += line.len() as u64 + 1;
        job_ids.push(id);
    }
    file.flush().expect("flush");
    StagedBatch {
        batch_id: format!("bench-{first}"),
        destination_id: "bench".into(),
        destination_type: batchrouter_dest_klaviyo::DESTINATION_TYPE.into(),
        path,
        job_ids,
        bytes,
        attempt: 1,
        created_at: Timestamp::now(),
    }
}
