//! The API's edges, probed from outside against the real binary: job
//! validation (400, never 503; characters, not bytes; nesting depth),
//! `enqueue` all or nothing, error bodies for every refusal, exact bearer
//! tokens, canonical ids, slow and idle clients, and log files without
//! terminal colour codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use batchrouter_testkit::http::HttpStandIn;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-token";

fn config(dir: &std::path::Path, url: &str, server: &str) -> String {
    let dest = http_destination("web", url, None);
    daemon_config(server, &sqlite_url(dir), &dir.join("staging"), "", &dest)
}

/// A daemon on a fresh store in a new directory, `server` added to its
/// `[server]` table and `env` set; the stand-in it sends to and the
/// directory are answered with it.
async fn daemon(server: &str, env: &[(&str, &str)]) -> (Daemon, HttpStandIn, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let cfg = write_config(dir.path(), &config(dir.path(), &s.url(), server));
    (Daemon::start(&cfg, env), s, dir)
}

/// Payload `{"a":{"a":...{}}}` nested `depth` objects deep.
fn nested(depth: usize) -> String {
    format!(
        "{}{{}}{}",
        "{\"a\":".repeat(depth - 1),
        "}".repeat(depth - 1)
    )
}

fn stored(counts: &Value) -> u64 {
    counts["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

fn assert_json_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(
        body["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
        "{what}: not a JSON error body: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_validated_once_with_400s_and_characters_not_bytes() {
    let (d, _s, _dir) = daemon("", &[]).await;
    let post = |jobs: Value| {
        let body = json!({ "jobs": jobs }).to_string();
        let d = &d;
        async move { d.post("/v1/jobs", "application/json", body).await }
    };
    // 256 emoji are 256 characters (1,024 bytes): accepted.
    let (status, a) =
        post(json!([{"destinationId": "web", "payload": {}, "messageId": "😀".repeat(256)}])).await;
    assert_eq!(status, 202, "{a}");
    let (status, e) =
        post(json!([{"destinationId": "web", "payload": {}, "messageId": "😀".repeat(257)}])).await;
    assert_json_error(status, &e, 400, "257 characters");
    assert_eq!(e["error"]["code"], "malformed_request");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("characters"),
        "{e}"
    );
    // A NUL in the message id: the client's mistake (400), not a store outage.
    let (status, e) =
        post(json!([{"destinationId": "web", "payload": {}, "messageId": "a\u{0}b"}])).await;
    assert_json_error(status, &e, 400, "NUL in messageId");
    assert_eq!(e["error"]["code"], "malformed_request");
    // Nesting: 64 levels pass, 65 and 200 are refused, and the whole request
    // with them (all or nothing).
    let ok: Value = serde_json::from_str(&nested(64)).unwrap();
    let (status, a) = post(json!([{"destinationId": "web", "payload": ok}])).await;
    assert_eq!(status, 202, "{a}");
    for depth in [65, 200] {
        let body = format!(
            "{{\"destinationId\":\"web\",\"payload\":{{\"fine\":1}}}}\n{{\"destinationId\":\"web\",\"payload\":{}}}",
            nested(depth)
        );
        let (status, e) = d.post("/v1/jobs", "application/x-ndjson", body).await;
        assert_json_error(status, &e, 400, &format!("depth {depth}"));
        assert_eq!(e["error"]["code"], "malformed_request");
    }
    let big = nested(10_000);
    let (status, e) = d
        .post(
            "/v1/jobs",
            "application/json",
            format!("{{\"jobs\":[{{\"destinationId\":\"web\",\"payload\":{big}}}]}}"),
        )
        .await;
    assert_json_error(status, &e, 400, "depth 10000");
    let c = d.counts("web").await;
    assert_eq!(stored(&c), 2, "only the two valid requests stored: {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_json_error_and_ids_are_canonical() {
    let (d, _s, _dir) = daemon("", &[]).await;
    let (status, a) = d
        .post("/v1/jobs", "application/x-ndjson", ndjson("web", "x", 0..1))
        .await;
    assert_eq!(status, 202, "{a}");
    let id = a["jobs"][0]["jobId"].as_i64().unwrap();
    assert_eq!(id, 1);
    let (status, j) = d.get("/v1/jobs/1").await;
    assert_eq!(status, 200, "{j}");
    // Non-canonical spellings of job 1 are not job 1.
    for path in [
        "/v1/jobs/+1",
        "/v1/jobs/01",
        "/v1/jobs/1.0",
        "/v1/jobs/%201",
        "/v1/jobs/0x1",
        "/v1/imports/+1",
        "/v1/imports/01",
    ] {
        let (status, e) = d.get(path).await;
        assert_json_error(status, &e, 404, path);
    }
    let (status, e) = d.post("/v1/jobs/01/retry", "application/json", "").await;
    assert_json_error(status, &e, 404, "retry 01");
    // axum's own rejections come back in the same shape.
    let (status, e) = d.get("/v1/jobs/%ff").await;
    assert!(status == 400 || status == 404, "{status} {e}");
    assert_json_error(status, &e, status, "/v1/jobs/%ff");
    let (status, e) = d.get("/v1/nothing-here").await;
    assert_json_error(status, &e, 404, "unknown route");
    let resp = reqwest::Client::new()
        .delete(d.url("/v1/jobs/1"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let e: Value = resp.json().await.unwrap();
    assert_json_error(status, &e, 405, "DELETE");
    // Redrive: a repeated state is the union; a bad state or parameter is a
    // JSON 400.
    let (status, r) = d
        .post(
            "/v1/destinations/web/redrive?state=aborted&state=failed",
            "application/json",
            "",
        )
        .await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["count"], 0);
    for q in ["?state=succeeded", "?foo=1", "?state=aborted&bogus"] {
        let (status, e) = d
            .post(
                &format!("/v1/destinations/web/redrive{q}"),
                "application/json",
                "",
            )
            .await;
        assert_json_error(status, &e, 400, q);
    }
    // A raw request with an invalid percent-escape in the query string.
    let (status, e) = raw_http(
        &d.addr,
        b"POST /v1/destinations/web/redrive?state=%ff%fe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_json_error(status, &e, 400, "query %ff%fe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_must_match_exactly_and_only_once() {
    let (d, _s, _dir) = daemon("authToken = \"${TEST_TOKEN}\"", &[("TEST_TOKEN", TOKEN)]).await;
    let get = |headers: &str| {
        raw_http(
            &d.addr,
            format!(
                "GET /v1/destinations HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
    };
    let (status, v) = get(&format!("Authorization: Bearer {TOKEN}\r\n"));
    assert_eq!(status, 200, "{v}");
    for headers in [
        String::new(),
        format!("Authorization: Bearer {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\n"),
        format!("Authorization: Bearer {TOKEN}\r\nAuthorization: Bearer wrong\r\n"),
        format!("Authorization: Bearer wrong\r\nAuthorization: Bearer {TOKEN}\r\n"),
        format!("Authorization: Bearer  {TOKEN}\r\n"),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
        format!("Authorization: Bearer {TOKEN} x\r\n"),
        format!("Authorization: Bearer {}\r\n", &TOKEN[..TOKEN.len() - 1]),
        format!("Authorization: bearer{TOKEN}\r\n"),
        format!("Authorization: Basic {TOKEN}\r\n"),
        format!("Authorization: {TOKEN}\r\n"),
    ] {
        let (status, e) = get(&headers);
        assert_json_error(status, &e, 401, &headers);
        assert_eq!(e["error"]["code"], "unauthorized", "{headers}");
    }
}

/// Reads from each of `conns` until the server closes it, failing when a
/// read times out or the last close comes `within` or more after `start`;
/// answers what each connection got first.
fn closed_by_server(conns: &mut [TcpStream], start: Instant, within: Duration) -> Vec<Vec<u8>> {
    let got = conns
        .iter_mut()
        .map(|c| {
            c.set_read_timeout(Some(within)).unwrap();
            let mut buf = [0u8; 512];
            let n = c
                .read(&mut buf)
                .expect("closed by the server, not timed out");
            buf[..n].to_vec()
        })
        .collect();
    let took = start.elapsed();
    assert!(took < within, "closed after {took:?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_cut_off() {
    let (d, _s, _dir) = daemon(
        "headerReadTimeout = \"500ms\"\nbodyReadTimeout = \"1s\"\nidleTimeout = \"30s\"",
        &[],
    )
    .await;
    // Connections that never send a request, or stall inside the headers,
    // are closed once headerReadTimeout passes.
    let start = Instant::now();
    let mut conns: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    conns[0].write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    // Well under idleTimeout (30 s), with room for a loaded 2-core machine.
    for got in closed_by_server(&mut conns, start, Duration::from_secs(12)) {
        // Nothing, or a 408 the server writes before closing.
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{got:?}"
        );
    }
    // A body shorter than its Content-Length: 408 once bodyReadTimeout
    // passes, with the usual error body, and nothing stored.
    let start = Instant::now();
    let body = ndjson("web", "slow", 0..1);
    let request = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n{}",
        body.len() + 100,
        body
    );
    let (status, e) = raw_http(&d.addr, request.as_bytes(), Duration::from_secs(25));
    let took = start.elapsed();
    assert_json_error(status, &e, 408, "short body");
    assert_eq!(e["error"]["code"], "request_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(12),
        "{took:?}"
    );
    assert_eq!(stored(&d.counts("web").await), 0);
    // The server still serves.
    let (status, _) = d.get("/v1/destinations").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_connections_are_capped() {
    let (d, _s, _dir) = daemon(
        "headerReadTimeout = \"30s\"\nidleTimeout = \"1s\"\nmaxConnections = 4",
        &[],
    )
    .await;
    // Four idle connections take every slot: a fifth request waits.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    let (status, _) = raw_http(
        &d.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_millis(400),
    );
    assert_eq!(status, 0, "served beyond maxConnections");
    // idleTimeout (not the 30 s header timeout) closes them...
    let start = Instant::now();
    // Well under the header timeout (30 s), with room for a loaded machine.
    for got in closed_by_server(&mut idle, start, Duration::from_secs(12)) {
        assert!(got.is_empty(), "{got:?}");
    }
    // ...which frees the slots.
    let (status, v) = raw_http(
        &d.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_carry_no_terminal_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let cfg = config(dir.path(), &s.url(), "").replace("level = \"warn\"", "level = \"info\"");
    let cfg = write_config(dir.path(), &cfg);
    let log = dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchrouterd"));
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .env_remove("BATCHROUTER_CONFIG")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG");
    let d = Daemon::from_command(cmd, &cfg);
    let (status, _) = d
        .post("/v1/jobs", "application/x-ndjson", ndjson("web", "c", 0..3))
        .await;
    assert_eq!(status, 202);
    d.settle("web", Duration::from_secs(30)).await;
    let exit = d.sigterm(Duration::from_secs(20));
    assert!(exit.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("batchrouterd started"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in the log file:\n{text}"
    );
}

fn enqueue(cfg: &std::path::Path, file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_batchrouterd"))
        .args(["enqueue", "--config"])
        .arg(cfg)
        .args(["--destination", "web", "--message-id-field", "mid"])
        .arg(file)
        .env_remove("BATCHROUTER_CONFIG")
        .output()
        .unwrap()
}

/// `n` good lines, then one bad line.
fn lines_then(n: usize, bad: &str) -> String {
    let mut out: Vec<String> = (0..n)
        .map(|i| format!("{{\"id\":\"e-{i}\",\"mid\":\"m-{i}\"}}"))
        .collect();
    out.push(bad.to_string());
    out.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_stores_nothing_when_a_late_line_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    // A fixed port (enqueue finds the daemon through server.listen) and
    // small bodies, so the API path sends many chunks.
    let cfg = on_a_free_port(&config(dir.path(), &s.url(), "maxBodyBytes = \"8KiB\""));
    let cfg = write_config(dir.path(), &cfg);
    let file = dir.path().join("jobs.ndjson");
    let long_id = format!("{{\"id\":\"late\",\"mid\":\"{}\"}}", "😀".repeat(257));
    let deep = format!("{{\"id\":\"late\",\"mid\":\"deep\",\"x\":{}}}", nested(70));
    // Straight into the store: more lines than one insert chunk (10,000).
    std::fs::write(&file, lines_then(10_050, &long_id)).unwrap();
    let out = enqueue(&cfg, &file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 10051") && stderr.contains("characters"),
        "{stderr}"
    );
    std::fs::write(&file, lines_then(10_050, &deep)).unwrap();
    let out = enqueue(&cfg, &file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 10051") && stderr.contains("deeper than 64"),
        "{stderr}"
    );
    // Through a running daemon: many API requests, refused before the first.
    let d = Daemon::start(&cfg, &[]);
    assert_eq!(
        stored(&d.counts("web").await),
        0,
        "direct enqueue stored jobs"
    );
    // A line alone larger than the daemon's 8 KiB request limit: refused
    // up front, not with a 413 after earlier chunks were stored.
    let huge = format!(
        "{{\"id\":\"late\",\"mid\":\"huge\",\"x\":\"{}\"}}",
        "a".repeat(9000)
    );
    for (bad, why) in [
        (&long_id, "characters"),
        (&deep, "deeper than 64"),
        (&huge, "server.maxBodyBytes"),
    ] {
        std::fs::write(&file, lines_then(600, bad)).unwrap();
        let out = enqueue(&cfg, &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("line 601") && stderr.contains(why),
            "{stderr}"
        );
    }
    assert_eq!(stored(&d.counts("web").await), 0, "API enqueue stored jobs");
    // The same file without its bad line goes through whole; an id of 256
    // emoji is fine.
    std::fs::write(
        &file,
        lines_then(
            600,
            &format!("{{\"id\":\"late\",\"mid\":\"{}\"}}", "😀".repeat(256)),
        ),
    )
    .unwrap();
    let out = enqueue(&cfg, &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("enqueued 601 job(s)") && stdout.contains("through the running daemon"),
        "{stdout}"
    );
}

#[test]
fn server_timeouts_and_connection_cap_are_configured_and_checked() {
    use batchrouter_config::{load, render_effective, OsEnv};
    let dir = tempfile::tempdir().unwrap();
    // Loads the config with `server` added to its `[server]` table.
    let load_with = |server: &str| {
        let cfg = config(dir.path(), "http://127.0.0.1:9/in", server);
        load(
            &write_config(dir.path(), &cfg),
            std::sync::Arc::new(OsEnv),
            &batchrouter_destinations::REGISTRY,
        )
    };
    let c = load_with("").unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.server.max_connections, 1024);
    let c = load_with("headerReadTimeout = \"2s\"\nbodyReadTimeout = \"1500ms\"\nidleTimeout = 7\nmaxConnections = 12").unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.server.body_read_timeout, Duration::from_millis(1500));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(7));
    assert_eq!(c.server.max_connections, 12);
    let printed = render_effective(&c);
    assert!(
        printed.contains("headerReadTimeout = \"2000ms\"")
            && printed.contains("maxConnections = 12"),
        "{printed}"
    );
    let e = load_with("headerReadTimeout = \"0s\"\nbodyReadTimeout = \"soon\"\nidleTimeout = \"99999999999999999999s\"\nmaxConnections = 0")
        .unwrap_err()
        .to_string();
    for key in [
        "server.headerReadTimeout",
        "server.bodyReadTimeout",
        "server.idleTimeout",
        "server.maxConnections",
    ] {
        assert!(e.contains(key), "{key} not named in: {e}");
    }
    // Parseable but beyond 1 h (a deadline this far out would overflow
    // `Instant`): refused, each key named.
    let e = load_with(
        "headerReadTimeout = \"2h\"\nbodyReadTimeout = \"3601s\"\nidleTimeout = \"100000000000d\"",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "server.headerReadTimeout",
        "server.bodyReadTimeout",
        "server.idleTimeout",
    ] {
        assert!(e.contains(&format!("{key}: ")), "{key} not named in: {e}");
    }
    assert!(e.contains("1ms to 1h"), "{e}");
    let c = load_with("headerReadTimeout = \"1ms\"\nidleTimeout = \"1h\"").unwrap();
    assert_eq!(c.server.idle_timeout, Duration::from_secs(3600));
    // HTTP drops whitespace around header values: such a token could never
    // match, so the config refuses it (without printing it).
    let path = write_config(
        dir.path(),
        &config(
            dir.path(),
            "http://127.0.0.1:9/in",
            "authToken = \"${TEST_TOKEN}\"",
        ),
    );
    let env = batchrouter_config::MapEnv::new([("TEST_TOKEN".to_string(), "tok ".to_string())]);
    let e = load(
        &path,
        std::sync::Arc::new(env),
        &batchrouter_destinations::REGISTRY,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.authToken") && !e.contains("tok "), "{e}");
}
