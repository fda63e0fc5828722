//! Remote file-system steps on one SFTP session, shared by every delivery:
//! `mkdir -p`, removing a file that may be gone, telling a failed write's
//! cause (the server said no, or the connection is lost), and the writers
//! that sit in the upload's output stack (byte counting, cancellation).
//!
//! They live apart from [`crate::upload`] because they are the plain
//! mechanics the uploader composes: none of them knows about batches,
//! sessions being replaced or `.part` bookkeeping.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use libssh2_sys as raw;
use ssh2::{ErrorCode as SshCode, Sftp};

use crate::client::Connection;
use crate::error::{
    sftp_status_from_io_message, sftp_status_is_permanent, sftp_status_words, SftpError,
};
use crate::path::parent;

/// Mode of created directories (the server's umask applies on top).
const DIR_MODE: i32 = 0o755;

/// Classifies a failed write into the remote file.
pub(crate) fn write_error(conn: &Connection, part: &str, e: &io::Error) -> SftpError {
    if e.kind() == io::ErrorKind::TimedOut {
        return SftpError::Transport {
            message: format!("remote write failed for {part}: timed out ({e})"),
            timed_out: true,
        };
    }
    let status = sftp_status_from_io_message(&e.to_string())
        .filter(|_| conn.last_session_code() == Some(raw::LIBSSH2_ERROR_SFTP_PROTOCOL));
    match status {
        Some(code) => SftpError::Remote {
            op: "remote write",
            path: part.to_string(),
            reason: sftp_status_words(code),
            permanent: sftp_status_is_permanent(code),
        },
        None => SftpError::Transport {
            message: format!("remote write failed for {part}: connection lost ({e})"),
            timed_out: false,
        },
    }
}

/// Removes a remote file; `Ok(false)` when it was not there.
pub(crate) fn unlink_if_present(sftp: &Sftp, path: &str) -> Result<bool, SftpError> {
    match sftp.unlink(Path::new(path)) {
        Ok(()) => Ok(true),
        Err(e)
            if e.code() == SshCode::SFTP(raw::LIBSSH2_FX_NO_SUCH_FILE)
                || e.code() == SshCode::SFTP(raw::LIBSSH2_FX_NO_SUCH_PATH) =>
        {
            Ok(false)
        }
        Err(e) => Err(SftpError::from_ssh("unlink", path, &e)),
    }
}

/// `mkdir -p` over SFTP.
pub(crate) fn ensure_dir(sftp: &Sftp, dir: &str) -> Result<(), SftpError> {
    if dir.is_empty() || dir == "/" || dir == "." {
        return Ok(());
    }
    match sftp.stat(Path::new(dir)) {
        Ok(st) if st.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(SftpError::Remote {
                op: "mkdir",
                path: dir.to_string(),
                reason: "exists and is not a directory".into(),
                permanent: true,
            })
        }
        Err(e) if e.code() == SshCode::SFTP(raw::LIBSSH2_FX_NO_SUCH_FILE) => {}
        Err(e) => return Err(SftpError::from_ssh("stat", dir, &e)),
    }
    ensure_dir(sftp, parent(dir))?;
    match sftp.mkdir(Path::new(dir), DIR_MODE) {
        Ok(()) => Ok(()),
        // Someone else created it meanwhile.
        Err(_) if sftp.stat(Path::new(dir)).is_ok_and(|st| st.is_dir()) => Ok(()),
        Err(e) => Err(SftpError::from_ssh("mkdir", dir, &e)),
    }
}

/// Refuses more output once the upload is cancelled. It sits above the
/// pipeline, so libssh2 is never left holding a half-sent request.
pub(crate) struct StopOnCancel<'a, W> {
    pub(crate) inner: W,
    pub(crate) cancel: &'a AtomicBool,
}

impl<W: Write> Write for StopOnCancel<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("upload cancelled"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("upload cancelled"));
        }
        self.inner.flush()
    }
}
