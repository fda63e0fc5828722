//! The HTTP destination against the stand-in over real loopback HTTP:
//! every outcome class, headers, methods and concurrency.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    AsyncDestinationManager, ErrorCode, Job, Outcome, StagedBatch, Timestamp, UploadOutput,
};
use batchrouter_testkit::http::{Fault, HttpStandIn};
use batchrouter_testkit::manager::{self as kit, BatchSpec};
use serde_json::json;

mod common;
use common::manager;

/// Stages `n` records the way the router does and returns the batch.
fn stage(m: &Arc<dyn AsyncDestinationManager>, dir: &std::path::Path, n: usize) -> StagedBatch {
    let spec = BatchSpec::new("h", "HTTP")
        .with_batch_id("b")
        .with_created_at(Timestamp(0));
    let jobs = (0..n).map(|i| {
        (
            i as i64 + 1,
            json!({"id": format!("r-{i}"), "v": i}).to_string(),
        )
    });
    let (batch, refused) = kit::stage_for(dir, &spec, m.as_ref(), jobs);
    assert!(refused.is_empty(), "{refused:?}");
    batch
}

fn outcome_counts(out: &UploadOutput) -> (usize, usize, usize, usize) {
    out.outcomes
        .iter()
        .fold((0, 0, 0, 0), |(s, f, a, t), (_, o)| match o {
            Outcome::Succeeded { .. } => (s + 1, f, a, t),
            Outcome::Failed(_) => (s, f + 1, a, t),
            Outcome::Aborted(_) => (s, f, a + 1, t),
            Outcome::Throttled(_) => (s, f, a, t + 1),
        })
}

#[tokio::test]
async fn batch_mode_sends_arrays_with_headers_and_method() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(
        json!({"url": s.url(), "method": "PUT", "maxBatchSize": 4, "headers": {"Authorization": "Bearer t0k", "X-Source": "br"}}),
    );
    let batch = stage(&m, dir.path(), 10);
    let out = m.upload(&batch).await;
    assert_eq!(outcome_counts(&out), (10, 0, 0, 0));
    assert_eq!(s.requests(), 3, "10 records in arrays of at most 4");
    assert_eq!(s.accepted().len(), 10);
    let headers = s.last_headers();
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("authorization").as_deref(), Some("Bearer t0k"));
    assert_eq!(get("x-source").as_deref(), Some("br"));
    assert_eq!(get("content-type").as_deref(), Some("application/json"));
    assert_eq!(s.last_method(), "PUT");
}

#[tokio::test]
async fn permanent_errors_abort_only_their_request_with_status_and_body() {
    let s = HttpStandIn::start().await;
    s.push_fault(Fault {
        status: 422,
        body: "{\"error\":\"field x is required\"}".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "maxBatchSize": 5}));
    let out = m.upload(&stage(&m, dir.path(), 10)).await;
    assert_eq!(outcome_counts(&out), (5, 0, 5, 0));
    let (_, first) = &out.outcomes[0];
    match first {
        Outcome::Aborted(e) => {
            assert_eq!(e.code, ErrorCode::DestinationRejected);
            assert_eq!(e.message, "HTTP 422: {\"error\":\"field x is required\"}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_errors_fail_the_request_and_defer_the_rest() {
    let s = HttpStandIn::start().await;
    s.push_fault(Fault::status(200));
    s.push_fault(Fault::status(503).with_retry_after("7"));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "maxBatchSize": 2}));
    let out = m.upload(&stage(&m, dir.path(), 8)).await;
    assert_eq!(
        outcome_counts(&out),
        (2, 2, 0, 4),
        "sent ok, failed, not sent"
    );
    assert_eq!(out.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(
        s.requests(),
        2,
        "nothing more is sent to a failing endpoint"
    );
    let deferred = out
        .outcomes
        .iter()
        .find(|(_, o)| matches!(o, Outcome::Throttled(_)))
        .unwrap();
    match &deferred.1 {
        Outcome::Throttled(e) => assert!(e.message.starts_with("not sent"), "{}", e.message),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn too_many_requests_is_throttling_with_retry_after() {
    let s = HttpStandIn::start().await;
    let when = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    s.push_fault(Fault::status(429).with_retry_after(when));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url()}));
    let out = m.upload(&stage(&m, dir.path(), 3)).await;
    assert_eq!(outcome_counts(&out), (0, 0, 0, 3));
    let hint = out.retry_after.unwrap();
    assert!(
        hint > Duration::from_secs(100) && hint <= Duration::from_secs(120),
        "{hint:?}"
    );
}

#[tokio::test]
async fn timeouts_and_dropped_connections_are_retryable() {
    let s = HttpStandIn::start().await;
    s.push_fault(Fault::status(200).delayed(Duration::from_secs(5)));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "timeout": "300ms"}));
    let t0 = Instant::now();
    let out = m.upload(&stage(&m, dir.path(), 2)).await;
    assert!(t0.elapsed() < Duration::from_secs(3));
    match &out.outcomes[0].1 {
        Outcome::Failed(e) => assert!(e.message.contains("timed out"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    s.heal();
    s.push_fault(Fault::dropped());
    let out = m.upload(&stage(&m, dir.path(), 2)).await;
    match &out.outcomes[0].1 {
        Outcome::Failed(e) => assert_eq!(e.code, ErrorCode::DestinationUnavailable),
        other => panic!("{other:?}"),
    }
    // Nothing listening at all.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let m = manager(json!({"url": format!("http://127.0.0.1:{port}/x")}));
    let out = m.upload(&stage(&m, dir.path(), 1)).await;
    match &out.outcomes[0].1 {
        Outcome::Failed(e) => assert!(e.message.starts_with("connection failed"), "{}", e.message),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn single_mode_rejects_records_individually_and_respects_max_in_flight() {
    let s = HttpStandIn::start().await;
    s.reject_when("id", "r-3", 400);
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "mode": "single", "maxInFlight": 4}));
    let out = m.upload(&stage(&m, dir.path(), 40)).await;
    // r-3 and r-30..r-39 match the prefix.
    assert_eq!(outcome_counts(&out), (29, 0, 11, 0));
    assert_eq!(s.requests(), 40);
    let mut ids: Vec<i64> = out.outcomes.iter().map(|(id, _)| *id).collect();
    ids.sort();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());
}

#[tokio::test]
async fn single_mode_stops_after_a_throttle() {
    let s = HttpStandIn::start().await;
    s.set_default(Some(Fault::status(429).with_retry_after("3")));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "mode": "single", "maxInFlight": 2}));
    let out = m.upload(&stage(&m, dir.path(), 50)).await;
    let (ok, failed, aborted, throttled) = outcome_counts(&out);
    assert_eq!((ok, failed, aborted, throttled), (0, 0, 0, 50));
    assert!(
        s.requests() <= 3,
        "stopped after the first throttle: {}",
        s.requests()
    );
    assert_eq!(out.retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn a_short_staged_file_fails_the_missing_jobs() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "maxBatchSize": 2}));
    let mut batch = stage(&m, dir.path(), 3);
    batch.job_ids.push(99);
    let out = m.upload(&batch).await;
    assert_eq!(outcome_counts(&out), (3, 1, 0, 0));
    let (id, o) = out.outcomes.last().unwrap();
    assert_eq!(*id, 99);
    assert!(matches!(o, Outcome::Failed(e) if e.code == ErrorCode::Internal));
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let s = HttpStandIn::start().await;
    let elsewhere = HttpStandIn::start().await;
    s.push_fault(Fault::redirect(301, elsewhere.url()));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "headers": {"X-Api-Key": "k3y"}}));
    let out = m.upload(&stage(&m, dir.path(), 3)).await;
    assert_eq!(
        outcome_counts(&out),
        (0, 0, 3, 0),
        "a 301 is a permanent answer"
    );
    match &out.outcomes[0].1 {
        Outcome::Aborted(e) => assert!(e.message.starts_with("HTTP 301"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        elsewhere.requests(),
        0,
        "records and headers never went elsewhere"
    );
}

/// The router's deterministic batch id (first id, count, FNV-1a of the ids).
fn router_batch_id(job_ids: &[i64]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in job_ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{}-{}-{h:016x}", job_ids[0], job_ids.len())
}

/// Stages `(job id, payload)` pairs as the router's staging does: a job
/// whose transform fails is aborted alone (`transform_failed`) and left out.
/// Job `id` was created at `id` ms (see [`stage_in_store`]).
fn stage_like_router(
    m: &Arc<dyn AsyncDestinationManager>,
    dir: &std::path::Path,
    jobs: &[(i64, String)],
) -> (StagedBatch, Vec<(i64, batchrouter_core::JobError)>) {
    stage_in_store(m, dir, "h", 0, jobs)
}

/// As [`stage_like_router`], for destination `destination_id` of a store
/// whose job `id` was created at `epoch + id` ms; the batch's creation time
/// is its earliest job's, as the router sets it.
fn stage_in_store(
    m: &Arc<dyn AsyncDestinationManager>,
    dir: &std::path::Path,
    destination_id: &str,
    epoch: i64,
    jobs: &[(i64, String)],
) -> (StagedBatch, Vec<(i64, batchrouter_core::JobError)>) {
    let (mut text, mut ids, mut aborted) = (String::new(), Vec::new(), Vec::new());
    let mut earliest = i64::MAX;
    for (id, payload) in jobs {
        let job = Job {
            id: *id,
            destination_id: destination_id.into(),
            payload: payload.clone(),
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at: Timestamp(epoch + id),
        };
        match m.transform(&job) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
                ids.push(*id);
                earliest = earliest.min(job.created_at.0);
            }
            Err(e) => aborted.push((
                *id,
                batchrouter_core::JobError::new(ErrorCode::TransformFailed, e.to_string()),
            )),
        }
    }
    let batch_id = router_batch_id(&ids);
    let path = dir.join(format!("{destination_id}-{epoch}-{batch_id}.staged"));
    std::fs::write(&path, &text).unwrap();
    let batch = StagedBatch {
        batch_id,
        destination_id: destination_id.into(),
        destination_type: "HTTP".into(),
        path,
        job_ids: ids,
        bytes: text.len() as u64,
        attempt: 1,
        created_at: Timestamp(earliest),
    };
    (batch, aborted)
}

fn records(ids: std::ops::RangeInclusive<i64>) -> Vec<(i64, String)> {
    ids.map(|i| (i, json!({"id": format!("r-{i}")}).to_string()))
        .collect()
}

#[tokio::test]
async fn a_deep_record_aborts_alone_and_the_rest_of_its_batch_is_delivered() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url()}));
    let mut jobs = records(1..=9);
    let deep = format!(
        "{{\"id\":\"deep\",\"v\":{}1{}}}",
        "[".repeat(9_999),
        "]".repeat(9_999)
    );
    jobs.insert(4, (100, deep));
    let (batch, aborted) = stage_like_router(&m, dir.path(), &jobs);
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0].0, 100);
    assert_eq!(aborted[0].1.code, ErrorCode::TransformFailed);
    assert!(
        aborted[0].1.message.contains("10000 levels deep"),
        "{}",
        aborted[0].1.message
    );
    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(outcome_counts(&out), (9, 0, 0, 0));
    assert_eq!(s.accepted().len(), 9);
    assert_eq!(s.accepted_count("deep"), 0);
}

#[tokio::test]
async fn every_request_carries_a_key_stable_for_its_job_set() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();

    // Batch mode, one request per batch: the key is the batch id, the same
    // on a re-send of the same jobs, different for another job set.
    let m = manager(json!({"url": s.url()}));
    let (first, _) = stage_like_router(&m, dir.path(), &records(1..=5));
    m.upload(&first).await;
    m.upload(&first).await;
    let (other, _) = stage_like_router(&m, dir.path(), &records(1..=4));
    m.upload(&other).await;
    // Job `id` was created at `id` ms, so both batches were created at 1.
    let keys = s.idempotency_keys();
    let whole = |b: &StagedBatch| Some(format!("h/{}-1", b.batch_id));
    assert_eq!(keys, vec![whole(&first), whole(&first), whole(&other)]);
    assert_ne!(first.batch_id, other.batch_id);

    // Several requests per batch: one key per run of jobs, each stable.
    let s = HttpStandIn::start().await;
    let m = manager(json!({"url": s.url(), "maxBatchSize": 2}));
    let (batch, _) = stage_like_router(&m, dir.path(), &records(1..=5));
    m.upload(&batch).await;
    m.upload(&batch).await;
    let keys: Vec<String> = s.idempotency_keys().into_iter().flatten().collect();
    let b = &batch.batch_id;
    let expected = [
        format!("h/{b}-1/1+2"),
        format!("h/{b}-1/3+2"),
        format!("h/{b}-1/5+1"),
    ];
    assert_eq!(keys[..3], expected[..]);
    assert_eq!(keys[3..], expected[..], "a re-send repeats the keys");

    // Single mode: the key is the job's (its id and its own creation time,
    // not its batch's), whatever batch carries it.
    let s = HttpStandIn::start().await;
    let m = manager(json!({"url": s.url(), "mode": "single", "maxInFlight": 1}));
    let (batch, _) = stage_like_router(&m, dir.path(), &records(7..=9));
    m.upload(&batch).await;
    let (alone, _) = stage_like_router(&m, dir.path(), &records(8..=8));
    m.upload(&alone).await;
    let mut keys: Vec<String> = s.idempotency_keys().into_iter().flatten().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["h/job-7-7", "h/job-8-8", "h/job-8-8", "h/job-9-9"]
    );
}

#[tokio::test]
async fn stores_that_reuse_job_ids_never_share_a_key() {
    // A fresh SQLite file, a new PostgreSQL database or a second environment
    // posting to the same receiver count job ids from 1 again: the same ids,
    // created at other times or bound for another destination, must not
    // repeat a key, or a receiver dropping repeats would lose new records.
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let stores = [
        ("events", 1_764_460_800_000),
        ("events", 1_764_460_800_000 + day),
        ("events-staging", 1_764_460_800_000),
    ];
    for config in [
        json!({}),
        json!({"maxBatchSize": 2}),
        json!({"mode": "single"}),
    ] {
        let mut per_store: Vec<Vec<String>> = Vec::new();
        for (destination, epoch) in stores {
            let s = HttpStandIn::start().await;
            let mut config = config.clone();
            config["url"] = json!(s.url());
            let m = manager(config.clone());
            let (batch, _) = stage_in_store(&m, dir.path(), destination, epoch, &records(1..=5));
            let out = m.upload(&batch).await;
            assert_eq!(outcome_counts(&out), (5, 0, 0, 0));
            let mut first: Vec<String> = s.idempotency_keys().into_iter().flatten().collect();
            // The same store re-sending the same jobs repeats its keys.
            m.upload(&batch).await;
            let mut all: Vec<String> = s.idempotency_keys().into_iter().flatten().collect();
            let mut again = all.split_off(first.len());
            first.sort();
            again.sort();
            assert_eq!(first, again, "{config}");
            assert!(
                first
                    .iter()
                    .all(|k| k.starts_with(&format!("{destination}/"))),
                "{first:?}"
            );
            per_store.push(first);
        }
        for (i, a) in per_store.iter().enumerate() {
            for b in &per_store[i + 1..] {
                assert!(
                    a.iter().all(|k| !b.contains(k)),
                    "{config}: stores share keys: {a:?} / {b:?}"
                );
            }
        }
    }
}
