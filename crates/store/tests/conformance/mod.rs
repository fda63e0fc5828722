//! One conformance suite for every `JobStore` backend. Each backend's test
//! file calls `conformance_tests!` with a factory that makes a fresh store.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::store::{
    ImportFinish, ImportState, ImportToCreate, JobTransition, LeaseRenewal, PollUpdate,
    RecoveryReport, RenewReport, RetryResult, Transition, UploadCommit,
};
use batchrouter_core::{ErrorCode, JobError, JobState, JobStore, NewJob, StoreError, Timestamp};
use serde_json::json;

pub type Store = Arc<dyn JobStore>;

const SEC: Duration = Duration::from_secs(1);

fn job(dest: &str, i: usize, message_id: Option<&str>) -> NewJob {
    NewJob {
        destination_id: dest.into(),
        payload: json!({"id": i}).to_string(),
        message_id: message_id.map(String::from),
    }
}

fn jobs(dest: &str, n: usize) -> Vec<NewJob> {
    (0..n).map(|i| job(dest, i, None)).collect()
}

async fn state_of(s: &Store, id: i64) -> JobState {
    s.get_job(id).await.unwrap().expect("job exists").state
}

fn succeeded() -> Transition {
    Transition::Succeeded {
        note: None,
        external_id: None,
    }
}

fn commit(dest: &str, owner: &str, now: Timestamp) -> UploadCommit {
    UploadCommit {
        destination_id: dest.into(),
        owner: owner.into(),
        now,
        attempted: vec![],
        imports: vec![],
        transitions: vec![],
        slot: None,
        import_lease_until: now + 60 * SEC,
    }
}

pub async fn insert_and_read_back(s: Store) {
    let now = Timestamp::now();
    let ins = s.insert_jobs(jobs("d1", 3), now).await.unwrap();
    assert_eq!(ins.len(), 3);
    assert!(
        ins.windows(2).all(|w| w[0].job_id < w[1].job_id),
        "ids increase"
    );
    assert!(ins.iter().all(|i| !i.duplicate));
    let rec = s.get_job(ins[0].job_id).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Waiting);
    assert_eq!(rec.attempts, 0);
    assert_eq!(rec.destination_id, "d1");
    assert_eq!(rec.created_at, now);
    assert!(rec.error.is_none() && rec.completed_at.is_none());
    assert!(s.get_job(ins[2].job_id + 1000).await.unwrap().is_none());
}

pub async fn message_ids_are_idempotent_per_destination(s: Store) {
    let now = Timestamp::now();
    let first = s
        .insert_jobs(
            vec![job("d1", 0, Some("m-1")), job("d1", 1, Some("m-1"))],
            now,
        )
        .await
        .unwrap();
    assert!(!first[0].duplicate);
    assert!(
        first[1].duplicate,
        "a repeat inside one request is a duplicate"
    );
    assert_eq!(first[0].job_id, first[1].job_id);
    let again = s
        .insert_jobs(vec![job("d1", 2, Some("m-1"))], now)
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].job_id, first[0].job_id);
    let other = s
        .insert_jobs(vec![job("d2", 3, Some("m-1"))], now)
        .await
        .unwrap();
    assert!(
        !other[0].duplicate,
        "the same id on another destination is a new job"
    );
    assert_ne!(other[0].job_id, first[0].job_id);
    let counts = s.destination_counts().await.unwrap();
    assert_eq!(counts["d1"].by_state[&JobState::Waiting], 1);
}

pub async fn insert_is_all_or_nothing(s: Store) {
    let now = Timestamp::now();
    let bad = vec![job("d1", 0, None), job("", 1, None)];
    assert!(s.insert_jobs(bad, now).await.is_err());
    assert!(
        s.destination_counts().await.unwrap().is_empty(),
        "nothing stored"
    );
}

/// Every backend refuses what `NewJob::validate` refuses, naming the job
/// and the problem, and stores nothing of that request.
pub async fn invalid_jobs_are_refused_by_name_and_nothing_is_stored(s: Store) {
    let now = Timestamp::now();
    let deep = format!(
        "{}1{}",
        "{\"a\":".repeat(batchrouter_core::MAX_PAYLOAD_DEPTH + 1),
        "}".repeat(batchrouter_core::MAX_PAYLOAD_DEPTH + 1)
    );
    let long_id = "m".repeat(batchrouter_core::MAX_MESSAGE_ID_CHARS + 1);
    let cases: [(NewJob, &str); 4] = [
        (
            job("d1", 1, Some("a\0b")),
            "messageId contains a NUL character",
        ),
        (
            NewJob {
                destination_id: "d1".into(),
                payload: deep,
                message_id: None,
            },
            "deeper than 64 levels",
        ),
        (job("d1", 1, Some(&long_id)), "messageId must be 1 to 256"),
        (job("", 1, None), "destinationId must not be empty"),
    ];
    for (bad, problem) in cases {
        let request = vec![job("d1", 0, Some("fine")), bad];
        let err = s.insert_jobs(request, now).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("job #1"), "names the job: {text}");
        assert!(text.contains(problem), "names the problem: {text}");
        assert!(
            s.destination_counts().await.unwrap().is_empty(),
            "nothing stored after: {text}"
        );
    }
    // 256 emoji are 256 characters (1,024 bytes): within the documented limit.
    let emoji = "\u{1F600}".repeat(batchrouter_core::MAX_MESSAGE_ID_CHARS);
    let ins = s
        .insert_jobs(vec![job("d1", 0, Some(&emoji))], now)
        .await
        .unwrap();
    let rec = s.get_job(ins[0].job_id).await.unwrap().unwrap();
    assert_eq!(rec.message_id.as_deref(), Some(emoji.as_str()));
}

pub async fn claims_due_jobs_in_id_order_under_a_lease(s: Store) {
    let now = Timestamp::now();
    let ins = s.insert_jobs(jobs("d1", 10), now).await.unwrap();
    s.insert_jobs(jobs("other", 5), now).await.unwrap();
    let a = s
        .claim_jobs("d1", "A", 4, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        a.iter().map(|j| j.id).collect::<Vec<_>>(),
        ins[..4].iter().map(|i| i.job_id).collect::<Vec<_>>()
    );
    assert!(a
        .iter()
        .all(|j| j.destination_id == "d1" && j.attempts == 0));
    let b = s
        .claim_jobs("d1", "B", 100, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(b.len(), 6, "B gets the rest, never A's");
    assert!(b.iter().all(|j| !a.iter().any(|x| x.id == j.id)));
    assert!(s
        .claim_jobs("d1", "C", 100, now, now + 60 * SEC)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(state_of(&s, a[0].id).await, JobState::Executing);
}

pub async fn failed_jobs_wait_for_their_backoff(s: Store) {
    let now = Timestamp::now();
    let ins = s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let claimed = s
        .claim_jobs("d1", "A", 10, now, now + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d1", "A", now);
    c.attempted = claimed.iter().map(|j| j.id).collect();
    c.transitions = vec![
        JobTransition {
            job_id: ins[0].job_id,
            to: Transition::Failed {
                error: JobError::new(ErrorCode::DestinationUnavailable, "503"),
                next_attempt_at: now + 30 * SEC,
            },
        },
        JobTransition {
            job_id: ins[1].job_id,
            to: Transition::Failed {
                error: JobError::new(ErrorCode::DestinationUnavailable, "503"),
                next_attempt_at: now,
            },
        },
    ];
    let r = s.commit_upload(c).await.unwrap();
    assert_eq!(r.applied, 2);
    let rec = s.get_job(ins[0].job_id).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.next_attempt_at, Some(now + 30 * SEC));
    assert_eq!(rec.error.unwrap().code, ErrorCode::DestinationUnavailable);
    let due = s
        .claim_jobs("d1", "A", 10, now + SEC, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ins[1].job_id]
    );
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].first_attempt_at, Some(now));
    let later = s
        .claim_jobs("d1", "A", 10, now + 31 * SEC, now + 90 * SEC)
        .await
        .unwrap();
    assert_eq!(
        later.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ins[0].job_id]
    );
}

pub async fn claims_ten_thousand_in_one_call(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("bulk", 10_000), now).await.unwrap();
    let claimed = s
        .claim_jobs("bulk", "A", 10_000, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10_000);
    assert!(claimed.windows(2).all(|w| w[0].id < w[1].id));
    let ids: Vec<_> = claimed.iter().map(|j| j.id).collect();
    let mut c = commit("bulk", "A", now);
    c.attempted = ids.clone();
    c.transitions = ids
        .iter()
        .map(|&job_id| JobTransition {
            job_id,
            to: succeeded(),
        })
        .collect();
    assert_eq!(s.commit_upload(c).await.unwrap().applied, 10_000);
    let counts = s.destination_counts().await.unwrap();
    assert_eq!(counts["bulk"].by_state[&JobState::Succeeded], 10_000);
}

pub async fn upload_commit_creates_imports_and_is_fenced(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 5), now).await.unwrap();
    let claimed = s
        .claim_jobs("d1", "A", 5, now, now + 60 * SEC)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|j| j.id).collect();
    let mut c = commit("d1", "A", now);
    c.attempted = ids.clone();
    c.imports = vec![ImportToCreate {
        batch_id: "b1".into(),
        context: json!({"remote": 42, "keys": {"a@x": ids[0]}}),
        job_ids: ids[..3].to_vec(),
        next_poll_at: now + SEC,
        deadline_at: now + 3600 * SEC,
    }];
    c.transitions = vec![
        JobTransition {
            job_id: ids[3],
            to: Transition::Aborted {
                error: JobError::new(ErrorCode::DestinationRejected, "HTTP 400: bad"),
            },
        },
        JobTransition {
            job_id: ids[4],
            to: Transition::Succeeded {
                note: Some("warned".into()),
                external_id: Some("ext-9".into()),
            },
        },
    ];
    let r = s.commit_upload(c).await.unwrap();
    assert_eq!(r.applied, 5);
    assert!(r.rejected.is_empty());
    assert_eq!(r.import_ids.len(), 1);
    let import_id = r.import_ids[0];
    let imp = s.get_import(import_id).await.unwrap().unwrap();
    assert_eq!(imp.state, ImportState::Pending);
    assert_eq!(imp.job_count, 3);
    assert_eq!(imp.context, json!({"remote": 42, "keys": {"a@x": ids[0]}}));
    let j0 = s.get_job(ids[0]).await.unwrap().unwrap();
    assert_eq!(
        (j0.state, j0.attempts, j0.import_id),
        (JobState::Importing, 1, Some(import_id))
    );
    let j3 = s.get_job(ids[3]).await.unwrap().unwrap();
    assert_eq!(j3.state, JobState::Aborted);
    assert!(j3.completed_at.is_some());
    assert_eq!(j3.error.unwrap().message, "HTTP 400: bad");
    let j4 = s.get_job(ids[4]).await.unwrap().unwrap();
    assert_eq!(
        (j4.note.as_deref(), j4.external_id.as_deref()),
        (Some("warned"), Some("ext-9"))
    );
    let info = s.importing_jobs(import_id).await.unwrap();
    assert_eq!(
        info.iter().map(|i| i.job_id).collect::<Vec<_>>(),
        ids[..3].to_vec()
    );
    assert!(info
        .iter()
        .all(|i| i.attempts == 1 && i.first_attempt_at == Some(now)));
    let counts = s.destination_counts().await.unwrap();
    assert_eq!(counts["d1"].imports_in_flight, 1);

    // A stale owner cannot overwrite anything.
    s.insert_jobs(jobs("d1", 1), now).await.unwrap();
    let mine = s
        .claim_jobs("d1", "B", 1, now, now + 60 * SEC)
        .await
        .unwrap();
    let mut stale = commit("d1", "A", now);
    stale.attempted = vec![mine[0].id];
    stale.transitions = vec![JobTransition {
        job_id: mine[0].id,
        to: succeeded(),
    }];
    let r = s.commit_upload(stale).await.unwrap();
    assert_eq!(r.applied, 0);
    assert_eq!(r.rejected, vec![mine[0].id]);
    let rec = s.get_job(mine[0].id).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (JobState::Executing, 0));
}

async fn one_import(s: &Store, dest: &str, n: usize, now: Timestamp) -> (i64, Vec<i64>) {
    one_import_as(s, dest, n, now, "A").await
}

async fn one_import_as(
    s: &Store,
    dest: &str,
    n: usize,
    now: Timestamp,
    owner: &str,
) -> (i64, Vec<i64>) {
    s.insert_jobs(jobs(dest, n), now).await.unwrap();
    let claimed = s
        .claim_jobs(dest, owner, n, now, now + 60 * SEC)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|j| j.id).collect();
    let mut c = commit(dest, owner, now);
    c.attempted = ids.clone();
    c.imports = vec![ImportToCreate {
        batch_id: "b".into(),
        context: json!({"id": "remote-1"}),
        job_ids: ids.clone(),
        next_poll_at: now + SEC,
        deadline_at: now + 3600 * SEC,
    }];
    let r = s.commit_upload(c).await.unwrap();
    (r.import_ids[0], ids)
}

pub async fn imports_are_polled_under_a_lease_and_finished_atomically(s: Store) {
    let now = Timestamp::now();
    let (import_id, ids) = one_import(&s, "d1", 4, now).await;
    assert!(
        s.claim_due_imports("d1", "A", 10, now, now + 60 * SEC)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    assert_eq!(s.next_poll_due("d1").await.unwrap(), Some(now + SEC));
    let t1 = now + 2 * SEC;
    let due = s
        .claim_due_imports("d1", "A", 10, t1, t1 + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert!(
        s.claim_due_imports("d1", "B", 10, t1, t1 + 60 * SEC)
            .await
            .unwrap()
            .is_empty(),
        "another owner waits for the lease"
    );
    let ok = s
        .record_poll(PollUpdate {
            import_id,
            owner: "A".into(),
            state: ImportState::Processing,
            progress: Some(40),
            poll_error: None,
            next_poll_at: t1 + 5 * SEC,
            lease_until: t1 + 60 * SEC,
            now: t1,
        })
        .await
        .unwrap();
    assert!(ok);
    let imp = s.get_import(import_id).await.unwrap().unwrap();
    assert_eq!(
        (imp.state, imp.progress, imp.poll_errors),
        (ImportState::Processing, 40, 0)
    );
    let stale_poll = s
        .record_poll(PollUpdate {
            import_id,
            owner: "B".into(),
            state: ImportState::Processing,
            progress: Some(99),
            poll_error: Some(JobError::new(ErrorCode::DestinationUnavailable, "503")),
            next_poll_at: t1,
            lease_until: t1,
            now: t1,
        })
        .await
        .unwrap();
    assert!(!stale_poll, "record_poll is fenced on the lease owner");
    // A poll error is remembered but does not fail the import.
    assert!(s
        .record_poll(PollUpdate {
            import_id,
            owner: "A".into(),
            state: ImportState::Processing,
            progress: None,
            poll_error: Some(JobError::new(ErrorCode::DestinationUnavailable, "HTTP 503")),
            next_poll_at: t1 + 5 * SEC,
            lease_until: t1 + 60 * SEC,
            now: t1,
        })
        .await
        .unwrap());
    let imp = s.get_import(import_id).await.unwrap().unwrap();
    assert_eq!(
        (imp.state, imp.progress, imp.poll_errors),
        (ImportState::Processing, 40, 1)
    );
    assert_eq!(imp.error.as_ref().unwrap().message, "HTTP 503");

    let finish = |owner: &str| ImportFinish {
        import_id,
        owner: owner.into(),
        state: ImportState::Partial,
        error: None,
        transitions: vec![
            JobTransition {
                job_id: ids[0],
                to: succeeded(),
            },
            JobTransition {
                job_id: ids[1],
                to: succeeded(),
            },
            JobTransition {
                job_id: ids[2],
                to: Transition::Aborted {
                    error: JobError::new(ErrorCode::RecordRejected, "1004 lead not found"),
                },
            },
            JobTransition {
                job_id: ids[3],
                to: Transition::Failed {
                    error: JobError::new(ErrorCode::ImportFailed, "try again"),
                    next_attempt_at: t1 + 10 * SEC,
                },
            },
        ],
        now: t1,
    };
    let rejected = s.finish_import(finish("B")).await.unwrap();
    assert_eq!(rejected.applied, 0, "a non-owner cannot finish the import");
    assert_eq!(state_of(&s, ids[0]).await, JobState::Importing);
    let r = s.finish_import(finish("A")).await.unwrap();
    assert_eq!(r.applied, 4);
    let imp = s.get_import(import_id).await.unwrap().unwrap();
    assert_eq!(imp.state, ImportState::Partial);
    assert_eq!(
        (imp.succeeded, imp.failed, imp.aborted, imp.progress),
        (2, 1, 1, 100)
    );
    assert!(imp.completed_at.is_some());
    assert_eq!(state_of(&s, ids[2]).await, JobState::Aborted);
    assert_eq!(state_of(&s, ids[3]).await, JobState::Failed);
    assert_eq!(
        s.get_job(ids[0]).await.unwrap().unwrap().import_id,
        Some(import_id)
    );
    assert!(s.importing_jobs(import_id).await.unwrap().is_empty());
    assert_eq!(s.next_poll_due("d1").await.unwrap(), None);
    assert!(
        s.finish_import(finish("A")).await.unwrap().applied == 0,
        "finishing twice changes nothing"
    );
}

pub async fn expired_leases_are_taken_back(s: Store) {
    let now = Timestamp::now();
    let (import_id, _) = one_import(&s, "d1", 2, now).await;
    s.insert_jobs(jobs("d1", 3), now).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 3, now, now + 10 * SEC)
        .await
        .unwrap();
    assert_eq!(held.len(), 3);
    s.claim_due_imports("d1", "A", 10, now + 2 * SEC, now + 10 * SEC)
        .await
        .unwrap();
    let early = s.reclaim_expired(now + 5 * SEC).await.unwrap();
    assert_eq!((early.jobs_released, early.imports_released), (0, 0));
    let late = s.reclaim_expired(now + 11 * SEC).await.unwrap();
    assert_eq!((late.jobs_released, late.imports_released), (3, 1));
    let again = s
        .claim_jobs("d1", "B", 10, now + 11 * SEC, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(again.len(), 3, "a dead owner's jobs come back to others");
    assert!(
        again.iter().all(|j| j.attempts == 0),
        "taking work back costs no attempt"
    );
    let imports = s
        .claim_due_imports("d1", "B", 10, now + 11 * SEC, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        imports.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![import_id]
    );
}

pub async fn release_returns_jobs_without_an_attempt(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let ids: Vec<_> = held.iter().map(|j| j.id).collect();
    assert_eq!(
        s.release_jobs("B", &ids, now).await.unwrap(),
        0,
        "fenced on owner"
    );
    assert_eq!(
        s.extend_job_leases("A", &ids, now + 120 * SEC)
            .await
            .unwrap(),
        2
    );
    assert_eq!(s.release_jobs("A", &ids, now).await.unwrap(), 2);
    let rec = s.get_job(ids[0]).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (JobState::Waiting, 0));
}

pub async fn transform_failures_abort_from_executing(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let t = vec![JobTransition {
        job_id: held[0].id,
        to: Transition::Aborted {
            error: JobError::new(ErrorCode::TransformFailed, "payload is not JSON"),
        },
    }];
    assert_eq!(
        s.transition_executing("B", t.clone(), now)
            .await
            .unwrap()
            .rejected,
        vec![held[0].id]
    );
    assert_eq!(
        s.transition_executing("A", t, now).await.unwrap().applied,
        1
    );
    let rec = s.get_job(held[0].id).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Aborted);
    assert_eq!(rec.attempts, 0, "a transform failure is not an upload");
    assert_eq!(rec.error.unwrap().code, ErrorCode::TransformFailed);
}

pub async fn retry_and_redrive_give_a_fresh_budget(s: Store) {
    let now = Timestamp::now();
    let ins = s.insert_jobs(jobs("d1", 4), now).await.unwrap();
    let ids: Vec<_> = ins.iter().map(|i| i.job_id).collect();
    let held = s
        .claim_jobs("d1", "A", 4, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(held.len(), 4);
    let mut c = commit("d1", "A", now);
    c.attempted = ids.clone();
    let abort = Transition::Aborted {
        error: JobError::new(ErrorCode::RetriesExhausted, "gave up"),
    };
    c.transitions = vec![
        JobTransition {
            job_id: ids[0],
            to: abort.clone(),
        },
        JobTransition {
            job_id: ids[1],
            to: abort.clone(),
        },
        JobTransition {
            job_id: ids[2],
            to: succeeded(),
        },
        JobTransition {
            job_id: ids[3],
            to: Transition::Failed {
                error: JobError::new(ErrorCode::DestinationUnavailable, "503"),
                next_attempt_at: now + 3600 * SEC,
            },
        },
    ];
    s.commit_upload(c).await.unwrap();
    assert_eq!(
        s.retry_job(ids[2], now).await.unwrap(),
        RetryResult::Conflict(JobState::Succeeded)
    );
    assert_eq!(
        s.retry_job(999_999, now).await.unwrap(),
        RetryResult::NotFound
    );
    assert_eq!(
        s.retry_job(ids[0], now).await.unwrap(),
        RetryResult::Retried
    );
    let rec = s.get_job(ids[0]).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempts),
        (JobState::Waiting, 1),
        "history kept"
    );
    assert!(rec.error.is_none() && rec.completed_at.is_none());
    let redriven = s
        .redrive("d1", &[JobState::Aborted, JobState::Failed], now)
        .await
        .unwrap();
    assert_eq!(redriven, 2);
    let claimed = s
        .claim_jobs("d1", "A", 10, now, now + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(claimed
        .iter()
        .all(|j| j.retry_base == 1 && j.attempts == 1 && j.first_attempt_at.is_none()));
    assert_eq!(
        s.redrive("d1", &[JobState::Succeeded], now).await.unwrap(),
        0,
        "only aborted/failed"
    );
}

pub async fn upload_slots_bound_concurrency(s: Store) {
    let now = Timestamp::now();
    let a = s
        .acquire_upload_slot("d1", "A", 2, now, now + 10 * SEC)
        .await
        .unwrap();
    let b = s
        .acquire_upload_slot("d1", "B", 2, now, now + 10 * SEC)
        .await
        .unwrap();
    assert!(a.is_some() && b.is_some());
    assert!(s
        .acquire_upload_slot("d1", "C", 2, now, now + 10 * SEC)
        .await
        .unwrap()
        .is_none());
    assert!(
        s.acquire_upload_slot("d2", "C", 2, now, now + 10 * SEC)
            .await
            .unwrap()
            .is_some(),
        "per destination"
    );
    s.release_upload_slot(a.unwrap()).await.unwrap();
    let c = s
        .acquire_upload_slot("d1", "C", 2, now, now + 10 * SEC)
        .await
        .unwrap();
    assert!(c.is_some());
    // Expired slots (a dead uploader) free themselves.
    assert!(s
        .acquire_upload_slot("d1", "D", 2, now + 11 * SEC, now + 20 * SEC)
        .await
        .unwrap()
        .is_some());
    // Imports in flight hold capacity until they finish.
    let later = now + 30 * SEC;
    let (_import_id, _) = one_import(&s, "d3", 1, later).await;
    assert!(s
        .acquire_upload_slot("d3", "A", 1, later, later + 10 * SEC)
        .await
        .unwrap()
        .is_none());
    assert!(s
        .acquire_upload_slot("d3", "A", 2, later, later + 10 * SEC)
        .await
        .unwrap()
        .is_some());
    // A commit releases the slot it names.
    s.insert_jobs(jobs("d4", 1), later).await.unwrap();
    let slot = s
        .acquire_upload_slot("d4", "A", 1, later, later + 10 * SEC)
        .await
        .unwrap();
    let held = s
        .claim_jobs("d4", "A", 1, later, later + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d4", "A", later);
    c.attempted = vec![held[0].id];
    c.transitions = vec![JobTransition {
        job_id: held[0].id,
        to: succeeded(),
    }];
    c.slot = slot;
    s.commit_upload(c).await.unwrap();
    assert!(s
        .acquire_upload_slot("d4", "A", 1, later, later + 10 * SEC)
        .await
        .unwrap()
        .is_some());
}

pub async fn retention_sweep_deletes_old_terminal_jobs_in_batches(s: Store) {
    let old = Timestamp::now() - 10 * 86400 * SEC;
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 5), old).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 5, old, old + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d1", "A", old);
    c.attempted = held.iter().map(|j| j.id).collect();
    c.transitions = held
        .iter()
        .map(|j| JobTransition {
            job_id: j.id,
            to: succeeded(),
        })
        .collect();
    s.commit_upload(c).await.unwrap();
    let fresh = s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let before = now - 7 * 86400 * SEC;
    assert_eq!(s.sweep_terminal(before, 3).await.unwrap(), 3);
    assert_eq!(s.sweep_terminal(before, 3).await.unwrap(), 2);
    assert_eq!(s.sweep_terminal(before, 3).await.unwrap(), 0);
    assert!(s.get_job(held[0].id).await.unwrap().is_none());
    assert!(
        s.get_job(fresh[0].job_id).await.unwrap().is_some(),
        "waiting jobs are never swept"
    );
}

pub async fn counts_cover_every_state(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 3), now).await.unwrap();
    s.claim_jobs("d1", "A", 1, now, now + 60 * SEC)
        .await
        .unwrap();
    let counts = s.destination_counts().await.unwrap();
    let d1 = &counts["d1"];
    assert_eq!(d1.by_state.len(), JobState::ALL.len());
    assert_eq!(d1.by_state[&JobState::Waiting], 2);
    assert_eq!(d1.by_state[&JobState::Executing], 1);
    assert_eq!(d1.by_state[&JobState::Aborted], 0);
    s.ping().await.unwrap();
}

pub async fn ids_are_never_reused(s: Store) {
    let old = Timestamp::now() - 10 * 86400 * SEC;
    let first = s.insert_jobs(jobs("d1", 3), old).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 3, old, old + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d1", "A", old);
    c.attempted = held.iter().map(|j| j.id).collect();
    c.transitions = held
        .iter()
        .map(|j| JobTransition {
            job_id: j.id,
            to: succeeded(),
        })
        .collect();
    s.commit_upload(c).await.unwrap();
    assert_eq!(s.sweep_terminal(Timestamp::now(), 100).await.unwrap(), 3);
    let again = s
        .insert_jobs(jobs("d1", 1), Timestamp::now())
        .await
        .unwrap();
    let highest = first.iter().map(|i| i.job_id).max().unwrap();
    assert!(
        again[0].job_id > highest,
        "a deleted job's id is never handed out again"
    );
}

pub async fn an_import_counts_only_the_jobs_it_really_took(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 3), now).await.unwrap();
    let mine = s
        .claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let theirs = s
        .claim_jobs("d1", "B", 1, now, now + 60 * SEC)
        .await
        .unwrap();
    let mut ids: Vec<_> = mine.iter().map(|j| j.id).collect();
    ids.push(theirs[0].id);
    let mut c = commit("d1", "A", now);
    c.attempted = ids.clone();
    c.imports = vec![ImportToCreate {
        batch_id: "b".into(),
        context: json!({"n": 3}),
        job_ids: ids.clone(),
        next_poll_at: now,
        deadline_at: now + 3600 * SEC,
    }];
    let r = s.commit_upload(c).await.unwrap();
    assert_eq!((r.applied, r.rejected.clone()), (2, vec![theirs[0].id]));
    let imp = s.get_import(r.import_ids[0]).await.unwrap().unwrap();
    assert_eq!(
        imp.job_count, 2,
        "the job held by B is not part of A's import"
    );
    let b = s.get_job(theirs[0].id).await.unwrap().unwrap();
    assert_eq!(
        (b.state, b.attempts, b.import_id),
        (JobState::Executing, 0, None)
    );
    assert_eq!(s.importing_jobs(imp.id).await.unwrap().len(), 2);
}

pub async fn a_job_named_twice_is_written_once(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let (a, b) = (held[0].id, held[1].id);
    let mut c = commit("d1", "A", now);
    c.attempted = vec![a, b];
    c.imports = vec![ImportToCreate {
        batch_id: "b".into(),
        context: json!({}),
        job_ids: vec![a],
        next_poll_at: now,
        deadline_at: now + 3600 * SEC,
    }];
    let abort = Transition::Aborted {
        error: JobError::new(ErrorCode::DestinationRejected, "no"),
    };
    c.transitions = vec![
        JobTransition {
            job_id: a,
            to: succeeded(),
        },
        JobTransition {
            job_id: b,
            to: succeeded(),
        },
        JobTransition {
            job_id: b,
            to: abort,
        },
    ];
    let r = s.commit_upload(c).await.unwrap();
    assert_eq!(r.applied, 2);
    let mut rejected = r.rejected.clone();
    rejected.sort_unstable();
    assert_eq!(
        rejected,
        vec![a, b],
        "the import took `a`; `b`'s second transition is refused"
    );
    let ja = s.get_job(a).await.unwrap().unwrap();
    assert_eq!((ja.state, ja.attempts), (JobState::Importing, 1));
    let jb = s.get_job(b).await.unwrap().unwrap();
    assert_eq!(
        (jb.state, jb.attempts),
        (JobState::Succeeded, 1),
        "counted once, first word wins"
    );
}

pub async fn polls_after_the_finish_are_refused(s: Store) {
    let now = Timestamp::now();
    let (import_id, ids) = one_import(&s, "d1", 1, now).await;
    let t = now + 2 * SEC;
    assert_eq!(
        s.claim_due_imports("d1", "A", 10, t, t + 60 * SEC)
            .await
            .unwrap()
            .len(),
        1
    );
    let r = s
        .finish_import(ImportFinish {
            import_id,
            owner: "A".into(),
            state: ImportState::Completed,
            error: None,
            transitions: vec![JobTransition {
                job_id: ids[0],
                to: succeeded(),
            }],
            now: t,
        })
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    let late = s
        .record_poll(PollUpdate {
            import_id,
            owner: "A".into(),
            state: ImportState::Processing,
            progress: Some(10),
            poll_error: None,
            next_poll_at: t,
            lease_until: t + 60 * SEC,
            now: t,
        })
        .await
        .unwrap();
    assert!(!late, "a finished import is never reopened by a late poll");
    let imp = s.get_import(import_id).await.unwrap().unwrap();
    assert_eq!((imp.state, imp.progress), (ImportState::Completed, 100));
    assert!(s
        .claim_due_imports("d1", "A", 10, t + 60 * SEC, t + 120 * SEC)
        .await
        .unwrap()
        .is_empty());
}

pub async fn odd_text_from_destinations_is_stored(s: Store) {
    let now = Timestamp::now();
    s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let held = s
        .claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d1", "A", now);
    c.attempted = held.iter().map(|j| j.id).collect();
    c.transitions = vec![
        JobTransition {
            job_id: held[0].id,
            to: Transition::Aborted {
                error: JobError::new(
                    ErrorCode::RecordRejected,
                    "bad\0byte — «ünïcode» '; DROP TABLE jobs; --",
                ),
            },
        },
        JobTransition {
            job_id: held[1].id,
            to: Transition::Succeeded {
                note: Some("warn\0ing".into()),
                external_id: Some("ext'\"".into()),
            },
        },
    ];
    assert_eq!(s.commit_upload(c).await.unwrap().applied, 2);
    let e = s.get_job(held[0].id).await.unwrap().unwrap().error.unwrap();
    assert!(
        e.message.starts_with("bad") && e.message.ends_with("'; DROP TABLE jobs; --"),
        "{}",
        e.message
    );
    assert!(e.message.contains("«ünïcode»"));
    let ok = s.get_job(held[1].id).await.unwrap().unwrap();
    assert!(ok.note.unwrap().starts_with("warn"));
    assert_eq!(ok.external_id.as_deref(), Some("ext'\""));
}

pub async fn due_jobs_are_claimed_longest_due_first(s: Store) {
    let now = Timestamp::now();
    let first = s.insert_jobs(jobs("d1", 2), now).await.unwrap();
    let (a, b) = (first[0].job_id, first[1].job_id);
    assert_eq!(
        s.get_job(a).await.unwrap().unwrap().next_attempt_at,
        Some(now),
        "a new job is due from its arrival"
    );
    s.claim_jobs("d1", "A", 2, now, now + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("d1", "A", now);
    // `a` was uploaded and failed; `b` was throttled (no attempt spent).
    c.attempted = vec![a];
    c.transitions = vec![
        JobTransition {
            job_id: a,
            to: Transition::Failed {
                error: JobError::new(ErrorCode::DestinationUnavailable, "503"),
                next_attempt_at: now + 10 * SEC,
            },
        },
        JobTransition {
            job_id: b,
            to: Transition::Failed {
                error: JobError::new(ErrorCode::Throttled, "429"),
                next_attempt_at: now + 30 * SEC,
            },
        },
    ];
    s.commit_upload(c).await.unwrap();
    let later = s.insert_jobs(jobs("d1", 2), now + 5 * SEC).await.unwrap();
    let t = now + 60 * SEC;
    let order: Vec<i64> = s
        .claim_jobs("d1", "A", 3, t, t + 60 * SEC)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    let mut expected = vec![later[0].job_id, later[1].job_id, a];
    expected.sort_unstable();
    assert_eq!(
        order, expected,
        "due at +5s, +5s and +10s go before `b` (due at +30s)"
    );
    let rest = s.claim_jobs("d1", "A", 3, t, t + 60 * SEC).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, b);
    assert_eq!(
        (rest[0].attempts, rest[0].first_attempt_at),
        (0, Some(now)),
        "a throttled upload spends no attempt but starts the retry window"
    );
}

pub async fn heartbeats_renew_only_leases_still_held(s: Store) {
    let now = Timestamp::now();
    // `one_import` leaves an import leased by A until now + 60s.
    let (import_id, _) = one_import(&s, "h1", 2, now).await;
    s.insert_jobs(jobs("h2", 3), now).await.unwrap();
    let a_jobs: Vec<i64> = s
        .claim_jobs("h2", "A", 2, now, now + 10 * SEC)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    let b_jobs: Vec<i64> = s
        .claim_jobs("h2", "B", 1, now, now + 10 * SEC)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    let a_slot = s
        .acquire_upload_slot("h3", "A", 5, now, now + 10 * SEC)
        .await
        .unwrap()
        .unwrap();
    let b_slot = s
        .acquire_upload_slot("h3", "B", 5, now, now + 10 * SEC)
        .await
        .unwrap()
        .unwrap();
    // A names B's job and slot too: only what A still holds is renewed.
    let r = s
        .renew_leases(LeaseRenewal {
            owner: "A".into(),
            jobs: a_jobs.iter().chain(&b_jobs).copied().collect(),
            imports: vec![import_id],
            slots: vec![a_slot, b_slot],
            lease_until: now + 100 * SEC,
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        RenewReport {
            jobs: 2,
            imports: 1,
            slots: 1
        }
    );
    // Past every original lease only B's work (not renewed) is taken back.
    let t = now + 70 * SEC;
    let rec = s.reclaim_expired(t).await.unwrap();
    assert_eq!(
        rec,
        RecoveryReport {
            jobs_released: 1,
            imports_released: 0,
            slots_released: 1
        }
    );
    for id in &a_jobs {
        assert_eq!(state_of(&s, *id).await, JobState::Executing);
    }
    assert_eq!(state_of(&s, b_jobs[0]).await, JobState::Waiting);
    assert!(
        s.claim_due_imports("h1", "B", 10, t, t + 10 * SEC)
            .await
            .unwrap()
            .is_empty(),
        "a renewed import stays with its poller"
    );
    // Work that is no longer held is not renewed (the heartbeat is fenced).
    let r = s
        .renew_leases(LeaseRenewal {
            owner: "B".into(),
            jobs: b_jobs.clone(),
            imports: vec![import_id],
            slots: vec![b_slot],
            lease_until: t + 100 * SEC,
        })
        .await
        .unwrap();
    assert_eq!(r, RenewReport::default());
    assert_eq!(
        s.renew_leases(LeaseRenewal {
            owner: "A".into(),
            lease_until: t,
            ..LeaseRenewal::default()
        })
        .await
        .unwrap(),
        RenewReport::default()
    );
    // Once A's renewed leases run out they are taken back like any other.
    let rec = s.reclaim_expired(now + 101 * SEC).await.unwrap();
    assert_eq!(
        rec,
        RecoveryReport {
            jobs_released: 2,
            imports_released: 1,
            slots_released: 1
        }
    );
}

pub async fn a_restarted_instance_takes_back_its_earlier_runs_leases_at_once(s: Store) {
    let now = Timestamp::now();
    // Instance owners are `prefix` + a 4-character nonce here; the prefix
    // holds LIKE wildcards and the escape character, which must match
    // literally.
    let prefix = "inst:p_%\\:";
    let old = format!("{prefix}0001");
    let current = format!("{prefix}0002");
    let others = [
        "inst:pX%\\:0003".to_string(), // `_` is not a wildcard
        format!("{prefix}x:0004"),     // another id extending this one
        "INST:p_%\\:0005".to_string(), // case matters
        "inst:p_%\\:005".to_string(),  // nonce length matters
    ];
    let (import_id, _) = one_import_as(&s, "r1", 2, now, &old).await;
    s.insert_jobs(jobs("r2", 3 + others.len()), now)
        .await
        .unwrap();
    let old_jobs: Vec<i64> = s
        .claim_jobs("r2", &old, 2, now, now + 600 * SEC)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    let mut kept_jobs = Vec::new();
    for owner in std::iter::once(&current).chain(&others) {
        let got = s
            .claim_jobs("r2", owner, 1, now, now + 600 * SEC)
            .await
            .unwrap();
        kept_jobs.push(got[0].id);
    }
    let old_slot = s
        .acquire_upload_slot("r3", &old, 2, now, now + 600 * SEC)
        .await
        .unwrap()
        .unwrap();
    s.acquire_upload_slot("r3", &current, 2, now, now + 600 * SEC)
        .await
        .unwrap()
        .unwrap();
    for owner in &others {
        s.acquire_upload_slot("r4", owner, 10, now, now + 600 * SEC)
            .await
            .unwrap()
            .unwrap();
    }
    let rep = s
        .release_earlier_runs(prefix, 4, &current, now)
        .await
        .unwrap();
    assert_eq!(
        rep,
        RecoveryReport {
            jobs_released: 2,
            imports_released: 1,
            slots_released: 1
        }
    );
    for id in &old_jobs {
        let rec = s.get_job(*id).await.unwrap().unwrap();
        assert_eq!((rec.state, rec.attempts), (JobState::Waiting, 0));
    }
    for id in &kept_jobs {
        assert_eq!(
            state_of(&s, *id).await,
            JobState::Executing,
            "this run's and other instances' leases are untouched"
        );
    }
    // The earlier run, if still alive (a zombie), is fenced out.
    assert_eq!(
        s.renew_leases(LeaseRenewal {
            owner: old.clone(),
            jobs: old_jobs.clone(),
            imports: vec![import_id],
            slots: vec![old_slot],
            lease_until: now + 900 * SEC,
        })
        .await
        .unwrap(),
        RenewReport::default()
    );
    let t = now + 2 * SEC;
    let due = s
        .claim_due_imports("r1", "B", 10, t, t + 10 * SEC)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![import_id],
        "the import is free for any poller at once"
    );
    assert!(
        s.acquire_upload_slot("r3", "C", 2, now, now + 10 * SEC)
            .await
            .unwrap()
            .is_some(),
        "the earlier run's slot is free"
    );
    assert!(
        s.acquire_upload_slot("r3", "D", 2, now, now + 10 * SEC)
            .await
            .unwrap()
            .is_none(),
        "this run's slot still counts"
    );
    assert!(
        s.acquire_upload_slot("r4", "E", 4, now, now + 10 * SEC)
            .await
            .unwrap()
            .is_none(),
        "other instances' slots still count"
    );
    assert_eq!(
        s.release_earlier_runs(prefix, 4, &current, now)
            .await
            .unwrap(),
        RecoveryReport::default()
    );
}

pub async fn unprocessed_jobs_expire_after_the_retention(s: Store) {
    let now = Timestamp::now();
    let old = now - 40 * 86_400 * SEC;
    // e1 is configured somewhere; `nowhere` is a destination nobody serves.
    let e1 = s.insert_jobs(jobs("e1", 3), old).await.unwrap();
    let e1: Vec<i64> = e1.iter().map(|i| i.job_id).collect();
    let nowhere = s.insert_jobs(jobs("nowhere", 2), old).await.unwrap();
    let fresh = s.insert_jobs(jobs("e1", 1), now).await.unwrap()[0].job_id;
    let done = s.insert_jobs(jobs("e2", 1), old).await.unwrap()[0].job_id;
    // Long ago e1[0] failed (it waits for a retry), e1[1] was claimed (still
    // executing) and e1[2] never moved.
    let claimed = s
        .claim_jobs("e1", "A", 2, old, old + 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        e1[..2].to_vec()
    );
    let mut c = commit("e1", "A", old);
    c.attempted = vec![e1[0]];
    c.transitions = vec![JobTransition {
        job_id: e1[0],
        to: Transition::Failed {
            error: JobError::new(ErrorCode::DestinationUnavailable, "503"),
            next_attempt_at: old + 60 * SEC,
        },
    }];
    s.commit_upload(c).await.unwrap();
    s.claim_jobs("e2", "A", 1, old, old + 60 * SEC)
        .await
        .unwrap();
    let mut c = commit("e2", "A", old);
    c.attempted = vec![done];
    c.transitions = vec![JobTransition {
        job_id: done,
        to: succeeded(),
    }];
    s.commit_upload(c).await.unwrap();

    let cutoff = now - 30 * 86_400 * SEC;
    let msg = "not delivered within jobRetention (720h)";
    let first = s.expire_jobs(cutoff, msg, now, 1).await.unwrap();
    assert_eq!(first.values().sum::<u64>(), 1, "at most `limit` per call");
    let rest = s.expire_jobs(cutoff, msg, now, 100).await.unwrap();
    let mut total = first.clone();
    for (d, n) in rest {
        *total.entry(d).or_default() += n;
    }
    assert_eq!(
        total.into_iter().collect::<Vec<_>>(),
        vec![("e1".to_string(), 2), ("nowhere".to_string(), 2)]
    );
    for id in [e1[0], e1[2], nowhere[0].job_id, nowhere[1].job_id] {
        let rec = s.get_job(id).await.unwrap().unwrap();
        assert_eq!(rec.state, JobState::Aborted, "job {id}");
        let err = rec.error.expect("an aborted job carries its reason");
        assert_eq!((err.code, err.message.as_str()), (ErrorCode::Expired, msg));
        assert_eq!(rec.completed_at, Some(now));
    }
    assert_eq!(
        state_of(&s, e1[1]).await,
        JobState::Executing,
        "work in progress is not expired"
    );
    assert_eq!(state_of(&s, fresh).await, JobState::Waiting);
    assert_eq!(state_of(&s, done).await, JobState::Succeeded);
    assert!(s
        .expire_jobs(cutoff, msg, now, 100)
        .await
        .unwrap()
        .is_empty());
    // An expired job can be re-driven like any aborted one, and the re-drive
    // gives it a fresh jobRetention.
    assert_eq!(s.retry_job(e1[2], now).await.unwrap(), RetryResult::Retried);
    assert!(s
        .expire_jobs(now - SEC, msg, now, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(state_of(&s, e1[2]).await, JobState::Waiting);
}

/// Expands to one `#[tokio::test]` per conformance check, each run against a
/// fresh store from `$factory`, so every backend runs the same suite.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        conformance_tests!(@each $factory;
            insert_and_read_back,
            message_ids_are_idempotent_per_destination,
            insert_is_all_or_nothing,
            invalid_jobs_are_refused_by_name_and_nothing_is_stored,
            claims_due_jobs_in_id_order_under_a_lease,
            failed_jobs_wait_for_their_backoff,
            claims_ten_thousand_in_one_call,
            upload_commit_creates_imports_and_is_fenced,
            imports_are_polled_under_a_lease_and_finished_atomically,
            expired_leases_are_taken_back,
            release_returns_jobs_without_an_attempt,
            transform_failures_abort_from_executing,
            retry_and_redrive_give_a_fresh_budget,
            upload_slots_bound_concurrency,
            retention_sweep_deletes_old_terminal_jobs_in_batches,
            counts_cover_every_state,
            ids_are_never_reused,
            an_import_counts_only_the_jobs_it_really_took,
            a_job_named_twice_is_written_once,
            polls_after_the_finish_are_refused,
            odd_text_from_destinations_is_stored,
            due_jobs_are_claimed_longest_due_first,
            heartbeats_renew_only_leases_still_held,
            a_restarted_instance_takes_back_its_earlier_runs_leases_at_once,
            unprocessed_jobs_expire_after_the_retention,
        );
    };
    (@each $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some((store, _guard)) = $factory(stringify!($name)).await else { return };
                conformance::$name(store).await;
            }
        )*
    };
}
