//! The uploader: one batch → one remote file, written to `<name>.part`,
//! size-checked, then renamed over `<name>`. All SSH work happens on a
//! blocking thread under the destination's single session.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use batchrouter_core::render::CountingWriter;
use batchrouter_core::{
    ConfigProblems, DestinationContext, DestinationTelemetry, ErrorCode, Job, JobError, Outcome,
    StagedBatch, Timestamp, TransformError, UploadOutput, Uploader,
};
use libssh2_sys as raw;
use ssh2::{ErrorCode as SshCode, OpenFlags, OpenType, RenameFlags};

use crate::client::Connection;
use crate::config::{HostKeyPolicy, Settings};
use crate::error::SftpError;
use crate::path::parent;
use crate::pipeline::Pipelined;
use crate::remote::{ensure_dir, unlink_if_present, write_error, StopOnCancel};
use crate::rename::PosixRename;
use crate::render::{render, ColumnRules, RenderError};
use crate::strays::StrayParts;
use crate::transform::transform_record;

/// Bytes kept in flight to the server (see [`crate::pipeline`]); with
/// libssh2's copy of them, this bounds an upload's buffer memory. The
/// server's channel window (2 MiB on OpenSSH) caps what is on the wire.
pub const IN_FLIGHT: usize = 4 << 20;

/// Mode of created files (the server's umask applies on top).
const FILE_MODE: i32 = 0o644;

/// The SFTP fire-and-forget uploader (wrap it in
/// [`batchrouter_core::SimpleAsyncDestinationManager`]; [`crate::SftpDestination`] does).
pub struct SftpUploader {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    destination_id: String,
    telemetry: Arc<dyn DestinationTelemetry>,
    /// The destination's one session and the `.part` files failed uploads
    /// left; locked for a whole delivery, so uploads are serialised.
    slot: Mutex<Slot>,
    sessions_opened: AtomicU64,
    posix_rename: AtomicBool,
}

/// What one destination's uploads share under one lock.
#[derive(Default)]
struct Slot {
    /// The session; `None` until the first upload and after any error.
    conn: Option<Connection>,
    /// `.part` files of failed attempts, removed after the next successful
    /// connect (see [`crate::strays`]).
    strays: StrayParts,
}

/// What the blocking side needs to know about a batch.
struct BatchSpec {
    batch_id: String,
    path: PathBuf,
    jobs: usize,
    created_at: Timestamp,
}

/// A finished delivery.
struct Delivered {
    path: String,
    bytes: u64,
}

impl SftpUploader {
    /// Builds the uploader from validated settings (no network I/O).
    pub fn new(ctx: &DestinationContext, settings: Settings) -> SftpUploader {
        if matches!(settings.host_key, HostKeyPolicy::Insecure) {
            tracing::warn!(
                destination_id = %ctx.id,
                address = %settings.address(),
                "insecureSkipHostKeyCheck = true: the SFTP server's identity is NOT verified, so anyone who can \
                 intercept the connection receives the credentials and the data; set knownHosts or hostKeyFingerprint"
            );
        }
        SftpUploader {
            shared: Arc::new(Shared {
                settings,
                destination_id: ctx.id.clone(),
                telemetry: ctx.telemetry.clone(),
                slot: Mutex::new(Slot::default()),
                sessions_opened: AtomicU64::new(0),
                posix_rename: AtomicBool::new(true),
            }),
        }
    }

    /// Validates a config table (every problem listed) and builds the uploader.
    pub fn from_config(
        ctx: &DestinationContext,
        config: &serde_json::Value,
    ) -> Result<SftpUploader, ConfigProblems> {
        Ok(SftpUploader::new(ctx, Settings::from_config(config)?))
    }

    /// The validated settings.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The remote path a batch is delivered to.
    pub fn remote_path(&self, batch: &StagedBatch) -> String {
        self.shared.settings.path.expand(
            &self.shared.destination_id,
            &batch.batch_id,
            batch.created_at,
        )
    }

    /// SSH sessions opened so far (one while the connection stays healthy).
    pub fn sessions_opened(&self) -> u64 {
        self.shared.sessions_opened.load(Ordering::Relaxed)
    }

    /// Turns posix-rename off so tests can exercise the fallback that
    /// servers without the extension get.
    #[doc(hidden)]
    pub fn set_posix_rename(&self, enabled: bool) {
        self.shared.posix_rename.store(enabled, Ordering::Relaxed);
    }
}

/// Sets the flag when the upload future is dropped (the router's timeout),
/// so the blocking thread stops at its next write instead of finishing.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Uploader for SftpUploader {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        transform_record(&job.payload, self.shared.settings.format)
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        if batch.job_ids.is_empty() {
            return UploadOutput::default();
        }
        let spec = BatchSpec {
            batch_id: batch.batch_id.clone(),
            path: batch.path.clone(),
            jobs: batch.job_ids.len(),
            created_at: batch.created_at,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let shared = self.shared.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || shared.deliver(&spec, &cancel)).await;
        let elapsed = started.elapsed();
        let s = &self.shared;
        match result {
            Ok(Ok(done)) => {
                let secs = elapsed.as_secs_f64().max(1e-9);
                tracing::debug!(
                    destination_id = %s.destination_id,
                    batch_id = %batch.batch_id,
                    attempt = batch.attempt,
                    jobs = batch.job_ids.len(),
                    bytes = done.bytes,
                    path = %done.path,
                    elapsed_ms = elapsed.as_millis() as u64,
                    mb_per_s = format!("{:.1}", done.bytes as f64 / 1e6 / secs),
                    "SFTP upload complete"
                );
                let outcome = Outcome::Succeeded {
                    note: None,
                    external_id: Some(done.path),
                };
                UploadOutput::all(&batch.job_ids, &outcome)
            }
            Ok(Err(e)) => {
                if e.is_permanent() {
                    tracing::error!(
                        destination_id = %s.destination_id,
                        batch_id = %batch.batch_id,
                        jobs = batch.job_ids.len(),
                        error = %e,
                        "SFTP destination rejected the upload; its jobs are aborted: fix the destination's config \
                         (or the server), then re-drive them"
                    );
                } else {
                    tracing::warn!(
                        destination_id = %s.destination_id,
                        batch_id = %batch.batch_id,
                        attempt = batch.attempt,
                        jobs = batch.job_ids.len(),
                        elapsed_ms = elapsed.as_millis() as u64,
                        error = %e,
                        "SFTP upload failed; the jobs will be retried"
                    );
                }
                let outcome = e.outcome();
                let bad = match &e {
                    SftpError::BadRecord { line, .. } => line
                        .checked_sub(1)
                        .and_then(|i| batch.job_ids.get(i).copied()),
                    _ => None,
                };
                UploadOutput {
                    outcomes: batch
                        .job_ids
                        .iter()
                        .map(|&id| {
                            if Some(id) == bad {
                                let why = JobError::new(ErrorCode::TransformFailed, e.to_string());
                                (id, Outcome::Aborted(why))
                            } else {
                                (id, outcome.clone())
                            }
                        })
                        .collect(),
                    ..Default::default()
                }
            }
            Err(join) => {
                tracing::error!(destination_id = %s.destination_id, batch_id = %batch.batch_id, error = %join, "SFTP upload task panicked");
                let why = JobError::new(
                    ErrorCode::Internal,
                    format!("SFTP upload task failed: {join}"),
                );
                UploadOutput::all_failed(&batch.job_ids, why)
            }
        }
    }

    async fn close(&self) {
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let conn = shared
                .slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .conn
                .take();
            if let Some(c) = conn {
                c.close();
            }
        })
        .await;
    }
}

impl Shared {
    /// Delivers one batch (blocking). A session that was reused and turns
    /// out dead is replaced once, transparently.
    fn deliver(&self, spec: &BatchSpec, cancel: &AtomicBool) -> Result<Delivered, SftpError> {
        let remote =
            self.settings
                .path
                .expand(&self.destination_id, &spec.batch_id, spec.created_at);
        let part = format!("{remote}.part");
        let mut guard = match self.slot.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                // A panic mid-upload: whatever session is there is suspect.
                let mut g = poisoned.into_inner();
                if let Some(c) = g.conn.take() {
                    c.discard();
                }
                g
            }
        };
        let slot = &mut *guard;
        let mut retried = false;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(SftpError::Cancelled);
            }
            let (mut conn, reused) = match slot.conn.take() {
                Some(c) => (c, true),
                None => (self.connect()?, false),
            };
            // Whether this attempt may have created `part` on the server.
            let mut part_touched = false;
            let result = if reused {
                Ok(())
            } else {
                self.remove_stray_parts(&conn, &mut slot.strays, &part)
            }
            .and_then(|()| {
                self.transfer(&mut conn, spec, &remote, &part, cancel, &mut part_touched)
            });
            self.telemetry.request(match &result {
                Ok(_) => "ok",
                Err(e) => e.telemetry_status(),
            });
            match result {
                Ok(bytes) => {
                    // Renamed to its final name: nothing stray any more.
                    slot.strays.forget(&part);
                    slot.conn = Some(conn);
                    return Ok(Delivered {
                        path: remote,
                        bytes,
                    });
                }
                Err(e) => {
                    if part_touched {
                        // When the session still works, do not leave a half
                        // file behind; otherwise remove it after the next
                        // successful connect.
                        let removed = matches!(
                            e,
                            SftpError::Remote { .. }
                                | SftpError::Staging(_)
                                | SftpError::BadRecord { .. }
                        ) && unlink_if_present(conn.sftp(), &part).is_ok();
                        if !removed {
                            self.remember_stray(&mut slot.strays, &part);
                            tracing::debug!(
                                destination_id = %self.destination_id,
                                path = %part,
                                remembered = slot.strays.len(),
                                "the failed upload may have left its .part file; it is removed after the next successful connect"
                            );
                        }
                    }
                    let session_age_s = conn.opened_at.elapsed().as_secs();
                    conn.discard();
                    if reused && e.is_transport() && !retried && !cancel.load(Ordering::Relaxed) {
                        tracing::warn!(
                            destination_id = %self.destination_id,
                            session_age_s,
                            error = %e,
                            "the kept SFTP session no longer works; reconnecting once"
                        );
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Remembers a `.part` to remove later, saying so when the list is full.
    fn remember_stray(&self, strays: &mut StrayParts, path: &str) {
        if let Some(dropped) = strays.remember(path) {
            tracing::warn!(
                destination_id = %self.destination_id,
                path = %dropped,
                "too many .part files of failed uploads to remember; this one will not be removed automatically"
            );
        }
    }

    /// On a freshly connected session, removes the `.part` files earlier
    /// failed attempts left, except `current` (this upload rewrites it).
    /// Paths that could not be removed for a passing reason stay
    /// remembered; a broken session fails the attempt like any other
    /// transport error.
    fn remove_stray_parts(
        &self,
        conn: &Connection,
        strays: &mut StrayParts,
        current: &str,
    ) -> Result<(), SftpError> {
        let todo = strays.take_except(current);
        if todo.is_empty() {
            return Ok(());
        }
        let mut removed = Vec::new();
        let mut result = Ok(());
        let mut todo = todo.into_iter();
        for path in todo.by_ref() {
            match unlink_if_present(conn.sftp(), &path) {
                Ok(true) => removed.push(path),
                // Gone already: a retry of its batch renamed it (maybe from
                // another process), or someone removed it.
                Ok(false) => {}
                Err(e) if e.is_transport() => {
                    self.remember_stray(strays, &path);
                    result = Err(e);
                    break;
                }
                Err(e) if e.is_permanent() => tracing::warn!(
                    destination_id = %self.destination_id,
                    path = %path,
                    error = %e,
                    "cannot remove the .part file a failed upload left; remove it by hand"
                ),
                Err(e) => {
                    tracing::debug!(
                        destination_id = %self.destination_id,
                        path = %path,
                        error = %e,
                        "cannot remove the .part file a failed upload left yet; trying again after the next connect"
                    );
                    self.remember_stray(strays, &path);
                }
            }
        }
        for path in todo {
            self.remember_stray(strays, &path);
        }
        if !removed.is_empty() {
            tracing::info!(
                destination_id = %self.destination_id,
                count = removed.len(),
                paths = %removed.join(", "),
                "removed .part files left by earlier failed uploads"
            );
        }
        result
    }

    fn connect(&self) -> Result<Connection, SftpError> {
        let started = Instant::now();
        match Connection::open(&self.settings) {
            Ok(c) => {
                self.sessions_opened.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    destination_id = %self.destination_id,
                    address = %self.settings.address(),
                    user = %self.settings.username,
                    cipher = %c.cipher,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "SFTP session established"
                );
                Ok(c)
            }
            Err(e) => {
                self.telemetry.request(e.telemetry_status());
                Err(e)
            }
        }
    }

    /// One attempt on one session: mkdir -p, write `.part`, fsync, check the
    /// size, rename over the final name. Returns the bytes written.
    fn transfer(
        &self,
        conn: &mut Connection,
        spec: &BatchSpec,
        remote: &str,
        part: &str,
        cancel: &AtomicBool,
        part_touched: &mut bool,
    ) -> Result<u64, SftpError> {
        ensure_dir(conn.sftp(), parent(remote))?;
        // From here on the server may hold `part` (even when the open's
        // answer is lost).
        *part_touched = true;
        let mut file = conn
            .sftp()
            .open_mode(
                Path::new(part),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                FILE_MODE,
                OpenType::File,
            )
            .map_err(|e| SftpError::from_ssh("open", part, &e))?;

        let counting = CountingWriter {
            inner: &mut file,
            bytes: 0,
        };
        let mut pipe = Pipelined::new(counting, IN_FLIGHT);
        let rules = ColumnRules {
            order: &self.settings.column_order,
            sort: self.settings.sort_column_names,
        };
        let rendered = {
            let mut out = StopOnCancel {
                inner: &mut pipe,
                cancel,
            };
            render(self.settings.format, &spec.path, spec.jobs, rules, &mut out)
                .and_then(|()| out.flush().map_err(RenderError::Sink))
        };
        let result = match rendered {
            Ok(()) => Ok(()),
            // libssh2 itself failed: its stream may stop mid-packet, so the
            // session must not wait long for anything any more.
            Err(RenderError::Sink(e)) if !cancel.load(Ordering::Relaxed) => {
                conn.shorten_timeouts();
                Err(write_error(conn, part, &e))
            }
            // We stopped (cancelled, or the staged file is unusable): first
            // let libssh2 finish the requests it holds, so the SFTP stream
            // stays well-formed and the handle closes cleanly.
            Err(other) => {
                if pipe.flush().is_err() {
                    conn.shorten_timeouts();
                }
                Err(if cancel.load(Ordering::Relaxed) {
                    SftpError::Cancelled
                } else if let RenderError::BadLine { line, reason } = other {
                    SftpError::BadRecord { line, reason }
                } else {
                    SftpError::Staging(other.to_string())
                })
            }
        };
        let bytes = pipe.into_inner().bytes;
        result?;

        match file.fsync() {
            Ok(()) => {}
            // The server lacks fsync@openssh.com: nothing more we can do.
            Err(e) if e.code() == SshCode::SFTP(raw::LIBSSH2_FX_OP_UNSUPPORTED) => {}
            Err(e) => return Err(SftpError::from_ssh("fsync", part, &e)),
        }
        file.close()
            .map_err(|e| SftpError::from_ssh("close", part, &e))?;

        let size = conn
            .sftp()
            .stat(Path::new(part))
            .map_err(|e| SftpError::from_ssh("stat", part, &e))?
            .size;
        if size != Some(bytes) {
            return Err(SftpError::Remote {
                op: "size check",
                path: part.to_string(),
                reason: format!(
                    "the server holds {} bytes but {bytes} were written",
                    size.map_or_else(|| "an unknown number of".to_string(), |s| s.to_string())
                ),
                permanent: false,
            });
        }
        self.publish(conn, part, remote).map(|()| bytes)
    }

    /// Renames `.part` over the final name: atomically with posix-rename,
    /// else (servers without it) by removing an existing target first.
    fn publish(&self, conn: &mut Connection, part: &str, remote: &str) -> Result<(), SftpError> {
        if self.posix_rename.load(Ordering::Relaxed) {
            match conn.posix_rename(part, remote)? {
                PosixRename::Done => return Ok(()),
                PosixRename::Unsupported => tracing::debug!(
                    destination_id = %self.destination_id,
                    "server lacks posix-rename@openssh.com; replacing the target in two steps"
                ),
            }
        }
        let sftp = conn.sftp();
        let flags = Some(RenameFlags::OVERWRITE | RenameFlags::ATOMIC | RenameFlags::NATIVE);
        match sftp.rename(Path::new(part), Path::new(remote), flags) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(e.code(), SshCode::SFTP(_)) && sftp.stat(Path::new(remote)).is_ok() =>
            {
                // SFTP v3 never replaces an existing file: this is an earlier
                // delivery of the same batch; replace it.
                sftp.unlink(Path::new(remote))
                    .map_err(|e| SftpError::from_ssh("unlink", remote, &e))?;
                sftp.rename(Path::new(part), Path::new(remote), flags)
                    .map_err(|e| SftpError::from_ssh("rename", remote, &e))
            }
            Err(e) => Err(SftpError::from_ssh("rename", remote, &e)),
        }
    }
}
