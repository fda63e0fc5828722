//! A throwaway PostgreSQL cluster per test process, and a fresh database per
//! test so tests run in parallel without seeing each other's rows.
//!
//! With `BATCHROUTER_TEST_POSTGRES_URL` set (any role allowed to `CREATE
//! DATABASE`), tests use that server. Otherwise the first call finds
//! `initdb`/`pg_ctl` (in `PATH`, else the newest `/usr/lib/postgresql/*/bin`),
//! runs `initdb -A trust` in a private directory under the system temp dir
//! (owned by the `postgres` account and run through `runuser` when the tests
//! run as root, since initdb refuses root), and starts the server with
//! `pg_ctl` on `127.0.0.1:<free port>` with durability switched off (tests
//! never need it). Databases are created and dropped with `psql`.
//!
//! Nothing outlives the test process: an `atexit` hook stops the server
//! (`pg_ctl stop -m immediate`) and deletes its directory; a detached
//! watchdog shell does the same if the process is killed before the hook can
//! run; and every start removes what an earlier, uncleanly ended run left.
//! Without a URL or binaries, [`TestDatabase::create`] calls
//! [`crate::skip_or_fail`] (a loud skip, or a failure when
//! `BATCHROUTER_REQUIRE_REAL_SERVERS=1`).

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Environment variable naming an existing server to test against.
pub const URL_ENV: &str = "BATCHROUTER_TEST_POSTGRES_URL";
/// Set to keep each test's database after the test (for debugging).
pub const KEEP_ENV: &str = "BATCHROUTER_TEST_POSTGRES_KEEP";
/// Where the PostgreSQL 15 binaries live on the project's machines.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Parent of every throwaway cluster directory (one per test process).
fn clusters_root() -> PathBuf {
    std::env::temp_dir().join("batchrouter-pg")
}

/// The server every test of this process uses.
pub struct PgServer {
    /// URL of the maintenance database (`postgres`).
    admin_url: String,
    /// The `psql` client used to create and drop databases.
    psql: PathBuf,
    /// Directory of the cluster, when this process started it.
    owned_dir: Option<PathBuf>,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("admin_url", &redact(&self.admin_url))
            .field("owned_dir", &self.owned_dir)
            .finish()
    }
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
/// The directory the exit hook removes (set once the cluster is running).
static STOP_ON_EXIT: Mutex<Option<(PathBuf, PathBuf, bool)>> = Mutex::new(None);

impl PgServer {
    /// The process-wide server, started on first use; the error says why
    /// none is available.
    pub fn get() -> Result<&'static PgServer, String> {
        SERVER
            .get_or_init(PgServer::init)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// URL of the maintenance database, for administrative statements.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Directory of the cluster this process started (`None` with a URL).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.owned_dir.as_ref().map(|d| d.join("data"))
    }

    fn init() -> Result<PgServer, String> {
        if let Ok(url) = std::env::var(URL_ENV) {
            if !url.trim().is_empty() {
                let psql = find_tool("psql", None).ok_or_else(|| {
                    format!("{URL_ENV} is set but `psql` was not found (apt-get install postgresql-client)")
                })?;
                let server = PgServer {
                    admin_url: url.trim().to_string(),
                    psql,
                    owned_dir: None,
                };
                server.psql(&server.admin_url, "SELECT 1").map_err(|e| {
                    format!(
                        "{URL_ENV} ({}) is not usable: {e}",
                        redact(&server.admin_url)
                    )
                })?;
                return Ok(server);
            }
        }
        let bin = find_bin_dir().ok_or_else(|| {
            format!(
                "no PostgreSQL server binaries (initdb, pg_ctl) in PATH or /usr/lib/postgresql/*/bin, and {URL_ENV} is not set (apt-get install postgresql)"
            )
        })?;
        start_cluster(&bin)
    }

    /// Runs one statement through `psql` against `url`.
    fn psql(&self, url: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(&self.psql)
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.psql.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(redact_text(&String::from_utf8_lossy(&out.stderr), url))
        }
    }
}

/// One test's private database; dropped (with its connections) on drop.
pub struct TestDatabase {
    server: &'static PgServer,
    name: String,
    url: String,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &redact(&self.url))
            .finish()
    }
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

impl TestDatabase {
    /// A fresh database for `test`, or `None` after a loud skip when no
    /// server is available (a panic when real servers are required).
    pub async fn create(test: &str) -> Option<TestDatabase> {
        let name = test.to_string();
        let made = tokio::task::spawn_blocking(move || TestDatabase::create_blocking(&name))
            .await
            .unwrap_or_else(|e| Err(format!("database task failed: {e}")));
        match made {
            Ok(db) => Some(db),
            Err(why) => {
                crate::skip_or_fail(test, &why);
                None
            }
        }
    }

    /// Blocking form of [`TestDatabase::create`] that reports why it failed.
    pub fn create_blocking(test: &str) -> Result<TestDatabase, String> {
        let server = PgServer::get()?;
        let name = database_name(
            test,
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed),
        );
        server
            .psql(
                &server.admin_url,
                &format!("CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"),
            )
            .map_err(|e| format!("CREATE DATABASE {name} failed: {e}"))?;
        Ok(TestDatabase {
            server,
            url: with_database(&server.admin_url, &name),
            name,
        })
    }

    /// Connection URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL through `psql` (for setup a test cannot do through its own client).
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.server.psql(&self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("keeping test database {} ({KEEP_ENV} is set)", self.name);
            return;
        }
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = self.server.psql(&self.server.admin_url, &sql) {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}

/// A valid, unique database name (at most 63 bytes) derived from a test name.
pub fn database_name(test: &str, pid: u32, n: u64) -> String {
    let suffix = format!("_{pid}_{n}");
    let mut stem: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    stem.truncate(63 - 3 - suffix.len());
    format!("br_{stem}{suffix}")
}

/// `url` with its database (path) replaced by `db`, query string kept.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

/// The URL with its password hidden.
fn redact(url: &str) -> String {
    match password_of(url) {
        Some(pw) => url.replacen(&format!(":{pw}@"), ":***@", 1),
        None => url.to_string(),
    }
}

/// `text` with the URL's password (if any) hidden.
fn redact_text(text: &str, url: &str) -> String {
    match password_of(url) {
        Some(pw) if !pw.is_empty() => text.replace(&pw, "***"),
        _ => text.to_string(),
    }
}

fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split('/').next()?.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, pw)| pw.to_string())
}

fn in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Version directories under /usr/lib/postgresql, newest first.
fn versioned_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut out: Vec<PathBuf> = dirs.into_iter().map(|(_, p)| p).collect();
    let default = PathBuf::from(DEFAULT_BIN_DIR);
    if !out.contains(&default) {
        out.push(default);
    }
    out
}

/// A directory holding both `initdb` and `pg_ctl`.
fn find_bin_dir() -> Option<PathBuf> {
    let from_path = in_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf));
    from_path
        .into_iter()
        .chain(versioned_bin_dirs())
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn find_tool(tool: &str, preferred: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = preferred.map(|d| d.join(tool)).filter(|p| p.is_file()) {
        return Some(p);
    }
    in_path(tool).or_else(|| {
        versioned_bin_dirs()
            .into_iter()
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// A command run as the `postgres` account when we are root (initdb and
/// postgres refuse to run as root), as ourselves otherwise.
fn pg_command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Stops servers and removes directories left by earlier test processes
/// that ended without running their exit hook (and whose watchdog is gone).
fn sweep_stale_clusters(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(owner) = name
            .strip_prefix("cluster-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if process_alive(owner) {
            continue;
        }
        let pidfile = e.path().join("data").join("postmaster.pid");
        if let Some(pm) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        {
            let cmdline = fs::read(format!("/proc/{pm}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("postgres") {
                // SIGQUIT: immediate shutdown of an orphaned test server.
                let _ = Command::new("kill")
                    .args(["-QUIT", &pm.to_string()])
                    .status();
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

fn start_cluster(bin: &Path) -> Result<PgServer, String> {
    let root = clusters_root();
    fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    sweep_stale_clusters(&root);
    let dir = root.join(format!(
        "cluster-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let as_postgres = crate::is_root();
    // Armed before anything starts, so a kill at any point cleans up.
    arm_cleanup(&dir, bin, as_postgres);
    if as_postgres {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = fs::remove_dir_all(&dir);
            return Err("running as root but cannot chown the cluster directory to the `postgres` account (does it exist?)".into());
        }
    }
    let result = init_and_start(bin, &dir, as_postgres);
    if result.is_err() {
        let _ = pg_command(as_postgres, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

fn init_and_start(bin: &Path, dir: &Path, as_postgres: bool) -> Result<PgServer, String> {
    let data = dir.join("data");
    let out = pg_command(as_postgres, &bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let log = dir.join("server.log");
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=128MB",
            dir.display()
        );
        let status = pg_command(as_postgres, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if status.success() {
            let server = PgServer {
                admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                psql: find_tool("psql", Some(bin)).ok_or("`psql` not found next to initdb")?,
                owned_dir: Some(dir.to_path_buf()),
            };
            server.psql(&server.admin_url, "SELECT 1")?;
            return Ok(server);
        }
        last_error = fs::read_to_string(&log).unwrap_or_default();
    }
    Err(format!(
        "pg_ctl start failed three times; server log:\n{last_error}"
    ))
}

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn stop_cluster_at_exit() {
    let taken = STOP_ON_EXIT.lock().map(|mut g| g.take()).unwrap_or(None);
    if let Some((dir, bin, as_postgres)) = taken {
        stop_and_remove(&dir, &bin, as_postgres);
    }
}

fn stop_and_remove(dir: &Path, bin: &Path, as_postgres: bool) {
    let _ = pg_command(as_postgres, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["stop", "-m", "immediate", "-w", "-t", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir_all(dir);
}

/// Makes sure the cluster stops with this process: an exit hook for normal
/// exits and a detached watchdog for kills.
fn arm_cleanup(dir: &Path, bin: &Path, as_postgres: bool) {
    if let Ok(mut g) = STOP_ON_EXIT.lock() {
        *g = Some((dir.to_path_buf(), bin.to_path_buf(), as_postgres));
    }
    // SAFETY: registers a plain `extern "C" fn()` with the C runtime; the
    // callback only touches a static and spawns processes.
    unsafe {
        atexit(stop_cluster_at_exit);
    }
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_postgres {
        format!("runuser -u postgres -- '{}'", pg_ctl.display())
    } else {
        format!("'{}'", pg_ctl.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {stop} -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        data = dir.join("data").display(),
        dir = dir.display(),
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_credentials_and_parameters() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgresql://h:1", "x"), "postgresql://h:1/x");
    }

    #[test]
    fn database_names_are_valid_and_unique() {
        let long = "a".repeat(200);
        let a = database_name(&long, 123, 1);
        let b = database_name(&long, 123, 2);
        assert!(a.len() <= 63 && b.len() <= 63, "{a}");
        assert_ne!(a, b);
        assert_eq!(database_name("Claims-Due::x", 7, 0), "br_claims_due__x_7_0");
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:s3cret@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact_text("auth failed for s3cret", "postgres://u:s3cret@h/db"),
            "auth failed for ***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn each_test_gets_a_private_database_that_is_dropped_afterwards() {
        let a = match TestDatabase::create_blocking("private_a") {
            Ok(db) => db,
            Err(why) => return crate::skip_or_fail("private database test", &why),
        };
        let b = TestDatabase::create_blocking("private_b").unwrap();
        a.psql("CREATE TABLE only_here (x int); INSERT INTO only_here VALUES (7)")
            .unwrap();
        assert_eq!(a.psql("SELECT x FROM only_here").unwrap(), "7");
        assert!(
            b.psql("SELECT x FROM only_here").is_err(),
            "databases do not share tables"
        );
        let name = a.name().to_string();
        let server = PgServer::get().unwrap();
        drop(a);
        let left = server
            .psql(
                server.admin_url(),
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
            )
            .unwrap();
        assert_eq!(left, "0", "dropped with the guard");
        if let Some(data) = server.data_dir() {
            assert!(
                data.join("postmaster.pid").is_file(),
                "our own cluster is running"
            );
        }
    }
}
