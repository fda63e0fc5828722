//! The cells of the fault matrix (docs/operations.md, "What each destination
//! fault leads to") that `manager.rs` does not cover already: a 429 without
//! `Retry-After`, an answer cut mid-body, and faults while fetching the
//! result files (hang, throttling, malformed CSV). Each ends in a retry, a
//! throttle pause with its hint, or an abort with a reason; no job id is
//! lost, and a failed row is never reported `succeeded`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::time::{Duration, Instant};

use batchrouter_core::{validate_upload_output, DestinationError, ErrorCode, Outcome, PollStatus};
use batchrouter_testkit::marketo::{Endpoint, MarketoFault, MarketoStandIn};
use common::*;
use serde_json::json;

/// An error's class and pause hint.
type Class = (&'static str, Option<Duration>);

/// "retryable" / "throttled" / "permanent", with the pause hint.
fn class(e: &DestinationError) -> Class {
    match e {
        DestinationError::Retryable { .. } => ("retryable", e.retry_after()),
        DestinationError::Throttled { .. } => ("throttled", e.retry_after()),
        DestinationError::Permanent { .. } => ("permanent", None),
    }
}

#[tokio::test]
async fn upload_faults_missing_from_the_manager_tests() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..4, |i| format!("u{i}@x.io")),
    );

    // 429 without Retry-After: throttled, no hint (the router's backoff applies).
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::Http {
            status: 429,
            retry_after: None,
            body: String::new(),
        },
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(out.imports.is_empty());
    for (_, o) in &out.outcomes {
        assert!(
            matches!(o, Outcome::Throttled(e) if e.code == ErrorCode::Throttled && e.message.contains("HTTP 429")),
            "{o:?}"
        );
    }
    assert_eq!(out.retry_after, None);

    // 200 and half an answer, then the connection breaks: the import may or
    // may not exist, nothing says which, so the jobs are retried.
    standin.push_fault(Endpoint::CreateImport, MarketoFault::CutMidBody);
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(out.imports.is_empty());
    for (_, o) in &out.outcomes {
        assert!(
            matches!(o, Outcome::Failed(e) if e.code == ErrorCode::DestinationUnavailable),
            "{o:?}"
        );
    }
}

#[tokio::test]
async fn a_poll_throttled_without_retry_after_or_cut_mid_body_keeps_the_import() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..3, |i| format!("p{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    standin.push_fault(
        Endpoint::Status,
        MarketoFault::Http {
            status: 429,
            retry_after: None,
            body: String::new(),
        },
    );
    let e = m.poll(&h).await.unwrap_err();
    assert_eq!(class(&e), ("throttled", None), "{e}");
    // A status answer cut mid-body is a poll that did not work.
    standin.push_fault(Endpoint::Status, MarketoFault::CutMidBody);
    let e = m.poll(&h).await.unwrap_err();
    assert_eq!(class(&e), ("retryable", None), "{e}");
    let outcomes = drive(m.as_ref(), &[h]).await;
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.values().all(|o| *o == Outcome::succeeded()));
}

#[tokio::test]
async fn result_file_faults_are_fetched_again_never_read_as_success() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    let (m, _) = manager(&standin, json!({"requestTimeout": "1s"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..4, |i| {
            if i < 2 {
                format!("bad{i}@x.io")
            } else {
                format!("ok{i}@x.io")
            }
        }),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    while let PollStatus::InProgress { .. } = m.poll(&h).await.unwrap() {}

    let cases: Vec<(MarketoFault, Class, &str)> = vec![
        (
            MarketoFault::Delay(Duration::from_secs(3)),
            ("retryable", None),
            "timed out",
        ),
        (
            MarketoFault::http_retry_after(429, "4"),
            ("throttled", Some(Duration::from_secs(4))),
            "429",
        ),
        (
            MarketoFault::Http {
                status: 429,
                retry_after: None,
                body: String::new(),
            },
            ("throttled", None),
            "429",
        ),
        (
            MarketoFault::api("606", "Max rate limit '100' exceeded with in '20' secs"),
            ("throttled", Some(Duration::from_secs(20))),
            "606",
        ),
        (MarketoFault::http(500), ("retryable", None), "500"),
        (MarketoFault::CutMidBody, ("retryable", None), "Marketo"),
        // Malformed CSV: an unterminated quote swallows the rows after it.
        (
            MarketoFault::Csv(
                "email,firstName,lastName,score,vip,Import Failure Reason\n\"bad0@x.io,F0,L,0,true,1004 Lead not found\nbad1@x.io,F1,L,1,false,1004 Lead not found\n".into(),
            ),
            ("retryable", None),
            "",
        ),
        // A result file without the lookup column: no row can be matched.
        (
            MarketoFault::Csv(
                "firstName,Import Failure Reason\nF0,1004 Lead not found\nF1,1004 Lead not found\n"
                    .into(),
            ),
            ("retryable", None),
            "malformed Marketo result file",
        ),
        // Not CSV at all.
        (
            MarketoFault::Csv("\u{0}\u{1}<html>oops</html>".into()),
            ("retryable", None),
            "",
        ),
    ];
    for (fault, want, needle) in cases {
        standin.push_fault(Endpoint::Failures, fault.clone());
        let started = Instant::now();
        let e = match m.get_upload_stats(&h).await {
            Err(e) => e,
            Ok(stats) => panic!("{fault:?} was read as results: {stats:?}"),
        };
        assert!(started.elapsed() < Duration::from_secs(3), "{fault:?}");
        assert_eq!(class(&e), want, "{fault:?}: {e}");
        assert!(e.message().contains(needle), "{fault:?}: {e}");
    }
    // Once the file is readable, the failed rows reach their jobs.
    let stats = m.get_upload_stats(&h).await.unwrap();
    let mut aborted: Vec<i64> = stats
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Aborted(_)))
        .map(|(id, _)| *id)
        .collect();
    aborted.sort();
    assert_eq!(aborted, vec![0, 1]);
}
