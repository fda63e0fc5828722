//! The cells of the fault matrix (docs/operations.md, "What each destination
//! fault leads to") that `upload.rs` and `poll_stats.rs` do not cover
//! already: a 429 without `Retry-After`, answers cut mid-body, throttled
//! and hanging polls and result pages, and the API key revoked while an
//! import runs. Each ends in a retry, a throttle pause with its hint, or an
//! abort with a reason; no job id is lost, and nothing is read as success.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, AsyncDestinationManager, DestinationError, ErrorCode, ImportHandle,
    Outcome, PollStatus,
};
use batchrouter_testkit::klaviyo::{KlaviyoFault, KlaviyoStandIn, KlaviyoStandInOptions, Route};
use common::*;
use serde_json::json;

/// "retryable" / "throttled" / "permanent", with the pause hint.
fn class(e: &DestinationError) -> (&'static str, Option<Duration>) {
    match e {
        DestinationError::Retryable { .. } => ("retryable", e.retry_after()),
        DestinationError::Throttled { .. } => ("throttled", e.retry_after()),
        DestinationError::Permanent { .. } => ("permanent", None),
    }
}

async fn one_import(
    m: &dyn AsyncDestinationManager,
    n: usize,
    email: impl Fn(usize) -> String,
) -> ImportHandle {
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(dir.path(), m, (0..n).map(|i| profile(i, &email(i))));
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 1, "{:?}", out.outcomes.first());
    handle(0, &out.imports[0])
}

#[tokio::test]
async fn upload_faults_missing_from_the_upload_tests() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxProfilesPerRequest": 2}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..4).map(|i| profile(i, &format!("u{i}@x.io"))),
    );

    // 429 without Retry-After: every job throttled, no hint (the router's
    // backoff applies), nothing more sent.
    standin.push_fault(
        Route::Create,
        KlaviyoFault {
            status: 429,
            ..Default::default()
        },
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(out.imports.is_empty());
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Throttled(e) if e.code == ErrorCode::Throttled)
        ),
        4
    );
    assert_eq!(out.retry_after, None);
    assert_eq!(standin.request_count(Route::Create), 1);

    // 202 and half an answer, then the connection breaks: whether the
    // import exists is unknown, so those jobs are retried; the rest of the
    // batch is not sent and retried with them.
    standin.push_fault(Route::Create, KlaviyoFault::status(202).truncated());
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(out.imports.is_empty());
    let o = outcomes(&out);
    for id in [1, 2] {
        assert!(
            matches!(&o[&id], Outcome::Failed(e) if e.code == ErrorCode::DestinationUnavailable),
            "{:?}",
            o[&id]
        );
    }
    for id in [3, 4] {
        assert!(
            matches!(&o[&id], Outcome::Failed(e) if e.message.starts_with("not sent")),
            "{:?}",
            o[&id]
        );
    }
}

#[tokio::test]
async fn poll_faults_keep_the_import_with_the_hint_honoured() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"requestTimeout": "1s"}));
    let h = one_import(m.as_ref(), 3, |i| format!("p{i}@x.io")).await;
    let cases: Vec<(KlaviyoFault, (&str, Option<Duration>))> = vec![
        (
            KlaviyoFault::throttled(1),
            ("throttled", Some(Duration::from_secs(1))),
        ),
        (
            KlaviyoFault {
                status: 429,
                ..Default::default()
            },
            ("throttled", None),
        ),
        (KlaviyoFault::status(200).truncated(), ("retryable", None)),
        (KlaviyoFault::status(503), ("retryable", None)),
    ];
    for (fault, want) in cases {
        standin.push_fault(Route::Status, fault.clone());
        let e = m.poll(&h).await.expect_err("a poll that did not work");
        assert_eq!(class(&e), want, "{fault:?}: {e}");
        if let Some(pause) = want.1 {
            // The hint pauses every request of the destination; let it pass
            // so the next case reaches the stand-in.
            tokio::time::sleep(pause + Duration::from_millis(100)).await;
        }
    }
    let (status, _) = poll_to_end(m.as_ref(), &h).await;
    assert_eq!(
        status,
        PollStatus::Complete {
            has_failures: false
        }
    );
}

#[tokio::test]
async fn result_page_faults_are_read_again_never_as_success() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("email", "bounce");
    let (m, _) = manager(
        &standin,
        json!({"requestTimeout": "1s", "uploadTimeBudget": "3s"}),
    );
    let h = one_import(m.as_ref(), 30, |i| format!("bounce{i}@x.io")).await;
    poll_to_end(m.as_ref(), &h).await;

    // A hang past the timeout and an answer cut mid-body: errors, retried later.
    standin.push_fault(
        Route::Errors,
        KlaviyoFault::status(200).delayed(Duration::from_secs(3)),
    );
    let started = Instant::now();
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(class(&e), ("retryable", None), "{e}");
    assert!(e.message().contains("timed out"), "{e}");
    standin.push_fault(Route::Errors, KlaviyoFault::status(200).truncated());
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert_eq!(class(&e), ("retryable", None), "{e}");

    // A 429 without Retry-After between pages is waited out (1 s) and the
    // read goes on.
    standin.push_fault(
        Route::Errors,
        KlaviyoFault {
            status: 429,
            ..Default::default()
        },
    );
    let stats = m
        .get_upload_stats(&h)
        .await
        .expect("the pause is waited out");
    assert_eq!(stats.outcomes.len(), 30);
    assert!(stats
        .outcomes
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Aborted(_))));
}

#[tokio::test]
async fn a_key_revoked_mid_import_keeps_the_import_until_it_is_restored() {
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        polls_to_complete: 2,
        ..Default::default()
    })
    .await;
    standin.fail_in_import_where("email", "bounce");
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(m.as_ref(), 4, |i| {
        if i < 2 {
            format!("bounce{i}@x.io")
        } else {
            format!("ok{i}@x.io")
        }
    })
    .await;

    standin.set_key_revoked(true);
    // The poll answers Klaviyo's 401: an Err, so the router keeps the import
    // and polls again until `asyncImportDeadline`; it is never a verdict.
    let e = m.poll(&h).await.unwrap_err();
    assert_eq!(class(&e), ("permanent", None), "{e}");
    assert!(
        e.message().contains("Missing or invalid private key"),
        "{e}"
    );
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert!(e.message().contains("401"), "{e}");

    // A new upload with the revoked key aborts its jobs with the reason.
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..2).map(|i| profile(i, &format!("n{i}@x.io"))),
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Aborted(e) if e.code == ErrorCode::DestinationRejected)
        ),
        2
    );

    // Key restored (or replaced): the same import completes, results intact.
    standin.set_key_revoked(false);
    let (status, _) = poll_to_end(m.as_ref(), &h).await;
    assert_eq!(status, PollStatus::Complete { has_failures: true });
    let stats = m.get_upload_stats(&h).await.unwrap();
    let mut aborted: Vec<i64> = stats
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Aborted(_)))
        .map(|(id, _)| *id)
        .collect();
    aborted.sort();
    assert_eq!(aborted, vec![1, 2]);
}

fn count(out: &batchrouter_core::UploadOutput, pred: impl Fn(&Outcome) -> bool) -> usize {
    out.outcomes.iter().filter(|(_, o)| pred(o)).count()
}
