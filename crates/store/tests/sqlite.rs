//! The store conformance suite against the embedded SQLite store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod conformance;

use std::sync::Arc;

use batchrouter_store::SqliteStore;

async fn sqlite(_name: &str) -> Option<(conformance::Store, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("jobs.db")).await.unwrap();
    Some((Arc::new(store), dir))
}

conformance_tests!(sqlite);

#[tokio::test]
async fn recover_takes_back_every_lease_at_start() {
    use batchrouter_core::{JobState, JobStore, Timestamp};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let now = Timestamp::now();
    {
        let s = SqliteStore::open(&path).await.unwrap();
        s.insert_jobs(batchrouter_testkit::jobs::numbered_jobs("d", "r", 3), now)
            .await
            .unwrap();
        let held = s
            .claim_jobs(
                "d",
                "dead",
                3,
                now,
                now + std::time::Duration::from_secs(3600),
            )
            .await
            .unwrap();
        assert_eq!(held.len(), 3);
    }
    let s = SqliteStore::open(&path).await.unwrap();
    let r = s.recover(now).await.unwrap();
    assert_eq!(
        r.jobs_released, 3,
        "leases are not waited for: the OS lock proves the holder is gone"
    );
    let counts = s.destination_counts().await.unwrap();
    assert_eq!(counts["d"].by_state[&JobState::Waiting], 3);
}
