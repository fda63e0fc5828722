//! The crash-point matrix (docs/operations.md, "Crash-point matrix"): the
//! real `batchrouterd`, built with the router's `failpoints` feature (the
//! daemon's dev-dependencies turn it on), is killed at each named step of a
//! job's life, restarted on the same store without the crash variable, and
//! must then lose nothing, leave nothing stuck, never report a row the
//! destination refused as `succeeded`, and deliver twice only inside the
//! documented window (accepted by the destination, outcome not yet stored).
//!
//! {SQLite, PostgreSQL} × {HTTP batch, Marketo} × five points = 20 cases,
//! run a few at a time in one test so the duplicate counts print as one
//! table; plus two daemons on PostgreSQL where one is killed and the other
//! takes its work over once the lease runs out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_router::crash::POINTS;
use batchrouter_testkit::http::{Fault, HttpStandIn};
use batchrouter_testkit::marketo::{Endpoint, MarketoStandIn};
use batchrouter_testkit::postgres::TestDatabase;
use common::crash::{enqueue_file, Armed};
use common::*;

/// Jobs per case.
const JOBS: usize = 50;
/// Jobs per staged batch: the most one crash can re-send per upload in flight.
const BATCH: usize = 10;
/// Uploads plus imports in flight per destination in the matrix: one, so a
/// crash at a point is never also a crash inside another upload's window.
const IN_FLIGHT: usize = 1;
/// In the two-daemon case both daemons upload at once.
const IN_FLIGHT_TWO_DAEMONS: usize = 2;
/// Short leases so PostgreSQL takes a dead daemon's work back quickly, yet
/// long enough that a live daemon's renewal (due once half the lease is
/// used) never comes too late while five cases share a loaded 2-core
/// machine: a lapsed lease would re-send a batch outside the crash window.
const LEASE: Duration = Duration::from_secs(4);
/// How long a run may take to reach its point.
const REACH: Duration = Duration::from_secs(60);
/// How long a restarted daemon may take to settle every job.
const SETTLE: Duration = Duration::from_secs(90);
/// Cases run at once (the CI machine has 2 cores).
const PARALLEL: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Http,
    Marketo,
}

impl Dest {
    fn id(self) -> &'static str {
        match self {
            Dest::Http => "web",
            Dest::Marketo => "leads",
        }
    }
}

/// Rows the stand-ins refuse: 3, 20 and 37.
fn is_bad(i: usize) -> bool {
    i % 17 == 3
}

/// The record key the destination reports for row `i`.
fn key(dest: Dest, i: usize) -> String {
    let kind = if is_bad(i) { "bad" } else { "row" };
    match dest {
        Dest::Http => format!("{kind}-{i}"),
        Dest::Marketo => format!("{kind}{i}@example.com"),
    }
}

fn payloads(dest: Dest) -> Vec<String> {
    (0..JOBS)
        .map(|i| {
            let v = match dest {
                Dest::Http => serde_json::json!({"id": key(dest, i), "n": i}),
                Dest::Marketo => serde_json::json!({"email": key(dest, i), "n": i}),
            };
            v.to_string()
        })
        .collect()
}

/// A running stand-in and what it recorded.
enum StandIn {
    Http(HttpStandIn),
    Marketo(MarketoStandIn),
}

impl StandIn {
    async fn start(dest: Dest) -> StandIn {
        match dest {
            Dest::Http => {
                let s = HttpStandIn::start().await;
                s.reject_when("id", "bad-", 400);
                StandIn::Http(s)
            }
            Dest::Marketo => {
                // An upload whose outcome was lost shows up as a duplicate.
                let m = marketo_importing_at_once().await;
                m.fail_rows_matching("bad", "1004 Lead not found");
                StandIn::Marketo(m)
            }
        }
    }

    fn destination_toml(&self) -> String {
        match self {
            StandIn::Http(s) => http_destination("web", &s.url(), Some(5)),
            StandIn::Marketo(m) => {
                marketo_destination("leads", m.client_id(), m.client_secret(), &m.base_url())
            }
        }
    }

    /// How often the destination took each record (HTTP: accepted in a 2xx
    /// request; Marketo: imported by an import, failed rows excluded).
    fn delivered(&self) -> HashMap<String, u32> {
        match self {
            StandIn::Http(s) => s.accepted(),
            StandIn::Marketo(m) => m.imported(),
        }
    }

    /// Rows sent in accepted import files (Marketo only).
    fn rows_uploaded(&self) -> Option<u64> {
        match self {
            StandIn::Http(_) => None,
            StandIn::Marketo(m) => Some(m.rows_received()),
        }
    }

    fn status_polls(&self) -> u64 {
        match self {
            StandIn::Http(_) => 0,
            StandIn::Marketo(m) => m.requests(Endpoint::Status),
        }
    }

    /// Per-record result fetches (Marketo's failures file).
    fn result_fetches(&self) -> u64 {
        match self {
            StandIn::Http(_) => 0,
            StandIn::Marketo(m) => m.requests(Endpoint::Failures),
        }
    }
}

fn config(dir: &Path, store_url: &str, staging: &str, dest: &str, in_flight: usize) -> String {
    let router = format!(
        "leaseTimeout = \"{lease}s\"\nuploadCallTimeout = \"5s\"\n\
         maxEventsInABatch = {BATCH}\nmaxConcurrentImports = {in_flight}",
        lease = LEASE.as_secs(),
    );
    daemon_config("", store_url, &dir.join(staging), &router, dest)
}

/// Where the duplicate window is: the destination took the batch, the
/// router has not stored that yet. For a fire-and-forget destination the
/// upload's answer is also its completion and its per-record result, so
/// its `after_poll_complete` and `after_stats` points sit in that window too.
fn in_duplicate_window(dest: Dest, point: &str) -> bool {
    point == "after_accept"
        || (dest == Dest::Http && matches!(point, "after_poll_complete" | "after_stats"))
}

/// One line of the summary table.
#[derive(Clone, Debug)]
struct Row {
    case: String,
    /// Records the destination took more than once (sum over records of
    /// `times - 1`); `None` when skipped.
    duplicates: Option<u64>,
    succeeded: u64,
    aborted: u64,
    settle: Duration,
}

async fn store_url(store: Store, dir: &Path, test: &str) -> Option<(String, Option<TestDatabase>)> {
    match store {
        Store::Sqlite => Some((format!("sqlite://{}/jobs.db", dir.display()), None)),
        Store::Postgres => {
            let db = TestDatabase::create(test).await?;
            Some((db.url().to_string(), Some(db)))
        }
    }
}

/// Checks every job against the destination's record; returns the
/// duplicate count and the terminal counts.
async fn verify(
    d: &Daemon,
    label: &str,
    dest: Dest,
    stand_in: &StandIn,
    point: &str,
    in_flight: usize,
) -> (u64, u64, u64) {
    let delivered = stand_in.delivered();
    let (mut succeeded, mut aborted) = (0u64, 0u64);
    for i in 0..JOBS {
        let id = i + 1; // `enqueue` stores lines in order
        let (status, j) = d.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{label}: job {id} lost: {j}");
        let state = j["state"].as_str().unwrap_or_default().to_string();
        let times = delivered.get(&key(dest, i)).copied().unwrap_or(0);
        match state.as_str() {
            "succeeded" => succeeded += 1,
            "aborted" => aborted += 1,
            other => panic!("{label}: job {id} is `{other}` after settling: {j}"),
        }
        if is_bad(i) {
            assert_eq!(
                (state.as_str(), times),
                ("aborted", 0),
                "{label}: a row the stand-in refuses must end aborted and never arrive: {j}"
            );
        }
        assert_eq!(
            state == "succeeded",
            times > 0,
            "{label}: job {id} ({}) is `{state}` but the destination took it {times} time(s): {j}",
            key(dest, i)
        );
    }
    let (status, _) = d.get(&format!("/v1/jobs/{}", JOBS + 1)).await;
    assert_eq!(status, 404, "{label}: no job may appear from nowhere");
    let dest_view = d.counts(dest.id()).await;
    assert_eq!(dest_view["importsInFlight"], 0, "{label}: {dest_view}");

    let duplicates: u64 = delivered
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    if in_duplicate_window(dest, point) {
        assert!(
            duplicates >= 1,
            "{label}: the batch accepted before the crash is sent again after it"
        );
        assert!(
            duplicates as usize <= BATCH * in_flight,
            "{label}: at most the uploads in flight are sent again, got {duplicates} duplicates"
        );
    } else {
        assert_eq!(
            duplicates, 0,
            "{label}: no duplicate outside the accepted-but-not-stored window"
        );
    }
    (duplicates, succeeded, aborted)
}

async fn run_case(store: Store, dest: Dest, point: &'static str) -> Row {
    let label = format!("{store:?}/{dest:?}/{point}");
    let dir = tempfile::tempdir().unwrap();
    let Some((url, db)) = store_url(store, dir.path(), &format!("crash_{point}")).await else {
        return Row {
            case: label,
            duplicates: None,
            succeeded: 0,
            aborted: 0,
            settle: Duration::ZERO,
        };
    };
    let stand_in = StandIn::start(dest).await;
    let cfg = write_config(
        dir.path(),
        &config(
            dir.path(),
            &url,
            "staging",
            &stand_in.destination_toml(),
            IN_FLIGHT,
        ),
    );
    let lines = payloads(dest);
    let cfg2 = cfg.clone();
    let label2 = label.clone();
    tokio::task::spawn_blocking(move || {
        enqueue_file(&cfg2, dest.id(), &lines);
        Armed::start(&cfg2, point, &label2, &[]).wait_for_crash(REACH)
    })
    .await
    .unwrap();

    // What the destination had when the process died.
    let uploaded_at_crash = stand_in.rows_uploaded();
    let polls_at_crash = stand_in.status_polls();
    let fetches_at_crash = stand_in.result_fetches();

    let restarted = Instant::now();
    let cfg2 = cfg.clone();
    let d = tokio::task::spawn_blocking(move || Daemon::start(&cfg2, &[]))
        .await
        .unwrap();
    d.settle(dest.id(), SETTLE).await;
    let settle = restarted.elapsed();
    let (duplicates, succeeded, aborted) =
        verify(&d, &label, dest, &stand_in, point, IN_FLIGHT).await;

    if let Some(uploaded) = stand_in.rows_uploaded() {
        if point == "after_accept" {
            assert!(uploaded > JOBS as u64, "{label}: {uploaded} rows uploaded");
        } else {
            // Imports in flight at the crash were polled again, not uploaded again.
            assert_eq!(
                uploaded, JOBS as u64,
                "{label}: every row is uploaded exactly once (at the crash: {uploaded_at_crash:?})"
            );
        }
        if matches!(point, "after_poll_complete" | "after_stats") {
            assert!(
                stand_in.status_polls() > polls_at_crash,
                "{label}: the import in flight at the crash is polled after the restart"
            );
            // The first batch holds a refused row, so its results are read
            // (again, for `after_stats`) after the restart.
            assert!(
                stand_in.result_fetches() > fetches_at_crash,
                "{label}: the import's per-record results are fetched after the restart"
            );
        }
    }
    drop(d);
    drop(db);
    Row {
        case: label,
        duplicates: Some(duplicates),
        succeeded,
        aborted,
        settle,
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_loses_nothing_and_duplicates_only_in_the_window() {
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    // `CRASH_MATRIX_ONLY=Sqlite/Marketo` runs the cases whose label contains it.
    let only = std::env::var("CRASH_MATRIX_ONLY").ok();
    let mut cases = Vec::new();
    // PostgreSQL cases first: they wait out leases, so they start early.
    for store in [Store::Postgres, Store::Sqlite] {
        for dest in [Dest::Marketo, Dest::Http] {
            for point in POINTS {
                let gate = gate.clone();
                let label = format!("{store:?}/{dest:?}/{point}");
                if !only.as_deref().is_none_or(|f| label.contains(f)) {
                    continue;
                }
                cases.push((
                    label,
                    tokio::spawn(async move {
                        let _permit = gate.acquire_owned().await.unwrap();
                        run_case(store, dest, point).await
                    }),
                ));
            }
        }
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (label, task) in cases {
        match task.await {
            Ok(row) => rows.push(row),
            Err(e) => failures.push(format!("{label}: {}", panic_text(e))),
        }
    }
    rows.sort_by(|a, b| a.case.cmp(&b.case));
    let mut table = String::from(
        "\ncrash-point matrix (50 jobs per case, 3 refused by the stand-in)\n\
         case                                     duplicates  succeeded  aborted  settled in\n",
    );
    for r in &rows {
        match r.duplicates {
            Some(n) => table.push_str(&format!(
                "{:<40} {:>10} {:>10} {:>8} {:>10.1}s\n",
                r.case,
                n,
                r.succeeded,
                r.aborted,
                r.settle.as_secs_f64()
            )),
            None => table.push_str(&format!("{:<40} {:>10}\n", r.case, "skipped")),
        }
    }
    for f in &failures {
        table.push_str(&format!(
            "{:<40} {:>10}\n",
            f.split(':').next().unwrap(),
            "FAILED"
        ));
    }
    table.push_str(&format!(
        "whole matrix: {:.1}s\n",
        started.elapsed().as_secs_f64()
    ));
    println!("{table}");
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_daemons_one_killed_the_other_takes_over_after_the_lease() {
    let Some(db) = TestDatabase::create("crash_two_daemons").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = Dest::Http;
    let stand_in = StandIn::start(dest).await;
    let StandIn::Http(s) = &stand_in else {
        unreachable!()
    };
    // The killed daemon's first upload is held so the survivor is running
    // when it dies there.
    s.push_fault(Fault::status(200).delayed(Duration::from_millis(1500)));
    let toml = stand_in.destination_toml();
    // Daemon `name`'s config: the shared store, its own staging directory.
    let daemon_config = |name: &str| {
        let staging = format!("staging-{name}");
        let cfg = config(dir.path(), db.url(), &staging, &toml, IN_FLIGHT_TWO_DAEMONS);
        write_config_as(dir.path(), name, &cfg)
    };
    let cfg_a = daemon_config("a");
    let cfg_b = daemon_config("b");
    let lines = payloads(dest);
    let a = {
        let cfg_a = cfg_a.clone();
        tokio::task::spawn_blocking(move || {
            enqueue_file(&cfg_a, dest.id(), &lines);
            Armed::start(&cfg_a, "after_accept", "PG two daemons: A", &[])
        })
        .await
        .unwrap()
    };
    wait_until("daemon A never uploaded", REACH, || s.requests() > 0).await;
    let b = tokio::task::spawn_blocking(move || Daemon::start(&cfg_b, &[]))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || a.wait_for_crash(REACH))
        .await
        .unwrap();
    let died = Instant::now();
    b.settle(dest.id(), SETTLE).await;
    let took = died.elapsed();
    let (duplicates, succeeded, aborted) = verify(
        &b,
        "PG two daemons",
        dest,
        &stand_in,
        "after_accept",
        IN_FLIGHT_TWO_DAEMONS,
    )
    .await;
    // The dead daemon's jobs come back once their lease expires and the
    // survivor's next maintenance round (at most every LEASE / 2) takes
    // them; 15 s more for delivering them on a busy machine.
    let bound = LEASE + LEASE / 2 + Duration::from_secs(15);
    assert!(
        took < bound,
        "the survivor took {took:?} to finish the dead daemon's work (bound {bound:?})"
    );
    let line = format!(
        "PG two daemons (A killed at after_accept, B takes over): duplicates {duplicates}, \
         succeeded {succeeded}, aborted {aborted}, settled {:.1}s after the kill",
        took.as_secs_f64()
    );
    println!("{line}");
    eprintln!("{line}");
    drop(b);
    drop(db);
}
