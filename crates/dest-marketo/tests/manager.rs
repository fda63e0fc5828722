//! The Marketo manager against the Marketo stand-in over loopback HTTP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, Outcome, PollStatus, UploadOutput,
};
use batchrouter_dest_marketo::context::Keys;
use batchrouter_testkit::marketo::{Endpoint, MarketoFault, MarketoOptions, MarketoStandIn};
use common::*;
use serde_json::json;

fn throttled(o: &Outcome) -> &JobError {
    match o {
        Outcome::Throttled(e) => e,
        other => panic!("expected throttled, got {other:?}"),
    }
}

fn imported_job_count(out: &UploadOutput) -> usize {
    out.imports.iter().map(|i| i.job_ids.len()).sum()
}

#[tokio::test]
async fn happy_path_25k_jobs_across_several_imports() {
    let standin = MarketoStandIn::start().await;
    let (m, telemetry) = manager(
        &standin,
        json!({"maxFileSize": "400KB", "listId": 77, "partitionName": "EMEA"}),
    );
    let dir = tempfile::tempdir().unwrap();
    let (batch, rejected) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..25_000, |i| format!("Lead{i}@Example.COM")),
    );
    assert!(rejected.is_empty());

    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(
        out.outcomes.is_empty(),
        "{:?}",
        &out.outcomes[..out.outcomes.len().min(3)]
    );
    assert!(
        out.imports.len() >= 3,
        "expected several imports, got {}",
        out.imports.len()
    );
    assert_eq!(imported_job_count(&out), 25_000);
    for imp in &out.imports {
        let ctx = batchrouter_dest_marketo::ImportContext::from_value(&imp.context).unwrap();
        match &ctx.keys {
            Keys::InRowOrder(keys) => assert_eq!(keys.len(), imp.job_ids.len()),
            other => panic!("new contexts list keys in row order: {other:?}"),
        }
        assert_eq!(ctx.job_ids, imp.job_ids);
        assert_eq!(ctx.parts as usize, out.imports.len());
    }

    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    assert_eq!(outcomes.len(), 25_000);
    assert!(outcomes.values().all(|o| *o == Outcome::succeeded()));

    let imported = standin.imported();
    assert_eq!(imported.len(), 25_000);
    assert!(
        imported.values().all(|&n| n == 1),
        "every lead imported exactly once"
    );
    assert_eq!(standin.imported_count("lead24999@example.com"), 1);
    assert_eq!(standin.rows_imported(), 25_000);
    for info in standin.imports() {
        assert_eq!(
            info.columns,
            vec!["email", "firstName", "lastName", "score", "vip"]
        );
        assert_eq!(info.lookup_field, "email");
        assert_eq!(info.list_id.as_deref(), Some("77"));
        assert_eq!(info.partition_name.as_deref(), Some("EMEA"));
        assert!(info.file_bytes <= 400_000, "{}", info.file_bytes);
        assert_eq!(info.duplicate_keys, 0);
    }
    assert_eq!(standin.query_token_uses(), 0);
    assert_eq!(standin.token_errors(), 0);
    assert_eq!(
        standin.tokens_issued(),
        1,
        "one cached token for the whole run"
    );
    assert!(standin.max_active_imports() <= 10);
    let total = telemetry.requests.lock().unwrap().len();
    assert_eq!(
        telemetry.count("200"),
        total,
        "every request counted once with its status"
    );
    let expected =
        1 + standin.requests(Endpoint::CreateImport) + standin.requests(Endpoint::Status);
    assert_eq!(total as u64, expected);
}

#[tokio::test]
async fn row_failures_and_warnings_reach_the_right_jobs() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    standin.warn_rows_matching("warn", "1017 Field value truncated");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let email = |i: i64| match i % 3 {
        0 => format!("  Bad{i}@Example.com "),
        1 => format!("WARN{i}@example.COM"),
        _ => format!("ok{i}@example.com"),
    };
    let (batch, _) = stage(dir.path(), m.as_ref(), leads(0..300, email));
    let outcomes = upload_and_drive(m.as_ref(), &batch).await;
    assert_eq!(outcomes.len(), 300);
    for (id, o) in &outcomes {
        match id % 3 {
            0 => match o {
                Outcome::Aborted(e) => {
                    assert_eq!(e.code, ErrorCode::RecordRejected);
                    assert_eq!(e.message, "Marketo rejected the lead: 1004 Lead not found");
                }
                other => panic!("job {id}: {other:?}"),
            },
            1 => assert_eq!(
                *o,
                Outcome::Succeeded {
                    note: Some("1017 Field value truncated".into()),
                    external_id: None
                },
                "job {id}"
            ),
            _ => assert_eq!(*o, Outcome::succeeded(), "job {id}"),
        }
    }
}

#[tokio::test]
async fn result_rows_without_a_job_are_counted_as_unmatched() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..4, |i| format!("bad{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let mut h = handles(&out).remove(0);
    // A context missing one row (as a foreign or stale context would be).
    let keys = h.context["keys"].as_array_mut().unwrap();
    let at = keys.iter().position(|k| k == "bad0@x.io").unwrap();
    keys.remove(at);
    h.context["jobIds"].as_array_mut().unwrap().remove(at);
    while let PollStatus::InProgress { .. } = m.poll(&h).await.unwrap() {}
    let stats = m.get_upload_stats(&h).await.unwrap();
    assert_eq!(
        stats.unmatched, 1,
        "the router counts these in unmatched_results_total"
    );
    let ids: Vec<i64> = stats.outcomes.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[tokio::test]
async fn duplicate_lookup_values_go_to_later_imports_in_order() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("dup", "1003 Rejected");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let email = |i: i64| {
        if i % 4 == 0 {
            format!("Dup@X.io{}", if i == 4 { " " } else { "" })
        } else {
            format!("u{i}@x.io")
        }
    };
    let (batch, _) = stage(dir.path(), m.as_ref(), leads(0..12, email));
    let out = m.upload(&batch).await;
    assert_eq!(out.imports.len(), 3, "jobs 0, 4, 8 share a lookup value");
    assert_eq!(out.imports[0].job_ids, vec![0, 1, 2, 3, 5, 6, 7, 9, 10, 11]);
    assert_eq!(out.imports[1].job_ids, vec![4]);
    assert_eq!(out.imports[2].job_ids, vec![8]);
    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    for id in [0, 4, 8] {
        assert!(
            matches!(&outcomes[&id], Outcome::Aborted(e) if e.code == ErrorCode::RecordRejected),
            "job {id}"
        );
    }
    assert_eq!(
        outcomes
            .values()
            .filter(|o| **o == Outcome::succeeded())
            .count(),
        9
    );
    assert!(standin.imports().iter().all(|i| i.duplicate_keys == 0));
}

#[tokio::test]
async fn token_expiry_mid_upload_and_before_poll_refreshes_once() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxFileSize": 1000}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..150, |i| format!("t{i}@x.io")),
    );
    // The second import POST finds its token expired.
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(Endpoint::CreateImport, MarketoFault::ExpireTokens);
    let out = m.upload(&batch).await;
    assert!(out.outcomes.is_empty(), "{:?}", out.outcomes);
    assert!(out.imports.len() >= 3);
    assert_eq!(standin.tokens_issued(), 2);
    assert_eq!(standin.token_errors(), 1);

    standin.expire_tokens();
    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    assert!(outcomes.values().all(|o| *o == Outcome::succeeded()));
    assert_eq!(standin.tokens_issued(), 3);
    assert_eq!(standin.token_errors(), 2);
    assert_eq!(standin.query_token_uses(), 0);

    // A token refused again right after a refresh is a transient poll error.
    standin.push_fault(
        Endpoint::Status,
        MarketoFault::api("601", "Access token invalid"),
    );
    standin.push_fault(
        Endpoint::Status,
        MarketoFault::api("601", "Access token invalid"),
    );
    let e = m.poll(&handles(&out)[0]).await.unwrap_err();
    assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
    assert!(e.message().contains("freshly issued"), "{e}");
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    let standin = MarketoStandIn::start_with(MarketoOptions {
        token_lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..3, |i| format!("e{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    m.poll(&h).await.unwrap();
    assert_eq!(
        standin.tokens_issued(),
        2,
        "a new token after the first one's lifetime"
    );
    assert_eq!(
        standin.token_errors(),
        0,
        "refreshed before Marketo had to refuse it"
    );
}

#[tokio::test]
async fn concurrent_calls_share_one_token_request() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..3, |i| format!("c{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    let (m2, _) = manager(&standin, json!({}));
    let polls = (0..8).map(|_| m2.poll(&h));
    for r in futures::future::join_all(polls).await {
        r.unwrap();
    }
    assert_eq!(
        standin.requests(Endpoint::Token),
        2,
        "one for each manager, not one per call"
    );
}

#[tokio::test]
async fn throttling_606_1016_and_429_are_throttled_not_aborted() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();

    // 606: rate limit, with Marketo's documented 20 s window as the hint.
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..5, |i| format!("r{i}@x.io")),
    );
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::api("606", "Max rate limit '100' exceeded with in '20' secs"),
    );
    let out = m.upload(&batch).await;
    assert!(out.imports.is_empty());
    assert_eq!(out.outcomes.len(), 5);
    for (_, o) in &out.outcomes {
        let e = throttled(o);
        assert_eq!(e.code, ErrorCode::Throttled);
        assert!(e.message.contains("606"), "{e:?}");
    }
    assert_eq!(out.retry_after, Some(Duration::from_secs(20)));

    // HTTP 429 with Retry-After.
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::http_retry_after(429, "7"),
    );
    let out = m.upload(&batch).await;
    assert!(out
        .outcomes
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Throttled(_))));
    assert_eq!(out.retry_after, Some(Duration::from_secs(7)));

    // 1016: ten imports queued, the eleventh is refused until the queue drains.
    let mut queued = Vec::new();
    for b in 0..10 {
        let (batch, _) = stage(
            dir.path(),
            m.as_ref(),
            leads(b * 10..b * 10 + 10, |i| format!("q{i}@x.io")),
        );
        let out = m.upload(&batch).await;
        assert_eq!(out.imports.len(), 1, "upload {b}: {:?}", out.outcomes);
        queued.push(out);
    }
    let (eleventh, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(500..510, |i| format!("q{i}@x.io")),
    );
    let out = m.upload(&eleventh).await;
    assert!(out.imports.is_empty());
    assert_eq!(out.outcomes.len(), 10);
    for (_, o) in &out.outcomes {
        assert!(throttled(o)
            .message
            .contains("Marketo error 1016: Too many imports"));
    }
    assert_eq!(out.retry_after, None);
    for q in &queued {
        drive(m.as_ref(), &handles(q)).await;
    }
    let out = m.upload(&eleventh).await;
    assert_eq!(
        out.imports.len(),
        1,
        "accepted once the queue drained: {:?}",
        out.outcomes
    );
}

#[tokio::test]
async fn a_failure_mid_way_keeps_earlier_imports_and_fails_the_rest() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxFileSize": 1000}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..150, |i| format!("mid{i}@x.io")),
    );
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::api("1016", "Too many imports"),
    );
    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 1);
    let first = out.imports[0].job_ids.clone();
    assert!(!first.is_empty() && first.len() < 150);
    assert_eq!(out.outcomes.len(), 150 - first.len());
    let parts = standin.requests(Endpoint::CreateImport);
    assert_eq!(parts, 2, "no POST after the refused one");
    assert_eq!(standin.imports().len(), 1);
    let (mut refused, mut not_sent) = (0, 0);
    for (_, o) in &out.outcomes {
        let e = throttled(o);
        if e.message
            .starts_with("not sent: Marketo throttled import file 2 of ")
        {
            assert!(
                e.message.contains("Marketo error 1016: Too many imports"),
                "{e:?}"
            );
            not_sent += 1;
        } else {
            assert!(e.message.starts_with("import file 2 of "), "{e:?}");
            assert!(
                e.message.ends_with("Marketo error 1016: Too many imports"),
                "{e:?}"
            );
            refused += 1;
        }
    }
    assert!(refused > 0 && not_sent > 0, "{refused} {not_sent}");
}

#[tokio::test]
async fn upload_errors_are_classified_per_marketo_code_and_status() {
    let standin = MarketoStandIn::start().await;
    let (m, telemetry) = manager(&standin, json!({"requestTimeout": "1s"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..3, |i| format!("x{i}@x.io")),
    );
    let cases: Vec<(MarketoFault, &str, &str)> = vec![
        (MarketoFault::http(503), "failed", "HTTP 503"),
        (MarketoFault::http(500), "failed", "HTTP 500"),
        (
            MarketoFault::api("611", "System error"),
            "failed",
            "Marketo error 611: System error",
        ),
        (
            MarketoFault::api("604", "Request timed out"),
            "failed",
            "Marketo error 604",
        ),
        (
            MarketoFault::DropConnection,
            "failed",
            "Marketo transport error",
        ),
        (
            MarketoFault::Delay(Duration::from_secs(3)),
            "failed",
            "timed out",
        ),
        (
            MarketoFault::api("610", "Requested resource not found"),
            "aborted",
            "Marketo error 610: Requested resource not found",
        ),
        (
            MarketoFault::api("1003", "Invalid file"),
            "aborted",
            "Marketo error 1003: Invalid file",
        ),
        (MarketoFault::http(400), "aborted", "HTTP 400"),
        (MarketoFault::http(501), "aborted", "HTTP 501"),
        (
            MarketoFault::Http {
                status: 200,
                retry_after: None,
                body: "<html>proxy</html>".into(),
            },
            "failed",
            "malformed create import answer",
        ),
    ];
    for (fault, class, needle) in cases {
        standin.push_fault(Endpoint::CreateImport, fault.clone());
        let out = m.upload(&batch).await;
        assert!(out.imports.is_empty(), "{fault:?}");
        assert_eq!(out.outcomes.len(), 3, "{fault:?}");
        for (_, o) in &out.outcomes {
            let (got, e) = match o {
                Outcome::Failed(e) => ("failed", e),
                Outcome::Aborted(e) => ("aborted", e),
                other => panic!("{fault:?}: {other:?}"),
            };
            assert_eq!(got, class, "{fault:?}: {e:?}");
            assert!(e.message.contains(needle), "{fault:?}: {e:?}");
            let code = if class == "failed" {
                ErrorCode::DestinationUnavailable
            } else {
                ErrorCode::DestinationRejected
            };
            assert_eq!(e.code, code, "{fault:?}");
        }
    }
    assert!(telemetry.count("timeout") >= 1);
    assert!(telemetry.count("error") >= 1, "the dropped connection");
    assert!(telemetry.count("503") == 1 && telemetry.count("400") == 1);
}

#[tokio::test]
async fn bad_credentials_abort_and_an_unreachable_host_fails_without_leaking_the_secret() {
    let standin = MarketoStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(&standin, json!({"clientSecret": "wrong-secret-value-123"}));
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..2, |i| format!("s{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    for (_, o) in &out.outcomes {
        match o {
            Outcome::Aborted(e) => {
                assert!(
                    e.message
                        .contains("refused the client credentials of clientId `standin-client`"),
                    "{e:?}"
                );
                assert!(e.message.contains("Bad client credentials"), "{e:?}");
                assert!(!e.message.contains("wrong-secret-value-123"));
            }
            other => panic!("{other:?}"),
        }
    }

    // Nothing listens on the port any more: the token request cannot connect.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (m, telemetry) = manager(&standin, json!({"baseUrl": format!("http://{closed}")}));
    let out = m.upload(&batch).await;
    for (_, o) in &out.outcomes {
        match o {
            Outcome::Failed(e) => {
                assert!(e.message.contains("could not connect"), "{e:?}");
                assert!(!e.message.contains(standin.client_secret()), "{e:?}");
                assert!(!e.message.contains("client_secret"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(telemetry.count("error"), 1);
}

#[tokio::test]
async fn poll_errors_keep_the_import_and_it_completes_later() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"requestTimeout": "1s"}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..20, |i| format!("p{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    let faults = [
        (MarketoFault::http(503), "retryable"),
        (MarketoFault::http(502), "retryable"),
        (MarketoFault::http_retry_after(429, "3"), "throttled"),
        (MarketoFault::api("606", "Max rate limit"), "throttled"),
        (MarketoFault::api("611", "System error"), "retryable"),
        (MarketoFault::DropConnection, "retryable"),
        (MarketoFault::Delay(Duration::from_secs(3)), "retryable"),
        (
            MarketoFault::Http {
                status: 200,
                retry_after: None,
                body: "{\"success\":".into(),
            },
            "retryable",
        ),
    ];
    for (fault, class) in faults {
        standin.push_fault(Endpoint::Status, fault.clone());
        let e = m
            .poll(&h)
            .await
            .expect_err("a poll that did not work is an Err");
        let got = match e {
            DestinationError::Retryable { .. } => "retryable",
            DestinationError::Throttled { .. } => "throttled",
            DestinationError::Permanent { .. } => "permanent",
        };
        assert_eq!(got, class, "{fault:?}: {e}");
    }
    let outcomes = drive(m.as_ref(), &[h]).await;
    assert_eq!(outcomes.len(), 20);
    assert!(outcomes.values().all(|o| *o == Outcome::succeeded()));
    assert_eq!(standin.rows_imported(), 20);
}

#[tokio::test]
async fn progress_is_reported_and_a_failed_import_carries_marketos_message() {
    let standin = MarketoStandIn::start_with(MarketoOptions {
        polls_to_complete: 4,
        ..Default::default()
    })
    .await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..8, |i| format!("f{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    assert_eq!(
        m.poll(&h).await.unwrap(),
        PollStatus::InProgress {
            processed: Some(2),
            total: Some(8)
        }
    );
    assert_eq!(
        m.poll(&h).await.unwrap(),
        PollStatus::InProgress {
            processed: Some(4),
            total: Some(8)
        }
    );
    let batch_id = h.context["batchId"].as_u64().unwrap();
    standin.fail_import(batch_id, "Import file is empty or corrupt");
    match m.poll(&h).await.unwrap() {
        PollStatus::Failed { retryable, error } => {
            assert!(retryable);
            assert_eq!(error.code, ErrorCode::ImportFailed);
            assert!(
                error.message.contains("Import file is empty or corrupt"),
                "{error:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn result_file_problems_are_retried_later() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    standin.warn_rows_matching("warn", "1017 truncated");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..6, |i| {
            if i < 3 {
                format!("bad{i}@x.io")
            } else {
                format!("warn{i}@x.io")
            }
        }),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    while let PollStatus::InProgress { .. } = m.poll(&h).await.unwrap() {}

    standin.push_fault(Endpoint::Failures, MarketoFault::api("611", "System error"));
    let e = m.get_upload_stats(&h).await.unwrap_err();
    assert!(e.message().contains("Marketo error 611"), "{e}");
    standin.push_fault(Endpoint::Failures, MarketoFault::http(503));
    assert!(m.get_upload_stats(&h).await.is_err());
    standin.push_fault(Endpoint::Warnings, MarketoFault::DropConnection);
    assert!(m.get_upload_stats(&h).await.is_err());
    // Expired token on the result file: refreshed once, then it works.
    standin.push_fault(Endpoint::Failures, MarketoFault::ExpireTokens);
    let stats = m.get_upload_stats(&h).await.unwrap();
    assert_eq!(stats.outcomes.len(), 6);
    assert!(stats.outcomes[..3]
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Aborted(_))));
    assert!(stats.outcomes[3..]
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Succeeded { note: Some(_), .. })));
    // Stats of an import not yet complete are a "later", not an answer.
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(10..12, |i| format!("n{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    assert!(m.get_upload_stats(&handles(&out)[0]).await.is_err());
}

#[tokio::test]
async fn restart_between_upload_and_stats_loses_nothing() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    standin.warn_rows_matching("warn", "1017 truncated");
    let dir = tempfile::tempdir().unwrap();
    let email = |i: i64| match i % 5 {
        0 => format!("BAD{i}@Example.com"),
        1 => format!(" warn{i}@example.com"),
        _ => format!("fine{i}@example.com"),
    };
    // What the router persists: each import's context (as JSON text) and job ids.
    let persisted: Vec<(String, Vec<i64>)> = {
        let (first, _) = manager(&standin, json!({"maxFileSize": 3000}));
        let (batch, _) = stage(dir.path(), first.as_ref(), leads(0..100, email));
        let out = first.upload(&batch).await;
        assert!(out.outcomes.is_empty());
        assert!(out.imports.len() >= 2);
        out.imports
            .iter()
            .map(|i| (i.context.to_string(), i.job_ids.clone()))
            .collect()
    };
    // A new process: new manager, handles rebuilt from the stored text only.
    let (second, _) = manager(&standin, json!({"maxFileSize": 3000}));
    let handles: Vec<ImportHandle> = persisted
        .iter()
        .enumerate()
        .map(|(i, (ctx, ids))| ImportHandle {
            id: i as i64,
            destination_id: "marketo-test".into(),
            batch_id: "b".into(),
            context: serde_json::from_str(ctx).unwrap(),
            job_ids: ids.clone(),
            started_at: batchrouter_core::Timestamp::now(),
        })
        .collect();
    let outcomes = drive(second.as_ref(), &handles).await;
    assert_eq!(outcomes.len(), 100);
    for (id, o) in &outcomes {
        let ok = match id % 5 {
            0 => matches!(o, Outcome::Aborted(e) if e.code == ErrorCode::RecordRejected),
            1 => matches!(o, Outcome::Succeeded { note: Some(n), .. } if n == "1017 truncated"),
            _ => *o == Outcome::succeeded(),
        };
        assert!(ok, "job {id}: {o:?}");
    }
}

#[tokio::test]
async fn an_unreadable_context_sends_the_jobs_again_instead_of_guessing() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let h = ImportHandle {
        id: 1,
        destination_id: "marketo-test".into(),
        batch_id: "b".into(),
        context: json!({"importId": "x"}),
        job_ids: vec![5, 6],
        started_at: batchrouter_core::Timestamp::now(),
    };
    assert!(
        matches!(m.poll(&h).await.unwrap(), PollStatus::Failed { retryable: true, error } if error.code == ErrorCode::Internal)
    );
    let stats = m.get_upload_stats(&h).await.unwrap();
    assert_eq!(stats.outcomes.len(), 2);
    assert!(stats
        .outcomes
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Failed(_))));
    assert_eq!(standin.requests(Endpoint::Status), 0);
}

#[tokio::test]
async fn malformed_payloads_are_aborted_with_reason_and_the_rest_imports() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"passUnmappedFields": false}));
    let dir = tempfile::tempdir().unwrap();
    let payloads = vec![
        (
            1,
            json!({"email": "good@x.io", "first": "A", "ignored": 1}).to_string(),
        ),
        (2, "[1,2,3]".to_string()),
        (3, "{\"email\": ".to_string()),
        (4, json!({"first": "no email"}).to_string()),
        (5, json!({"email": "   "}).to_string()),
        (6, json!({"email": "fine@x.io", "first": 1e6}).to_string()),
    ];
    let (batch, rejected) = stage(dir.path(), m.as_ref(), payloads);
    let reasons: HashMap<i64, String> = rejected.into_iter().collect();
    assert_eq!(reasons.len(), 4);
    assert!(
        reasons[&2].contains("must be a JSON object"),
        "{}",
        reasons[&2]
    );
    assert!(reasons[&3].contains("not valid JSON"), "{}", reasons[&3]);
    assert!(
        reasons[&4].contains("lacks a value for `email`"),
        "{}",
        reasons[&4]
    );
    assert!(
        reasons[&5].contains("lacks a value for `email`"),
        "{}",
        reasons[&5]
    );
    let outcomes = upload_and_drive(m.as_ref(), &batch).await;
    assert_eq!(outcomes.len(), 2);
    let info = &standin.imports()[0];
    assert_eq!(
        info.columns,
        vec!["email", "firstName"],
        "unmapped keys dropped"
    );
    assert_eq!(standin.imported_count("good@x.io"), 1);
    assert_eq!(standin.imported_count("fine@x.io"), 1);
}

#[tokio::test]
async fn ten_megabyte_files_are_split_under_the_limit() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let filler = "n".repeat(900);
    let payloads = (0..30_000i64).map(|i| {
        (
            i,
            json!({"email": format!("big{i}@x.io"), "notes": format!("{i}{filler}")}).to_string(),
        )
    });
    let (batch, _) = stage(dir.path(), m.as_ref(), payloads);
    assert!(batch.bytes > 25_000_000);
    let out = m.upload(&batch).await;
    assert!(out.outcomes.is_empty(), "{:?}", out.outcomes.first());
    assert!(out.imports.len() >= 3, "{}", out.imports.len());
    let infos = standin.imports();
    assert_eq!(infos.len(), out.imports.len());
    for info in &infos {
        assert!(info.file_bytes < 10_000_000, "{}", info.file_bytes);
    }
    assert!(
        infos[0].file_bytes > 9_000_000,
        "files are filled up to the limit: {}",
        infos[0].file_bytes
    );
    drive(m.as_ref(), &handles(&out)).await;
    let imported = standin.imported();
    assert_eq!(imported.len(), 30_000);
    assert!(imported.values().all(|&n| n == 1));
}

#[tokio::test]
async fn build_rejects_bad_config_with_every_problem() {
    let bad = json!({"munchkinId": "", "clientID": "x", "clientSecret": "", "maxFileSize": "12MB"});
    let ctx = batchrouter_core::DestinationContext {
        id: "m".into(),
        destination_type: "MARKETO_BULK_UPLOAD".into(),
        telemetry: std::sync::Arc::new(batchrouter_core::NoopTelemetry),
    };
    let err = batchrouter_dest_marketo::MarketoDestination
        .validate_and_build(&ctx, &bad)
        .err()
        .expect("rejected");
    assert!(
        err.0
            .iter()
            .any(|p| p.contains("unknown key `clientID` (did you mean `clientId`?)")),
        "{err:?}"
    );
    let mut bad = bad;
    bad.as_object_mut().unwrap().remove("clientID");
    let err = batchrouter_dest_marketo::MarketoDestination
        .validate_and_build(&ctx, &bad)
        .err()
        .expect("rejected");
    let text = err.to_string();
    for needle in [
        "`munchkinId` is required",
        "`clientId` is required",
        // Set but blank: most likely an unset `${ENV}`, and the problem says so.
        "`clientSecret` is empty (is the environment variable",
        "`maxFileSize` = 12000000",
        "deDuplicationField `email`",
    ] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({"maxFileSize": "5MB"}));
    assert_eq!(
        m.limits().max_upload_bytes,
        Some(25_000_000),
        "half of ten full files: rows with the same fields never need more files than Marketo queues"
    );
    assert_eq!(
        standin.requests(Endpoint::Token),
        0,
        "building does no network I/O"
    );
}

/// Stages 150 leads under a 1000-byte file limit, and lays them out with the
/// manager's own settings to know which jobs each import file holds.
struct SeveralFiles {
    m: std::sync::Arc<dyn batchrouter_core::AsyncDestinationManager>,
    batch: batchrouter_core::StagedBatch,
    files: Vec<Vec<i64>>,
}

fn several_files(
    standin: &MarketoStandIn,
    dir: &std::path::Path,
    extra: serde_json::Value,
) -> SeveralFiles {
    let mut config = base_config(standin);
    config["maxFileSize"] = json!(1000);
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let (m, _) = manager_with(&config);
    let (batch, _) = stage(dir, m.as_ref(), leads(0..150, |i| format!("part{i}@x.io")));
    let settings = batchrouter_dest_marketo::Settings::from_config(&config).unwrap();
    let plan = batchrouter_dest_marketo::layout::plan_import_files(&batch, &settings).unwrap();
    assert!(plan.decided.is_empty());
    let files: Vec<Vec<i64>> = plan.files.iter().map(|f| f.job_ids.clone()).collect();
    assert!(files.len() >= 4, "{} files", files.len());
    SeveralFiles { m, batch, files }
}

#[tokio::test]
async fn a_file_refused_for_its_content_aborts_only_its_own_jobs() {
    let standin = MarketoStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let SeveralFiles { m, batch, files } = several_files(&standin, dir.path(), json!({}));
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::api("1003", "Invalid file"),
    );
    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    let parts = files.len();
    assert_eq!(out.imports.len(), parts - 1, "every other file was sent");
    assert_eq!(standin.requests(Endpoint::CreateImport) as usize, parts);
    assert_eq!(out.outcomes.len(), files[2].len());
    for (id, o) in &out.outcomes {
        assert!(files[2].contains(id));
        match o {
            Outcome::Aborted(e) => {
                assert_eq!(e.code, ErrorCode::DestinationRejected);
                assert_eq!(
                    e.message,
                    format!("import file 3 of {parts}: Marketo error 1003: Invalid file")
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    assert_eq!(outcomes.len(), 150 - files[2].len());
    assert!(outcomes.values().all(|o| *o == Outcome::succeeded()));
}

#[tokio::test]
async fn a_refusal_every_file_would_get_stops_and_says_what_was_not_sent() {
    let standin = MarketoStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let SeveralFiles { m, batch, files } = several_files(&standin, dir.path(), json!({}));

    // 603 on the second file: the first stays importing, the second is
    // aborted with Marketo's answer, the rest without being sent.
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::api("603", "Access denied"),
    );
    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    let parts = files.len();
    assert_eq!(out.imports.len(), 1);
    assert_eq!(out.imports[0].job_ids, files[0]);
    assert_eq!(
        standin.requests(Endpoint::CreateImport),
        2,
        "nothing sent after 603"
    );
    let reasons: HashMap<i64, &JobError> = out
        .outcomes
        .iter()
        .map(|(id, o)| match o {
            Outcome::Aborted(e) => (*id, e),
            other => panic!("{other:?}"),
        })
        .collect();
    for id in &files[1] {
        assert_eq!(
            reasons[id].message,
            format!("import file 2 of {parts}: Marketo error 603: Access denied")
        );
    }
    for (n, jobs) in files.iter().enumerate().skip(2) {
        for id in jobs {
            assert_eq!(reasons[id].code, ErrorCode::DestinationRejected);
            assert_eq!(
                reasons[id].message,
                format!(
                    "not sent: Marketo refused import file 2 of {parts} of this upload for a reason \
                     every file gets (Marketo error 603: Access denied), so file {} was not sent",
                    n + 1
                )
            );
        }
    }

    // Bad credentials: the first file is refused at the token, nothing is sent.
    let SeveralFiles {
        m: bad,
        batch,
        files,
    } = several_files(&standin, dir.path(), json!({"clientSecret": "wrong-one"}));
    let before = standin.requests(Endpoint::CreateImport);
    let out = bad.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(out.imports.is_empty());
    assert_eq!(standin.requests(Endpoint::CreateImport), before);
    for (id, o) in &out.outcomes {
        match o {
            Outcome::Aborted(e) => {
                assert!(e.message.contains("Bad client credentials"), "{e:?}");
                let first = files[0].contains(id);
                assert_eq!(!first, e.message.starts_with("not sent: "), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    // A transient failure: that file fails, the later ones wait unsent.
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(Endpoint::CreateImport, MarketoFault::http(503));
    let SeveralFiles { m, batch, files } = several_files(&standin, dir.path(), json!({}));
    let out = m.upload(&batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 1);
    for (id, o) in &out.outcomes {
        match o {
            Outcome::Failed(e) => {
                assert!(files[1].contains(id));
                assert_eq!(e.code, ErrorCode::DestinationUnavailable);
                assert!(e.message.contains("HTTP 503"), "{e:?}");
            }
            Outcome::Throttled(e) => {
                assert!(!files[0].contains(id) && !files[1].contains(id));
                assert_eq!(e.code, ErrorCode::DestinationUnavailable);
                assert!(
                    e.message.starts_with("not sent: import file 2 of "),
                    "{e:?}"
                );
                assert!(e.message.contains("HTTP 503"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn an_upload_stays_within_its_time_budget_and_keeps_the_imports_it_made() {
    let standin = MarketoStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let SeveralFiles { m, batch, files } =
        several_files(&standin, dir.path(), json!({"uploadTimeBudget": "1500ms"}));
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::Delay(Duration::from_millis(700)),
    );
    standin.push_fault(
        Endpoint::CreateImport,
        MarketoFault::Delay(Duration::from_millis(3000)),
    );
    let started = std::time::Instant::now();
    let out = m.upload(&batch).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(2000),
        "the budget bounds the upload: {elapsed:?}"
    );
    batchrouter_core::validate_upload_output(&batch.job_ids, &out).unwrap();
    assert_eq!(out.imports.len(), 2, "the imports made in time are kept");
    assert_eq!(out.imports[0].job_ids, files[0]);
    assert_eq!(out.imports[1].job_ids, files[1]);
    for (id, o) in &out.outcomes {
        match o {
            Outcome::Failed(e) => {
                assert!(files[2].contains(id));
                assert!(
                    e.message.contains("within the upload's time budget"),
                    "{e:?}"
                );
            }
            Outcome::Throttled(e) => {
                assert!(files[3..].iter().any(|f| f.contains(id)));
                assert!(e.message.starts_with("not sent: import file 3 of"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    assert_eq!(outcomes.len(), files[0].len() + files[1].len());
}

#[tokio::test]
async fn the_enforced_rate_limit_throttles_with_the_20s_hint() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..5, |i| format!("rate{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    assert_eq!(out.imports.len(), 1, "{:?}", out.outcomes);
    let h = handles(&out).remove(0);
    // 1 import + 99 polls fill Marketo's 100 calls per 20 s; the next is refused.
    let mut polls = 0;
    let e = loop {
        match m.poll(&h).await {
            Ok(_) => polls += 1,
            Err(e) => break e,
        }
        assert!(polls < 200, "the stand-in never limited the calls");
    };
    assert_eq!(polls, 99);
    assert_eq!(standin.rate_limited(), 1);
    match &e {
        DestinationError::Throttled {
            message,
            retry_after,
        } => {
            assert!(message.contains("Marketo error 606"), "{message}");
            assert_eq!(*retry_after, Some(Duration::from_secs(20)));
        }
        other => panic!("{other:?}"),
    }
    // An upload meeting the limit is throttled whole, with the 20 s hint.
    let (next, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(10..15, |i| format!("rate{i}@x.io")),
    );
    let out = m.upload(&next).await;
    assert!(out.imports.is_empty());
    assert_eq!(out.outcomes.len(), 5);
    for (_, o) in &out.outcomes {
        let e = throttled(o);
        assert_eq!(e.code, ErrorCode::Throttled);
        assert!(
            e.message
                .contains("Marketo error 606: Max rate limit '100'"),
            "{e:?}"
        );
    }
    assert_eq!(out.retry_after, Some(Duration::from_secs(20)));
    assert_eq!(standin.imports().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enforced_concurrency_limit_throttles_the_eleventh_call() {
    let standin = MarketoStandIn::start().await;
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..3, |i| format!("conc{i}@x.io")),
    );
    let out = m.upload(&batch).await;
    let h = handles(&out).remove(0);
    for _ in 0..12 {
        standin.push_fault(
            Endpoint::Status,
            MarketoFault::Delay(Duration::from_millis(600)),
        );
    }
    let polls = (0..12).map(|_| m.poll(&h));
    let results = futures::future::join_all(polls).await;
    let refused: Vec<&DestinationError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 2, "{results:?}");
    for e in refused {
        assert!(matches!(e, DestinationError::Throttled { .. }), "{e:?}");
        assert!(e.message().contains("Marketo error 615"), "{e}");
    }
    assert_eq!(standin.concurrency_limited(), 2);
}

#[tokio::test]
async fn results_listing_fewer_rows_than_counted_are_fetched_again() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    standin.warn_rows_matching("warn", "1017 truncated");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    for (prefix, what) in [("bad", "3 failed rows"), ("warn", "3 rows with warnings")] {
        let (batch, _) = stage(
            dir.path(),
            m.as_ref(),
            leads(0..6, |i| {
                if i < 3 {
                    format!("{prefix}{i}@x.io")
                } else {
                    format!("ok-{i}@x.io")
                }
            }),
        );
        let out = m.upload(&batch).await;
        let h = handles(&out).remove(0);
        while let PollStatus::InProgress { .. } = m.poll(&h).await.unwrap() {}
        standin.withhold_result_rows(1);
        let e = m.get_upload_stats(&h).await.unwrap_err();
        assert!(matches!(e, DestinationError::Retryable { .. }), "{e:?}");
        assert!(e.message().contains(&format!("counts {what}")), "{e}");
        assert!(e.message().contains("lists 2"), "{e}");
        standin.withhold_result_rows(0);
        let stats = m.get_upload_stats(&h).await.unwrap();
        assert_eq!(stats.outcomes.len(), 3, "every listed row reaches its job");
    }
}

#[tokio::test]
async fn contexts_persisted_by_the_previous_release_are_still_matched() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    let (m, _) = manager(&standin, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..6, |i| {
            if i % 2 == 0 {
                format!("Bad{i}@x.io")
            } else {
                format!("good{i}@x.io")
            }
        }),
    );
    let out = m.upload(&batch).await;
    let mut h = handles(&out).remove(0);
    // The version 1 shape: a key → job object and no job id list.
    let keys = h.context["keys"].as_array().unwrap().clone();
    let ids = h.context["jobIds"].as_array().unwrap().clone();
    let map: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .zip(ids)
        .map(|(k, id)| (k.as_str().unwrap().to_string(), id))
        .collect();
    let ctx = h.context.as_object_mut().unwrap();
    ctx.remove("jobIds");
    ctx.insert("keys".into(), map.into());
    ctx.insert("version".into(), 1.into());
    let outcomes = drive(m.as_ref(), &[h]).await;
    assert_eq!(outcomes.len(), 6);
    for (id, o) in outcomes {
        if id % 2 == 0 {
            assert!(
                matches!(&o, Outcome::Aborted(e) if e.code == ErrorCode::RecordRejected),
                "{id}: {o:?}"
            );
        } else {
            assert_eq!(o, Outcome::succeeded(), "{id}");
        }
    }
}
