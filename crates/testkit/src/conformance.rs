//! The manager conformance suite: one set of checks that every destination
//! manager must pass against its stand-in, as `crates/store/tests/conformance`
//! is for stores. A destination wires itself in with a [`Target`] in its
//! `tests/conformance.rs` and calls [`run_all`]; the checks are the manager
//! contract of `DESIGN.md` ("The manager contract"):
//!
//! - [`check_accounting`]: every job named exactly once in the upload output
//!   (`validate_upload_output`), imports driven to the end, every record
//!   received by the stand-in exactly once;
//! - [`check_restart`]: import contexts survive a JSON round trip and a
//!   manager rebuilt from config polls them and reads their stats;
//! - [`check_stats_by_job_id`]: per-record rejections land on the jobs that
//!   carried the rejected records (scattered, shuffled ids), nowhere else;
//! - [`check_throttling`]: a throttling stand-in gives `Throttled` outcomes
//!   (code `throttled`), never failed or aborted jobs;
//! - [`check_bad_records`]: a payload the transform refuses is refused alone,
//!   and the rest of the batch is delivered;
//! - [`check_secrets`]: no secret in any log line (global capture at TRACE,
//!   the HTTP stack included), in the `Debug` of outputs, poll states, stats,
//!   config problems or the destination's own `Debug` views.
//!
//! Checks panic with `[conformance:<check>]` in the message when a contract
//! is broken; a check that does not apply to a destination (no throttling
//! over SFTP) reports itself not applicable, and the destination's test pins
//! which ones those are.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use batchrouter_core::{
    validate_upload_output, AsyncDestinationManager, ConfigProblems, DestinationContext, ErrorCode,
    ImportHandle, JobId, Outcome, UploadOutput,
};
use serde_json::Value;

use crate::logs::LogCapture;
use crate::manager::{drive, handles, stage_for, BatchSpec, RecordingTelemetry};

/// What a destination supplies to be checked: how to build its manager,
/// records for its stand-in, and how to ask the stand-in what it received.
pub trait Target: Send + Sync {
    /// The destination type name (`HTTP`, `SFTP`, …).
    fn destination_type(&self) -> &str;

    /// A valid config pointing at the stand-in, secrets included.
    fn config(&self) -> Value;

    /// Builds a manager from a config value, as the registry does.
    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems>;

    /// A valid payload whose record the stand-in will know by `key`.
    fn payload(&self, key: &str) -> String;

    /// How many times the stand-in took in the record known by `key`.
    fn received(&self, key: &str) -> u32;

    /// Payloads the transform must refuse besides invalid JSON, which every
    /// destination refuses.
    fn bad_payloads(&self) -> Vec<String> {
        Vec::new()
    }

    /// A payload that transforms fine but the stand-in rejects per record
    /// (in the upload answer or in the import's results); `None` when the
    /// destination has no per-record rejection.
    fn rejected_payload(&self, _key: &str) -> Option<String> {
        None
    }

    /// Makes the stand-in throttle the next upload request; false when the
    /// destination has no throttling.
    fn throttle_next_upload(&self) -> bool {
        false
    }

    /// Whether uploads start asynchronous imports (Marketo, Klaviyo) or
    /// decide every job at once (HTTP, SFTP).
    fn starts_imports(&self) -> bool;

    /// Strings that must never be logged or shown by `Debug`; read at the
    /// end of the run, so tokens issued meanwhile can be included.
    fn secrets(&self) -> Vec<String>;

    /// `Debug` renderings of the destination's own types built from
    /// `config` (settings, manager), checked for secrets.
    fn debug_views(&self, _config: &Value) -> Vec<String> {
        Vec::new()
    }
}

/// What a check concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The contract holds.
    Passed,
    /// The check does not apply to this destination, and why.
    NotApplicable(&'static str),
}

/// Every check's verdict, in run order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `(check name, verdict)`.
    pub verdicts: Vec<(&'static str, Verdict)>,
}

impl Report {
    /// Names of the checks that did not apply, for the caller to pin.
    pub fn not_applicable(&self) -> Vec<&'static str> {
        self.verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::NotApplicable(_)))
            .map(|(n, _)| *n)
            .collect()
    }
}

/// One run of the suite against one target: a scratch dir, the Debug texts
/// seen so far (checked for secrets at the end) and the manager's telemetry.
pub struct Run<'a> {
    target: &'a dyn Target,
    dir: tempfile::TempDir,
    seen: Mutex<Vec<String>>,
    telemetry: Arc<RecordingTelemetry>,
}

/// The destination id every manager of the suite is built under.
pub const DESTINATION_ID: &str = "conformance";

/// Records per sample batch: small, so the suite runs in seconds.
const SAMPLE: usize = 12;

impl<'a> Run<'a> {
    /// A run against `target`.
    pub fn new(target: &'a dyn Target) -> Self {
        Run {
            target,
            dir: tempfile::tempdir().expect("scratch dir"),
            seen: Mutex::new(Vec::new()),
            telemetry: Arc::new(RecordingTelemetry::default()),
        }
    }

    /// A fresh manager built from the target's config, as at daemon start.
    pub fn manager(&self) -> Arc<dyn AsyncDestinationManager> {
        let ctx = DestinationContext {
            id: DESTINATION_ID.into(),
            destination_type: self.target.destination_type().into(),
            telemetry: self.telemetry.clone(),
        };
        self.seen.lock().unwrap().push(format!("{ctx:?}"));
        match self.target.build(&ctx, &self.target.config()) {
            Ok(m) => m,
            Err(e) => fail("build", format!("the target's config does not build: {e}")),
        }
    }

    fn spec(&self) -> BatchSpec {
        BatchSpec::new(DESTINATION_ID, self.target.destination_type())
    }

    fn note(&self, what: impl std::fmt::Debug) {
        self.seen.lock().unwrap().push(format!("{what:?}"));
    }

    /// Uploads, keeps the output for the secrets check and checks the
    /// partition: every job of the batch named exactly once.
    async fn upload(
        &self,
        check: &str,
        m: &dyn AsyncDestinationManager,
        batch: &batchrouter_core::StagedBatch,
    ) -> UploadOutput {
        let out = m.upload(batch).await;
        self.note(&out);
        if let Err(v) = validate_upload_output(&batch.job_ids, &out) {
            fail(check, format!("{v}: {out:?}"));
        }
        out
    }

    /// Drives imports to their end, keeping the stats for the secrets check.
    async fn drive(
        &self,
        m: &dyn AsyncDestinationManager,
        hs: &[ImportHandle],
    ) -> HashMap<JobId, Outcome> {
        for h in hs {
            self.note(m.poll(h).await);
        }
        let outcomes = drive(m, hs).await;
        self.note(&outcomes);
        outcomes
    }
}

fn fail(check: &str, detail: impl std::fmt::Display) -> ! {
    panic!("[conformance:{check}] {detail}")
}

/// A record key unique in this process, the same width for every key so
/// none occurs inside another.
fn key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("c{:06}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Job ids that are neither 1.. nor in line order, so a manager that keys
/// results by line index or sorts ids is caught.
fn scattered_ids(n: usize) -> Vec<JobId> {
    let mut ids: Vec<JobId> = (0..n as i64).map(|i| 1_000_003 + i * 7_919).collect();
    ids.reverse();
    ids.swap(0, n / 2);
    ids
}

fn good_jobs(t: &dyn Target, n: usize) -> Vec<(JobId, String, String)> {
    scattered_ids(n)
        .into_iter()
        .map(|id| {
            let k = key();
            (id, t.payload(&k), k)
        })
        .collect()
}

fn expect_received_once(check: &str, t: &dyn Target, keys: &[String]) {
    for k in keys {
        let n = t.received(k);
        if n != 1 {
            fail(
                check,
                format!("the stand-in received record {k} {n} times, not once"),
            );
        }
    }
}

/// Every job of a good batch is named exactly once by the upload, ends
/// succeeded after its import (if any), and reaches the stand-in once.
pub async fn check_accounting(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "accounting";
    let t = run.target;
    let m = run.manager();
    let jobs = good_jobs(t, SAMPLE);
    let (batch, rejected) = stage_for(
        run.dir.path(),
        &run.spec(),
        m.as_ref(),
        jobs.iter().map(|(id, p, _)| (*id, p.clone())),
    );
    if !rejected.is_empty() {
        fail(
            CHECK,
            format!("good payloads refused by transform: {rejected:?}"),
        );
    }
    let out = run.upload(CHECK, m.as_ref(), &batch).await;
    if t.starts_imports() && out.imports.is_empty() {
        fail(CHECK, format!("no import started: {out:?}"));
    }
    if !t.starts_imports() && !out.imports.is_empty() {
        fail(
            CHECK,
            format!("a fire-and-forget destination started imports: {out:?}"),
        );
    }
    if out.imports.iter().any(|i| i.job_ids.is_empty()) {
        fail(CHECK, format!("an import covers no job: {out:?}"));
    }
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(run.drive(m.as_ref(), &handles(DESTINATION_ID, &out)).await);
    for (id, _, _) in &jobs {
        match all.get(id) {
            Some(Outcome::Succeeded { .. }) => {}
            other => fail(CHECK, format!("job {id} ended {other:?}, not succeeded")),
        }
    }
    let keys: Vec<String> = jobs.into_iter().map(|(_, _, k)| k).collect();
    expect_received_once(CHECK, t, &keys);
    m.close().await;
    Verdict::Passed
}

/// Imports survive a restart: contexts go through JSON text and back, and a
/// manager rebuilt from config (nothing kept in memory) polls them and reads
/// their stats to the same final outcomes.
pub async fn check_restart(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "restart";
    let t = run.target;
    if !t.starts_imports() {
        return Verdict::NotApplicable("fire-and-forget: nothing to poll after a restart");
    }
    let first = run.manager();
    let mut jobs = good_jobs(t, SAMPLE);
    let rejected_keys: Vec<(JobId, String)> = if t.rejected_payload("probe").is_some() {
        // Half the batch is rejected per record, so the stats matter too.
        jobs.iter_mut()
            .step_by(2)
            .map(|(id, p, k)| {
                *p = t.rejected_payload(k).expect("rejected payload");
                (*id, k.clone())
            })
            .collect()
    } else {
        Vec::new()
    };
    let (batch, _) = stage_for(
        run.dir.path(),
        &run.spec(),
        first.as_ref(),
        jobs.iter().map(|(id, p, _)| (*id, p.clone())),
    );
    let out = run.upload(CHECK, first.as_ref(), &batch).await;
    if out.imports.is_empty() {
        fail(CHECK, format!("no import started: {out:?}"));
    }
    // The daemon stops: only the persisted text of each context is left.
    let persisted: Vec<String> = out
        .imports
        .iter()
        .map(|i| serde_json::to_string(&i.context).expect("contexts are JSON"))
        .collect();
    first.close().await;
    drop(first);
    let mut restored = out.clone();
    for (imp, text) in restored.imports.iter_mut().zip(&persisted) {
        imp.context = serde_json::from_str(text).expect("persisted context parses");
    }
    let second = run.manager();
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(
        run.drive(second.as_ref(), &handles(DESTINATION_ID, &restored))
            .await,
    );
    for (id, _, _) in &jobs {
        let rejected = rejected_keys.iter().any(|(r, _)| r == id);
        match all.get(id) {
            Some(Outcome::Succeeded { .. }) if !rejected => {}
            Some(Outcome::Aborted(_) | Outcome::Failed(_)) if rejected => {}
            other => fail(
                CHECK,
                format!("after the restart job {id} (rejected: {rejected}) ended {other:?}"),
            ),
        }
    }
    second.close().await;
    Verdict::Passed
}

/// Per-record rejections from the stand-in land on exactly the jobs whose
/// records were rejected, whether the upload answer or the import's results
/// report them: results are matched by job id, not position or content.
pub async fn check_stats_by_job_id(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "stats_by_job_id";
    let t = run.target;
    if t.rejected_payload("probe").is_none() {
        return Verdict::NotApplicable("the destination rejects no single record");
    }
    let m = run.manager();
    let mut jobs = good_jobs(t, SAMPLE);
    let mut rejected = Vec::new();
    for (i, (id, p, k)) in jobs.iter_mut().enumerate() {
        if i % 3 == 1 {
            *p = t.rejected_payload(k).expect("rejected payload");
            rejected.push(*id);
        }
    }
    let (batch, refused) = stage_for(
        run.dir.path(),
        &run.spec(),
        m.as_ref(),
        jobs.iter().map(|(id, p, _)| (*id, p.clone())),
    );
    if !refused.is_empty() {
        fail(
            CHECK,
            format!("rejected payloads must transform fine: {refused:?}"),
        );
    }
    let out = run.upload(CHECK, m.as_ref(), &batch).await;
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(run.drive(m.as_ref(), &handles(DESTINATION_ID, &out)).await);
    for (id, _, k) in &jobs {
        let want_rejected = rejected.contains(id);
        match all.get(id) {
            Some(Outcome::Succeeded { .. }) if !want_rejected => {
                expect_received_once(CHECK, t, std::slice::from_ref(k))
            }
            Some(Outcome::Aborted(e) | Outcome::Failed(e))
                if want_rejected && !e.message.trim().is_empty() => {}
            other => fail(
                CHECK,
                format!("job {id} (record rejected: {want_rejected}) ended {other:?}"),
            ),
        }
    }
    m.close().await;
    Verdict::Passed
}

/// A throttling stand-in gives `Throttled` outcomes (code `throttled`, no
/// attempt burnt), never failed or aborted jobs; nothing is lost.
pub async fn check_throttling(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "throttling";
    let t = run.target;
    let m = run.manager();
    let jobs = good_jobs(t, SAMPLE);
    let (batch, _) = stage_for(
        run.dir.path(),
        &run.spec(),
        m.as_ref(),
        jobs.iter().map(|(id, p, _)| (*id, p.clone())),
    );
    if !t.throttle_next_upload() {
        return Verdict::NotApplicable("the destination never throttles");
    }
    let out = run.upload(CHECK, m.as_ref(), &batch).await;
    let mut throttled = 0;
    for (id, o) in &out.outcomes {
        match o {
            Outcome::Throttled(e) if e.code == ErrorCode::Throttled => throttled += 1,
            Outcome::Succeeded { .. } => {}
            other => fail(CHECK, format!("job {id} ended {other:?} while throttled")),
        }
    }
    if throttled == 0 {
        fail(
            CHECK,
            format!("a throttled upload throttled no job: {out:?}"),
        );
    }
    m.close().await;
    Verdict::Passed
}

/// A payload the transform refuses is refused alone, with a reason; the
/// rest of the batch is staged and delivered.
pub async fn check_bad_records(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "bad_records";
    let t = run.target;
    let m = run.manager();
    let mut bad = vec!["{\"broken\": ".to_string()];
    bad.extend(t.bad_payloads());
    let good = good_jobs(t, SAMPLE);
    let mut jobs: Vec<(JobId, String)> = Vec::new();
    let mut bad_ids = Vec::new();
    for (i, (id, p, _)) in good.iter().enumerate() {
        jobs.push((*id, p.clone()));
        if let Some(b) = bad.get(i) {
            let bad_id = id + 1;
            jobs.push((bad_id, b.clone()));
            bad_ids.push(bad_id);
        }
    }
    let (batch, refused) = stage_for(run.dir.path(), &run.spec(), m.as_ref(), jobs);
    let refused_ids: Vec<JobId> = refused.iter().map(|(id, _)| *id).collect();
    if refused_ids != bad_ids {
        fail(
            CHECK,
            format!("transform refused {refused:?}; the bad payloads were jobs {bad_ids:?}"),
        );
    }
    if let Some((id, e)) = refused.iter().find(|(_, e)| e.0.trim().is_empty()) {
        fail(CHECK, format!("job {id} refused without a reason: {e:?}"));
    }
    run.note(&refused);
    let want: Vec<JobId> = good.iter().map(|(id, _, _)| *id).collect();
    if batch.job_ids != want {
        fail(
            CHECK,
            format!(
                "staged {:?}, expected the good jobs {want:?}",
                batch.job_ids
            ),
        );
    }
    let out = run.upload(CHECK, m.as_ref(), &batch).await;
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(run.drive(m.as_ref(), &handles(DESTINATION_ID, &out)).await);
    for id in &want {
        if !matches!(all.get(id), Some(Outcome::Succeeded { .. })) {
            fail(
                CHECK,
                format!("good job {id} ended {:?} beside bad records", all.get(id)),
            );
        }
    }
    let keys: Vec<String> = good.into_iter().map(|(_, _, k)| k).collect();
    expect_received_once(CHECK, t, &keys);
    m.close().await;
    Verdict::Passed
}

/// The global log capture of this test binary (installed once, at TRACE,
/// so the HTTP stack's own logs are searched too).
pub fn global_logs() -> &'static LogCapture {
    static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
    CAPTURE.get_or_init(|| LogCapture::install_global(tracing::Level::TRACE))
}

/// No secret in the logs of everything the run did, nor in the `Debug` of
/// what the manager returned, the config problems of a misspelt config, the
/// telemetry, or the destination's own `Debug` views.
pub async fn check_secrets(run: &Run<'_>) -> Verdict {
    const CHECK: &str = "secrets";
    let t = run.target;
    let config = t.config();
    let secrets = t.secrets();
    if secrets.is_empty() {
        fail(CHECK, "the target names no secret to look for");
    }
    if let Some(s) = secrets.iter().find(|s| s.len() < 6) {
        fail(CHECK, format!("secret {s:?} is too short to search for"));
    }
    // A misspelt key holding a secret, and a config of the wrong shape.
    let mut misspelt = config.clone();
    if let Value::Object(map) = &mut misspelt {
        map.insert(
            "conformanceMisspeltKey".into(),
            Value::String(secrets[0].clone()),
        );
    }
    let ctx = DestinationContext {
        id: DESTINATION_ID.into(),
        destination_type: t.destination_type().into(),
        telemetry: run.telemetry.clone(),
    };
    let mut views = run.seen.lock().unwrap().clone();
    match t.build(&ctx, &misspelt) {
        Ok(_) => fail(CHECK, "a config with an unknown key was accepted"),
        Err(e) => views.push(format!("{e} {e:?}")),
    }
    views.extend(t.debug_views(&config));
    views.push(format!("{:?}", run.telemetry.statuses()));
    tracing::trace!(
        destination_type = t.destination_type(),
        "conformance secrets check"
    );
    let logs = global_logs().text();
    if !logs.contains("conformance secrets check") {
        fail(
            CHECK,
            "the log capture sees nothing: another subscriber is installed",
        );
    }
    for s in &secrets {
        if logs.contains(s.as_str()) {
            fail(CHECK, format!("secret {s:?} is in the logs"));
        }
        if let Some(v) = views.iter().find(|v| v.contains(s.as_str())) {
            fail(CHECK, format!("secret {s:?} is in a Debug view: {v}"));
        }
    }
    Verdict::Passed
}

/// Runs every check against `target` in order (the secrets check last, over
/// everything the others logged) and returns each verdict. The caller's test
/// binary must not install another global tracing subscriber.
pub async fn run_all(target: &dyn Target) -> Report {
    global_logs();
    let run = Run::new(target);
    let mut report = Report::default();
    report
        .verdicts
        .push(("accounting", check_accounting(&run).await));
    report.verdicts.push(("restart", check_restart(&run).await));
    report
        .verdicts
        .push(("stats_by_job_id", check_stats_by_job_id(&run).await));
    report
        .verdicts
        .push(("bad_records", check_bad_records(&run).await));
    report
        .verdicts
        .push(("throttling", check_throttling(&run).await));
    report.verdicts.push(("secrets", check_secrets(&run).await));
    report
}

/// Reads every file below `dir` (recursively) as text, for destinations
/// whose stand-in is a file system (SFTP): how often `needle` occurs.
pub fn occurrences_below(dir: &Path, needle: &str) -> u32 {
    fn walk(dir: &Path, needle: &str, n: &mut u32) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, needle, n);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                *n += text.matches(needle).count() as u32;
            }
        }
    }
    let mut n = 0;
    walk(dir, needle, &mut n);
    n
}
