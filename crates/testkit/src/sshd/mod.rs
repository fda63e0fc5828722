//! A throwaway OpenSSH server (`/usr/sbin/sshd` from `openssh-server`) for
//! SFTP tests and benchmarks: real protocol, real host keys, real failures.
//!
//! [`Sshd::start`] writes a private config into a temp dir (ed25519 host
//! key, a client key pair in `authorized_keys`, `internal-sftp`), runs
//! `sshd -D -e -f <config>` on `127.0.0.1:<free port>`, waits until
//! `ssh-keyscan` answers and records its output as a `known_hosts` file.
//! Dropping the value kills the server and every session process it forked
//! (found through `/proc`), so nothing is left behind.
//!
//! Key authentication logs in as the user running the tests. Password
//! authentication needs a real local account with a password: when running
//! as root, [`password_account`] creates `batchrouter-sftp` (home
//! `/home/batchrouter-sftp`) with a random password kept in
//! `/var/lib/batchrouter-testkit/sftp-password` (mode 0600) so concurrent
//! test processes agree on it. Without root it reports why it cannot.
//!
//! Without sshd installed, [`Sshd::start`] fails and [`Sshd::start_or_skip`]
//! calls [`crate::skip_or_fail`] (a loud skip, or a failure when
//! `BATCHROUTER_REQUIRE_REAL_SERVERS=1`).

mod account;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use self::account::current_user;
pub use self::account::{password_account, PasswordAccount, PASSWORD_FILE, PASSWORD_USER};
use crate::is_root;

/// The OpenSSH server binary (absolute: sshd re-executes itself).
pub const SSHD: &str = "/usr/sbin/sshd";

/// How long the server may take to answer `ssh-keyscan` after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running throwaway sshd; killed (with its sessions) on drop.
pub struct Sshd {
    dir: TempDir,
    upload_root: PathBuf,
    port: u16,
    child: Option<Child>,
    user: String,
    fingerprint: String,
    known_hosts: PathBuf,
    client_key: PathBuf,
    log: PathBuf,
    config: PathBuf,
}

impl Sshd {
    /// Starts a server, or says why it cannot (sshd or ssh tools missing,
    /// start failure with the server's log).
    pub fn start() -> Result<Sshd, String> {
        for tool in [SSHD, "ssh-keygen", "ssh-keyscan"] {
            if which(tool).is_none() {
                return Err(format!(
                    "`{tool}` is not installed (apt-get install openssh-server openssh-client)"
                ));
            }
        }
        if is_root() {
            // The privilege-separation directory sshd insists on.
            fs::create_dir_all("/run/sshd").map_err(|e| format!("cannot create /run/sshd: {e}"))?;
            let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
        }
        let dir = tempfile::Builder::new()
            .prefix("batchrouter-sshd-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let host_key = dir.path().join("ssh_host_ed25519_key");
        keygen(&host_key, "ed25519", "")?;
        let client_key = dir.path().join("client_ed25519");
        keygen(&client_key, "ed25519", "")?;
        fs::copy(pub_path(&client_key), dir.path().join("authorized_keys"))
            .map_err(|e| format!("authorized_keys: {e}"))?;
        let fingerprint = fingerprint_of(&pub_path(&host_key))?;
        let upload_root = dir.path().join("files");
        fs::create_dir(&upload_root).map_err(|e| format!("upload dir: {e}"))?;
        let user = current_user()?;

        let mut sshd = Sshd {
            known_hosts: dir.path().join("known_hosts"),
            log: dir.path().join("sshd.log"),
            config: dir.path().join("sshd_config"),
            dir,
            upload_root,
            port: 0,
            child: None,
            user,
            fingerprint,
            client_key,
        };
        let mut last = String::new();
        for _ in 0..5 {
            sshd.port = free_port()?;
            match sshd.launch() {
                Ok(()) => return Ok(sshd),
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Starts a server, or calls [`crate::skip_or_fail`] and returns `None`.
    pub fn start_or_skip(test: &str) -> Option<Sshd> {
        match Sshd::start() {
            Ok(s) => Some(s),
            Err(why) => {
                crate::skip_or_fail(test, &format!("no OpenSSH server: {why}"));
                None
            }
        }
    }

    fn write_config(&self) -> Result<(), String> {
        let d = self.dir.path();
        let text = format!(
            "ListenAddress 127.0.0.1:{port}\n\
             HostKey {hk}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {ak}\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\n\
             UseDNS no\n\
             PrintMotd no\n\
             LogLevel INFO\n\
             MaxStartups 64\n\
             MaxAuthTries 10\n\
             Subsystem sftp internal-sftp\n",
            port = self.port,
            hk = d.join("ssh_host_ed25519_key").display(),
            pid = d.join("sshd.pid").display(),
            ak = d.join("authorized_keys").display(),
        );
        fs::write(&self.config, text).map_err(|e| format!("sshd_config: {e}"))
    }

    fn launch(&mut self) -> Result<(), String> {
        self.write_config()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("sshd log: {e}"))?;
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot run {SSHD}: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = self.log_since(log_start);
                    return Err(format!("sshd exited at start ({status}): {}", log.trim()));
                }
            }
            let scan = Command::new("ssh-keyscan")
                .args([
                    "-T",
                    "2",
                    "-t",
                    "ed25519",
                    "-p",
                    &self.port.to_string(),
                    "127.0.0.1",
                ])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = scan {
                let text = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.starts_with('#') && l.contains("ssh-ed25519"))
                    .collect();
                if !lines.is_empty() {
                    fs::write(&self.known_hosts, format!("{}\n", lines.join("\n")))
                        .map_err(|e| format!("known_hosts: {e}"))?;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "sshd did not answer ssh-keyscan within {READY_TIMEOUT:?}: {}",
                    self.log_since(log_start).trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned()
    }

    /// Address to connect to.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Port it listens on (kept across [`Sshd::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user that key authentication logs in as (the one running tests).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Private key (OpenSSH format, no passphrase) listed in `authorized_keys`.
    pub fn client_key_path(&self) -> &Path {
        &self.client_key
    }

    /// Text of [`Sshd::client_key_path`].
    pub fn client_key(&self) -> String {
        fs::read_to_string(&self.client_key).unwrap_or_default()
    }

    /// `known_hosts` holding this server's key as `[127.0.0.1]:<port>`.
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// `SHA256:…` fingerprint of the host key, as `ssh-keygen -lf` prints it.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A directory the key user may write to (an absolute path).
    pub fn upload_root(&self) -> &Path {
        &self.upload_root
    }

    /// A scratch directory that disappears with the server.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Generates a key pair (`kind` = ed25519, rsa, ecdsa) in the scratch
    /// dir, optionally with a passphrase and optionally authorised, and
    /// returns the private key's path.
    pub fn generate_key(
        &self,
        name: &str,
        kind: &str,
        passphrase: &str,
        authorize: bool,
    ) -> Result<PathBuf, String> {
        let path = self.dir.path().join(name);
        keygen(&path, kind, passphrase)?;
        if authorize {
            let public =
                fs::read_to_string(pub_path(&path)).map_err(|e| format!("{name}.pub: {e}"))?;
            let mut ak = OpenOptions::new()
                .append(true)
                .open(self.dir.path().join("authorized_keys"))
                .map_err(|e| format!("authorized_keys: {e}"))?;
            ak.write_all(public.as_bytes())
                .map_err(|e| format!("authorized_keys: {e}"))?;
        }
        Ok(path)
    }

    /// `SHA256:…` fingerprint of a public key file.
    pub fn fingerprint_of(public_key: &Path) -> Result<String, String> {
        fingerprint_of(public_key)
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the server and every session it forked (connections drop at once).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let root = child.id();
        // Freeze the listener so it forks no new session while we look.
        let _ = Command::new("kill")
            .args(["-STOP", &root.to_string()])
            .status();
        let mut pids = descendants(root);
        pids.push(root);
        let mut args = vec!["-KILL".to_string()];
        args.extend(pids.iter().map(|p| p.to_string()));
        let _ = Command::new("kill")
            .args(&args)
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Freezes the server and every session it forked (SIGSTOP): connections
    /// stay open but nothing answers any more, as with a hung server or a
    /// dead network path. [`Sshd::thaw`] resumes them.
    pub fn freeze(&mut self) {
        self.signal_all("-STOP");
    }

    /// Resumes a server frozen by [`Sshd::freeze`] (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&mut self, signal: &str) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let root = child.id();
        let mut pids = vec![root];
        pids.extend(descendants(root));
        let mut args = vec![signal.to_string()];
        args.extend(pids.iter().map(|p| p.to_string()));
        let _ = Command::new("kill")
            .args(&args)
            .stderr(Stdio::null())
            .status();
    }

    /// Stops the server and starts it again on the same port with the same keys.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.launch()
    }

    /// The server's log so far (all starts).
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    /// Successful logins so far (all starts), from the server's log.
    pub fn accepted_logins(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Accepted "))
            .count()
    }

    /// Runs OpenSSH's `sftp` client in batch mode (`-b`) with the client key
    /// and strict host-key checking; returns its output.
    pub fn sftp_batch(&self, commands: &str) -> Result<String, String> {
        self.sftp_batch_with_key(&self.client_key, commands)
    }

    /// Like [`Sshd::sftp_batch`] with another (authorised) private key.
    pub fn sftp_batch_with_key(&self, key: &Path, commands: &str) -> Result<String, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let batch = self
            .dir
            .path()
            .join(format!("sftp-batch-{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::write(&batch, commands).map_err(|e| format!("batch file: {e}"))?;
        let out = Command::new("sftp")
            .arg("-F")
            .arg("/dev/null")
            .arg("-b")
            .arg(&batch)
            .arg("-i")
            .arg(key)
            .arg("-P")
            .arg(self.port.to_string())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg(format!("{}@127.0.0.1", self.user))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run sftp: {e}"))?;
        let _ = fs::remove_file(&batch);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "sftp failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Downloads a remote file with OpenSSH's `sftp` client (an independent
    /// implementation) and returns its bytes.
    pub fn download(&self, remote: &Path) -> Result<Vec<u8>, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let local = self
            .dir
            .path()
            .join(format!("download-{}", N.fetch_add(1, Ordering::Relaxed)));
        self.sftp_batch(&format!(
            "get \"{}\" \"{}\"\n",
            remote.display(),
            local.display()
        ))?;
        let bytes = fs::read(&local).map_err(|e| format!("downloaded file: {e}"))?;
        let _ = fs::remove_file(&local);
        Ok(bytes)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    if tool.starts_with('/') {
        return Path::new(tool).is_file().then(|| PathBuf::from(tool));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn pub_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn keygen(path: &Path, kind: &str, passphrase: &str) -> Result<(), String> {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args([
        "-q",
        "-t",
        kind,
        "-N",
        passphrase,
        "-C",
        "batchrouter-test",
        "-f",
    ])
    .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "3072"]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn fingerprint_of(public_key: &Path) -> Result<String, String> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public_key)
        .output()
        .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .map(str::to_string)
        .ok_or_else(|| format!("no fingerprint for {}", public_key.display()))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Every process below `root`, from `/proc/<pid>/stat`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command name: state, ppid, …
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}
