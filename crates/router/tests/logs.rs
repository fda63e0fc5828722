//! What one upload and one import log: the router writes exactly one info
//! line per upload and per finished poll, carrying `destination_id`,
//! `destination_type` (and `import_id` for the poll); the destination's own
//! lines are at debug, inside the router's span with the same field names.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::{DestinationContext, JobState, JobStore, NoopTelemetry, Timestamp};
use batchrouter_router::RouterSettings;
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::klaviyo::{KlaviyoStandIn, KlaviyoStandInOptions};
use batchrouter_testkit::logs::LogCapture;
use common::*;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);
const KIND: &str = "KLAVIYO_BULK_UPLOAD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_info_line_per_upload_and_per_finished_poll() {
    let capture = LogCapture::install_global(tracing::Level::DEBUG);
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        polls_to_complete: 2,
        ..Default::default()
    })
    .await;
    let manager = batchrouter_destinations::REGISTRY
        .build(
            &DestinationContext {
                id: "kl".into(),
                destination_type: KIND.into(),
                telemetry: Arc::new(NoopTelemetry),
            },
            &json!({
                "privateApiKey": standin.api_key(),
                "baseUrl": standin.base_url(),
                "requestTimeout": "10s",
                "connectTimeout": "2s",
            }),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    store
        .insert_jobs(numbered_jobs("kl", "p", 20), Timestamp::now())
        .await
        .unwrap();
    let settings = RouterSettings {
        max_events_in_batch: 100,
        ..fast()
    };
    let router = start(
        store.clone(),
        dir.path(),
        vec![("kl", KIND, manager, settings)],
    )
    .await;
    let c = settle(&store, "kl", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 20, "{:?}", c.by_state);
    router.shutdown().await;

    let text = capture.text();
    let info: Vec<&str> = text.lines().filter(|l| l.contains(" INFO ")).collect();
    let uploads: Vec<&&str> = info
        .iter()
        .filter(|l| l.contains("Upload finished."))
        .collect();
    assert_eq!(uploads.len(), 1, "one upload, one info line:\n{text}");
    assert!(
        uploads[0].contains("destination_id=kl")
            && uploads[0].contains(&format!("destination_type={KIND}")),
        "{}",
        uploads[0]
    );
    let polls: Vec<&&str> = info.iter().filter(|l| l.contains("Import")).collect();
    assert_eq!(polls.len(), 1, "one finished poll, one info line:\n{text}");
    assert!(
        polls[0].contains("Import complete.")
            && polls[0].contains("destination_id=kl")
            && polls[0].contains(&format!("destination_type={KIND}"))
            && polls[0].contains("import_id="),
        "{}",
        polls[0]
    );
    // The destination says nothing at info about the upload or the polls:
    // its lines are at debug, inside the router's span.
    let own_info: Vec<&&str> = info
        .iter()
        .filter(|l| l.contains("batchrouter_dest_klaviyo"))
        .collect();
    assert!(own_info.is_empty(), "destination info lines: {own_info:#?}");
    let own: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("batchrouter_dest_klaviyo"))
        .collect();
    for (op, needle) in [("upload", "klaviyo upload"), ("poll", "klaviyo poll")] {
        let line = own
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} line:\n{text}"));
        assert!(
            line.contains(" DEBUG ")
                && line.contains(&format!("op=\"{op}\""))
                && line.contains("destination_id=kl")
                && line.contains(&format!("destination_type={KIND}")),
            "{line}"
        );
        if op == "poll" {
            assert!(line.contains("import_id="), "{line}");
        }
    }
    assert!(
        own.iter()
            .all(|l| !l.contains("destination=") && !l.contains(" import=")),
        "the destination uses the router's field names:\n{own:#?}"
    );
}
