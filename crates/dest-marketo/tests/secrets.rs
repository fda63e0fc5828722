//! No secret (client secret, access tokens) ever reaches a log line or a
//! job's reason: a global subscriber captures every log of the process at
//! TRACE level, from every thread (blocking ones included) and from the
//! `log` crate too (reqwest), while the manager goes through uploads, token
//! expiry, throttled polls, stats and refused credentials.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use batchrouter_testkit::logs::LogCapture;
use batchrouter_testkit::marketo::{Endpoint, MarketoFault, MarketoStandIn};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_reasons() {
    // Global (every thread) and the `log` crate too (reqwest).
    let capture = LogCapture::install_global(tracing::Level::TRACE);

    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("bad", "1004 Lead not found");
    let (m, _) = manager(&standin, json!({"maxFileSize": 1000}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        leads(0..150, |i| format!("bad{i}@x.io")),
    );
    standin.push_fault(Endpoint::CreateImport, MarketoFault::Pass);
    standin.push_fault(Endpoint::CreateImport, MarketoFault::ExpireTokens);
    let out = m.upload(&batch).await;
    standin.push_fault(Endpoint::Status, MarketoFault::api("606", "Max rate limit"));
    let _ = m.poll(&handles(&out)[0]).await;
    standin.expire_tokens();
    let outcomes = drive(m.as_ref(), &handles(&out)).await;
    let (bad, _) = manager(
        &standin,
        json!({"clientSecret": "another-wrong-secret-xyz"}),
    );
    let failed = bad.upload(&batch).await;
    // Logged from a blocking thread: the global subscriber sees it.
    tokio::task::spawn_blocking(|| tracing::info!("a log line from a blocking thread"))
        .await
        .unwrap();

    let text = capture.text();
    for needle in [
        "uploaded batch to Marketo",
        "refreshing it once",
        "a log line from a blocking thread",
        // reqwest logs through the `log` crate: captured as well.
        "reqwest::connect",
    ] {
        assert!(text.contains(needle), "{needle:?} not captured:\n{text}");
    }
    let tokens = standin.issued_tokens();
    assert!(tokens.len() >= 3);
    let mut reasons: Vec<String> = outcomes
        .values()
        .chain(failed.outcomes.iter().map(|(_, o)| o))
        .map(|o| format!("{o:?}"))
        .collect();
    reasons.push(format!("{:?}", out.imports));
    for needle in tokens.iter().map(String::as_str).chain([
        standin.client_secret(),
        "another-wrong-secret-xyz",
        "client_secret=",
    ]) {
        assert!(!text.contains(needle), "log leaks {needle}");
        assert!(
            !reasons.iter().any(|r| r.contains(needle)),
            "a reason leaks {needle}"
        );
    }
}
