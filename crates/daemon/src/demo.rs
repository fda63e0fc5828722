//! `batchrouterd demo`: the whole product in one process. It starts local
//! stand-ins for the destinations, the daemon on an embedded store in a temp
//! dir, submits the sample jobs in `testdata/demo/` through the HTTP API,
//! shows live progress, prints a per-destination summary with the top abort
//! reasons, and exits 0 when every job ended the way the sample expects.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use batchrouter_config::{load_str, FileFormat, MapEnv, OsEnv};
use batchrouter_core::{JobState, JobStore, NewJob, Timestamp};
use batchrouter_testkit::http::HttpStandIn;
use batchrouter_testkit::klaviyo::{KlaviyoStandIn, KlaviyoStandInOptions};
use batchrouter_testkit::marketo::{MarketoOptions, MarketoStandIn};
use batchrouter_testkit::sshd::Sshd;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::{app, logging};

/// The demo's config, embedded so the binary runs from any directory.
const DEMO_CONFIG: &str = include_str!("../../../config/demo.toml");
/// Sample jobs (NDJSON for `POST /v1/jobs`), embedded for the same reason.
const SAMPLES: &[(&str, &str)] = &[
    (
        "webhook",
        include_str!("../../../testdata/demo/webhook.ndjson"),
    ),
    (
        "warehouse",
        include_str!("../../../testdata/demo/warehouse.ndjson"),
    ),
    (
        "marketo-leads",
        include_str!("../../../testdata/demo/marketo.ndjson"),
    ),
    (
        "klaviyo-profiles",
        include_str!("../../../testdata/demo/klaviyo.ndjson"),
    ),
    (
        "sftp-drop",
        include_str!("../../../testdata/demo/sftp.ndjson"),
    ),
];
/// What each destination should end with.
const EXPECTED: &str = include_str!("../../../testdata/demo/expected.json");
/// Malformed payloads inserted straight into the store, as upstream SQL might.
const MALFORMED: usize = 5;
/// The demo gives up after this long.
const LIMIT: Duration = Duration::from_secs(90);

/// Demo switches.
#[derive(Clone, Copy, Debug, Default)]
pub struct DemoOptions {
    /// Keep the temp dir (store and staging) for inspection.
    pub keep: bool,
}

struct StandIns {
    webhook: HttpStandIn,
    warehouse: HttpStandIn,
    marketo: MarketoStandIn,
    klaviyo: KlaviyoStandIn,
    /// A real OpenSSH server, when one is installed; why not otherwise.
    sshd: Result<Sshd, String>,
}

impl StandIns {
    async fn start() -> Self {
        let webhook = HttpStandIn::start().await;
        webhook.reject_when("id", "reject-", 400);
        let warehouse = HttpStandIn::start().await;
        let marketo = MarketoStandIn::start_with(MarketoOptions {
            polls_to_complete: 2,
            ..MarketoOptions::default()
        })
        .await;
        marketo.fail_rows_matching("bounce.example", "1004 Lead not found");
        marketo.warn_rows_matching("warn.example", "1008 Field value was truncated: lastName");
        let klaviyo = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
            polls_to_complete: 2,
            ..KlaviyoStandInOptions::default()
        })
        .await;
        klaviyo.reject_profiles_where("email", "@invalid");
        klaviyo.fail_in_import_where("email", "@suppressed.example");
        let sshd = tokio::task::spawn_blocking(Sshd::start)
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        StandIns {
            webhook,
            warehouse,
            marketo,
            klaviyo,
            sshd,
        }
    }
}

/// Runs the demo; the exit code says whether every job ended as expected.
pub async fn run(opts: DemoOptions) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("batchrouter-demo-")
        .tempdir()?;
    let standins = StandIns::start().await;
    let token = format!("demo-{:016x}", fastrand::u64(..));
    let vars = [
        ("DEMO_DIR", dir.path().display().to_string()),
        ("DEMO_WEBHOOK_URL", standins.webhook.url()),
        ("DEMO_WEBHOOK_TOKEN", token),
        ("DEMO_WAREHOUSE_URL", standins.warehouse.url()),
        ("DEMO_MARKETO_URL", standins.marketo.base_url()),
        (
            "DEMO_MARKETO_CLIENT_ID",
            standins.marketo.client_id().to_string(),
        ),
        (
            "DEMO_MARKETO_CLIENT_SECRET",
            standins.marketo.client_secret().to_string(),
        ),
        ("DEMO_KLAVIYO_URL", standins.klaviyo.base_url()),
        ("DEMO_KLAVIYO_KEY", standins.klaviyo.api_key().to_string()),
    ];
    let mut vars: Vec<(String, String)> =
        vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let config_text = match &standins.sshd {
        Ok(sshd) => {
            vars.extend([
                ("DEMO_SFTP_PORT".to_string(), sshd.port().to_string()),
                ("DEMO_SFTP_USER".to_string(), sshd.user().to_string()),
                (
                    "DEMO_SFTP_KEY".to_string(),
                    sshd.client_key_path().display().to_string(),
                ),
                (
                    "DEMO_SFTP_FINGERPRINT".to_string(),
                    sshd.host_key_fingerprint().to_string(),
                ),
                (
                    "DEMO_SFTP_ROOT".to_string(),
                    sshd.upload_root().display().to_string(),
                ),
            ]);
            DEMO_CONFIG.to_string()
        }
        Err(_) => without_block(DEMO_CONFIG, "sftp"),
    };
    let env = MapEnv::over(vars, Arc::new(OsEnv));
    let cfg = load_str(
        &config_text,
        FileFormat::Toml,
        Arc::new(env),
        &batchrouter_destinations::REGISTRY,
    )
    .context("the demo config is invalid")?;
    let configured: Vec<String> = cfg.destinations.iter().map(|d| d.id.clone()).collect();
    logging::init(&cfg.logging);
    let app = app::start(&cfg).await?;
    println!("batchrouter demo");
    println!(
        "  API        http://{}   (try /v1/destinations and /metrics while it runs)",
        app.addr()
    );
    println!(
        "  store      {}  ({})",
        dir.path().join("demo.db").display(),
        if opts.keep {
            "kept after the demo"
        } else {
            "deleted at exit; --keep keeps it"
        }
    );
    println!(
        "  stand-ins  webhook {}  warehouse {}  marketo {}  klaviyo {}",
        standins.webhook.url(),
        standins.warehouse.url(),
        standins.marketo.base_url(),
        standins.klaviyo.base_url()
    );
    match &standins.sshd {
        Ok(sshd) => println!(
            "  sftp       OpenSSH on 127.0.0.1:{}, files under {}",
            sshd.port(),
            sshd.upload_root().display()
        ),
        Err(why) => println!("  sftp       skipped: {why}"),
    }

    let mut ids = submit(&app.addr().to_string(), &configured).await?;
    let malformed: Vec<NewJob> = (0..MALFORMED)
        .map(|i| NewJob {
            destination_id: "warehouse".into(),
            payload: format!("{{\"id\": \"broken-{i}\", \"total\": "),
            message_id: None,
        })
        .collect();
    for ins in app.store().insert_jobs(malformed, Timestamp::now()).await? {
        ids.entry("warehouse".into()).or_default().push(ins.job_id);
    }
    let total: usize = ids.values().map(Vec::len).sum();
    println!("  submitted  {total} jobs ({MALFORMED} of them malformed, inserted straight into the store)\n");

    let store = app.store();
    let settled = watch_progress(&store, &ids).await?;
    let summary = summarize(&store, &ids).await?;
    app.shutdown().await;
    print_summary(&summary);
    let verdict = check(&summary, &standins)?;
    println!(
        "\nDemo finished in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        if settled && verdict.is_empty() {
            "every job ended as expected.".to_string()
        } else {
            format!("UNEXPECTED RESULTS:\n  {}", verdict.join("\n  "))
        }
    );
    if opts.keep {
        let kept = dir.keep();
        println!(
            "Kept the demo's store and staging directory in {}",
            kept.display()
        );
    }
    Ok(if settled && verdict.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The config text without the block between `# >>> name` and `# <<< name`.
fn without_block(text: &str, name: &str) -> String {
    let (open, close) = (format!("# >>> {name}"), format!("# <<< {name}"));
    let mut out = String::with_capacity(text.len());
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with(&open) {
            skipping = true;
        } else if line.starts_with(&close) {
            skipping = false;
        } else if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Posts every sample file of a configured destination as NDJSON; returns
/// the new job ids per destination.
async fn submit(addr: &str, configured: &[String]) -> anyhow::Result<BTreeMap<String, Vec<i64>>> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/jobs");
    let mut ids: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (dest, text) in SAMPLES
        .iter()
        .filter(|(d, _)| configured.iter().any(|c| c == d))
    {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for chunk in lines.chunks(400) {
            let resp = client
                .post(&url)
                .header("content-type", "application/x-ndjson")
                .body(chunk.join("\n"))
                .send()
                .await
                .context("submitting sample jobs")?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            if status.as_u16() != 202 {
                bail!("the API refused the sample jobs for {dest}: {status} {body}");
            }
            for j in body["jobs"].as_array().into_iter().flatten() {
                if j["duplicate"] != true {
                    ids.entry(dest.to_string())
                        .or_default()
                        .push(j["jobId"].as_i64().unwrap_or(0));
                }
            }
        }
    }
    Ok(ids)
}

fn open_jobs(c: &batchrouter_core::store::DestinationCounts) -> u64 {
    [
        JobState::Waiting,
        JobState::Executing,
        JobState::Importing,
        JobState::Failed,
    ]
    .iter()
    .map(|s| c.by_state.get(s).copied().unwrap_or(0))
    .sum()
}

/// Live progress until every job is terminal; false on timeout.
async fn watch_progress(
    store: &Arc<dyn JobStore>,
    ids: &BTreeMap<String, Vec<i64>>,
) -> anyhow::Result<bool> {
    let tty = std::io::stdout().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("  {prefix:<18} [{bar:32}] {pos:>5}/{len:<5} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: BTreeMap<&str, ProgressBar> = ids
        .iter()
        .map(|(d, v)| {
            let bar = if tty {
                multi.add(ProgressBar::new(v.len() as u64))
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(style.clone());
            bar.set_prefix(d.clone());
            (d.as_str(), bar)
        })
        .collect();
    let start = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let counts = store.destination_counts().await?;
        let mut open = 0;
        for (d, bar) in &bars {
            let c = counts.get(*d).cloned().unwrap_or_default();
            let n = |s: JobState| c.by_state.get(&s).copied().unwrap_or(0);
            let done = n(JobState::Succeeded) + n(JobState::Aborted);
            open += open_jobs(&c);
            let msg = format!(
                "succeeded {} · aborted {} · importing {} · retrying {}",
                n(JobState::Succeeded),
                n(JobState::Aborted),
                n(JobState::Importing),
                n(JobState::Failed)
            );
            bar.set_position(done);
            bar.set_message(msg.clone());
            if !tty && last_line.elapsed() >= Duration::from_secs(1) {
                println!(
                    "  {d:<18} {done:>5}/{:<5} {msg}",
                    ids.get(*d).map_or(0, Vec::len)
                );
            }
        }
        if !tty && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
        }
        if open == 0 {
            bars.values().for_each(|b| b.finish());
            return Ok(true);
        }
        if start.elapsed() > LIMIT {
            bars.values().for_each(|b| b.abandon());
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::reason_key;

    #[test]
    fn reasons_group_by_shape_not_by_record() {
        assert_eq!(
            reason_key(
                "destination_rejected",
                "HTTP 400: record reject-107 rejected"
            ),
            "destination_rejected: HTTP 400: record reject-# rejected"
        );
        assert_eq!(
            reason_key("record_rejected", "1004 Lead not found"),
            "record_rejected: 1004 Lead not found"
        );
    }
}

#[derive(Default)]
struct DestSummary {
    succeeded: u64,
    failed: u64,
    aborted: u64,
    open: u64,
    notes: u64,
    reasons: BTreeMap<String, u64>,
}

/// Masks the numbers inside record ids (`reject-123` → `reject-#`) so
/// reasons that differ only by record group together; codes and statuses
/// (`HTTP 400`, `1004`) stay as they are.
fn reason_key(code: &str, message: &str) -> String {
    let mut masked = String::with_capacity(message.len());
    let mut prev: Option<char> = None;
    let mut in_id_number = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if in_id_number {
                prev = Some(c);
                continue;
            }
            if prev.is_some_and(|p| p == '-' || p.is_ascii_alphabetic()) {
                in_id_number = true;
                masked.push('#');
                prev = Some(c);
                continue;
            }
        } else {
            in_id_number = false;
        }
        masked.push(c);
        prev = Some(c);
    }
    let short: String = masked.chars().take(100).collect();
    format!("{code}: {short}")
}

async fn summarize(
    store: &Arc<dyn JobStore>,
    ids: &BTreeMap<String, Vec<i64>>,
) -> anyhow::Result<BTreeMap<String, DestSummary>> {
    let mut out = BTreeMap::new();
    for (dest, list) in ids {
        let mut s = DestSummary::default();
        for id in list {
            let Some(j) = store.get_job(*id).await? else {
                continue;
            };
            match j.state {
                JobState::Succeeded => {
                    s.succeeded += 1;
                    s.notes += u64::from(j.note.is_some());
                }
                JobState::Aborted => {
                    s.aborted += 1;
                    if let Some(e) = &j.error {
                        *s.reasons
                            .entry(reason_key(e.code.as_str(), &e.message))
                            .or_default() += 1;
                    }
                }
                JobState::Failed => s.failed += 1,
                _ => s.open += 1,
            }
        }
        out.insert(dest.clone(), s);
    }
    Ok(out)
}

fn print_summary(summary: &BTreeMap<String, DestSummary>) {
    println!(
        "\n  {:<18} {:>9} {:>7} {:>8} {:>6}",
        "destination", "succeeded", "failed", "aborted", "open"
    );
    for (d, s) in summary {
        println!(
            "  {d:<18} {:>9} {:>7} {:>8} {:>6}",
            s.succeeded, s.failed, s.aborted, s.open
        );
    }
    for (d, s) in summary {
        if s.reasons.is_empty() && s.notes == 0 {
            continue;
        }
        println!("\n  {d}:");
        if s.notes > 0 {
            println!(
                "    {:>5} succeeded with a destination warning kept as the job's note",
                s.notes
            );
        }
        let mut top: Vec<_> = s.reasons.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (reason, n) in top.into_iter().take(3) {
            println!("    {n:>5} aborted  {reason}");
        }
    }
}

/// Compares with `expected.json` and the stand-ins' own counts.
fn check(
    summary: &BTreeMap<String, DestSummary>,
    standins: &StandIns,
) -> anyhow::Result<Vec<String>> {
    let expected: Value = serde_json::from_str(EXPECTED)?;
    let mut problems = Vec::new();
    for (dest, want) in expected.as_object().into_iter().flatten() {
        if dest == "sftp-drop" && standins.sshd.is_err() {
            continue;
        }
        let got = summary.get(dest);
        let field = |k: &str| want.get(k).and_then(Value::as_u64);
        let pairs = [
            ("succeeded", got.map_or(0, |s| s.succeeded)),
            ("aborted", got.map_or(0, |s| s.aborted)),
            ("notes", got.map_or(0, |s| s.notes)),
        ];
        for (k, have) in pairs {
            if let Some(w) = field(k) {
                if w != have {
                    problems.push(format!("{dest}: expected {w} {k}, got {have}"));
                }
            }
        }
    }
    let twice = |m: std::collections::HashMap<String, u32>| m.values().filter(|&&v| v > 1).count();
    for (name, dup) in [
        ("webhook", twice(standins.webhook.accepted())),
        ("warehouse", twice(standins.warehouse.accepted())),
        ("marketo-leads", twice(standins.marketo.imported())),
        ("klaviyo-profiles", twice(standins.klaviyo.imported())),
    ] {
        if dup > 0 {
            problems.push(format!("{name}: {dup} record(s) delivered more than once"));
        }
    }
    if let Ok(sshd) = &standins.sshd {
        let files = csv_files(&sshd.upload_root().join("drops"));
        let rows: usize = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .map(|t| t.lines().count().saturating_sub(1))
                    .unwrap_or(0)
            })
            .sum();
        let want = summary.get("sftp-drop").map_or(0, |s| s.succeeded as usize);
        println!(
            "\n  sftp-drop wrote {} CSV file(s) with {rows} row(s), e.g. {}",
            files.len(),
            files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        );
        if rows != want {
            problems.push(format!(
                "sftp-drop: {rows} CSV rows on the server for {want} succeeded jobs"
            ));
        }
        let partial = files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "part"))
            .count();
        if partial > 0 {
            problems.push(format!(
                "sftp-drop: {partial} partial upload(s) left on the server"
            ));
        }
    }
    Ok(problems)
}

/// Every file under `dir`, recursively (the demo's SFTP drops).
fn csv_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
