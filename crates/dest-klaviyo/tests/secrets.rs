//! The API key never reaches the logs: every log line of a full run
//! (upload with rejected profiles, polls, paginated stats, a refused key, a
//! failing poll), at TRACE level and including the HTTP stack's own logs,
//! is captured and searched.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use batchrouter_core::AsyncDestinationManager;
use batchrouter_testkit::klaviyo::{KlaviyoFault, KlaviyoStandIn, KlaviyoStandInOptions, Route};
use batchrouter_testkit::logs::LogCapture;
use common::*;
use serde_json::json;

const KEY: &str = "pk_SECRET_d0ntLogMe_7f3a9c";
const WRONG_KEY: &str = "pk_WRONG_alsoSecret_51b2e0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_never_logged() {
    // Global (every thread) and the `log` crate too (reqwest).
    let capture = LogCapture::install_global(tracing::Level::TRACE);

    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        api_key: KEY.into(),
        polls_to_complete: 2,
        ..Default::default()
    })
    .await;
    standin.reject_profiles_where("email", "invalid");
    standin.fail_in_import_where("email", "bounce");
    let (m, _) = manager(&standin, json!({"privateApiKey": KEY}));
    let dir = tempfile::tempdir().unwrap();
    let (batch, _) = stage(
        dir.path(),
        m.as_ref(),
        (0..60).map(|i| match i % 10 {
            3 => profile(i, &format!("invalid{i}@x.io")),
            4 => profile(i, &format!("bounce{i}@x.io")),
            _ => profile(i, &format!("ok{i}@x.io")),
        }),
    );
    let out = m.upload(&batch).await;
    assert_eq!(out.outcomes.len(), 6);
    standin.push_fault(Route::Status, KlaviyoFault::status(500));
    let h = handle(0, &out.imports[0]);
    assert!(m.poll(&h).await.is_err());
    let results = drive(m.as_ref(), &[h]).await;
    assert_eq!(
        results
            .values()
            .filter(|o| !matches!(o, batchrouter_core::Outcome::Succeeded { .. }))
            .count(),
        6
    );

    let (wrong, _) = manager(&standin, json!({"privateApiKey": WRONG_KEY}));
    let refused = wrong.upload(&batch).await;
    assert_eq!(refused.outcomes.len(), batch.job_ids.len());
    // Config problems and Debug output stay redacted too.
    tracing::info!(manager = ?wrong, "manager built");

    let text = capture.text();
    for needle in [
        "klaviyo upload",
        "klaviyo poll",
        "klaviyo upload stats",
        "klaviyo rejected a request for invalid profiles",
        "manager built",
    ] {
        assert!(
            text.contains(needle),
            "expected {needle:?} in the logs:\n{text}"
        );
    }
    assert!(
        text.lines().count() > 20,
        "the HTTP stack logged too:\n{text}"
    );
    for secret in [KEY, WRONG_KEY, "SECRET_d0ntLogMe", "WRONG_alsoSecret"] {
        assert!(!text.contains(secret), "{secret} leaked into the logs");
    }
}
