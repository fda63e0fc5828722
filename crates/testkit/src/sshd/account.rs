//! The local accounts sshd logs tests in as: the user running the tests
//! (key authentication) and, for password authentication, a dedicated
//! account `batchrouter-sftp` that only root can create.
//!
//! Apart from the server itself because it changes the machine, not a temp
//! dir: it runs `useradd`/`chpasswd` once per machine and keeps the random
//! password in a root-only file so concurrent test processes agree on it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The local account used for password authentication tests.
pub const PASSWORD_USER: &str = "batchrouter-sftp";
/// Where the password account's password is kept between test processes.
pub const PASSWORD_FILE: &str = "/var/lib/batchrouter-testkit/sftp-password";

/// A local account that logs in with a password.
#[derive(Clone, Debug)]
pub struct PasswordAccount {
    /// Login name.
    pub user: String,
    /// Its password (random, per machine).
    pub password: String,
    /// Its home directory (writable by it; uploads of password tests land here).
    pub home: PathBuf,
}

/// The password account, created (as root) on first use in this process.
pub fn password_account() -> Result<PasswordAccount, String> {
    static ACCOUNT: OnceLock<Result<PasswordAccount, String>> = OnceLock::new();
    ACCOUNT.get_or_init(create_password_account).clone()
}

fn create_password_account() -> Result<PasswordAccount, String> {
    if !crate::is_root() {
        return Err(format!(
            "password authentication needs the local account `{PASSWORD_USER}`, which only root can create"
        ));
    }
    let password = shared_password()?;
    if passwd_entry(PASSWORD_USER).is_none() {
        let out = Command::new("useradd")
            .args(["--create-home", "--home-dir"])
            .arg(format!("/home/{PASSWORD_USER}"))
            .args(["--shell", "/bin/sh", PASSWORD_USER])
            .output()
            .map_err(|e| format!("cannot run useradd: {e}"))?;
        // Exit code 9: another test process created it meanwhile.
        if !out.status.success() && out.status.code() != Some(9) {
            return Err(format!(
                "useradd failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let mut chpasswd = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run chpasswd: {e}"))?;
    if let Some(mut stdin) = chpasswd.stdin.take() {
        stdin
            .write_all(format!("{PASSWORD_USER}:{password}\n").as_bytes())
            .map_err(|e| format!("chpasswd: {e}"))?;
    }
    let out = chpasswd
        .wait_with_output()
        .map_err(|e| format!("chpasswd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "chpasswd failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let home = passwd_entry(PASSWORD_USER)
        .and_then(|fields| fields.get(5).cloned())
        .map(PathBuf::from)
        .ok_or_else(|| format!("account `{PASSWORD_USER}` has no passwd entry after useradd"))?;
    if !home.is_dir() {
        return Err(format!(
            "home {} of `{PASSWORD_USER}` does not exist",
            home.display()
        ));
    }
    Ok(PasswordAccount {
        user: PASSWORD_USER.to_string(),
        password,
        home,
    })
}

/// The password every test process uses: created once with `create_new`,
/// read back by everyone else.
fn shared_password() -> Result<String, String> {
    let file = Path::new(PASSWORD_FILE);
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(mut f) => {
            let password: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(24)
                .collect();
            f.write_all(password.as_bytes())
                .map_err(|e| format!("{PASSWORD_FILE}: {e}"))?;
            Ok(password)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut text = String::new();
                File::open(file)
                    .and_then(|mut f| f.read_to_string(&mut text))
                    .map_err(|e| format!("{PASSWORD_FILE}: {e}"))?;
                let text = text.trim().to_string();
                if !text.is_empty() {
                    return Ok(text);
                }
                if Instant::now() > deadline {
                    return Err(format!("{PASSWORD_FILE} stays empty"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(e) => Err(format!("{PASSWORD_FILE}: {e}")),
    }
}

fn passwd_entry(user: &str) -> Option<Vec<String>> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.first().map(String::as_str) == Some(user))
}

/// The name of the user running the tests (key logins use it).
pub(super) fn current_user() -> Result<String, String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .map_err(|e| format!("cannot run id: {e}"))?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if name.is_empty() {
        Err("cannot tell the current user name".into())
    } else {
        Ok(name)
    }
}
