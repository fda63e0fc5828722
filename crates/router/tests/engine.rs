//! End-to-end tests of the engine with the embedded SQLite store, real HTTP
//! over loopback to the stand-in, and scripted managers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{ErrorCode, JobState, JobStore, NewJob, Timestamp};
use batchrouter_router::RouterSettings;
use batchrouter_testkit::http::{Fault, HttpStandIn};
use batchrouter_testkit::jobs::{malformed_job, numbered_jobs};
use common::*;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_across_two_destinations_arrive_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let a = HttpStandIn::start().await;
    let b = HttpStandIn::start().await;
    store
        .insert_jobs(numbered_jobs("a", "a", 5_000), Timestamp::now())
        .await
        .unwrap();
    store
        .insert_jobs(numbered_jobs("b", "b", 5_000), Timestamp::now())
        .await
        .unwrap();
    let settings = RouterSettings {
        max_events_in_batch: 1_000,
        ..fast()
    };
    let router = start(
        store.clone(),
        dir.path(),
        vec![
            (
                "a",
                "HTTP",
                http_manager("a", json!({"url": a.url(), "maxBatchSize": 250})),
                settings.clone(),
            ),
            (
                "b",
                "HTTP",
                http_manager(
                    "b",
                    json!({"url": b.url(), "mode": "single", "maxInFlight": 16}),
                ),
                settings,
            ),
        ],
    )
    .await;
    for (dest, standin, prefix) in [("a", &a, "a"), ("b", &b, "b")] {
        let c = settle(&store, dest, LIMIT).await;
        assert_eq!(
            n(&c, JobState::Succeeded),
            5_000,
            "{dest}: {:?}",
            readable(&c)
        );
        let accepted = standin.accepted();
        assert_eq!(accepted.len(), 5_000, "{dest}: every record arrived");
        assert!(
            accepted.values().all(|&v| v == 1),
            "{dest}: no record arrived twice"
        );
        assert!(accepted.contains_key(&format!("{prefix}-4999")));
    }
    assert_eq!(a.requests(), 20, "5,000 records in arrays of 250");
    let job = store.get_job(1).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
    assert!(job.completed_at.is_some());
    assert!(router.healthy());
    assert!(router.shutdown().await.clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_outcomes_each_get_their_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let now = Timestamp::now();

    // Single mode with per-record rejection, plus malformed payloads.
    let picky = HttpStandIn::start().await;
    picky.reject_when("id", "reject-", 400);
    let mut jobs = numbered_jobs("picky", "ok", 20);
    jobs.extend(numbered_jobs("picky", "reject", 5));
    jobs.extend((0..3).map(|i| malformed_job("picky", i)));
    store.insert_jobs(jobs, now).await.unwrap();

    // 503 once, then fine.
    let flaky = HttpStandIn::start().await;
    flaky.push_fault(Fault::status(503));
    let flaky_ids = store
        .insert_jobs(numbered_jobs("flaky", "f", 10), now)
        .await
        .unwrap();

    // Always 500.
    let down = HttpStandIn::start().await;
    down.set_default(Some(Fault::status(500)));
    let down_ids = store
        .insert_jobs(numbered_jobs("down", "d", 4), now)
        .await
        .unwrap();

    let router = start(
        store.clone(),
        dir.path(),
        vec![
            (
                "picky",
                "HTTP",
                http_manager("picky", json!({"url": picky.url(), "mode": "single"})),
                fast(),
            ),
            (
                "flaky",
                "HTTP",
                http_manager("flaky", json!({"url": flaky.url()})),
                fast(),
            ),
            (
                "down",
                "HTTP",
                http_manager("down", json!({"url": down.url()})),
                fast(),
            ),
        ],
    )
    .await;

    let c = settle(&store, "picky", LIMIT).await;
    assert_eq!(
        (n(&c, JobState::Succeeded), n(&c, JobState::Aborted)),
        (20, 8),
        "{:?}",
        readable(&c)
    );
    for id in 1..=28 {
        let j = store.get_job(id).await.unwrap().unwrap();
        if id <= 20 {
            assert_eq!(j.state, JobState::Succeeded);
        } else if id <= 25 {
            let e = j.error.expect("reason");
            assert_eq!(
                (j.state, e.code),
                (JobState::Aborted, ErrorCode::DestinationRejected)
            );
            assert!(
                e.message.contains("HTTP 400")
                    && e.message.contains(&format!("reject-{}", id - 21)),
                "{}",
                e.message
            );
            assert_eq!(j.attempts, 1);
        } else {
            let e = j.error.expect("reason");
            assert_eq!(
                (j.state, e.code),
                (JobState::Aborted, ErrorCode::TransformFailed)
            );
            assert!(e.message.contains("not valid JSON"), "{}", e.message);
            assert_eq!(j.attempts, 0, "never uploaded");
        }
    }
    assert_eq!(picky.accepted().len(), 20);

    let c = settle(&store, "flaky", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 10);
    let j = store.get_job(flaky_ids[0].job_id).await.unwrap().unwrap();
    assert_eq!(j.attempts, 2, "failed once with 503, then delivered");
    assert_eq!(flaky.accepted().len(), 10);

    let c = settle(&store, "down", LIMIT).await;
    assert_eq!(n(&c, JobState::Aborted), 4);
    let j = store.get_job(down_ids[0].job_id).await.unwrap().unwrap();
    let e = j.error.unwrap();
    assert_eq!(e.code, ErrorCode::RetriesExhausted);
    assert!(
        e.message.contains("HTTP 500"),
        "last reason kept: {}",
        e.message
    );
    assert_eq!(j.attempts, 4, "1 + maxRetries uploads");
    assert_eq!(down.requests(), 4);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_pauses_without_spending_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let s = HttpStandIn::start().await;
    s.push_fault(Fault::status(429).with_retry_after("1"));
    store
        .insert_jobs(numbered_jobs("t", "t", 50), Timestamp::now())
        .await
        .unwrap();
    // Batches of ten: while the first is throttled the next is staged and
    // waiting for the upload slot; it must wait out the pause too.
    let settings = RouterSettings {
        max_retries: 0,
        max_events_in_batch: 10,
        ..fast()
    };
    let started = Instant::now();
    let router = start(
        store.clone(),
        dir.path(),
        vec![(
            "t",
            "HTTP",
            http_manager("t", json!({"url": s.url(), "maxBatchSize": 10})),
            settings,
        )],
    )
    .await;
    let c = settle(&store, "t", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 50, "{:?}", readable(&c));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    for id in 1..=50 {
        let j = store.get_job(id).await.unwrap().unwrap();
        assert_eq!(
            j.attempts, 1,
            "a throttled upload does not spend the budget (maxRetries = 0)"
        );
    }
    assert_eq!(s.accepted().len(), 50);
    assert_eq!(
        s.requests(),
        6,
        "one throttled request, then five arrays of ten"
    );
    let arrivals = s.arrivals();
    assert!(
        arrivals[1..]
            .iter()
            .all(|t| t.duration_since(arrivals[0]) >= Duration::from_millis(950)),
        "no request during the Retry-After pause, not even from a batch already staged"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_never_aborts_old_jobs_that_were_never_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let s = HttpStandIn::start().await;
    s.push_fault(Fault::status(429).with_retry_after("1"));
    // A backlog far older than the retry window.
    let old = Timestamp::now() - Duration::from_secs(3600);
    store
        .insert_jobs(numbered_jobs("t", "t", 5), old)
        .await
        .unwrap();
    // No attempt budget: jobs give up when the budget AND the window are
    // spent, so with `maxRetries = 0` the window alone decides — were it
    // counted from creation, the throttled jobs would be aborted here.
    let settings = RouterSettings {
        retry_time_window: Duration::from_secs(600),
        max_retries: 0,
        ..fast()
    };
    let router = start(
        store.clone(),
        dir.path(),
        vec![(
            "t",
            "HTTP",
            http_manager("t", json!({"url": s.url()})),
            settings,
        )],
    )
    .await;
    let c = settle(&store, "t", LIMIT).await;
    assert_eq!(
        n(&c, JobState::Succeeded),
        5,
        "the window starts at the first try, not at creation: {:?}",
        readable(&c)
    );
    assert_eq!(s.requests(), 2, "throttled once, then delivered");
    router.shutdown().await;
}

/// Puts 4 jobs of `d` into an import that never finishes, stops the router
/// as a crash would and stays down past `asyncImportDeadline` (2 s):
/// answers the reopened store, the settings and the first run's manager.
async fn import_in_flight_then_down_past_deadline(
    dir: &Path,
) -> (Arc<dyn JobStore>, RouterSettings, Arc<Recording>) {
    let first = Arc::new(Recording::default());
    *first.behaviour.lock().unwrap() = Behaviour::ImportForever;
    let settings = RouterSettings {
        import_deadline: Duration::from_secs(2),
        ..fast()
    };
    {
        let store: Arc<dyn JobStore> = sqlite(dir).await;
        store
            .insert_jobs(numbered_jobs("d", "x", 4), Timestamp::now())
            .await
            .unwrap();
        let router = start(
            store.clone(),
            dir,
            vec![("d", "TEST", first.clone(), settings.clone())],
        )
        .await;
        wait_for("an import in flight", LIMIT, || {
            let store = store.clone();
            async move { n(&counts(&store, "d").await, JobState::Importing) == 4 }
        })
        .await;
        router.abort();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    (reopen(&dir.join("jobs.db")).await, settings, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_past_its_deadline_after_downtime_is_polled_before_giving_up() {
    let dir = tempfile::tempdir().unwrap();
    let (store, settings, first) = import_in_flight_then_down_past_deadline(dir.path()).await;
    // Meanwhile the destination finished the import.
    let second = Arc::new(Recording::default());
    *second.behaviour.lock().unwrap() = Behaviour::Import { polls: 1 };
    let router = start(
        store.clone(),
        dir.path(),
        vec![("d", "TEST", second.clone(), settings)],
    )
    .await;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 4, "{:?}", readable(&c));
    assert_eq!(
        second.uploads.load(Ordering::SeqCst),
        0,
        "polled to completion, not uploaded again"
    );
    assert_eq!(first.uploads.load(Ordering::SeqCst), 1);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_fetch_failing_once_after_downtime_past_the_deadline_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (store, settings, _) = import_in_flight_then_down_past_deadline(dir.path()).await;
    // Meanwhile the destination finished the import (one record rejected),
    // and its results endpoint fails once.
    let second = Arc::new(Recording::default());
    *second.behaviour.lock().unwrap() = Behaviour::ImportWithFailures { polls: 1 };
    second.stats_failures_left.store(1, Ordering::SeqCst);
    let router = start(
        store.clone(),
        dir.path(),
        vec![("d", "TEST", second.clone(), settings)],
    )
    .await;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(
        (n(&c, JobState::Succeeded), n(&c, JobState::Aborted)),
        (3, 1),
        "the jobs get their real outcomes, not results_unavailable: {:?}",
        readable(&c)
    );
    assert_eq!(second.stats_calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        second.uploads.load(Ordering::SeqCst),
        0,
        "not uploaded again"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_cut_by_count_bytes_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let now = Timestamp::now();
    store
        .insert_jobs(numbered_jobs("count", "c", 1_000), now)
        .await
        .unwrap();
    store
        .insert_jobs(numbered_jobs("bytes", "b", 300), now)
        .await
        .unwrap();
    let by_count = Arc::new(Recording::default());
    let by_bytes = Arc::new(Recording::default());
    let by_time = Arc::new(Recording::default());
    let router = start(
        store.clone(),
        dir.path(),
        vec![
            (
                "count",
                "TEST",
                by_count.clone(),
                RouterSettings {
                    max_events_in_batch: 100,
                    upload_freq: Duration::from_secs(30),
                    ..fast()
                },
            ),
            (
                "bytes",
                "TEST",
                by_bytes.clone(),
                RouterSettings {
                    max_upload_bytes: 4096,
                    upload_freq: Duration::from_secs(30),
                    ..fast()
                },
            ),
            (
                "time",
                "TEST",
                by_time.clone(),
                RouterSettings {
                    upload_freq: Duration::from_millis(400),
                    ..fast()
                },
            ),
        ],
    )
    .await;
    settle(&store, "count", LIMIT).await;
    let sizes: Vec<usize> = by_count
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![100; 10], "count cut at maxEventsInABatch");

    settle(&store, "bytes", LIMIT).await;
    let bytes = by_bytes.batch_bytes.lock().unwrap().clone();
    let batches = by_bytes.batches.lock().unwrap().clone();
    assert!(
        batches.len() >= 4,
        "300 lines of ~70 bytes need several 4 KiB files: {bytes:?}"
    );
    let line = bytes[0] / batches[0].len() as u64;
    for (i, b) in bytes.iter().enumerate() {
        assert!(*b <= 4096, "batch {i} is {b} bytes");
        if i + 1 < bytes.len() {
            assert!(
                *b + line > 4096 - line,
                "batch {i} was cut early: {b} bytes"
            );
        }
    }
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 300);

    let t0 = Instant::now();
    store
        .insert_jobs(numbered_jobs("time", "t", 5), Timestamp::now())
        .await
        .unwrap();
    router.wake("time");
    settle(&store, "time", LIMIT).await;
    let waited = t0.elapsed();
    assert_eq!(
        by_time
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![5]
    );
    assert!(
        waited >= Duration::from_millis(400),
        "a small batch waits for uploadFreq: {waited:?}"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_that_lose_or_duplicate_jobs_are_caught() {
    for behaviour in [Behaviour::OmitOne, Behaviour::DuplicateOne] {
        let dir = tempfile::tempdir().unwrap();
        let (store, m, router, c) = recording_run_settled(
            dir.path(),
            10,
            behaviour.clone(),
            RouterSettings {
                max_retries: 1,
                ..fast()
            },
        )
        .await;
        assert_eq!(
            n(&c, JobState::Aborted),
            10,
            "{behaviour:?}: {:?}",
            readable(&c)
        );
        let j = store.get_job(1).await.unwrap().unwrap();
        let e = j.error.unwrap();
        assert_eq!(e.code, ErrorCode::RetriesExhausted);
        assert!(
            e.message.contains("invalid_output"),
            "{behaviour:?}: {}",
            e.message
        );
        assert_eq!(
            m.uploads.load(Ordering::SeqCst),
            2,
            "1 + maxRetries uploads"
        );
        router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_polling_without_uploading_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let first = Arc::new(Recording::default());
    *first.behaviour.lock().unwrap() = Behaviour::ImportForever;
    let settings = RouterSettings {
        max_events_in_batch: 10,
        upload_freq: Duration::from_millis(50),
        ..fast()
    };
    {
        let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
        store
            .insert_jobs(numbered_jobs("d", "x", 25), Timestamp::now())
            .await
            .unwrap();
        let router = start(
            store.clone(),
            dir.path(),
            vec![("d", "TEST", first.clone(), settings.clone())],
        )
        .await;
        // One import in flight (sync mode), the next batch staged and waiting
        // for the slot: claimed but never uploaded.
        wait_for("an import in flight and a staged batch", LIMIT, || {
            let store = store.clone();
            let first = first.clone();
            async move {
                let c = counts(&store, "d").await;
                first.polls.load(Ordering::SeqCst) >= 2
                    && n(&c, JobState::Importing) == 10
                    && n(&c, JobState::Executing) >= 10
            }
        })
        .await;
        router.abort(); // no graceful path
    }
    assert_eq!(first.uploads.load(Ordering::SeqCst), 1);
    let imported: Vec<i64> = first.batches.lock().unwrap()[0].clone();

    // The crashed router's lock is gone once its tasks are: reopen.
    let store: Arc<dyn JobStore> = reopen(&path).await;
    let second = Arc::new(Recording::default());
    *second.behaviour.lock().unwrap() = Behaviour::Import { polls: 1 };
    let router = start(
        store.clone(),
        dir.path(),
        vec![("d", "TEST", second.clone(), settings)],
    )
    .await;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 25, "{:?}", readable(&c));
    let uploaded_again: Vec<i64> = second
        .batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .copied()
        .collect();
    assert!(
        imported.iter().all(|id| !uploaded_again.contains(id)),
        "the import in flight was polled, not uploaded again"
    );
    assert_eq!(
        uploaded_again.len(),
        15,
        "claimed-but-not-uploaded jobs came back and were uploaded once"
    );
    assert!(second.polls.load(Ordering::SeqCst) >= 1);
    for id in &imported {
        let j = store.get_job(*id).await.unwrap().unwrap();
        assert_eq!((j.state, j.attempts), (JobState::Succeeded, 1));
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_held_by_a_dead_owner_come_back_after_lease_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let m = Arc::new(Recording::default());
    // An idle worker that only looks again in 30 s unless woken: the jobs
    // below come back through lease expiry, whose reclaim wakes it.
    let settings = RouterSettings {
        min_idle_sleep: Duration::from_secs(30),
        ..fast()
    };
    let router = start(
        store.clone(),
        dir.path(),
        vec![("d", "TEST", m.clone(), settings)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // its first (empty) claim is done
    let now = Timestamp::now();
    store
        .insert_jobs(numbered_jobs("d", "x", 5), now)
        .await
        .unwrap();
    // Another (dead) process grabs them with a short lease.
    let grabbed = store
        .claim_jobs(
            "d",
            "ghost",
            5,
            Timestamp::now(),
            Timestamp::now() + Duration::from_millis(800),
        )
        .await
        .unwrap();
    assert_eq!(grabbed.len(), 5, "the idle worker did not claim them first");
    let t0 = Instant::now();
    let c = settle(&store, "d", Duration::from_secs(20)).await;
    assert_eq!(n(&c, JobState::Succeeded), 5);
    assert!(
        t0.elapsed() >= Duration::from_millis(600),
        "not before the lease expired"
    );
    let uploaded: usize = m.batches.lock().unwrap().iter().map(Vec::len).sum();
    assert_eq!(uploaded, 5, "each job uploaded once");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_keeps_one_import_in_flight_and_async_pipelines() {
    for (max, expect_max) in [(1u32, 1usize), (3, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
        store
            .insert_jobs(numbered_jobs("d", "x", 60), Timestamp::now())
            .await
            .unwrap();
        let m = Arc::new(Recording::default());
        *m.behaviour.lock().unwrap() = Behaviour::Import { polls: 4 };
        let settings = RouterSettings {
            max_events_in_batch: 10,
            max_concurrent_imports: max,
            ..fast()
        };
        let router = start(
            store.clone(),
            dir.path(),
            vec![("d", "TEST", m.clone(), settings)],
        )
        .await;
        let mut seen_max = 0;
        let t0 = Instant::now();
        loop {
            let c = counts(&store, "d").await;
            seen_max = seen_max.max(c.imports_in_flight as usize);
            if n(&c, JobState::Succeeded) == 60 {
                break;
            }
            assert!(t0.elapsed() < LIMIT, "{:?}", readable(&c));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            seen_max <= expect_max,
            "max {max}: saw {seen_max} imports in flight"
        );
        if max > 1 {
            assert!(seen_max > 1, "async mode pipelines imports");
        }
        router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_timeouts_and_import_deadlines_fail_with_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let slow = HttpStandIn::start().await;
    slow.push_fault(Fault::status(200).delayed(Duration::from_secs(3)));
    store
        .insert_jobs(numbered_jobs("slow", "s", 3), Timestamp::now())
        .await
        .unwrap();
    let stuck = Arc::new(Recording::default());
    *stuck.behaviour.lock().unwrap() = Behaviour::ImportForever;
    store
        .insert_jobs(numbered_jobs("stuck", "k", 3), Timestamp::now())
        .await
        .unwrap();
    let router = start(
        store.clone(),
        dir.path(),
        vec![
            (
                "slow",
                "HTTP",
                http_manager("slow", json!({"url": slow.url()})),
                RouterSettings {
                    upload_timeout: Duration::from_millis(300),
                    ..fast()
                },
            ),
            (
                "stuck",
                "TEST",
                stuck.clone(),
                RouterSettings {
                    import_deadline: Duration::from_millis(300),
                    max_retries: 1,
                    ..fast()
                },
            ),
        ],
    )
    .await;
    let c = settle(&store, "slow", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 3);
    let j = store.get_job(1).await.unwrap().unwrap();
    assert_eq!(
        j.attempts, 2,
        "the timed-out upload counted, the retry delivered"
    );

    let c = settle(&store, "stuck", LIMIT).await;
    assert_eq!(n(&c, JobState::Aborted), 3);
    let j = store.get_job(4).await.unwrap().unwrap();
    let e = j.error.unwrap();
    assert_eq!(e.code, ErrorCode::RetriesExhausted);
    assert!(
        e.message.contains("deadline_exceeded") && e.message.contains("asyncImportDeadline"),
        "{}",
        e.message
    );
    assert_eq!(stuck.uploads.load(Ordering::SeqCst), 2);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_staged_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let m = Arc::new(Recording::default());
    let router = start(
        store.clone(),
        dir.path(),
        vec![(
            "d",
            "TEST",
            m.clone(),
            RouterSettings {
                upload_freq: Duration::from_secs(60),
                ..fast()
            },
        )],
    )
    .await;
    store
        .insert_jobs(numbered_jobs("d", "x", 7), Timestamp::now())
        .await
        .unwrap();
    router.wake("d");
    wait_for("jobs staged", LIMIT, || {
        let store = store.clone();
        async move { n(&counts(&store, "d").await, JobState::Executing) == 7 }
    })
    .await;
    let t0 = Instant::now();
    assert!(router.shutdown().await.clean);
    assert!(t0.elapsed() < Duration::from_secs(3));
    let c = counts(&store, "d").await;
    assert_eq!(
        n(&c, JobState::Waiting),
        7,
        "released, not lost: {:?}",
        readable(&c)
    );
    assert_eq!(m.uploads.load(Ordering::SeqCst), 0);
    let j = store.get_job(1).await.unwrap().unwrap();
    assert_eq!(j.attempts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_gives_aborted_jobs_a_fresh_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let s = HttpStandIn::start().await;
    s.set_default(Some(Fault::status(403)));
    store
        .insert_jobs(numbered_jobs("d", "x", 6), Timestamp::now())
        .await
        .unwrap();
    let router = start(
        store.clone(),
        dir.path(),
        vec![(
            "d",
            "HTTP",
            http_manager("d", json!({"url": s.url()})),
            fast(),
        )],
    )
    .await;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Aborted), 6);
    assert!(s.accepted().is_empty());
    s.heal();
    let n_redriven = store
        .redrive("d", &[JobState::Aborted], Timestamp::now())
        .await
        .unwrap();
    assert_eq!(n_redriven, 6);
    router.wake("d");
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 6);
    assert!(s.accepted().values().all(|&v| v == 1));
    assert_eq!(s.accepted().len(), 6);
    let j = store.get_job(1).await.unwrap().unwrap();
    assert_eq!(j.attempts, 2, "history kept");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_ids_are_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let s = HttpStandIn::start().await;
    let job = |m: &str| NewJob {
        destination_id: "d".into(),
        payload: json!({"id": m}).to_string(),
        message_id: Some(m.into()),
    };
    store
        .insert_jobs(vec![job("m1"), job("m2"), job("m1")], Timestamp::now())
        .await
        .unwrap();
    store
        .insert_jobs(vec![job("m2")], Timestamp::now())
        .await
        .unwrap();
    let router = start(
        store.clone(),
        dir.path(),
        vec![(
            "d",
            "HTTP",
            http_manager("d", json!({"url": s.url()})),
            fast(),
        )],
    )
    .await;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 2);
    assert_eq!(s.accepted().len(), 2);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_import_whose_results_cannot_be_read_is_aborted_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let m = Arc::new(Recording::default());
    *m.behaviour.lock().unwrap() = Behaviour::ImportWithFailures { polls: 1 };
    *m.stats_error.lock().unwrap() = Some(batchrouter_core::DestinationError::retryable(
        "results endpoint answered HTTP 503",
    ));
    // Two batches; sync mode (one slot), so the second waits for the first import.
    let first_ids = store
        .insert_jobs(numbered_jobs("d", "x", 5), Timestamp::now())
        .await
        .unwrap();
    let second_ids = store
        .insert_jobs(numbered_jobs("d", "y", 5), Timestamp::now())
        .await
        .unwrap();
    let settings = RouterSettings {
        max_events_in_batch: 5,
        max_concurrent_imports: 1,
        import_deadline: Duration::from_millis(800),
        ..fast()
    };
    let router = start(
        store.clone(),
        dir.path(),
        vec![("d", "TEST", m.clone(), settings)],
    )
    .await;
    let first_job = first_ids[0].job_id;
    wait_for("the first import's jobs to end", LIMIT, || {
        let store = store.clone();
        async move { store.get_job(first_job).await.unwrap().unwrap().state == JobState::Aborted }
    })
    .await;
    // The results endpoint heals: the second import resolves normally.
    *m.stats_error.lock().unwrap() = None;
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Aborted), 6, "{:?}", readable(&c));
    assert_eq!(n(&c, JobState::Succeeded), 4, "{:?}", readable(&c));
    let mut import = None;
    for ins in &first_ids {
        let j = store.get_job(ins.job_id).await.unwrap().unwrap();
        assert_eq!((j.state, j.attempts), (JobState::Aborted, 1));
        let e = j.error.unwrap();
        assert_eq!(e.code, ErrorCode::ResultsUnavailable);
        assert!(
            e.message.contains("asyncImportDeadline") && e.message.contains("HTTP 503"),
            "names the deadline and the last error: {}",
            e.message
        );
        import = j.import_id;
    }
    let imp = store.get_import(import.unwrap()).await.unwrap().unwrap();
    assert_eq!(imp.state, batchrouter_core::store::ImportState::Failed);
    assert!(
        m.stats_calls.load(Ordering::SeqCst) >= 3,
        "stats were retried before the deadline"
    );
    assert_eq!(
        m.uploads.load(Ordering::SeqCst),
        2,
        "each batch uploaded once: the first is not uploaded again, the second got the slot"
    );
    let rejected = store.get_job(second_ids[0].job_id).await.unwrap().unwrap();
    assert_eq!(rejected.error.unwrap().code, ErrorCode::RecordRejected);
    // Re-drivable by the operator.
    let redriven = store
        .redrive("d", &[JobState::Aborted], Timestamp::now())
        .await
        .unwrap();
    assert_eq!(redriven, 6);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_failed_for_good_aborts_its_jobs_without_uploading_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, m, router, c) = recording_run_settled(
        dir.path(),
        5,
        Behaviour::ImportFails { retryable: false },
        fast(),
    )
    .await;
    assert_eq!(n(&c, JobState::Aborted), 5, "{:?}", readable(&c));
    let j = store.get_job(1).await.unwrap().unwrap();
    assert_eq!(j.attempts, 1);
    assert_eq!(j.error.unwrap().code, ErrorCode::ImportFailed);
    let imp = store
        .get_import(j.import_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(imp.state, batchrouter_core::store::ImportState::Failed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.uploads.load(Ordering::SeqCst), 1, "never uploaded again");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_failed_retryably_is_uploaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, m, router, c) = recording_run_settled(
        dir.path(),
        5,
        Behaviour::ImportFails { retryable: true },
        RouterSettings {
            max_retries: 2,
            ..fast()
        },
    )
    .await;
    assert_eq!(n(&c, JobState::Aborted), 5, "{:?}", readable(&c));
    assert_eq!(
        m.uploads.load(Ordering::SeqCst),
        3,
        "1 + maxRetries uploads"
    );
    let j = store.get_job(1).await.unwrap().unwrap();
    assert_eq!(j.attempts, 3);
    let e = j.error.unwrap();
    assert_eq!(e.code, ErrorCode::RetriesExhausted);
    assert!(e.message.contains("import_failed"), "{}", e.message);
    router.shutdown().await;
}
