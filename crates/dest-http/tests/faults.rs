//! The fault matrix of the HTTP destination (docs/operations.md, "What each
//! destination fault leads to"): every fault the stand-in can play ends in
//! a retry (`Failed`), a throttle pause (`Throttled`, hint honoured) or an
//! abort with a reason, and no job id is ever lost or doubled.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, AsyncDestinationManager, ErrorCode, Outcome, StagedBatch, Timestamp,
    UploadOutput,
};
use batchrouter_testkit::http::{Fault, HttpStandIn};
use batchrouter_testkit::manager::{self as kit, BatchSpec};
use serde_json::json;

mod common;
use common::manager;

fn stage(m: &Arc<dyn AsyncDestinationManager>, dir: &std::path::Path, n: i64) -> StagedBatch {
    let spec = BatchSpec::new("h", "HTTP")
        .with_batch_id(format!("1-{n}-faults"))
        .with_created_at(Timestamp(0));
    let jobs = (1..=n).map(|id| (id, json!({"id": format!("r-{id}")}).to_string()));
    let (batch, refused) = kit::stage_for(dir, &spec, m.as_ref(), jobs);
    assert!(refused.is_empty(), "{refused:?}");
    batch
}

/// The class and code of every outcome, checking no job id was lost first.
fn classes(batch: &StagedBatch, out: &UploadOutput) -> Vec<(&'static str, Option<ErrorCode>)> {
    validate_upload_output(&batch.job_ids, out).expect("every job named exactly once");
    let mut sorted = out.outcomes.clone();
    sorted.sort_by_key(|(id, _)| *id);
    sorted
        .into_iter()
        .map(|(_, o)| match o {
            Outcome::Succeeded { .. } => ("succeeded", None),
            Outcome::Failed(e) => ("failed", Some(e.code)),
            Outcome::Aborted(e) => ("aborted", Some(e.code)),
            Outcome::Throttled(e) => ("throttled", Some(e.code)),
        })
        .collect()
}

fn message_of(out: &UploadOutput, id: i64) -> String {
    match &out.outcomes.iter().find(|(j, _)| *j == id).unwrap().1 {
        Outcome::Failed(e) | Outcome::Aborted(e) | Outcome::Throttled(e) => e.message.clone(),
        Outcome::Succeeded { .. } => String::new(),
    }
}

/// An outcome's class and error code.
type Class = (&'static str, Option<ErrorCode>);

const FAILED: (&str, Option<ErrorCode>) = ("failed", Some(ErrorCode::DestinationUnavailable));
const THROTTLED: (&str, Option<ErrorCode>) = ("throttled", Some(ErrorCode::Throttled));
const ABORTED: (&str, Option<ErrorCode>) = ("aborted", Some(ErrorCode::DestinationRejected));
const SUCCEEDED: (&str, Option<ErrorCode>) = ("succeeded", None);

#[tokio::test]
async fn status_faults_end_in_their_class_with_the_hint_honoured() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "maxBatchSize": 2}));
    let batch = stage(&m, dir.path(), 4);
    let html = Fault {
        status: 502,
        body: "<html><body>Bad gateway</body></html>".into(),
        ..Default::default()
    };
    // (fault, class of the failed request's records, hint, message part)
    let cases: Vec<(Fault, Class, Option<u64>, &str)> = vec![
        (Fault::status(500), FAILED, None, "HTTP 500"),
        (html, FAILED, None, "HTTP 502: <html>"),
        (
            Fault::status(503).with_retry_after("9"),
            FAILED,
            Some(9),
            "HTTP 503",
        ),
        (Fault::status(504), FAILED, None, "HTTP 504"),
        (
            Fault::status(429).with_retry_after("5"),
            THROTTLED,
            Some(5),
            "HTTP 429",
        ),
        (Fault::status(429), THROTTLED, None, "HTTP 429"),
        (Fault::status(501), ABORTED, None, "HTTP 501"),
        // Credentials expired or revoked: the endpoint's 401 aborts with its reason.
        (Fault::status(401), ABORTED, None, "HTTP 401"),
    ];
    for (fault, class, hint, needle) in cases {
        s.heal();
        s.push_fault(fault.clone());
        let out = m.upload(&batch).await;
        let got = classes(&batch, &out);
        assert_eq!(got[..2], [class, class], "{fault:?}");
        if class.0 == "aborted" {
            // A permanent answer concerns its own request only.
            assert_eq!(got[2..], [SUCCEEDED, SUCCEEDED], "{fault:?}");
        } else {
            // Nothing more is sent to a failing endpoint: deferred, no attempt spent.
            assert!(got[2..].iter().all(|c| c.0 == "throttled"), "{fault:?}");
            assert!(message_of(&out, 3).starts_with("not sent"), "{fault:?}");
        }
        assert!(message_of(&out, 1).contains(needle), "{fault:?}");
        assert_eq!(out.retry_after, hint.map(Duration::from_secs), "{fault:?}");
    }
}

#[tokio::test]
async fn a_throttle_without_retry_after_in_single_mode_stops_and_leaves_the_pause_to_the_router() {
    let s = HttpStandIn::start().await;
    s.set_default(Some(Fault::status(429)));
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url(), "mode": "single", "maxInFlight": 1}));
    let batch = stage(&m, dir.path(), 6);
    let out = m.upload(&batch).await;
    assert!(classes(&batch, &out).iter().all(|c| c.0 == "throttled"));
    assert_eq!(
        out.retry_after, None,
        "no hint: the router's backoff applies"
    );
    assert_eq!(s.requests(), 1, "stopped after the first 429");
}

#[tokio::test]
async fn a_hang_past_the_timeout_fails_retryably_within_the_timeout_in_both_modes() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    for mode in ["batch", "single"] {
        s.heal();
        s.set_default(Some(Fault::status(200).delayed(Duration::from_secs(10))));
        let m =
            manager(json!({"url": s.url(), "mode": mode, "maxInFlight": 1, "timeout": "300ms"}));
        let batch = stage(&m, dir.path(), 3);
        let started = Instant::now();
        let out = m.upload(&batch).await;
        assert!(started.elapsed() < Duration::from_secs(3), "{mode}");
        let got = classes(&batch, &out);
        assert_eq!(got[0], FAILED, "{mode}");
        assert!(message_of(&out, 1).contains("timed out"), "{mode}");
        if mode == "single" {
            assert!(
                got[1..].iter().all(|c| c.0 == "throttled"),
                "{mode}: {got:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_connection_closed_mid_answer_keeps_the_status_it_carried() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url()}));
    let batch = stage(&m, dir.path(), 3);

    // The status line said 2xx: the endpoint took the records, whatever
    // happened to the rest of its answer (the body of a 2xx is not read).
    s.push_fault(Fault::status(200).truncated());
    let out = m.upload(&batch).await;
    assert_eq!(classes(&batch, &out), vec![SUCCEEDED; 3]);
    assert_eq!(s.accepted().len(), 3);

    // A 5xx cut mid-body is still a 5xx: retried.
    s.push_fault(Fault::status(503).truncated());
    let out = m.upload(&batch).await;
    assert_eq!(classes(&batch, &out), vec![FAILED; 3]);
    assert!(message_of(&out, 1).starts_with("HTTP 503"));

    // Closed before any answer: retried.
    s.push_fault(Fault::dropped());
    let out = m.upload(&batch).await;
    assert_eq!(classes(&batch, &out), vec![FAILED; 3]);
}

#[tokio::test]
async fn a_malformed_answer_body_does_not_change_the_verdict_of_its_status() {
    let s = HttpStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manager(json!({"url": s.url()}));
    let batch = stage(&m, dir.path(), 2);
    s.push_fault(Fault {
        status: 202,
        body: "{\"accepted\": tru".into(),
        ..Default::default()
    });
    assert_eq!(classes(&batch, &m.upload(&batch).await), vec![SUCCEEDED; 2]);
    s.push_fault(Fault {
        status: 400,
        body: "\u{0}\u{1}not json at all".into(),
        ..Default::default()
    });
    let out = m.upload(&batch).await;
    assert_eq!(classes(&batch, &out), vec![ABORTED; 2]);
    assert!(message_of(&out, 1).starts_with("HTTP 400"));
}
