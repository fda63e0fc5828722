//! Upload through the Klaviyo stand-in over loopback HTTP: splitting,
//! per-profile rejection, list association, throttling and failures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, AsyncDestinationManager, ErrorCode, JobError, Outcome, UploadOutput,
};
use batchrouter_dest_klaviyo::context::ImportContext;
use batchrouter_testkit::klaviyo::{KlaviyoFault, KlaviyoStandIn, KlaviyoStandInOptions, Route};
use common::*;
use serde_json::json;

fn error_of(o: &Outcome) -> &JobError {
    match o {
        Outcome::Failed(e) | Outcome::Aborted(e) | Outcome::Throttled(e) => e,
        Outcome::Succeeded { .. } => panic!("expected an error outcome, got success"),
    }
}

fn count(out: &UploadOutput, pred: impl Fn(&Outcome) -> bool) -> usize {
    out.outcomes.iter().filter(|(_, o)| pred(o)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_profiles_become_several_imports_each_imported_once() {
    // The stand-in enforces the vendor's own rate limits (429 beyond them);
    // the manager's limiter, set one request under them (requests sent a
    // window apart can arrive inside one when the machine is busy), must
    // keep the run legal.
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        rate_limit: Some((10, 150)),
        ..Default::default()
    })
    .await;
    let (m, telemetry) = manager(
        &standin,
        json!({"rateLimitPerSecond": 9, "rateLimitPerMinute": 149}),
    );
    let dir = tempfile::tempdir().unwrap();
    let (batch, rejected) = stage(
        dir.path(),
        m.as_ref(),
        (0..40_000).map(|i| profile(i, &format!("User{i}@Example.com"))),
    );
    assert!(rejected.is_empty());

    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(
        out.outcomes.is_empty(),
        "{:?}",
        &out.outcomes[..out.outcomes.len().min(3)]
    );
    assert_eq!(out.imports.len(), 4, "10,000 profiles per request");
    assert_eq!(importing(&out), 40_000);
    let creates = standin.creates();
    assert_eq!(creates.len(), 4);
    for (c, imp) in creates.iter().zip(&out.imports) {
        assert!(c.body_bytes as u64 <= 4_500_000, "{} bytes", c.body_bytes);
        assert_eq!(c.profiles, imp.job_ids.len());
        assert_eq!(c.list_ids, None, "no list configured");
        let ctx = ImportContext::from_value(&imp.context).unwrap();
        assert_eq!(ctx.klaviyo_job_id, c.import_id);
        assert_eq!(ctx.profiles.len(), imp.job_ids.len());
        assert_eq!(
            ctx.profiles.iter().map(|p| p.job).collect::<Vec<_>>(),
            imp.job_ids
        );
    }
    let headers = standin.last_headers();
    let h = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        h("authorization").as_deref(),
        Some(format!("Klaviyo-API-Key {}", standin.api_key()).as_str())
    );
    assert_eq!(h("revision").as_deref(), Some("2025-01-15"));
    assert_eq!(h("accept").as_deref(), Some("application/vnd.api+json"));
    assert_eq!(
        h("content-type").as_deref(),
        Some("application/vnd.api+json")
    );

    let results = drive(m.as_ref(), &handles(&out)).await;
    assert_eq!(results.len(), 40_000);
    assert!(results.values().all(|o| *o == Outcome::succeeded()));
    let imported = standin.imported();
    assert_eq!(imported.len(), 40_000);
    assert!(
        imported.values().all(|&n| n == 1),
        "every profile imported exactly once"
    );
    assert_eq!(standin.imported_count("User39999@Example.com"), 1);
    assert_eq!(
        standin.rate_limited(),
        0,
        "the stand-in never had to throttle"
    );
    assert!(standin.requests().iter().all(|r| r.status != 429));
    let statuses = telemetry.statuses();
    assert_eq!(
        statuses.len(),
        standin.request_count(Route::Any),
        "one telemetry count per request"
    );
    assert_eq!(statuses.iter().filter(|s| *s == "202").count(), 4);
}

#[tokio::test]
async fn requests_stay_under_the_byte_cap_measured_on_the_encoded_body() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxRequestBytes": "20KB"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..300).map(|i| profile(i, &format!("u{i}@x.io"))),
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(importing(&out), 300);
    let creates = standin.creates();
    assert!(creates.len() >= 3, "{} requests", creates.len());
    assert!(
        creates.iter().all(|c| c.body_bytes <= 20_000),
        "{creates:?}"
    );
    // Packed tight: every request but the last is within one profile of the cap.
    let biggest_line = std::fs::read_to_string(&batch.path)
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    for c in &creates[..creates.len() - 1] {
        assert!(c.body_bytes + biggest_line + 1 > 20_000, "{c:?} left room");
    }
}

#[tokio::test]
async fn invalid_profiles_are_aborted_with_detail_and_the_rest_imported() {
    let standin = KlaviyoStandIn::start().await;
    standin.reject_profiles_where("email", "invalid");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let emails: Vec<String> = (0..50)
        .map(|i| {
            if i % 17 == 5 {
                format!("invalid{i}@x.io")
            } else {
                format!("ok{i}@x.io")
            }
        })
        .collect();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        emails.iter().enumerate().map(|(i, e)| profile(i, e)),
    );

    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    let bad: Vec<i64> = vec![6, 23, 40]; // job ids of indices 5, 22, 39
    assert_eq!(out.outcomes.len(), 3, "{:?}", out.outcomes);
    for (job, o) in &out.outcomes {
        assert!(bad.contains(job), "job {job}");
        let Outcome::Aborted(e) = o else {
            panic!("{o:?}")
        };
        assert_eq!(e.code, ErrorCode::DestinationRejected);
        let email = &emails[*job as usize - 1];
        assert!(
            e.message.contains(&format!("Invalid email: '{email}'")),
            "{}",
            e.message
        );
    }
    assert_eq!(out.imports.len(), 1);
    assert_eq!(importing(&out), 47);
    assert_eq!(
        standin.request_count(Route::Create),
        2,
        "one rejected request, one resubmission"
    );

    drive(m.as_ref(), &handles(&out)).await;
    assert_eq!(standin.imported_total(), 47);
    assert_eq!(standin.imported_count("ok0@x.io"), 1);
    assert_eq!(standin.imported_count("invalid5@x.io"), 0);
}

#[tokio::test]
async fn a_second_rejection_aborts_the_named_profiles_and_fails_the_rest() {
    let standin = KlaviyoStandIn::start().await;
    let pointer_error = |i: usize, what: &str| {
        json!({"errors": [{"id": "e", "status": 400, "code": "invalid", "title": "Invalid input.",
            "detail": what, "source": {"pointer": format!("/data/attributes/profiles/data/{i}/attributes/email")}}]})
        .to_string()
    };
    standin.push_fault(
        Route::Create,
        KlaviyoFault::raw(400, pointer_error(1, "first bad")),
    );
    standin.push_fault(
        Route::Create,
        KlaviyoFault::raw(400, pointer_error(0, "second bad")),
    );
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..5).map(|i| profile(i, &format!("u{i}@x.io"))),
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    let o = outcomes(&out);
    assert!(
        matches!(&o[&2], Outcome::Aborted(e) if e.message.contains("first bad")),
        "{:?}",
        o[&2]
    );
    assert!(
        matches!(&o[&1], Outcome::Aborted(e) if e.message.contains("second bad")),
        "{:?}",
        o[&1]
    );
    for j in [3, 4, 5] {
        let Outcome::Failed(e) = &o[&j] else {
            panic!("{:?}", o[&j])
        };
        assert!(
            e.message.contains("rejected the request again"),
            "{}",
            e.message
        );
    }
    assert!(out.imports.is_empty());
    assert_eq!(
        standin.request_count(Route::Create),
        2,
        "resubmitted once, not more"
    );
}

#[tokio::test]
async fn list_association_is_sent_only_when_configured() {
    let standin = KlaviyoStandIn::start().await;
    standin.set_known_lists(&["LiSt42"]);
    let dir = tempfile::tempdir().unwrap();

    let (with_list, _) = manager(&standin, json!({"listId": "LiSt42"}));
    let (batch, _) = stage(
        dir.path(),
        with_list.as_ref(),
        (0..3).map(|i| profile(i, &format!("l{i}@x.io"))),
    );
    let out = with_list.upload(&batch).await;
    assert_eq!(importing(&out), 3);

    let (without, _) = manager(&standin, json!({}));
    let (batch, _) = stage(
        dir.path(),
        without.as_ref(),
        (0..3).map(|i| profile(i, &format!("n{i}@x.io"))),
    );
    let out = without.upload(&batch).await;
    assert_eq!(importing(&out), 3);

    let creates = standin.creates();
    assert_eq!(creates[0].list_ids, Some(vec!["LiSt42".to_string()]));
    assert_eq!(creates[1].list_ids, None);

    // An unknown list is an unattributable 400: it holds for every request
    // of the batch, so the first request's jobs are aborted with the detail
    // and the rest are aborted unsent with the same reason.
    let (bad_list, _) = manager(
        &standin,
        json!({"listId": "Nope", "maxProfilesPerRequest": 2}),
    );
    let (batch, _) = stage(
        dir.path(),
        bad_list.as_ref(),
        (0..6).map(|i| profile(i, &format!("b{i}@x.io"))),
    );
    let creates_before = standin.request_count(Route::Create);
    let out = bad_list.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Aborted(e) if e.code == ErrorCode::DestinationRejected && e.message.contains("List 'Nope' does not exist"))
        ),
        6
    );
    let o = outcomes(&out);
    for j in 3..=6 {
        assert!(
            error_of(&o[&j])
                .message
                .starts_with("not sent: Klaviyo refused an earlier request"),
            "{:?}",
            o[&j]
        );
    }
    assert_eq!(
        standin.request_count(Route::Create),
        creates_before + 1,
        "the rest of the batch is not sent"
    );
    assert_eq!(standin.creates().len(), 2);
}

#[tokio::test]
async fn profiles_over_the_vendors_size_limit_are_refused_by_the_stand_in() {
    let standin = KlaviyoStandIn::start().await;
    // A manager allowed to send 200 KB profiles meets Klaviyo's ~100 KB limit.
    let (m, _) = manager(&standin, json!({"maxProfileBytes": "200KB"}));
    let dir = tempfile::tempdir().unwrap();
    let payloads = (0..5).map(|i| {
        let mut p = profile(i, &format!("size{i}@x.io"));
        if i == 2 {
            p["bio"] = json!("x".repeat(150_000));
        }
        p
    });
    let (batch, rejected) = stage(dir.path(), m.as_ref(), payloads);
    assert!(rejected.is_empty());
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.outcomes.len(), 1, "{:?}", out.outcomes);
    let (id, o) = &out.outcomes[0];
    assert_eq!(*id, 3);
    assert!(
        matches!(o, Outcome::Aborted(e) if e.message.contains("a profile may be at most 100000 bytes")),
        "{o:?}"
    );
    assert_eq!(importing(&out), 4);
    assert_eq!(
        standin.request_count(Route::Create),
        2,
        "rejected, then resubmitted"
    );

    // With the default limit the transform refuses it before any request.
    let (default, _) = manager(&standin, json!({}));
    let big = json!({"email": "big@x.io", "bio": "x".repeat(150_000)});
    let e = default.transform(&job(9, &big)).unwrap_err();
    assert!(
        e.0.contains("over the per-profile limit of 100000 bytes"),
        "{e}"
    );
}

#[tokio::test]
async fn an_upload_stops_at_its_time_budget_and_keeps_the_imports_it_created() {
    let standin = KlaviyoStandIn::start().await;
    // One request a second and a 2 s budget: requests start at 0 s and about
    // 1 s; the third slot (about 2 s) is past the budget.
    let (m, _) = manager(
        &standin,
        json!({"rateLimitPerSecond": 1, "rateLimitPerMinute": 60,
               "uploadTimeBudget": "2s", "maxProfilesPerRequest": 10}),
    );
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..50).map(|i| profile(i, &format!("slow{i}@x.io"))),
    );
    let started = Instant::now();
    let out = m.upload(&batch).await;
    let elapsed = started.elapsed();
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(elapsed < secs(2), "returned within the budget: {elapsed:?}");
    assert_eq!(out.imports.len(), 2, "the imports created are kept");
    assert_eq!(importing(&out), 20);
    assert_eq!(standin.request_count(Route::Create), 2);
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Throttled(e) if e.code == ErrorCode::Throttled && e.message.contains("uploadTimeBudget"))
        ),
        30,
        "the rest is throttled unsent (no attempt used)"
    );
    let hint = out.retry_after.expect("the wait for the next slot");
    assert!(hint > Duration::ZERO && hint <= secs(2), "{hint:?}");
    // The router sizes batches so this does not happen at the configured rate.
    let limits = m.limits();
    assert_eq!(
        limits.max_events,
        Some(10),
        "1 request planned in 2 s at 1/s (half of 2)"
    );
}

#[tokio::test]
async fn throttled_upload_names_retry_after_and_pauses_the_destination() {
    let standin = KlaviyoStandIn::start().await;
    standin.push_fault(Route::Create, KlaviyoFault::throttled(2));
    let (m, telemetry) = manager(&standin, json!({"maxProfilesPerRequest": 10}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..30).map(|i| profile(i, &format!("t{i}@x.io"))),
    );

    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.retry_after, Some(secs(2)));
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Throttled(e) if e.code == ErrorCode::Throttled)
        ),
        30
    );
    assert_eq!(
        standin.request_count(Route::Create),
        1,
        "the rest of the batch is not sent"
    );
    assert_eq!(telemetry.statuses(), vec!["429"]);

    // Within the pause nothing reaches Klaviyo, and the hint shrinks.
    let again = m.upload(&batch).await;
    assert_eq!(count(&again, |o| matches!(o, Outcome::Throttled(_))), 30);
    let left = again.retry_after.expect("hint");
    assert!(left > Duration::ZERO && left <= secs(2), "{left:?}");
    assert_eq!(standin.request_count(Route::Create), 1);

    tokio::time::sleep(left).await;
    let done = m.upload(&batch).await;
    assert!(done.outcomes.is_empty(), "{:?}", done.outcomes);
    assert_eq!(importing(&done), 30);
    assert_eq!(done.imports.len(), 3);
}

#[tokio::test]
async fn server_errors_fail_the_batch_and_stop_sending() {
    let standin = KlaviyoStandIn::start().await;
    let (m, telemetry) = manager(&standin, json!({"maxProfilesPerRequest": 10}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..30).map(|i| profile(i, &format!("s{i}@x.io"))),
    );

    // The second request fails: the first import stands, the third is not sent.
    standin.push_fault(Route::Create, KlaviyoFault::pass());
    standin.push_fault(Route::Create, KlaviyoFault::status(503));
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 1);
    assert_eq!(out.imports[0].job_ids, (1..=10).collect::<Vec<i64>>());
    let o = outcomes(&out);
    assert_eq!(o.len(), 20);
    for (j, outcome) in &o {
        let Outcome::Failed(e) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(e.code, ErrorCode::DestinationUnavailable);
        if *j > 20 {
            assert!(
                e.message
                    .starts_with("not sent: an earlier request of this batch failed"),
                "{}",
                e.message
            );
        } else {
            assert!(e.message.contains("HTTP 503"), "{}", e.message);
        }
    }
    assert_eq!(standin.request_count(Route::Create), 2);
    assert_eq!(telemetry.statuses(), vec!["202", "503"]);
}

#[tokio::test]
async fn dropped_connections_timeouts_and_malformed_answers_are_retryable() {
    let standin = KlaviyoStandIn::start().await;
    let (m, telemetry) = manager(&standin, json!({"requestTimeout": "1s"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..4).map(|i| profile(i, &format!("d{i}@x.io"))),
    );

    standin.push_fault(Route::Create, KlaviyoFault::dropped());
    let out = m.upload(&batch).await;
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Failed(e) if e.code == ErrorCode::DestinationUnavailable)
        ),
        4
    );
    assert_eq!(telemetry.statuses(), vec!["error"]);

    standin.push_fault(Route::Create, KlaviyoFault::status(202).delayed(secs(3)));
    let started = Instant::now();
    let out = m.upload(&batch).await;
    assert!(
        started.elapsed() < secs(3),
        "requestTimeout bounds the request"
    );
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Failed(e) if e.message.contains("timed out"))
        ),
        4
    );
    assert_eq!(
        telemetry.statuses().last().map(String::as_str),
        Some("timeout")
    );

    standin.push_fault(Route::Create, KlaviyoFault::raw(202, "{\"data\": {}}"));
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Failed(e) if e.message.contains("had no job id"))
        ),
        4
    );
}

#[tokio::test]
async fn bad_key_and_old_revision_are_refused_with_the_real_error_shapes() {
    let standin = KlaviyoStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (m, telemetry) = manager(
        &standin,
        json!({"privateApiKey": "pk_wrong", "maxProfilesPerRequest": 2}),
    );
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..6).map(|i| profile(i, &format!("k{i}@x.io"))),
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Aborted(e) if e.message.contains("Missing or invalid private key"))
        ),
        6
    );
    assert_eq!(
        standin.request_count(Route::Create),
        1,
        "a 401 stops the batch"
    );
    assert_eq!(telemetry.statuses(), vec!["401"]);
    for (_, o) in &out.outcomes {
        assert!(!error_of(o).message.contains("pk_wrong"));
    }

    let (old, _) = manager(&standin, json!({"revision": "2019-01-01"}));
    let out = old.upload(&batch).await;
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Aborted(e) if e.message.contains("is not a valid revision"))
        ),
        6
    );
}

#[tokio::test]
async fn a_413_splits_the_request_until_it_fits() {
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        max_body_bytes: 12_000,
        ..Default::default()
    })
    .await;
    let (m, _) = manager(&standin, json!({"maxRequestBytes": "1MB"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..200).map(|i| profile(i, &format!("big{i}@x.io"))),
    );
    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(
        out.outcomes.is_empty(),
        "{:?}",
        &out.outcomes[..out.outcomes.len().min(2)]
    );
    assert_eq!(importing(&out), 200);
    assert!(standin.creates().iter().all(|c| c.body_bytes <= 12_000));
    assert!(standin.requests().iter().any(|r| r.status == 413));
    let mut jobs: Vec<i64> = out.imports.iter().flat_map(|i| i.job_ids.clone()).collect();
    jobs.sort();
    assert_eq!(
        jobs, batch.job_ids,
        "no job lost or repeated across the halves"
    );
}

#[tokio::test]
async fn short_staged_files_and_foreign_lines_fail_only_their_jobs() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (mut batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..3).map(|i| profile(i, &format!("f{i}@x.io"))),
    );
    let mut text = std::fs::read_to_string(&batch.path).unwrap();
    text.push_str("{\"type\":\"list\",\"id\":\"x\"}\n");
    std::fs::write(&batch.path, text).unwrap();
    batch.job_ids.extend([4, 5]);

    let out = m.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    let o = outcomes(&out);
    assert!(
        matches!(&o[&4], Outcome::Failed(e) if e.code == ErrorCode::Internal && e.message.contains("not a Klaviyo profile"))
    );
    assert!(
        matches!(&o[&5], Outcome::Failed(e) if e.code == ErrorCode::Internal && e.message.contains("ended 1 line(s) early"))
    );
    assert_eq!(importing(&out), 3);

    batch.path = dir.path().join("missing.jsonl");
    let out = m.upload(&batch).await;
    assert_eq!(
        count(
            &out,
            |o| matches!(o, Outcome::Failed(e) if e.message.contains("cannot open the staged file"))
        ),
        5
    );
}

#[tokio::test]
async fn transform_refuses_bad_records_through_the_manager() {
    let standin = KlaviyoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxProfileBytes": "1KB"}));
    let too_big = json!({"email": "a@b.c", "bio": "x".repeat(2_000)});
    let e = m.transform(&job(1, &too_big)).unwrap_err();
    assert!(
        e.0.contains("over the per-profile limit of 1000 bytes"),
        "{e}"
    );
    let e = m
        .transform(&job(2, &json!({"first_name": "nobody"})))
        .unwrap_err();
    assert!(e.0.contains("at least one of"), "{e}");
    let line = m
        .transform(&job(
            3,
            &json!({"phone_number": "+33 6 00 00 00 00", "tier": "gold"}),
        ))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&line).unwrap(),
        json!({"type": "profile", "attributes": {"phone_number": "+33 6 00 00 00 00", "properties": {"tier": "gold"}}})
    );
}
