//! Transform + stage + upload of synthetic leads to the Marketo stand-in,
//! the way the router drives the manager: batches of 10,000 lines staged to
//! a file, uploaded, polled to completion. Prints jobs/s and peak RSS.
//!
//! `cargo bench -p batchrouter-dest-marketo` (1,000,000 leads by default;
//! `MARKETO_BENCH_LEADS=200000` for a shorter run; `MARKETO_BENCH_BATCH`
//! jobs per staged batch, 10,000 by default like the router's
//! `maxEventsInABatch`, larger to fill 9.5 MB import files). Peak RSS is that
//! of the whole process, stand-in included.

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
use batchrouter_testkit::marketo::{MarketoOptions, MarketoStandIn};
use batchrouter_testkit::measure::{peak_rss_kib, rate};
use serde_json::json;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn main() {
    let total = env_count("MARKETO_BENCH_LEADS", 1_000_000);
    let batch_size = env_count("MARKETO_BENCH_BATCH", 10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The bench measures this code, not Marketo's API quota: at 100 calls
    // per 20 s a million leads would spend most of the run waiting out 606s.
    let standin = rt.block_on(MarketoStandIn::start_with(MarketoOptions {
        track_leads: false,
        polls_to_complete: 1,
        max_calls_per_window: None,
        ..Default::default()
    }));
    let ctx = DestinationContext {
        id: "bench".into(),
        destination_type: batchrouter_dest_marketo::DESTINATION_TYPE.into(),
        telemetry: Arc::new(NoopTelemetry),
    };
    let config = json!({
        "munchkinId": "123-ABC-456",
        "clientId": standin.client_id(),
        "clientSecret": standin.client_secret(),
        "baseUrl": standin.base_url(),
        "columnFieldsMapping": [
            {"from": "email", "to": "email"},
            {"from": "first", "to": "firstName"},
            {"from": "last", "to": "lastName"},
            {"from": "company", "to": "company"}
        ],
        "passUnmappedFields": true,
    });
    let manager = batchrouter_dest_marketo::MarketoDestination
        .validate_and_build(&ctx, &config)
        .expect("config");
    let dir = tempfile::tempdir().expect("temp dir");

    let rss_start = peak_rss_kib().unwrap_or(0);
    let mut stage_time = Duration::ZERO;
    let mut upload_time = Duration::ZERO;
    let mut staged_bytes = 0u64;
    let mut imports = 0usize;
    let started = Instant::now();
    let mut next_id = 0i64;
    while (next_id as usize) < total {
        let n = batch_size.min(total - next_id as usize);
        let jobs: Vec<Job> = (0..n as i64).map(|k| lead(next_id + k)).collect();
        next_id += n as i64;

        let t = Instant::now();
        let batch = stage(dir.path(), manager.as_ref(), &jobs);
        stage_time += t.elapsed();
        staged_bytes += batch.bytes;

        let t = Instant::now();
        imports += rt.block_on(upload_and_complete(manager.as_ref(), &batch));
        upload_time += t.elapsed();
        std::fs::remove_file(&batch.path).expect("remove staged file");
    }
    let elapsed = started.elapsed();
    assert_eq!(
        standin.rows_received(),
        total as u64,
        "every lead reached the stand-in"
    );
    assert_eq!(
        standin.rows_imported(),
        total as u64,
        "every lead was imported"
    );

    let total = total as u64;
    println!(
        "marketo_upload: {total} leads in {} batches of {batch_size}, {imports} imports",
        total.div_ceil(batch_size as u64)
    );
    println!("  staged bytes          {:>12}", staged_bytes);
    println!(
        "  transform + stage     {:>12.0} jobs/s ({:.2?})",
        rate(total, stage_time),
        stage_time
    );
    println!(
        "  upload + poll         {:>12.0} jobs/s ({:.2?})",
        rate(total, upload_time),
        upload_time
    );
    println!(
        "  end to end            {:>12.0} jobs/s ({:.2?})",
        rate(total, elapsed),
        elapsed
    );
    println!(
        "  peak RSS              {:>12} KiB (at start {rss_start} KiB; whole process, stand-in included)",
        peak_rss_kib().unwrap_or(0)
    );
}

fn lead(i: i64) -> Job {
    Job {
        id: i,
        destination_id: "bench".into(),
        payload: json!({
            "email": format!("Lead{i}@Example.com"),
            "first": format!("First{i}"),
            "last": "Lastname",
            "company": format!("Company {}", i % 1000),
            "score": i % 100,
            "vip": i % 7 == 0,
        })
        .to_string(),
        message_id: None,
        attempts: 0,
        retry_base: 0,
        first_attempt_at: None,
        created_at: Timestamp::now(),
    }
}

/// Transforms each job and appends its line to a staged file, like the router.
fn stage(dir: &std::path::Path, m: &dyn AsyncDestinationManager, jobs: &[Job]) -> StagedBatch {
    let path = dir.join(format!("staged-{}.jsonl", jobs[0].id));
    let mut out = std::io::BufWriter::with_capacity(
        256 * 1024,
        std::fs::File::create(&path).expect("staged file"),
    );
    let mut ids = Vec::with_capacity(jobs.len());
    let mut bytes = 0u64;
    for job in jobs {
        let line = m.transform(job).expect("synthetic leads transform");
        out.write_all(line.as_bytes()).expect("write");
        out.write_all(b"\n").expect("write");
        bytes += line.len() as u64 + 1;
        ids.push(job.id);
    }
    out.flush().expect("flush");
    StagedBatch {
        batch_id: format!("bench-{}", jobs[0].id),
        destination_id: "bench".into(),
        destination_type: batchrouter_dest_marketo::DESTINATION_TYPE.into(),
        path,
        job_ids: ids,
        bytes,
        attempt: 1,
        created_at: Timestamp::now(),
    }
}

/// Uploads one batch and polls its imports until Marketo says complete.
async fn upload_and_complete(m: &dyn AsyncDestinationManager, batch: &StagedBatch) -> usize {
    let out = m.upload(batch).await;
    assert!(
        out.outcomes.is_empty(),
        "bench upload failed: {:?}",
        out.outcomes.first()
    );
    for (i, imp) in out.imports.iter().enumerate() {
        let handle = ImportHandle {
            id: i as i64,
            destination_id: "bench".into(),
            batch_id: batch.batch_id.clone(),
            context: imp.context.clone(),
            job_ids: imp.job_ids.clone(),
            started_at: Timestamp::now(),
        };
        loop {
            match m.poll(&handle).await.expect("poll") {
                PollStatus::Complete { has_failures } => {
                    assert!(!has_failures);
                    break;
                }
                PollStatus::InProgress { .. } => {}
                PollStatus::Failed { error, .. } => panic!("import failed: {error:?}"),
            }
        }
    }
    out.imports.len()
}
