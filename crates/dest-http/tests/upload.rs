//! The HTTP destination against the stand-in over real loopback HTTP:
//! every outcome class, headers, methods and concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, ErrorCode, Job, NoopTelemetry, Outcome,
    StagedBatch, Timestamp, UploadOutput,
};
use batchrouter_testkit::http::{Fault, HttpStandIn};
use serde_json::json;

fn manager(config: serde_json::Value) -> Arc<dyn AsyncDestinationManager> {
    batchrouter_dest_http::build(
        &DestinationContext {
            id: "h".into(),
            destination_type: "HTTP".into(),
            telemetry: Arc::new(NoopTelemetry),
        },
        &config,
    )
    .unwrap()
}

/// Stages `n` records the way the router does and returns the batch.
fn stage(m: &Arc<dyn AsyncDestinationManager>, dir: &std::path::Path, n: usize) -> StagedBatch {
    let mut text = String::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let job = Job {
            id: i as i64 + 1,
            destination_id: "h".into(),
            payload: json!({"id": format!("r-{i}"), "v": i}).to_string(),
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at: Timestamp(0),
        };
        text.push_str(&m.transform(&job).unwrap());
        text.push('\n');
        ids.push(job.id);
    }
    let path = dir.join("batch.staged");
    std::fs::write(&path, &text).unwrap();
    StagedBatch {
        batch_id: "b".into(),
        destination_id: "h".into(),
        destination_type: "HTTP".into(),
        path,
        job_ids: ids,
        bytes: text.len() as u64,
        attempt: 1,
        created_at: Timestamp(0),
    }
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
