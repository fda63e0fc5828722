//! Crash-point helpers: run `batchrouterd` with one crash point armed
//! (`BATCHROUTER_CRASH_AT`, feature `failpoints` of the router, turned on by
//! the daemon's dev-dependencies) and wait until it dies there; enqueue jobs
//! straight into the store with the real `enqueue` subcommand.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The variable the router's crash points read.
pub const CRASH_ENV: &str = "BATCHROUTER_CRASH_AT";

/// What a run that crashed at its point left behind.
pub struct Crashed {
    /// Lines the process wrote on stderr (also forwarded to ours).
    pub stderr: Vec<String>,
}

/// A `batchrouterd run` armed to crash at `point`, not yet dead.
pub struct Armed {
    child: std::process::Child,
    point: String,
    label: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Armed {
    /// Starts `batchrouterd run --config config` with `point` armed, logging
    /// at `info`. Its stderr is watched for the point's announcement, which
    /// is forwarded with `label` as prefix; the rest is kept for the report
    /// of a run that never gets there.
    pub fn start(config: &Path, point: &str, label: &str, env: &[(&str, &str)]) -> Armed {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchrouterd"));
        cmd.args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("BATCHROUTER_CONFIG")
            .env(CRASH_ENV, point)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn batchrouterd");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let prefix = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("crash point") {
                    eprintln!("[{prefix}] {line}");
                }
                let _ = tx.send(line);
            }
        });
        Armed {
            child,
            point: point.to_string(),
            label: label.to_string(),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until the process announces its point, makes sure it is dead
    /// (`kill -9`: the point kills itself that way; a second SIGKILL is
    /// harmless) and reaps it. Panics, naming the case, when the process
    /// exits any other way or the point is not reached within `limit`.
    pub fn wait_for_crash(mut self, limit: Duration) -> Crashed {
        let marker = format!("crash point `{}` reached", self.point);
        let start = Instant::now();
        let mut reached = false;
        while !reached {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    reached = line.contains(&marker);
                    self.seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    panic!(
                        "{}: batchrouterd exited ({status}) without reaching crash point `{}` \
                         (is it built with the router's `failpoints` feature?); its log:\n{}",
                        self.label,
                        self.point,
                        self.tail()
                    );
                }
            }
            if !reached && start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                    self.seen.push(line);
                }
                panic!(
                    "{}: crash point `{}` not reached within {limit:?} \
                     (is batchrouterd built with the router's `failpoints` feature?); its log:\n{}",
                    self.label,
                    self.point,
                    self.tail()
                );
            }
        }
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "{}: the process should die by SIGKILL at `{}`, got {status}",
            self.label,
            self.point
        );
        // Whatever it wrote before dying.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
            self.seen.push(line);
        }
        Crashed {
            stderr: std::mem::take(&mut self.seen),
        }
    }
}

impl Armed {
    /// The last lines of the process's log.
    fn tail(&self) -> String {
        let from = self.seen.len().saturating_sub(40);
        self.seen[from..].join("\n")
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts `lines` (NDJSON payloads) for `destination` into the store with
/// `batchrouterd enqueue`, before any daemon runs: job ids follow line order.
pub fn enqueue_file(config: &Path, destination: &str, lines: &[String]) {
    let file = config.with_file_name(format!("{destination}.ndjson"));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_batchrouterd"))
        .args(["enqueue", "--config"])
        .arg(config)
        .args(["--destination", destination])
        .arg(&file)
        .env_remove("BATCHROUTER_CONFIG")
        .env_remove(CRASH_ENV)
        .stdin(Stdio::null())
        .output()
        .expect("run batchrouterd enqueue");
    assert!(
        out.status.success(),
        "enqueue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
