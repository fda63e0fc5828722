//! RudderStack keys batchrouter ignores are logged at startup, by name
//! (its own test binary: it installs the global log subscriber).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;

use batchrouter_config::{load_str, FileFormat, MapEnv};
use batchrouter_testkit::logs::LogCapture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_rudderstack_keys_are_logged_as_warnings_at_startup() {
    let logs = LogCapture::install_global(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{d}/jobs.db\"\nstagingDir = \"{d}/staging\"\n[BatchRouter]\nisolationMode = \"workspace\"\nmaxRetries = 2\n",
        d = dir.path().display()
    );
    let env = MapEnv::new([(
        "RSERVER_BATCH_ROUTER_MAX_CONSECUTIVE_FAILURES".to_string(),
        "3".to_string(),
    )]);
    let cfg = load_str(
        &text,
        FileFormat::Toml,
        Arc::new(env),
        &batchrouter_destinations::REGISTRY,
    )
    .unwrap();
    let app = batchrouterd::app::start(&cfg).await.unwrap();
    app.shutdown().await;
    let text = logs.text();
    for key in [
        "BatchRouter.isolationMode",
        "BatchRouter.maxConsecutiveFailures",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains("WARN") && l.contains(key) && l.contains("ignored")),
            "a startup warning names {key}:\n{text}"
        );
    }
    assert!(
        !text.contains("maxRetries"),
        "keys we use are not warned about:\n{text}"
    );
}
