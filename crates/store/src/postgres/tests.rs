//! Plans of the hot statements: the claim and the due-import claim must
//! walk their partial indexes in order (no sort, no scan of finished rows),
//! both as custom plans and as the generic plans prepared statements
//! settle on. Also: the state words the statements quote are contract words.

use std::time::Duration;

use batchrouter_core::store::{ImportToCreate, JobTransition, Transition, UploadCommit};
use batchrouter_core::{JobStore, Timestamp};
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::postgres::TestDatabase;
use sqlx::{AssertSqlSafe, Row};

use super::{percent_decode, sql, PostgresStore, Secrets};

const SEC: Duration = Duration::from_secs(1);

/// A backlog of 6,000 due jobs per destination behind 18,000 settled ones,
/// and 30,000 finished imports beside 5 in flight.
async fn busy_store(db: &TestDatabase) -> PostgresStore {
    let s = PostgresStore::open(db.url()).await.unwrap();
    let now = Timestamp::now();
    for dest in ["d", "e", "f"] {
        for _ in 0..2 {
            s.insert_jobs(numbered_jobs(dest, dest, 6_000), now)
                .await
                .unwrap();
        }
    }
    for dest in ["d", "e", "f"] {
        let held = s
            .claim_jobs(dest, "A", 6_000, now, now + 60 * SEC)
            .await
            .unwrap();
        let ids: Vec<i64> = held.iter().map(|j| j.id).collect();
        let (imported, done) = ids.split_at(if dest == "d" { 300 } else { 0 });
        let (done, _executing) = done.split_at(done.len() - 100);
        let commit = UploadCommit {
            destination_id: dest.into(),
            owner: "A".into(),
            now,
            attempted: ids.clone(),
            imports: imported
                .chunks(60)
                .map(|c| ImportToCreate {
                    batch_id: "b".into(),
                    context: serde_json::json!({"n": c.len()}),
                    job_ids: c.to_vec(),
                    next_poll_at: now,
                    deadline_at: now + 3600 * SEC,
                })
                .collect(),
            transitions: done
                .iter()
                .map(|&job_id| JobTransition {
                    job_id,
                    to: Transition::Succeeded {
                        note: None,
                        external_id: None,
                    },
                })
                .collect(),
            slot: None,
            import_lease_until: now + 60 * SEC,
        };
        s.commit_upload(commit).await.unwrap();
    }
    // A week of finished imports kept by the retention window.
    sqlx::query(
        "INSERT INTO imports (destination_id, batch_id, context, state, job_count, next_poll_at, deadline_at, \
             started_at, updated_at, completed_at) \
         SELECT (ARRAY['d','e','f'])[1 + g % 3], 'old', '{}', 'completed', 100, $1, $1, $1, $1, $1 \
         FROM generate_series(1, 30000) AS g",
    )
    .bind(now.0 - 86_400_000)
    .execute(s.pool())
    .await
    .unwrap();
    for table in ["VACUUM ANALYZE jobs", "VACUUM ANALYZE imports"] {
        sqlx::raw_sql(AssertSqlSafe(table))
            .execute(s.pool())
            .await
            .unwrap();
    }
    s
}

async fn plan(
    s: &PostgresStore,
    name: &str,
    types: &str,
    statement: &str,
    args: &str,
    generic: bool,
) -> String {
    let mut conn = s.pool().acquire().await.unwrap();
    let mode = if generic {
        "force_generic_plan"
    } else {
        "force_custom_plan"
    };
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET plan_cache_mode = {mode}; PREPARE {name} ({types}) AS {statement}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "EXPLAIN (COSTS OFF) EXECUTE {name} ({args})"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DEALLOCATE {name}; RESET plan_cache_mode"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_walk_their_partial_indexes_in_order() {
    let Some(db) = TestDatabase::create("claim_plans").await else {
        return;
    };
    let s = busy_store(&db).await;
    let now = Timestamp::now().0;
    for generic in [false, true] {
        let claim = plan(
            &s,
            "claim",
            "text, bigint, text, bigint, bigint",
            sql::CLAIM_JOBS,
            &format!("'B', {}, 'd', {now}, 1000", now + 60_000),
            generic,
        )
        .await;
        println!(
            "claim_jobs ({}):\n{claim}\n",
            if generic { "generic" } else { "custom" }
        );
        assert!(
            claim.contains("Index Scan using jobs_due on jobs"),
            "{claim}"
        );
        assert!(claim.contains("LockRows"), "{claim}");
        assert!(!claim.contains("Sort"), "the index gives id order: {claim}");
        assert!(!claim.contains("Seq Scan"), "{claim}");
        assert!(
            claim.contains("Index Scan using jobs_pkey on jobs j"),
            "{claim}"
        );

        let imports = plan(
            &s,
            "due_imports",
            "text, bigint, text, bigint, bigint",
            sql::CLAIM_DUE_IMPORTS,
            &format!("'B', {}, 'd', {now}, 32", now + 60_000),
            generic,
        )
        .await;
        println!(
            "claim_due_imports ({}):\n{imports}\n",
            if generic { "generic" } else { "custom" }
        );
        assert!(imports.contains("imports_in_flight"), "{imports}");
        assert!(!imports.contains("Sort"), "{imports}");
    }
    let importing = plan(&s, "importing", "bigint", sql::IMPORTING_JOBS, "3", true).await;
    println!("importing_jobs (generic):\n{importing}\n");
    assert!(importing.contains("jobs_importing"), "{importing}");
    let next = plan(&s, "next_poll", "text", sql::NEXT_POLL_DUE, "'d'", true).await;
    println!("next_poll_due (generic):\n{next}\n");
    assert!(next.contains("imports_in_flight"), "{next}");
    let counts = plan(
        &s,
        "counts",
        "int",
        &format!("{} LIMIT $1", sql::COUNT_JOBS),
        "100",
        true,
    )
    .await;
    println!("destination_counts (generic):\n{counts}\n");
    assert!(
        counts.contains("Index Only Scan using jobs_settled"),
        "{counts}"
    );
    let reclaim = plan(
        &s,
        "reclaim",
        "bigint",
        sql::RECLAIM_JOBS,
        &now.to_string(),
        true,
    )
    .await;
    println!("reclaim_expired (generic):\n{reclaim}\n");
    assert!(reclaim.contains("jobs_leases"), "{reclaim}");
    let ten_k = format!(
        "'{{{}}}'::bigint[]",
        (1..=10_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    for generic in [false, true] {
        let args = format!(
            "'A', {now}, {ten_k}, array_fill('succeeded'::text, ARRAY[10000]), array_fill(NULL::text, ARRAY[10000]), \
             array_fill(NULL::text, ARRAY[10000]), array_fill(NULL::text, ARRAY[10000]), array_fill(NULL::text, ARRAY[10000]), \
             array_fill(NULL::bigint, ARRAY[10000]), array_fill({now}::bigint, ARRAY[10000]), array_fill(1, ARRAY[10000])"
        );
        let types = "text, bigint, bigint[], text[], text[], text[], text[], text[], bigint[], bigint[], int[]";
        let bulk = plan(
            &s,
            "transition",
            types,
            sql::TRANSITION_EXECUTING,
            &args,
            generic,
        )
        .await;
        println!(
            "transition_executing, 10,000 jobs ({}):\n{bulk}\n",
            if generic { "generic" } else { "custom" }
        );
        // Either pkey probes or a walk of the claimed jobs only: never the table.
        assert!(
            bulk.contains("jobs_pkey") || bulk.contains("jobs_leases"),
            "{bulk}"
        );
        assert!(!bulk.contains("Seq Scan on jobs"), "{bulk}");
    }
    let sweep = plan(
        &s,
        "sweep",
        "bigint, bigint",
        sql::SWEEP_JOBS,
        &format!("{now}, 10000"),
        true,
    )
    .await;
    println!("sweep_terminal (generic):\n{sweep}\n");
    assert!(
        sweep.contains("LockRows") && sweep.contains("Limit"),
        "{sweep}"
    );
}

#[test]
fn passwords_are_scrubbed_as_written_and_decoded() {
    let s = Secrets::new("postgres://u:p%40ss%2Fw0rd@h:5432/db?sslmode=require");
    assert_eq!(s.redacted_url, "postgres://u:***@h:5432/db?sslmode=***");
    assert_eq!(
        s.scrub("bad p%40ss%2Fw0rd or p@ss/w0rd".into()),
        "bad *** or ***"
    );
    let q = Secrets::new("postgres://u@h/db?sslmode=disable&password=qu3ry");
    assert_eq!(q.scrub("auth qu3ry failed".into()), "auth *** failed");
    let none = Secrets::new("postgres://u@h/db");
    assert_eq!(none.scrub("nothing to hide".into()), "nothing to hide");
    assert_eq!(percent_decode("a%41%zz%4"), "aA%zz%4");
}

#[test]
fn quoted_state_words_are_the_contract_words() {
    use super::sql::*;
    let all = [
        NEXT_JOB_IDS,
        INSERT_JOBS,
        EXISTING_BY_MESSAGE_ID,
        CLAIM_JOBS,
        EXTEND_JOB_LEASES,
        RELEASE_JOBS,
        TRANSITION_EXECUTING,
        TRANSITION_IMPORTING,
        COUNT_ATTEMPT_ONLY,
        INSERT_IMPORTS,
        MOVE_TO_IMPORTING,
        FIX_IMPORT_COUNTS,
        ENSURE_DESTINATION,
        LOCK_DESTINATION,
        TAKE_SLOT,
        RELEASE_SLOT,
        CLAIM_DUE_IMPORTS,
        IMPORTING_JOBS,
        RECORD_POLL,
        FINISH_IMPORT,
        NEXT_POLL_DUE,
        RECLAIM_JOBS,
        RECLAIM_IMPORTS,
        RECLAIM_SLOTS,
        GET_JOB,
        GET_IMPORT,
        COUNT_JOBS,
        COUNT_IMPORTS,
        RETRY_JOB,
        REDRIVE,
        SWEEP_JOBS,
        SWEEP_IMPORTS,
        PING,
        RENEW_LEASES,
        RELEASE_EARLIER_RUNS,
        EXPIRE_JOBS,
    ];
    // Besides states: the id sequence and LIKE's escape character.
    crate::common::assert_state_words(&all, &["jobs_id_seq", "\\"]);
    crate::common::assert_state_words(super::schema::MIGRATIONS, &[""]);
}
