//! Unit tests of the SQLite store's own parts: the owner lock, the claim's
//! query plan, refusal of a newer schema, the state words its SQL quotes.

use super::*;
use rusqlite::Connection;

#[tokio::test]
async fn second_open_of_the_same_file_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let first = SqliteStore::open(&path).await.unwrap();
    let err = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("in use by another batchrouterd"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(first);
    SqliteStore::open(&path)
        .await
        .expect("lock released on drop");
}

#[tokio::test]
async fn claim_uses_the_due_index_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("jobs.db")).await.unwrap();
    let plan: Vec<String> = store
        .read(|conn| {
            let mut stmt = conn
                .prepare(
                    "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE destination_id = 'd' \
                     AND state IN ('waiting', 'failed') AND next_attempt_at <= 5 ORDER BY next_attempt_at, id LIMIT 10",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(3)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .unwrap();
    let plan = plan.join(" | ");
    assert!(plan.contains("jobs_due"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "claim must not sort: {plan}");
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 999").unwrap();
    }
    let err = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("newer than this batchrouterd"), "{err}");
}

#[test]
fn quoted_state_words_are_the_contract_words() {
    use super::sql::*;
    let all = [
        INSERT_JOB,
        EXISTING_BY_MESSAGE_ID,
        CLAIM_JOBS,
        EXTEND_JOB_LEASE,
        RELEASE_JOB,
        TRANSITION_EXECUTING,
        TRANSITION_IMPORTING,
        COUNT_ATTEMPT_ONLY,
        INSERT_IMPORT,
        MOVE_TO_IMPORTING,
        FIX_IMPORT_COUNT,
        DROP_EXPIRED_SLOTS,
        BUSY_SLOTS,
        INSERT_SLOT,
        RELEASE_SLOT,
        CLAIM_DUE_IMPORTS,
        IMPORTING_JOBS,
        RECORD_POLL,
        FINISH_IMPORT,
        NEXT_POLL_DUE,
        RECOVER_JOBS,
        RECOVER_IMPORTS,
        RECOVER_SLOTS,
        RECLAIM_JOBS,
        RECLAIM_IMPORTS,
        RECLAIM_SLOTS,
        RENEW_JOB,
        RENEW_IMPORT,
        RENEW_SLOT,
        RELEASE_EARLIER_JOBS,
        RELEASE_EARLIER_IMPORTS,
        RELEASE_EARLIER_SLOTS,
        EXPIRE_JOBS,
        GET_JOB,
        GET_IMPORT,
        COUNT_JOBS,
        COUNT_IMPORTS,
        RETRY_JOB,
        JOB_STATE,
        REDRIVE,
        SWEEP_JOBS,
        SWEEP_IMPORTS,
        PING,
    ];
    crate::common::assert_state_words(&all, &[]);
    // The schema quotes the empty string and `unixepoch`'s modifier too.
    crate::common::assert_state_words(super::schema::MIGRATIONS, &["", "subsec"]);
}
