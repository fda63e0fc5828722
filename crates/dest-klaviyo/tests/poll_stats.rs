//! Polls and per-profile results through the Klaviyo stand-in: progress,
//! cancelled imports, paginated import errors, restarts, poll failures,
//! 429 storms and the shared rate limit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, AsyncDestinationManager, DestinationError, ErrorCode, ImportHandle,
    Outcome, PollStatus,
};
use batchrouter_dest_klaviyo::poll::NOT_FOUND_GRACE;
use batchrouter_testkit::klaviyo::{
    max_requests_in_window, KlaviyoFault, KlaviyoStandIn, KlaviyoStandInOptions, Route,
};
use common::*;
use serde_json::{json, Value};

async fn one_import(
    standin: &KlaviyoStandIn,
    m: &dyn AsyncDestinationManager,
    n: usize,
    email: impl Fn(usize) -> String,
) -> ImportHandle {
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(dir.path(), m, (0..n).map(|i| profile(i, &email(i))));
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 1, "{:?}", out.outcomes.first());
    let _ = standin;
    handle(0, &out.imports[0])
}

#[tokio::test]
async fn imports_progress_over_several_polls_then_complete() {
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        polls_to_complete: 4,
        ..Default::default()
    })
    .await;
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 100, |i| format!("p{i}@x.io")).await;
    let mut seen = Vec::new();
    loop {
        match m.poll(&h).await.unwrap() {
            PollStatus::InProgress { processed, total } => {
                assert_eq!(total, Some(100));
                seen.push(processed.unwrap());
            }
            PollStatus::Complete { has_failures } => {
                assert!(!has_failures);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "three polls in progress, the fourth completes"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress grows: {seen:?}"
    );
    assert_eq!(standin.imported_total(), 100);
    let stats = m.get_upload_stats(&h).await.unwrap();
    assert!(stats.outcomes.is_empty());
    assert_eq!(stats.unmatched, 0);
}

#[tokio::test]
async fn cancelled_import_fails_retryable_and_is_never_polled_again() {
    let standin = KlaviyoStandIn::start().await;
    standin.cancel_next_imports(1);
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 20, |i| format!("c{i}@x.io")).await;
    let (status, polls) = poll_to_end(m.as_ref(), &h).await;
    assert_eq!(polls, 3, "ends as soon as Klaviyo says cancelled");
    match status {
        PollStatus::Failed { retryable, error } => {
            assert!(retryable, "the router uploads the jobs again");
            assert_eq!(error.code, ErrorCode::ImportFailed);
            assert!(error.message.contains("cancelled"), "{}", error.message);
        }
        other => panic!("{other:?}"),
    }
    // The verdict is stable: a poll after the end answers the same at once.
    let before = standin.request_count(Route::Status);
    assert!(matches!(
        m.poll(&h).await.unwrap(),
        PollStatus::Failed {
            retryable: true,
            ..
        }
    ));
    assert_eq!(standin.request_count(Route::Status), before + 1);
    assert_eq!(
        standin.imported_total(),
        0,
        "a cancelled import applies nothing"
    );
    assert_eq!(standin.imports()[0].status, "cancelled");
}

#[tokio::test]
async fn every_page_of_import_errors_is_mapped_to_its_job() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("email", "Bounce");
    let (m, _) = manager(&standin, json!({}));
    let email = |i: usize| {
        if i % 2 == 1 {
            format!("Bounce{i}@X.io")
        } else {
            format!("fine{i}@x.io")
        }
    };
    let h = one_import(&standin, m.as_ref(), 500, email).await;
    let (status, _) = poll_to_end(m.as_ref(), &h).await;
    assert_eq!(status, PollStatus::Complete { has_failures: true });

    let stats = m.get_upload_stats(&h).await.unwrap();
    let expected: HashSet<i64> = (0..500)
        .filter(|i| i % 2 == 1)
        .map(|i| i as i64 + 1)
        .collect();
    assert_eq!(expected.len(), 250, "more than two pages of 100");
    let got: HashSet<i64> = stats.outcomes.iter().map(|(j, _)| *j).collect();
    assert_eq!(got, expected);
    for (job, o) in &stats.outcomes {
        let Outcome::Aborted(e) = o else {
            panic!("{o:?}")
        };
        assert_eq!(e.code, ErrorCode::RecordRejected);
        let i = *job as usize - 1;
        assert!(
            e.message
                .contains(&format!("Invalid email: 'Bounce{i}@X.io'")),
            "{}",
            e.message
        );
    }
    assert_eq!(stats.unmatched, 0);
    // Pages of 100 (the documented maximum), not the default 20: 3 requests, not 13.
    let pages: Vec<String> = standin
        .requests()
        .into_iter()
        .filter(|r| r.route == Route::Errors)
        .map(|r| r.path)
        .collect();
    assert_eq!(pages.len(), 3, "pages of 100, 100 and 50: {pages:?}");
    assert!(
        pages[0].ends_with("/import-errors?page[size]=100"),
        "{pages:?}"
    );
    assert!(
        pages[1..].iter().all(|p| p.contains("page%5Bsize%5D=100")),
        "the next links keep the size: {pages:?}"
    );
    assert_eq!(standin.imported_total(), 500 - 250);
}

#[tokio::test]
async fn a_restarted_daemon_maps_results_from_the_persisted_context_alone() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("external_id", "ext-bad");
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Value> = (0..60)
        .map(|i| match i % 4 {
            0 => json!({"email": format!("E{i}@x.io")}),
            1 => json!({"phone_number": format!("+1 555 01{i:02}")}),
            2 => json!({"external_id": if i % 8 == 2 { format!("ext-bad-{i}") } else { format!("ext-{i}") }}),
            _ => json!({"email": format!("bad{i}@x.io"), "external_id": format!("ext-bad-{i}")}),
        })
        .collect();
    let persisted: Vec<(String, Vec<i64>)> = {
        let (first, _) = manager(&standin, json!({"maxProfilesPerRequest": 25}));
        let (batch, _) = stage(dir.path(), first.as_ref(), payloads);
        let out = first.upload(&batch).await;
        validate_upload_output(&batch.job_ids, &out).unwrap();
        assert_eq!(out.imports.len(), 3);
        out.imports
            .iter()
            .map(|i| (i.context.to_string(), i.job_ids.clone()))
            .collect()
        // The first manager is dropped here, as in a crash.
    };

    let (second, _) = manager(&standin, json!({}));
    let mut rejected = Vec::new();
    for (n, (context, jobs)) in persisted.iter().enumerate() {
        let mut h = ImportHandle {
            id: n as i64 + 100,
            destination_id: "klaviyo-test".into(),
            batch_id: "before-restart".into(),
            context: serde_json::from_str(context).unwrap(),
            job_ids: jobs.clone(),
            started_at: batchrouter_core::Timestamp::now(),
        };
        if n == 2 {
            // One job of this import was already decided elsewhere: its error
            // must not be reported, only counted as unmatched.
            h.job_ids.retain(|j| *j != 60);
        }
        let (status, _) = poll_to_end(second.as_ref(), &h).await;
        assert!(
            matches!(status, PollStatus::Complete { has_failures: true }),
            "{status:?}"
        );
        let stats = second.get_upload_stats(&h).await.unwrap();
        assert_eq!(stats.unmatched, u64::from(n == 2));
        rejected.extend(stats.outcomes.into_iter().map(|(j, o)| {
            assert!(
                matches!(o, Outcome::Aborted(ref e) if e.message.contains("ext-bad")),
                "{o:?}"
            );
            j
        }));
    }
    rejected.sort();
    let expected: Vec<i64> = (0..60)
        .filter(|i| i % 8 == 2 || i % 4 == 3)
        .map(|i| i as i64 + 1)
        .filter(|j| *j != 60)
        .collect();
    assert_eq!(rejected, expected);
}

#[tokio::test]
async fn poll_problems_are_errors_not_failed_imports() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"requestTimeout": "1s"}));
    let h = one_import(&standin, m.as_ref(), 5, |i| format!("q{i}@x.io")).await;

    standin.push_fault(Route::Status, KlaviyoFault::status(500));
    assert!(matches!(
        m.poll(&h).await,
        Err(DestinationError::Retryable { .. })
    ));
    standin.push_fault(Route::Status, KlaviyoFault::dropped());
    assert!(matches!(
        m.poll(&h).await,
        Err(DestinationError::Retryable { .. })
    ));
    standin.push_fault(
        Route::Status,
        KlaviyoFault::status(200).delayed(Duration::from_secs(3)),
    );
    let e = m.poll(&h).await.unwrap_err();
    assert!(e.message().contains("timed out"), "{e}");
    standin.push_fault(
        Route::Status,
        KlaviyoFault::raw(200, "<html>maintenance</html>"),
    );
    let e = m.poll(&h).await.unwrap_err();
    assert!(
        matches!(e, DestinationError::Retryable { .. }) && e.message().contains("malformed answer"),
        "{e}"
    );
    standin.push_fault(
        Route::Status,
        KlaviyoFault::raw(
            200,
            r#"{"data":{"id":"x","attributes":{"status":"validating"}}}"#,
        ),
    );
    assert!(
        matches!(m.poll(&h).await, Err(DestinationError::Retryable { .. })),
        "unknown live status: poll again"
    );
    standin.push_fault(Route::Status, KlaviyoFault::status(403));
    assert!(
        matches!(m.poll(&h).await, Err(DestinationError::Permanent { .. })),
        "still an Err: the router keeps the import"
    );
    assert_eq!(
        standin.imports()[0].polls,
        0,
        "no scripted failure reached the import"
    );
    // The import itself is untouched and completes normally.
    let (status, _) = poll_to_end(m.as_ref(), &h).await;
    assert_eq!(
        status,
        PollStatus::Complete {
            has_failures: false
        }
    );

    // A 404 for a young import is a poll error (the import is kept: no
    // re-upload on the strength of one lookup); past the grace period the
    // import is gone and ends (retryable), as does a context nobody can read.
    let mut gone = h.clone();
    gone.context["klaviyoJobId"] = json!("IMP99999999");
    let e = m.poll(&gone).await.unwrap_err();
    assert!(
        matches!(e, DestinationError::Retryable { .. }) && e.message().contains("HTTP 404"),
        "{e:?}"
    );
    let e = m.get_upload_stats(&gone).await.unwrap_err();
    assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
    gone.started_at = batchrouter_core::Timestamp(
        batchrouter_core::Timestamp::now().as_millis() - NOT_FOUND_GRACE.as_millis() as i64 - 1_000,
    );
    assert!(matches!(
        m.poll(&gone).await.unwrap(),
        PollStatus::Failed {
            retryable: true,
            ..
        }
    ));
    let stats = m.get_upload_stats(&gone).await.unwrap();
    assert_eq!(stats.outcomes.len(), 5);
    let mut broken = h.clone();
    broken.context = json!({"something": "else"});
    assert!(matches!(
        m.poll(&broken).await.unwrap(),
        PollStatus::Failed {
            retryable: true,
            ..
        }
    ));
    let stats = m.get_upload_stats(&broken).await.unwrap();
    assert_eq!(stats.outcomes.len(), 5);
    assert!(stats
        .outcomes
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Failed(e) if e.code == ErrorCode::ImportFailed)));
}

#[tokio::test]
async fn stats_problems_are_errors_and_foreign_links_are_refused() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("email", "bounce");
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 150, |i| format!("bounce{i}@x.io")).await;
    poll_to_end(m.as_ref(), &h).await;

    // Page 2 fails: the whole read is retried later, never half-reported.
    standin.push_fault(Route::Errors, KlaviyoFault::pass());
    standin.push_fault(Route::Errors, KlaviyoFault::status(502));
    assert!(matches!(
        m.get_upload_stats(&h).await,
        Err(DestinationError::Retryable { .. })
    ));
    standin.push_fault(Route::Errors, KlaviyoFault::raw(200, "{\"data\": 5}"));
    assert!(matches!(
        m.get_upload_stats(&h).await,
        Err(DestinationError::Retryable { .. })
    ));

    standin.set_links_origin(Some("http://evil.example:9"));
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert!(e.message().contains("another host"), "{e}");
    standin.set_links_origin(None);

    // Fewer errors listed than failed profiles: the unlisted ones must not
    // end `succeeded`, so the read is an error (tried again later).
    standin.push_fault(
        Route::Errors,
        KlaviyoFault::raw(200, r#"{"data":[],"links":{"next":null}}"#),
    );
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert!(
        matches!(e, DestinationError::Retryable { .. })
            && e.message().contains("reports 150 failed profiles")
            && e.message().contains("lists 0 import errors"),
        "{e:?}"
    );

    let stats = m.get_upload_stats(&h).await.unwrap();
    assert_eq!(stats.outcomes.len(), 150);
}

#[tokio::test]
async fn a_429_between_pages_is_waited_out_and_reading_goes_on_from_that_page() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("email", "bounce");
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 250, |i| format!("bounce{i}@x.io")).await;
    poll_to_end(m.as_ref(), &h).await;

    // Page 2 is throttled twice (Retry-After: 1); pages 1 and 3 are not.
    standin.push_fault(Route::Errors, KlaviyoFault::pass());
    standin.push_faults(Route::Errors, KlaviyoFault::throttled(1), 2);
    let started = Instant::now();
    let stats = m
        .get_upload_stats(&h)
        .await
        .expect("the pause is waited out");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.outcomes.len(), 250);
    let pages: Vec<(String, u16)> = standin
        .requests()
        .into_iter()
        .filter(|r| r.route == Route::Errors)
        .map(|r| (r.path, r.status))
        .collect();
    let statuses: Vec<u16> = pages.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, vec![200, 429, 429, 200, 200], "{pages:?}");
    // Page 1 was read once: the read went on from page 2's cursor.
    assert_eq!(
        pages.iter().filter(|(p, _)| !p.contains("cursor")).count(),
        1,
        "{pages:?}"
    );
    assert_eq!(pages[1].0, pages[3].0, "the throttled page is asked again");

    // A pause longer than the time budget allows is handed to the router.
    let (tight, _) = manager(&standin, json!({"uploadTimeBudget": "2s"}));
    standin.push_fault(Route::Errors, KlaviyoFault::pass());
    standin.push_fault(Route::Errors, KlaviyoFault::throttled(30));
    let started = Instant::now();
    match tight.get_upload_stats(&h).await {
        Err(DestinationError::Throttled { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(30)))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn errors_without_original_payload_are_matched_by_their_pointer() {
    let standin = KlaviyoStandIn::start().await;
    standin.fail_in_import_where("email", "bounce");
    standin.omit_original_payload(true);
    let (m, _) = manager(&standin, json!({}));
    let email = |i: usize| {
        if i % 7 == 3 {
            format!("bounce{i}@x.io")
        } else {
            format!("ok{i}@x.io")
        }
    };
    let h = one_import(&standin, m.as_ref(), 40, email).await;
    poll_to_end(m.as_ref(), &h).await;
    let stats = m.get_upload_stats(&h).await.unwrap();
    let mut rejected: Vec<i64> = stats.outcomes.iter().map(|(j, _)| *j).collect();
    rejected.sort();
    let expected: Vec<i64> = (0..40).filter(|i| i % 7 == 3).map(|i| i + 1).collect();
    assert_eq!(rejected, expected);
    assert_eq!(stats.unmatched, 0);
    for (job, o) in &stats.outcomes {
        assert!(
            matches!(o, Outcome::Aborted(e) if e.message.contains(&format!("bounce{}@x.io", job - 1))),
            "{o:?}"
        );
    }
}

#[tokio::test]
async fn an_oversized_answer_is_an_explicit_error_not_malformed_json() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 3, |i| format!("big{i}@x.io")).await;
    let huge = format!(
        r#"{{"data":{{"id":"x","attributes":{{"status":"queued"}}}},"pad":"{}"}}"#,
        "x".repeat(batchrouter_dest_klaviyo::client::MAX_ANSWER_BYTES)
    );
    standin.push_fault(Route::Status, KlaviyoFault::raw(200, huge));
    let e = m.poll(&h).await.unwrap_err();
    assert!(
        matches!(e, DestinationError::Retryable { .. })
            && e.message().contains("too large")
            && !e.message().contains("malformed"),
        "{e:?}"
    );
    // The import itself is untouched.
    assert!(m.poll(&h).await.is_ok());
}

#[tokio::test]
async fn a_429_storm_is_honoured_and_pauses_every_caller() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let h = one_import(&standin, m.as_ref(), 5, |i| format!("r{i}@x.io")).await;
    standin.push_faults(Route::Status, KlaviyoFault::throttled(1), 3);

    let started = Instant::now();
    let mut throttles = 0;
    let mut refused_locally = 0;
    let status = loop {
        match m.poll(&h).await {
            Ok(s) => break s,
            Err(DestinationError::Throttled { retry_after, .. }) => {
                throttles += 1;
                let wait = retry_after.expect("Retry-After is passed on");
                assert!(wait <= Duration::from_secs(1), "{wait:?}");
                // Another caller during the pause is answered without a request.
                let before = standin.request_count(Route::Any);
                if matches!(
                    m.get_upload_stats(&h).await,
                    Err(DestinationError::Throttled { .. })
                ) {
                    refused_locally += 1;
                }
                assert_eq!(standin.request_count(Route::Any), before);
                // The router waits for the hint (plus scheduling slack) before polling again.
                tokio::time::sleep(wait).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    assert!(matches!(status, PollStatus::InProgress { .. }));
    assert_eq!(throttles, 3);
    assert_eq!(refused_locally, 3);
    assert!(started.elapsed() >= Duration::from_secs(3));
    let polls: Vec<Instant> = standin
        .requests()
        .iter()
        .filter(|r| r.route == Route::Status)
        .map(|r| r.at)
        .collect();
    assert_eq!(polls.len(), 4);
    for w in polls.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(990),
            "retry came early: {:?}",
            w[1] - w[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_limiter_never_exceeds_the_configured_rate() {
    // The stand-in enforces 4/s itself (429 otherwise) and records arrivals.
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        rate_limit: Some((4, 1_000)),
        polls_to_complete: 1_000,
        ..Default::default()
    })
    .await;
    let (m, _) = manager(
        &standin,
        json!({"rateLimitPerSecond": 4, "rateLimitPerMinute": 1000}),
    );
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..4).map(|i| profile(i, &format!("z{i}@x.io"))),
    );
    let first = m.upload(&batch).await;
    let h = handle(0, &first.imports[0]);
    let m: Arc<dyn AsyncDestinationManager> = m;
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Uploads and polls draw from the same budget.
    for k in 0..12 {
        let (m, batch, h) = (m.clone(), batch.clone(), h.clone());
        tasks.push(tokio::spawn(async move {
            if k % 2 == 0 {
                let out = m.upload(&batch).await;
                assert_eq!(out.imports.len(), 1, "{:?}", out.outcomes.first());
            } else {
                let status = m.poll(&h).await.expect("never throttled");
                assert!(
                    matches!(status, PollStatus::InProgress { .. }),
                    "{status:?}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let records = standin.requests();
    assert_eq!(records.len(), 13);
    assert_eq!(
        standin.rate_limited(),
        0,
        "the stand-in never had to throttle"
    );
    assert!(max_requests_in_window(&records, Duration::from_secs(1)) <= 4);
    // 13 requests at 4/s: the last one starts in the fourth second.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let span = records.last().unwrap().at - records.first().unwrap().at;
    assert!(span >= Duration::from_secs(3), "{span:?}");
}
