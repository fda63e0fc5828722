//! `/readyz` tells the truth, within a second: ready means the store accepts
//! a write and the staging directory can take a file. Probed against the
//! real binary with a staging path that cannot hold a directory, real full
//! file systems (tmpfs in a private mount namespace), and a real PostgreSQL
//! that becomes unreachable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchrouter_testkit::http::HttpStandIn;
use batchrouter_testkit::postgres::TestDatabase;
use common::*;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The longest `/readyz` may take to answer.
const ANSWER: Duration = Duration::from_secs(1);
/// Room on a busy CI machine (2 cores, parallel tests) for the round trip
/// and scheduling around the daemon's own answer deadline; far below the
/// store timeouts an answer that waited on a hung probe would take.
const SLACK: Duration = Duration::from_secs(2);
/// How long a change may take to show on `/readyz` before the test gives up.
const CHANGE: Duration = Duration::from_secs(15);
/// How soon a store that went away must show: a probe result lives a
/// second and a running probe answers within one; the rest is room for a
/// loaded machine.
const NOTICED: Duration = Duration::from_secs(8);

fn config(store_url: &str, staging: &Path, url: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "{store_url}"
stagingDir = "{staging}"
[logging]
level = "error"
{dest}"#,
        staging = staging.display(),
        dest = http_destination("web", url, None),
    )
}

/// One `/readyz` answer (a hung daemon fails the test, not the run).
async fn readyz(d: &Daemon) -> (u16, Value) {
    tokio::time::timeout(Duration::from_secs(15), d.get("/readyz"))
        .await
        .expect("/readyz answered at all")
}

/// One `/readyz` answer, checked to arrive within [`ANSWER`] plus
/// [`SLACK`]: the sampled requests that carry the one-second property.
async fn readyz_timed(d: &Daemon) -> (u16, Value) {
    let start = Instant::now();
    let answer = readyz(d).await;
    let took = start.elapsed();
    assert!(took <= ANSWER + SLACK, "/readyz took {took:?}: {answer:?}");
    answer
}

/// Asks `/readyz` until it answers `want`, the first request (the one
/// that meets the changed state) timed; returns the body and how long the
/// change took to show.
async fn until_ready_is(d: &Daemon, want: u16, limit: Duration) -> (Value, Duration) {
    let start = Instant::now();
    let mut first = true;
    loop {
        let (status, body) = if std::mem::take(&mut first) {
            readyz_timed(d).await
        } else {
            readyz(d).await
        };
        if status == want {
            return (body, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "/readyz still {status} after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_staging_cannot_take_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let staging = dir.path().join("staging");
    let db = format!("sqlite://{}/jobs.db", dir.path().display());
    let cfg = write_config(dir.path(), &config(&db, &staging, &s.url()));
    let d = Daemon::start(&cfg, &[]);
    until_ready_is(&d, 200, Duration::from_secs(10)).await;
    // A file where the staging directory should be: no batch can be staged
    // (even by root, unlike a read-only mode).
    std::fs::remove_dir_all(&staging).ok();
    std::fs::write(&staging, b"not a directory").unwrap();
    let (body, _) = until_ready_is(&d, 503, CHANGE).await;
    assert_eq!(body["status"], "not_ready");
    // A short reason for this open endpoint: no path, no OS error text.
    assert_eq!(
        body["reason"], "the staging directory cannot take a file",
        "{body}"
    );
    std::fs::remove_file(&staging).unwrap();
    until_ready_is(&d, 200, CHANGE).await;
}

/// A TCP forwarder in front of PostgreSQL that can be taken down (closing
/// every connection and the port) and brought back on the same port.
struct Proxy {
    addr: std::net::SocketAddr,
    upstream: String,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream: upstream.to_string(),
            tasks: Arc::default(),
        };
        p.serve(listener);
        p
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// PostgreSQL "goes away": connections cut, the port refuses.
    fn down(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// The proxy's port again (aborted tasks release it a moment later).
    async fn rebind(&self) -> TcpListener {
        let start = Instant::now();
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => return l,
                Err(e) if start.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        }
    }

    /// PostgreSQL "hangs": the port accepts and never answers.
    async fn hang(&self) {
        let listener = self.rebind().await;
        let held = tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                keep.push(s);
            }
        });
        self.tasks.lock().unwrap().push(held.abort_handle());
    }

    async fn up(&self) {
        let listener = self.rebind().await;
        self.serve(listener);
    }
}

/// `url` with its `host:port` replaced by `addr`.
fn reroute(url: &str, addr: std::net::SocketAddr) -> (String, String) {
    let start = url
        .find('@')
        .map(|i| i + 1)
        .unwrap_or(url.find("://").unwrap() + 3);
    let end = start + url[start..].find('/').unwrap();
    (
        format!("{}{addr}{}", &url[..start], &url[end..]),
        url[start..end].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_within_a_second_when_postgres_is_down_or_hangs() {
    let Some(db) = TestDatabase::create("readyz_postgres_down").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = HttpStandIn::start().await;
    let (_, upstream) = reroute(db.url(), "127.0.0.1:1".parse().unwrap());
    let proxy = Proxy::start(&upstream).await;
    let (url, _) = reroute(db.url(), proxy.addr);
    let cfg = write_config(
        dir.path(),
        &config(&url, &dir.path().join("staging"), &s.url()),
    );
    let d = Daemon::start(&cfg, &[]);
    until_ready_is(&d, 200, Duration::from_secs(10)).await;

    proxy.down();
    let (body, took) = until_ready_is(&d, 503, CHANGE).await;
    assert!(took < NOTICED, "noticed after {took:?}");
    assert!(body["reason"].as_str().unwrap().contains("store"), "{body}");
    proxy.up().await;
    until_ready_is(&d, 200, Duration::from_secs(30)).await;

    proxy.down();
    proxy.hang().await;
    let (body, took) = until_ready_is(&d, 503, CHANGE).await;
    assert!(took < NOTICED, "noticed after {took:?}");
    assert_eq!(body["status"], "not_ready");
    // Every answer while it hangs is still quick.
    for _ in 0..3 {
        let (status, _) = readyz_timed(&d).await;
        assert_eq!(status, 503);
    }
    proxy.down();
    proxy.up().await;
    until_ready_is(&d, 200, Duration::from_secs(30)).await;
}

/// Whether this machine lets us mount a tmpfs in a private mount namespace
/// (root, or unprivileged user namespaces).
fn private_tmpfs_available(dir: &Path) -> Result<(), String> {
    let probe = dir.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg("mount -t tmpfs -o size=1m tmpfs \"$1\"")
        .arg("sh")
        .arg(&probe)
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cannot mount a tmpfs in a private mount namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Fills the file system behind `path` (as the daemon sees it) to the last
/// byte; returns the filler to delete.
fn fill(pid: u32, path: &Path) -> PathBuf {
    use std::io::Write;
    let filler = PathBuf::from(format!("/proc/{pid}/root{}", path.join("filler").display()));
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
            break;
        }
    }
    // Smaller writes take the last partial chunk too.
    while f.write_all(&[0u8; 512]).is_ok() {}
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_database_or_staging_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = private_tmpfs_available(dir.path()) {
        batchrouter_testkit::skip_or_fail(
            "not_ready_while_the_database_or_staging_disk_is_full",
            &why,
        );
        return;
    }
    let s = HttpStandIn::start().await;
    let (db_dir, staging) = (dir.path().join("db"), dir.path().join("staging"));
    std::fs::create_dir_all(&db_dir).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    let db = format!("sqlite://{}/jobs.db", db_dir.display());
    let cfg = write_config(dir.path(), &config(&db, &staging, &s.url()));
    // Two small file systems, seen only by the daemon.
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=4m tmpfs \"$1\" && mount -t tmpfs -o size=1m tmpfs \"$2\" \
             && exec \"$3\" run --config \"$4\"",
        )
        .arg("sh")
        .arg(&db_dir)
        .arg(&staging)
        .arg(env!("CARGO_BIN_EXE_batchrouterd"))
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_remove("BATCHROUTER_CONFIG");
    let d = Daemon::from_command(cmd, &cfg);
    until_ready_is(&d, 200, Duration::from_secs(10)).await;
    // The filler is invisible from here: the daemon's disks are private.
    assert!(!db_dir.join("jobs.db").exists());

    // SQLite's disk full: reads still work, writes do not.
    let filler = fill(d.pid(), &db_dir);
    let (body, _) = until_ready_is(&d, 503, CHANGE).await;
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("store refuses writes"), "{body}");
    assert!(!reason.contains("staging"), "{body}");
    let (status, v) = d.get("/v1/destinations").await;
    assert_eq!(status, 200, "reads still work: {v}");
    std::fs::remove_file(&filler).unwrap();
    until_ready_is(&d, 200, CHANGE).await;

    // Staging's disk full (ENOSPC): no batch can be staged.
    let filler = fill(d.pid(), &staging);
    let (body, _) = until_ready_is(&d, 503, CHANGE).await;
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("staging"), "{body}");
    assert!(!reason.contains("store refuses"), "{body}");
    std::fs::remove_file(&filler).unwrap();
    until_ready_is(&d, 200, CHANGE).await;
}
