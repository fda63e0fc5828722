//! Why an SFTP upload did not work, classified into what happens to the
//! batch's jobs: retry later, or give up until an operator fixes something.

use batchrouter_core::{ErrorCode, JobError, Outcome};
use libssh2_sys as raw;
use ssh2::ErrorCode as SshCode;

/// A failed SFTP upload, by cause.
#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    /// The TCP connection could not be made (refused, unreachable, timed out,
    /// name not resolved). Retryable.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// `host:port`.
        address: String,
        /// What the OS said.
        reason: String,
        /// The connect timed out.
        timed_out: bool,
    },
    /// The SSH conversation broke (reset, handshake failure, timeout,
    /// malformed answer). Retryable on a new session.
    #[error("{message}")]
    Transport {
        /// What happened, with the operation and path when known.
        message: String,
        /// An `ioTimeout` expired.
        timed_out: bool,
    },
    /// The server's host key did not verify. Permanent until the key or the
    /// config is fixed; no credential was sent.
    #[error("{0}")]
    HostKey(String),
    /// The server refused our credentials (or the key could not be used).
    /// Permanent until the config is fixed.
    #[error("{0}")]
    Auth(String),
    /// The server answered an SFTP request with an error status.
    #[error("{op} failed for {path}: {reason}")]
    Remote {
        /// The operation (`mkdir`, `open`, `remote write`, `rename`, …).
        op: &'static str,
        /// Remote path concerned.
        path: String,
        /// Server's status, in words.
        reason: String,
        /// Retrying cannot help (permission denied, not a directory, …).
        permanent: bool,
    },
    /// The staged batch could not be read or is not what transform wrote.
    #[error("staged batch unusable: {0}")]
    Staging(String),
    /// One staged record could not be rendered into the file (transform
    /// prevents this; kept as a safety net so one record never fails its
    /// whole batch for good): that job is aborted, the others retried.
    #[error("staged line {line} cannot be rendered: {reason}")]
    BadRecord {
        /// 1-based line of the staged file (= position in the batch).
        line: usize,
        /// Parser message.
        reason: String,
    },
    /// The router gave up on the upload (its timeout) while it ran.
    #[error("upload cancelled before it finished")]
    Cancelled,
}

impl SftpError {
    /// Retrying the same upload later cannot succeed without a fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            SftpError::HostKey(_) | SftpError::Auth(_) => true,
            SftpError::Remote { permanent, .. } => *permanent,
            _ => false,
        }
    }

    /// The session broke (as opposed to the server refusing a request).
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            SftpError::Connect { .. } | SftpError::Transport { .. }
        )
    }

    /// The word for `destination_requests_total{status}`.
    pub fn telemetry_status(&self) -> &'static str {
        match self {
            SftpError::Connect {
                timed_out: true, ..
            }
            | SftpError::Transport {
                timed_out: true, ..
            } => "timeout",
            SftpError::HostKey(_) | SftpError::Auth(_) => "rejected",
            _ => "error",
        }
    }

    /// The job error every job of the batch gets.
    pub fn job_error(&self) -> JobError {
        let code = match self {
            SftpError::Staging(_) | SftpError::BadRecord { .. } => ErrorCode::Internal,
            e if e.is_permanent() => ErrorCode::DestinationRejected,
            _ => ErrorCode::DestinationUnavailable,
        };
        JobError::new(code, self.to_string())
    }

    /// The outcome every job of the batch gets: aborted when permanent,
    /// failed (retried with backoff) otherwise.
    pub fn outcome(&self) -> Outcome {
        if self.is_permanent() {
            Outcome::Aborted(self.job_error())
        } else {
            Outcome::Failed(self.job_error())
        }
    }

    /// Classifies an ssh2 error from an SFTP request on `path`.
    pub(crate) fn from_ssh(op: &'static str, path: &str, e: &ssh2::Error) -> SftpError {
        match e.code() {
            SshCode::SFTP(code) => SftpError::Remote {
                op,
                path: path.to_string(),
                reason: sftp_status_words(code),
                permanent: sftp_status_is_permanent(code),
            },
            SshCode::Session(code) => SftpError::Transport {
                message: format!("{op} {path}: {}", session_words(code, e.message())),
                timed_out: is_timeout(code),
            },
        }
    }

    /// Classifies an ssh2 error outside any SFTP request (handshake, channel).
    pub(crate) fn transport(what: &str, e: &ssh2::Error) -> SftpError {
        let timed_out = matches!(e.code(), SshCode::Session(c) if is_timeout(c));
        let words = match e.code() {
            SshCode::Session(c) => session_words(c, e.message()),
            SshCode::SFTP(c) => sftp_status_words(c),
        };
        SftpError::Transport {
            message: format!("{what}: {words}"),
            timed_out,
        }
    }
}

/// libssh2 reports a timed-out blocking call with these codes.
pub(crate) fn is_timeout(code: i32) -> bool {
    code == raw::LIBSSH2_ERROR_TIMEOUT || code == raw::LIBSSH2_ERROR_SOCKET_TIMEOUT
}

fn session_words(code: i32, message: &str) -> String {
    if is_timeout(code) {
        format!("timed out ({message})")
    } else if code == raw::LIBSSH2_ERROR_SOCKET_DISCONNECT
        || code == raw::LIBSSH2_ERROR_SOCKET_RECV
        || code == raw::LIBSSH2_ERROR_SOCKET_SEND
        || code == raw::LIBSSH2_ERROR_BANNER_RECV
    {
        format!("connection lost ({message})")
    } else {
        message.to_string()
    }
}

/// The SFTP status codes after which retrying the same request is pointless.
pub(crate) fn sftp_status_is_permanent(code: i32) -> bool {
    matches!(
        code,
        raw::LIBSSH2_FX_PERMISSION_DENIED
            | raw::LIBSSH2_FX_WRITE_PROTECT
            | raw::LIBSSH2_FX_NOT_A_DIRECTORY
            | raw::LIBSSH2_FX_INVALID_FILENAME
            | raw::LIBSSH2_FX_LINK_LOOP
    )
}

/// An SFTP status in words, with its protocol name so operators can search it.
pub(crate) fn sftp_status_words(code: i32) -> String {
    let (name, words) = match code {
        raw::LIBSSH2_FX_EOF => ("SSH_FX_EOF", "end of file"),
        raw::LIBSSH2_FX_NO_SUCH_FILE => ("SSH_FX_NO_SUCH_FILE", "no such file or directory"),
        raw::LIBSSH2_FX_PERMISSION_DENIED => ("SSH_FX_PERMISSION_DENIED", "permission denied"),
        raw::LIBSSH2_FX_FAILURE => (
            "SSH_FX_FAILURE",
            "the server reported a failure (often a full disk or quota)",
        ),
        raw::LIBSSH2_FX_BAD_MESSAGE => ("SSH_FX_BAD_MESSAGE", "bad message"),
        raw::LIBSSH2_FX_NO_CONNECTION => ("SSH_FX_NO_CONNECTION", "no connection"),
        raw::LIBSSH2_FX_CONNECTION_LOST => ("SSH_FX_CONNECTION_LOST", "connection lost"),
        raw::LIBSSH2_FX_OP_UNSUPPORTED => (
            "SSH_FX_OP_UNSUPPORTED",
            "operation not supported by the server",
        ),
        raw::LIBSSH2_FX_NO_SUCH_PATH => ("SSH_FX_NO_SUCH_PATH", "no such path"),
        raw::LIBSSH2_FX_FILE_ALREADY_EXISTS => {
            ("SSH_FX_FILE_ALREADY_EXISTS", "file already exists")
        }
        raw::LIBSSH2_FX_WRITE_PROTECT => ("SSH_FX_WRITE_PROTECT", "write protected"),
        raw::LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM => {
            ("SSH_FX_NO_SPACE_ON_FILESYSTEM", "no space left")
        }
        raw::LIBSSH2_FX_QUOTA_EXCEEDED => ("SSH_FX_QUOTA_EXCEEDED", "quota exceeded"),
        raw::LIBSSH2_FX_NOT_A_DIRECTORY => ("SSH_FX_NOT_A_DIRECTORY", "not a directory"),
        raw::LIBSSH2_FX_INVALID_FILENAME => ("SSH_FX_INVALID_FILENAME", "invalid file name"),
        raw::LIBSSH2_FX_LINK_LOOP => ("SSH_FX_LINK_LOOP", "symbolic link loop"),
        _ => return format!("SFTP status {code}"),
    };
    format!("{words} ({name})")
}

/// Maps the text of an `io::Error` that ssh2's `Write` produced back to the
/// SFTP status it came from (ssh2 keeps only the words); `None` when it was
/// not an SFTP status.
pub(crate) fn sftp_status_from_io_message(message: &str) -> Option<i32> {
    (1..=21).find(|&code| ssh2::Error::from_errno(SshCode::SFTP(code)).message() == message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let denied = SftpError::Remote {
            op: "mkdir",
            path: "/x".into(),
            reason: sftp_status_words(raw::LIBSSH2_FX_PERMISSION_DENIED),
            permanent: sftp_status_is_permanent(raw::LIBSSH2_FX_PERMISSION_DENIED),
        };
        assert!(denied.is_permanent());
        assert_eq!(denied.job_error().code, ErrorCode::DestinationRejected);
        assert!(matches!(denied.outcome(), Outcome::Aborted(_)));
        assert_eq!(
            denied.to_string(),
            "mkdir failed for /x: permission denied (SSH_FX_PERMISSION_DENIED)"
        );

        assert!(!sftp_status_is_permanent(raw::LIBSSH2_FX_FAILURE));
        let t = SftpError::Transport {
            message: "x".into(),
            timed_out: true,
        };
        assert_eq!(t.telemetry_status(), "timeout");
        assert!(
            matches!(t.outcome(), Outcome::Failed(ref e) if e.code == ErrorCode::DestinationUnavailable)
        );
        assert_eq!(
            SftpError::HostKey("k".into()).telemetry_status(),
            "rejected"
        );
        assert_eq!(
            SftpError::Staging("s".into()).job_error().code,
            ErrorCode::Internal
        );
    }

    #[test]
    fn ssh2_errors_map_to_classes() {
        let e = ssh2::Error::from_errno(SshCode::SFTP(raw::LIBSSH2_FX_FAILURE));
        let s = SftpError::from_ssh("write", "/a.part", &e);
        assert!(!s.is_permanent() && !s.is_transport());
        assert!(s.to_string().contains("SSH_FX_FAILURE"), "{s}");
        let e = ssh2::Error::from_errno(SshCode::Session(raw::LIBSSH2_ERROR_TIMEOUT));
        let s = SftpError::from_ssh("stat", "/a", &e);
        assert!(s.is_transport());
        assert_eq!(s.telemetry_status(), "timeout");
    }

    #[test]
    fn io_messages_map_back_to_sftp_statuses() {
        for code in [
            raw::LIBSSH2_FX_FAILURE,
            raw::LIBSSH2_FX_PERMISSION_DENIED,
            raw::LIBSSH2_FX_QUOTA_EXCEEDED,
        ] {
            let io: std::io::Error = ssh2::Error::from_errno(SshCode::SFTP(code)).into();
            assert_eq!(sftp_status_from_io_message(&io.to_string()), Some(code));
        }
        assert_eq!(
            sftp_status_from_io_message("Timed out waiting on socket"),
            None
        );
    }
}
