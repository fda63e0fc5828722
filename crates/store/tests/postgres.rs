//! The store conformance suite against PostgreSQL (a throwaway cluster, or
//! `BATCHROUTER_TEST_POSTGRES_URL`), plus what only a shared store must do:
//! concurrent claimers, concurrent migrations, cluster-wide slots, fencing
//! between daemons, waiting for lease expiry, direct upstream inserts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod conformance;

use std::sync::Arc;

use batchrouter_store::PostgresStore;
use batchrouter_testkit::postgres::TestDatabase;

async fn postgres(name: &str) -> Option<(conformance::Store, TestDatabase)> {
    let db = TestDatabase::create(name).await?;
    let store = PostgresStore::open(db.url()).await.unwrap();
    Some((Arc::new(store), db))
}

conformance_tests!(postgres);

use std::collections::HashSet;
use std::time::{Duration, Instant};

use batchrouter_core::store::{
    ImportFinish, ImportState, ImportToCreate, JobTransition, PollUpdate, Transition, UploadCommit,
};
use batchrouter_core::{JobState, JobStore, NewJob, StoreError, Timestamp};
use batchrouter_testkit::jobs::numbered_jobs;
use sqlx::Row;

const SEC: Duration = Duration::from_secs(1);

/// A fresh database and `n` stores on it, each with its own pool: `n` daemons.
async fn daemons(test: &str, n: usize) -> Option<(Vec<Arc<PostgresStore>>, TestDatabase)> {
    let db = TestDatabase::create(test).await?;
    let mut stores = Vec::new();
    for _ in 0..n {
        stores.push(Arc::new(PostgresStore::open(db.url()).await.unwrap()));
    }
    Some((stores, db))
}

fn succeed_all(dest: &str, owner: &str, ids: &[i64], now: Timestamp) -> UploadCommit {
    UploadCommit {
        destination_id: dest.into(),
        owner: owner.into(),
        now,
        attempted: ids.to_vec(),
        imports: vec![],
        transitions: ids
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
        import_lease_until: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_daemons_never_claim_the_same_job() {
    let Some((stores, _db)) = daemons("competing_daemons", 3).await else {
        return;
    };
    const JOBS: usize = 6_000;
    let now = Timestamp::now();
    let ins = stores[0]
        .insert_jobs(numbered_jobs("d", "c", JOBS), now)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for worker in 0..9 {
        let store = stores[worker % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{worker}");
            let mut mine = Vec::new();
            loop {
                let now = Timestamp::now();
                let jobs = store
                    .claim_jobs("d", &owner, 37 + worker, now, now + 60 * SEC)
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    break;
                }
                let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
                let r = store
                    .commit_upload(succeed_all("d", &owner, &ids, now))
                    .await
                    .unwrap();
                assert_eq!(
                    (r.applied, r.rejected.len()),
                    (ids.len(), 0),
                    "{owner} owns what it claimed"
                );
                mine.extend(ids);
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    let mut per_worker = Vec::new();
    for t in tasks {
        let ids = t.await.unwrap();
        per_worker.push(ids.len());
        for id in ids {
            assert!(seen.insert(id), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), JOBS, "every job claimed exactly once");
    assert!(ins.iter().all(|i| seen.contains(&i.job_id)));
    assert!(
        per_worker.iter().filter(|&&n| n > 0).count() > 1,
        "work was shared: {per_worker:?}"
    );
    let counts = stores[0].destination_counts().await.unwrap();
    assert_eq!(counts["d"].by_state[&JobState::Succeeded], JOBS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_rows_another_transaction_holds_instead_of_waiting() {
    let Some((stores, _db)) = daemons("claim_skips_locked", 1).await else {
        return;
    };
    let s = &stores[0];
    let now = Timestamp::now();
    let ins = s
        .insert_jobs(numbered_jobs("d", "l", 10), now)
        .await
        .unwrap();
    // Another daemon's claim in progress: its transaction holds the first 4 rows.
    let mut other = s.pool().begin().await.unwrap();
    let locked: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE destination_id = 'd' ORDER BY id LIMIT 4 FOR UPDATE",
    )
    .fetch_all(&mut *other)
    .await
    .unwrap();
    assert_eq!(locked.len(), 4);
    let started = Instant::now();
    let claimed = tokio::time::timeout(5 * SEC, s.claim_jobs("d", "B", 3, now, now + 60 * SEC))
        .await
        .expect("a claim never waits for another claim's locks")
        .unwrap();
    assert!(started.elapsed() < 2 * SEC);
    let ids: Vec<i64> = claimed.iter().map(|j| j.id).collect();
    assert_eq!(
        ids,
        ins[4..7].iter().map(|i| i.job_id).collect::<Vec<_>>(),
        "next due jobs in id order"
    );
    other.rollback().await.unwrap();
    let rest = s
        .claim_jobs("d", "C", 100, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        rest.len(),
        7,
        "the rows the other transaction released are claimable again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_starting_together_migrate_once() {
    let Some(db) = TestDatabase::create("migrate_together").await else {
        return;
    };
    let opens = (0..6).map(|_| {
        let url = db.url().to_string();
        tokio::spawn(async move { PostgresStore::open(&url).await })
    });
    let stores: Vec<PostgresStore> = futures_join(opens).await;
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM batchrouter_schema_migrations ORDER BY version")
            .fetch_all(stores[0].pool())
            .await
            .unwrap();
    let expected: Vec<i32> = (1..=batchrouter_store::postgres::MIGRATIONS.len() as i32).collect();
    assert_eq!(versions, expected);
    stores[5].ping().await.unwrap();
}

async fn futures_join(
    handles: impl Iterator<Item = tokio::task::JoinHandle<Result<PostgresStore, StoreError>>>,
) -> Vec<PostgresStore> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap().expect("every concurrent open succeeds"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let Some((stores, db)) = daemons("newer_schema", 1).await else {
        return;
    };
    sqlx::query("INSERT INTO batchrouter_schema_migrations (version) VALUES (999)")
        .execute(stores[0].pool())
        .await
        .unwrap();
    let err = PostgresStore::open(db.url()).await.unwrap_err().to_string();
    assert!(err.contains("newer than this batchrouterd"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_daemon_waits_for_leases_to_expire() {
    let Some((stores, _db)) = daemons("recover_waits", 2).await else {
        return;
    };
    let (a, b) = (&stores[0], &stores[1]);
    let now = Timestamp::now();
    s_insert(a, "d", 4, now).await;
    let held = a
        .claim_jobs("d", "A", 4, now, now + 60 * SEC)
        .await
        .unwrap();
    let slot = a
        .acquire_upload_slot("d", "A", 1, now, now + 60 * SEC)
        .await
        .unwrap();
    assert!(slot.is_some());
    let r = b.recover(now + SEC).await.unwrap();
    assert_eq!(
        (r.jobs_released, r.slots_released),
        (0, 0),
        "a live daemon's work is not taken at another's start"
    );
    assert_eq!(
        a.extend_job_leases(
            "A",
            &held.iter().map(|j| j.id).collect::<Vec<_>>(),
            now + 90 * SEC
        )
        .await
        .unwrap(),
        4
    );
    let r = b.recover(now + 61 * SEC).await.unwrap();
    assert_eq!(
        (r.jobs_released, r.slots_released),
        (0, 1),
        "renewed jobs stay; the stale slot goes"
    );
    let r = b.recover(now + 91 * SEC).await.unwrap();
    assert_eq!(r.jobs_released, 4, "after expiry the work comes back");
    assert_eq!(
        b.claim_jobs("d", "B", 10, now + 91 * SEC, now + 200 * SEC)
            .await
            .unwrap()
            .len(),
        4
    );
}

async fn s_insert(s: &PostgresStore, dest: &str, n: usize, now: Timestamp) -> Vec<i64> {
    s.insert_jobs(numbered_jobs(dest, dest, n), now)
        .await
        .unwrap()
        .iter()
        .map(|i| i.job_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_daemon_cannot_overwrite_the_new_owners_work() {
    let Some((stores, _db)) = daemons("stale_daemon", 2).await else {
        return;
    };
    let (a, b) = (&stores[0], &stores[1]);
    let now = Timestamp::now();
    let ids = s_insert(a, "d", 3, now).await;
    // A claims with a short lease, stalls, and B takes the jobs over.
    assert_eq!(
        a.claim_jobs("d", "A", 3, now, now + 5 * SEC)
            .await
            .unwrap()
            .len(),
        3
    );
    let later = now + 6 * SEC;
    assert_eq!(b.reclaim_expired(later).await.unwrap().jobs_released, 3);
    assert_eq!(
        b.claim_jobs("d", "B", 3, later, later + 60 * SEC)
            .await
            .unwrap()
            .len(),
        3
    );
    let stale = a
        .commit_upload(succeed_all("d", "A", &ids, later))
        .await
        .unwrap();
    assert_eq!(
        (stale.applied, stale.rejected.clone()),
        (0, ids.clone()),
        "A's late outcome is refused"
    );
    assert_eq!(
        a.extend_job_leases("A", &ids, later + 60 * SEC)
            .await
            .unwrap(),
        0
    );
    assert_eq!(a.release_jobs("A", &ids, later).await.unwrap(), 0);
    let mine = b
        .commit_upload(UploadCommit {
            imports: vec![ImportToCreate {
                batch_id: "b".into(),
                context: serde_json::json!({"remote": "r-1"}),
                job_ids: ids.clone(),
                next_poll_at: later,
                deadline_at: later + 3600 * SEC,
            }],
            transitions: vec![],
            ..succeed_all("d", "B", &ids, later)
        })
        .await
        .unwrap();
    assert_eq!(mine.applied, 3);
    let import_id = mine.import_ids[0];
    for id in &ids {
        let j = b.get_job(*id).await.unwrap().unwrap();
        assert_eq!(
            (j.state, j.attempts),
            (JobState::Importing, 1),
            "A's attempt was never counted"
        );
    }

    // The import lease moves the same way: B polls, stalls; A takes over.
    assert_eq!(
        b.claim_due_imports("d", "B", 10, later, later + 5 * SEC)
            .await
            .unwrap()
            .len(),
        1
    );
    let t2 = later + 6 * SEC;
    assert!(
        a.claim_due_imports("d", "A", 10, later + SEC, t2)
            .await
            .unwrap()
            .is_empty(),
        "B's lease holds"
    );
    assert_eq!(a.reclaim_expired(t2).await.unwrap().imports_released, 1);
    assert_eq!(
        a.claim_due_imports("d", "A", 10, t2, t2 + 60 * SEC)
            .await
            .unwrap()
            .len(),
        1
    );
    let poll = |owner: &str| PollUpdate {
        import_id,
        owner: owner.into(),
        state: ImportState::Processing,
        progress: Some(50),
        poll_error: None,
        next_poll_at: t2,
        lease_until: t2 + 60 * SEC,
        now: t2,
    };
    assert!(
        !b.record_poll(poll("B")).await.unwrap(),
        "B's late poll is refused"
    );
    let finish = |owner: &str| ImportFinish {
        import_id,
        owner: owner.into(),
        state: ImportState::Completed,
        error: None,
        transitions: ids
            .iter()
            .map(|&job_id| JobTransition {
                job_id,
                to: Transition::Succeeded {
                    note: None,
                    external_id: None,
                },
            })
            .collect(),
        now: t2,
    };
    let late = b.finish_import(finish("B")).await.unwrap();
    assert_eq!((late.applied, late.rejected.len()), (0, 3));
    assert_eq!(a.finish_import(finish("A")).await.unwrap().applied, 3);
    let imp = a.get_import(import_id).await.unwrap().unwrap();
    assert_eq!((imp.state, imp.succeeded), (ImportState::Completed, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slots_hold_across_daemons_under_contention() {
    let Some((stores, _db)) = daemons("slots_contention", 3).await else {
        return;
    };
    for round in 0..5u32 {
        let now = Timestamp::now() + round * 100 * SEC;
        let dest = format!("d{round}");
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let store = stores[i % 3].clone();
                let dest = dest.clone();
                tokio::spawn(async move {
                    store
                        .acquire_upload_slot(&dest, &format!("o{i}"), 2, now, now + 60 * SEC)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            granted += usize::from(t.await.unwrap().is_some());
        }
        assert_eq!(
            granted, 2,
            "round {round}: exactly maxConcurrentImports slots across every daemon"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_may_insert_jobs_with_plain_sql() {
    let Some((stores, _db)) = daemons("upstream_sql", 1).await else {
        return;
    };
    let s = &stores[0];
    let before = Timestamp::now();
    sqlx::query("INSERT INTO jobs (destination_id, payload) VALUES ('up', '{\"id\": 1}')")
        .execute(s.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO jobs (destination_id, payload, message_id) VALUES ('up', '{\"id\": 2}', 'm-2')")
        .execute(s.pool())
        .await
        .unwrap();
    let dup = sqlx::query(
        "INSERT INTO jobs (destination_id, payload, message_id) VALUES ('up', '{}', 'm-2')",
    )
    .execute(s.pool())
    .await
    .unwrap_err();
    assert!(dup.to_string().contains("jobs_message_id"), "{dup}");
    let forced =
        sqlx::query("INSERT INTO jobs (id, destination_id, payload) VALUES (1, 'up', '{}')")
            .execute(s.pool())
            .await
            .unwrap_err();
    assert!(
        forced.to_string().contains("non-DEFAULT value"),
        "ids come from the sequence only: {forced}"
    );
    let api = s
        .insert_jobs(
            vec![NewJob {
                destination_id: "up".into(),
                payload: "{}".into(),
                message_id: Some("m-2".into()),
            }],
            Timestamp::now(),
        )
        .await
        .unwrap();
    assert!(api[0].duplicate, "the API sees the row upstream inserted");
    let claimed = s
        .claim_jobs("up", "A", 10, Timestamp::now(), Timestamp::now() + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        claimed[0].payload, "{\"id\": 1}",
        "payload kept byte for byte"
    );
    assert_eq!(claimed[1].id, api[0].job_id);
    let after = Timestamp::now();
    for j in &claimed {
        assert!(
            j.created_at >= before - SEC && j.created_at <= after + SEC,
            "created_at defaults to now()"
        );
        assert_eq!((j.attempts, j.retry_base, j.first_attempt_at), (0, 0, None));
    }
    let rec = s.get_job(claimed[0].id).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Executing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_skips_rows_someone_holds_instead_of_waiting() {
    let Some((stores, _db)) = daemons("sweep_skips", 1).await else {
        return;
    };
    let s = &stores[0];
    let old = Timestamp::now() - 30 * 86400 * SEC;
    let ids = s_insert(s, "d", 6, old).await;
    s.claim_jobs("d", "A", 6, old, old + 60 * SEC)
        .await
        .unwrap();
    s.commit_upload(succeed_all("d", "A", &ids, old))
        .await
        .unwrap();
    let mut holder = s.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(ids[0])
        .execute(&mut *holder)
        .await
        .unwrap();
    let deleted = tokio::time::timeout(5 * SEC, s.sweep_terminal(Timestamp::now(), 100))
        .await
        .expect("the sweep never waits on a locked row")
        .unwrap();
    assert_eq!(deleted, 5);
    holder.rollback().await.unwrap();
    assert_eq!(
        s.sweep_terminal(Timestamp::now(), 100).await.unwrap(),
        1,
        "picked up by the next sweep"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_postgres_cannot_store_is_refused_whole() {
    let Some((stores, _db)) = daemons("nul_payload", 1).await else {
        return;
    };
    let s = &stores[0];
    let mut batch = numbered_jobs("d", "n", 3);
    batch[1].payload = "{\"a\":\"\0\"}".into();
    let err = s.insert_jobs(batch, Timestamp::now()).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("job #1"), "{err}");
    assert!(
        s.destination_counts().await.unwrap().is_empty(),
        "all or nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_errors_or_debug_output() {
    let err = PostgresStore::open_with(
        "postgres://batch:hunter2%21secret@127.0.0.1:1/jobs",
        batchrouter_store::PostgresOptions {
            acquire_timeout: 3 * SEC,
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("batch:***@127.0.0.1:1/jobs"), "{err}");
    let bad = PostgresStore::open("postgres://u:pw-in-bad-url@[::1/db")
        .await
        .unwrap_err()
        .to_string();
    assert!(!bad.contains("pw-in-bad-url"), "{bad}");

    let Some(db) = TestDatabase::create("password_debug").await else {
        return;
    };
    // The harness's own cluster trusts local connections and ignores a
    // password, so one is added; a server given by URL has its own.
    let (scheme, rest) = db.url().split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').unwrap();
    let (url, password) = match userinfo.split_once(':') {
        Some((_, pw)) => (db.url().to_string(), pw.to_string()),
        None => (
            format!("{scheme}://{userinfo}:t0ps3cret@{host}"),
            "t0ps3cret".to_string(),
        ),
    };
    let user = userinfo.split(':').next().unwrap();
    // A server that checks passwords refuses a wrong one without echoing it.
    let wrong = format!("{scheme}://{user}:wr0ng-pw-77@{host}");
    if let Err(e) = PostgresStore::open(&wrong).await {
        let e = e.to_string();
        assert!(
            !e.contains("wr0ng-pw-77") && e.contains(&format!("{user}:***@")),
            "{e}"
        );
    }
    let store = batchrouter_store::open(&url).await.unwrap();
    store.ping().await.unwrap();
    let s = PostgresStore::open(&url).await.unwrap();
    let debug = format!("{s:?}");
    assert!(
        !debug.contains(&password) && debug.contains(&format!("{user}:***@")),
        "{debug}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_url_picks_postgres() {
    let Some(db) = TestDatabase::create("open_by_url").await else {
        return;
    };
    let store = batchrouter_store::open(db.url()).await.unwrap();
    let now = Timestamp::now();
    store
        .insert_jobs(numbered_jobs("d", "u", 2), now)
        .await
        .unwrap();
    let check = PostgresStore::open(db.url()).await.unwrap();
    let n: i64 = sqlx::query("SELECT count(*) FROM jobs")
        .fetch_one(check.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the jobs went to PostgreSQL");
}
