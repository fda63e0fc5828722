//! The daemon binary end to end: API intake and status, metrics, kill -9
//! and SIGTERM, bad input, redrive, check-config and enqueue.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use batchrouter_testkit::http::{Fault, HttpStandIn};
use batchrouter_testkit::marketo::{MarketoOptions, MarketoStandIn};
use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

fn http_config(dir: &std::path::Path, url: &str, extra_server: &str, router: &str) -> String {
    let dest = http_destination("web", url, Some(200));
    daemon_config(
        extra_server,
        &sqlite_url(dir),
        &dir.join("staging"),
        router,
        &dest,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_jobs_through_the_api_with_status_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let cfg = write_config(dir.path(), &http_config(dir.path(), &s.url(), "", ""));
    let d = Daemon::start(&cfg, &[]);
    let (status, a) = d
        .post(
            "/v1/jobs",
            "application/json",
            envelope("web", "j", 0..2500),
        )
        .await;
    assert_eq!(status, 202, "{a}");
    assert_eq!(a["status"], "accepted");
    let (status, b) = d
        .post(
            "/v1/jobs",
            "application/x-ndjson",
            ndjson("web", "n", 0..2500),
        )
        .await;
    assert_eq!(status, 202, "{b}");
    let mut ids: Vec<i64> = Vec::new();
    for body in [&a, &b] {
        for j in body["jobs"].as_array().unwrap() {
            assert_eq!(j["duplicate"], false);
            let id = j["jobId"].as_i64().unwrap();
            assert_eq!(j["statusUrl"], format!("/v1/jobs/{id}"));
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), 5000);
    // Poll one job's status URL until terminal, then check them all.
    let start = Instant::now();
    loop {
        let (_, j) = d.get(&format!("/v1/jobs/{}", ids[4999])).await;
        if j["state"] == "succeeded" {
            break;
        }
        assert!(start.elapsed() < LIMIT, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = d.settle("web", LIMIT).await;
    assert_eq!(c["counts"]["succeeded"], 5000, "{c}");
    for id in ids.iter().step_by(97) {
        let (status, j) = d.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1);
        assert_eq!(j["destinationId"], "web");
        assert!(j["completedAt"].as_str().unwrap().ends_with('Z'));
        assert!(j.get("error").is_none());
    }
    assert_eq!(s.accepted().len(), 5000);
    assert!(s.accepted().values().all(|&n| n == 1));

    let text = d.get_text("/metrics").await;
    let labels = ["destination_type=\"HTTP\"", "destination_id=\"web\""];
    assert_eq!(
        metric(&text, "batchrouter_jobs_received_total", &labels),
        Some(5000.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "batchrouter_jobs_total",
            &[labels[0], labels[1], "state=\"succeeded\""]
        ),
        Some(5000.0)
    );
    assert!(
        metric(&text, "batchrouter_uploads_total", &["result=\"success\""]).unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "batchrouter_destination_requests_total",
            &["status=\"200\""]
        )
        .unwrap()
            >= 25.0
    );
    assert!(
        metric(
            &text,
            "batchrouter_store_op_duration_seconds_count",
            &["op=\"claim_jobs\""]
        )
        .unwrap()
            > 0.0
    );
    assert!(text.contains("batchrouter_job_latency_seconds_bucket"));
    promtool_check(&text);

    let (status, h) = d.get("/healthz").await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
    let (status, r) = d.get("/readyz").await;
    assert_eq!((status, r["status"].as_str()), (200, Some("ready")));
}

/// `promtool check metrics` on a scrape, when promtool is installed.
fn promtool_check(scrape: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        batchrouter_testkit::skip_or_fail(
            "promtool_check",
            "promtool is not installed (Debian package `prometheus`)",
        );
        return;
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let cfg = write_config(
        dir.path(),
        &http_config(
            dir.path(),
            &s.url(),
            "authToken = \"${TEST_TOKEN}\"\nmaxBodyBytes = \"4KiB\"",
            "",
        ),
    );
    let d = Daemon::start(&cfg, &[("TEST_TOKEN", "s3cret-token")]);
    let body = ndjson("web", "x", 0..2);
    let (status, e) = d
        .post("/v1/jobs", "application/x-ndjson", body.clone())
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let d = d.with_token("wrong");
    let (status, e) = d
        .post("/v1/jobs", "application/x-ndjson", body.clone())
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let d = d.with_token("s3cret-token");

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("application/json", "{\"jobs\": [".into(), 400, "malformed_request"),
        ("application/json", "{\"jobs\": []}".into(), 400, "malformed_request"),
        ("application/json", r#"{"jobs":[{"destinationId":"web","payload":[1]}]}"#.into(), 400, "malformed_request"),
        ("application/json", r#"{"jobs":[{"destinationId":"web","payload":{},"extra":1}]}"#.into(), 400, "malformed_request"),
        ("application/x-ndjson", format!("{}\n{{oops\n{}", ndjson("web", "a", 0..3), ndjson("web", "b", 0..3)), 400, "malformed_request"),
        ("application/json", r#"{"jobs":[{"destinationId":"web","payload":{}},{"destinationId":"nope","payload":{}}]}"#.into(), 422, "unknown_destination"),
        ("application/x-ndjson", ndjson("web", "big", 0..200), 413, "payload_too_large"),
    ];
    for (ct, body, want, code) in cases {
        let (status, e) = d.post("/v1/jobs", ct, body.clone()).await;
        assert_eq!(status, want, "{ct} {} → {e}", &body[..body.len().min(80)]);
        assert_eq!(e["error"]["code"], code, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().len() > 5);
    }
    let (_, e) = d
        .post(
            "/v1/jobs",
            "application/x-ndjson",
            format!("{}\n{{oops", ndjson("web", "a", 0..3)),
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 4:"),
        "names the line: {e}"
    );
    let c = d.counts("web").await;
    let stored: u64 = c["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(stored, 0, "nothing stored: {c}");
    let (status, e) = d.get("/v1/jobs/12345").await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = d.get("/v1/imports/abc").await;
    assert_eq!(status, 404);
    let (status, e) = d.get("/v1/jobs").await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{e}"
    );
    // The open endpoints stay open.
    let plain = reqwest::get(d.url("/healthz")).await.unwrap();
    assert_eq!(plain.status(), 200);
    // And a good request still works.
    let (status, _) = d.post("/v1/jobs", "application/x-ndjson", body).await;
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_jobs_are_redriven_and_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    s.set_default(Some(Fault::status(403)));
    let cfg = write_config(dir.path(), &http_config(dir.path(), &s.url(), "", ""));
    let d = Daemon::start(&cfg, &[]);
    let (status, r) = d
        .post(
            "/v1/jobs",
            "application/x-ndjson",
            ndjson("web", "r", 0..10),
        )
        .await;
    assert_eq!(status, 202);
    let first = r["jobs"][0]["jobId"].as_i64().unwrap();
    let c = d.settle("web", LIMIT).await;
    assert_eq!(c["counts"]["aborted"], 10);
    let (_, j) = d.get(&format!("/v1/jobs/{first}")).await;
    assert_eq!(j["error"]["code"], "destination_rejected", "{j}");
    assert!(j["error"]["message"].as_str().unwrap().contains("HTTP 403"));
    assert!(s.accepted().is_empty());

    s.heal();
    let (status, r) = d
        .post(&format!("/v1/jobs/{first}/retry"), "application/json", "")
        .await;
    assert_eq!((status, r["count"].as_u64()), (202, Some(1)), "{r}");
    let (status, r) = d
        .post(
            "/v1/destinations/web/redrive?state=aborted",
            "application/json",
            "",
        )
        .await;
    assert_eq!((status, r["count"].as_u64()), (202, Some(9)), "{r}");
    let c = d.settle("web", LIMIT).await;
    assert_eq!(c["counts"]["succeeded"], 10, "{c}");
    assert_eq!(s.accepted().len(), 10);
    assert!(
        s.accepted().values().all(|&n| n == 1),
        "each delivered once after the redrive"
    );
    let (_, j) = d.get(&format!("/v1/jobs/{first}")).await;
    assert_eq!(
        (j["state"].as_str(), j["attempts"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{j}"
    );

    let (status, e) = d
        .post(&format!("/v1/jobs/{first}/retry"), "application/json", "")
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (status, _) = d.post("/v1/jobs/99999/retry", "application/json", "").await;
    assert_eq!(status, 404);
    let (status, _) = d
        .post("/v1/destinations/nope/redrive", "application/json", "")
        .await;
    assert_eq!(status, 404);
    let (status, e) = d
        .post(
            "/v1/destinations/web/redrive?state=succeeded",
            "application/json",
            "",
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("malformed_request"))
    );
}

fn marketo_config(dir: &std::path::Path, m: &MarketoStandIn) -> String {
    let dest = marketo_destination("leads", m.client_id(), "${MKTO_SECRET}", &m.base_url());
    let dest =
        format!("{dest}[destinations.router]\nmaxEventsInABatch = 400\nmaxConcurrentImports = 1\n");
    daemon_config("", &sqlite_url(dir), &dir.join("staging"), "", &dest)
}

fn leads(range: std::ops::Range<usize>) -> String {
    range
        .map(|i| serde_json::json!({"destinationId": "leads", "payload": {"email": format!("lead{i}@example.com"), "n": i}}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_an_import_in_flight_loses_nothing_and_uploads_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let m = MarketoStandIn::start_with(MarketoOptions {
        polls_to_complete: 15,
        ..MarketoOptions::default()
    })
    .await;
    let cfg = write_config(dir.path(), &marketo_config(dir.path(), &m));
    let secret = m.client_secret().to_string();
    let env = [("MKTO_SECRET", secret.as_str())];
    let d = Daemon::start(&cfg, &env);
    let (status, _) = d
        .post("/v1/jobs", "application/x-ndjson", leads(0..1200))
        .await;
    assert_eq!(status, 202);
    // Sync mode: the first import is in flight and no upload can be.
    let start = Instant::now();
    loop {
        let c = d.counts("leads").await;
        if c["importsInFlight"] == 1 && c["counts"]["importing"] == 400 {
            break;
        }
        assert!(start.elapsed() < LIMIT, "{c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(m.imports().len(), 1, "one import started before the crash");
    d.kill9();

    let d = Daemon::start(&cfg, &env);
    let c = d.settle("leads", LIMIT).await;
    assert_eq!(c["counts"]["succeeded"], 1200, "{c}");
    let imported = m.imported();
    assert_eq!(imported.len(), 1200, "every lead arrived");
    assert!(
        imported.values().all(|&n| n == 1),
        "no lead was imported twice"
    );
    assert_eq!(
        m.imports().len(),
        3,
        "the in-flight import was polled to completion, not uploaded again"
    );
    let (_, j) = d.get("/v1/jobs/1").await;
    let import_id = j["importId"]
        .as_i64()
        .expect("importing jobs keep their import id");
    let (status, i) = d.get(&format!("/v1/imports/{import_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (i["status"].as_str(), i["progress"].as_u64()),
        (Some("completed"), Some(100)),
        "{i}"
    );
    assert_eq!(i["counts"]["succeeded"], 400);
    assert!(i["completedAt"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_upload_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    s.push_fault(Fault::status(200).delayed(Duration::from_millis(1500)));
    let cfg = write_config(
        dir.path(),
        &http_config(
            dir.path(),
            &s.url(),
            "",
            "maxEventsInABatch = 100\nshutdownTimeout = \"10s\"",
        ),
    );
    let d = Daemon::start(&cfg, &[]);
    let (status, _) = d
        .post(
            "/v1/jobs",
            "application/x-ndjson",
            ndjson("web", "t", 0..300),
        )
        .await;
    assert_eq!(status, 202);
    wait_until("nothing was uploaded", LIMIT, || s.requests() > 0).await;
    let t0 = Instant::now();
    let exit = d.sigterm(Duration::from_secs(15));
    assert!(exit.success(), "{exit:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "waited for the upload in flight"
    );
    // The store now belongs to nobody: read it directly.
    let store = batchrouter_store::SqliteStore::open(dir.path().join("jobs.db"))
        .await
        .unwrap();
    use batchrouter_core::{JobState, JobStore};
    let counts = store.destination_counts().await.unwrap();
    let web = &counts["web"];
    assert_eq!(
        web.by_state[&JobState::Succeeded],
        100,
        "the batch in flight finished: {web:?}"
    );
    assert_eq!(
        web.by_state[&JobState::Executing],
        0,
        "nothing left claimed"
    );
    assert_eq!(
        web.by_state[&JobState::Waiting],
        200,
        "the rest was released, not lost"
    );
    assert_eq!(s.accepted().len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_redacts_secrets_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        dir.path(),
        r#"
[server]
authToken = "${TOK}"
[store]
url = "postgres://br:pg-pass-123@127.0.0.1/br"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:1/x"
headers = { Authorization = "Bearer hdr-secret-456" }
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_batchrouterd"))
        .args(["check-config", "--config"])
        .arg(&good)
        .env("TOK", "api-token-789")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in ["pg-pass-123", "hdr-secret-456", "api-token-789"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    assert!(text.contains("is valid"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"nowhere\"\n[[destinations]]\nid = \"x\"\ntype = \"HTP\"\n[BatchRouter]\nmaxRetires = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_batchrouterd"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s)"), "{err}");
    assert!(
        err.contains("did you mean `HTTP`") && err.contains("did you mean `maxRetries`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_writes_to_the_store_or_through_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    // A fixed port: enqueue finds a running daemon through server.listen.
    let cfg = on_a_free_port(&http_config(dir.path(), &s.url(), "", ""));
    let cfg = write_config(dir.path(), &cfg);
    let file = dir.path().join("jobs.ndjson");
    let lines: Vec<String> = (0..50)
        .map(|i| format!("{{\"id\": \"e-{i}\", \"mid\": \"m-{i}\"}}"))
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let enqueue = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_batchrouterd"));
        c.args(["enqueue", "--config"]).arg(&cfg).args([
            "--destination",
            "web",
            "--message-id-field",
            "mid",
        ]);
        c.args(extra).arg(&file).output().unwrap()
    };
    let out = enqueue(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("enqueued 50 job(s)"));
    let d = Daemon::start(&cfg, &[]);
    let c = d.settle("web", LIMIT).await;
    assert_eq!(c["counts"]["succeeded"], 50);
    // With the daemon owning the SQLite file, enqueue goes through its API;
    // message ids make the re-run idempotent.
    let out = enqueue(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("enqueued 0 job(s)")
            && stdout.contains("50 duplicate")
            && stdout.contains("through the running daemon"),
        "{stdout}"
    );
    // A bad line stores nothing.
    std::fs::write(&file, "{\"id\": \"ok\", \"mid\": \"z\"}\n[1,2]\n").unwrap();
    let out = enqueue(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2: not a JSON object"));
    let c: Value = d.counts("web").await;
    assert_eq!(c["counts"]["succeeded"], 50);
    assert_eq!(c["counts"]["waiting"], 0);
}

#[test]
fn the_demo_runs_and_every_job_ends_as_expected() {
    let out = Command::new(env!("CARGO_BIN_EXE_batchrouterd"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every job ended as expected"), "{stdout}");
    if batchrouter_testkit::real_servers_required() {
        assert!(
            stdout.contains("sftp-drop wrote"),
            "the SFTP part ran: {stdout}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/systemd/batchrouterd.service"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batchrouterd.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/batchrouterd",
            env!("CARGO_BIN_EXE_batchrouterd"),
        ),
    )
    .unwrap();
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    else {
        eprintln!("*** SKIPPED the_systemd_unit_verifies: systemd-analyze is not installed ***");
        return;
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Only complaints about this unit count (the host's own units may be odd).
    let ours: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("batchrouterd"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{report}");
}
