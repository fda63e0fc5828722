//! Runs the real `batchrouterd` binary as a subprocess on port 0.

#![allow(dead_code)]

pub mod crash;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub addr: String,
    pub child: Child,
    pub config: PathBuf,
    pub token: Option<String>,
    client: reqwest::Client,
}

/// Writes `config` to `dir/batchrouter.toml`.
pub fn write_config(dir: &Path, config: &str) -> PathBuf {
    write_config_as(dir, "batchrouter", config)
}

/// Writes `config` to `dir/<name>.toml`, for one of several daemons.
pub fn write_config_as(dir: &Path, name: &str, config: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

impl Daemon {
    /// Starts `batchrouterd run` and waits for its "listening on" line.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchrouterd"));
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env_remove("BATCHROUTER_CONFIG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::from_command(cmd, config)
    }

    /// Runs a prepared command that ends up exec'ing `batchrouterd run`
    /// (e.g. behind `unshare`); stdout must be piped.
    pub fn from_command(mut cmd: Command, config: &Path) -> Daemon {
        let mut child = cmd.spawn().expect("spawn batchrouterd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("batchrouterd listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("batchrouterd did not start: {:?}", child.wait());
            }
        };
        Daemon {
            addr,
            child,
            config: config.to_path_buf(),
            token: None,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .auth(self.client.get(self.url(path)))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let resp = self
            .auth(self.client.post(self.url(path)))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Counts for one destination from `GET /v1/destinations`.
    pub async fn counts(&self, dest: &str) -> Value {
        let (status, v) = self.get("/v1/destinations").await;
        assert_eq!(status, 200, "{v}");
        v["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == dest)
            .cloned()
            .unwrap_or_else(|| panic!("no destination {dest} in {v}"))
    }

    /// Waits until every job of `dest` is terminal; returns its counts.
    pub async fn settle(&self, dest: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let d = self.counts(dest).await;
            let c = &d["counts"];
            let open: u64 = ["waiting", "executing", "importing", "failed"]
                .iter()
                .map(|s| c[s].as_u64().unwrap())
                .sum();
            let total: u64 = ["succeeded", "aborted"]
                .iter()
                .map(|s| c[s].as_u64().unwrap())
                .sum();
            if open == 0 && total > 0 {
                return d;
            }
            assert!(start.elapsed() < limit, "{dest} did not settle: {d}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no cleanup of any kind.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn sigterm(mut self, limit: Duration) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "batchrouterd did not exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NDJSON body of jobs `{"destinationId", "payload": {"id": prefix-i}}`.
pub fn ndjson(dest: &str, prefix: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| serde_json::json!({"destinationId": dest, "payload": {"id": format!("{prefix}-{i}"), "n": i}}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A JSON envelope body.
pub fn envelope(dest: &str, prefix: &str, range: std::ops::Range<usize>) -> String {
    let jobs: Vec<Value> = range
        .map(|i| serde_json::json!({"destinationId": dest, "payload": {"id": format!("{prefix}-{i}"), "n": i}}))
        .collect();
    serde_json::json!({ "jobs": jobs }).to_string()
}

/// Scrapes a metric value by name and label fragment.
pub fn metric(text: &str, name: &str, labels_contain: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && labels_contain.iter().all(|f| l.contains(f)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sends `request` as raw bytes on a fresh connection and reads until the
/// server closes it or `limit` passes; answers the status and the body
/// (parsed as JSON when it is). `(0, Null)` when nothing came back.
pub fn raw_http(addr: &str, request: &[u8], limit: Duration) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, body)
}

/// A `[[destinations]]` table for an `HTTP` destination posting to `url`,
/// with `maxBatchSize` when given.
pub fn http_destination(id: &str, url: &str, max_batch_size: Option<usize>) -> String {
    let max = max_batch_size
        .map(|n| format!("maxBatchSize = {n}\n"))
        .unwrap_or_default();
    format!(
        r#"
[[destinations]]
id = "{id}"
type = "HTTP"
[destinations.config]
url = "{url}"
{max}"#
    )
}

/// A `[[destinations]]` table for a Marketo destination at `base_url` that
/// maps `email` and `n` (as `score`); `secret` is written as given, so it
/// may be a `${VAR}` reference.
pub fn marketo_destination(id: &str, client_id: &str, secret: &str, base_url: &str) -> String {
    format!(
        r#"
[[destinations]]
id = "{id}"
type = "MARKETO_BULK_UPLOAD"
[destinations.config]
munchkinId = "123-ABC-456"
clientId = "{client_id}"
clientSecret = "{secret}"
baseUrl = "{base_url}"
columnFieldsMapping = [{{ from = "email", to = "email" }}, {{ from = "n", to = "score" }}]
"#
    )
}

/// `config` listening on a port free right now instead of port 0, for
/// commands (such as `enqueue`) that find the daemon through `server.listen`.
pub fn on_a_free_port(config: &str) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
}

/// Waits until `done` holds, checking every 10 ms; fails with `what` once
/// `limit` has passed.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The URL of a SQLite store in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}/jobs.db", dir.display())
}

/// A daemon config on port 0: `server` added to `[server]`, the store at
/// `store_url`, staging in `staging`, short `[BatchRouter]` intervals (so
/// tests take seconds) plus `router`, then `destinations`.
pub fn daemon_config(
    server: &str,
    store_url: &str,
    staging: &Path,
    router: &str,
    destinations: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}
[store]
url = "{store_url}"
stagingDir = "{staging}"
[logging]
level = "warn"
[BatchRouter]
uploadFreq = "100ms"
minIdleSleep = "50ms"
pollStatusLoopSleep = "100ms"
minRetryBackoff = "100ms"
maxRetryBackoff = "500ms"
{router}
{destinations}"#,
        staging = staging.display()
    )
}

/// A Marketo stand-in without rate limits that imports an accepted file at
/// once, as Marketo does whether or not anyone polls.
pub async fn marketo_importing_at_once() -> batchrouter_testkit::marketo::MarketoStandIn {
    use batchrouter_testkit::marketo::{MarketoOptions, MarketoStandIn};
    MarketoStandIn::start_with(MarketoOptions {
        polls_to_complete: 0,
        max_calls_per_window: None,
        max_concurrent_calls: None,
        ..MarketoOptions::default()
    })
    .await
}
