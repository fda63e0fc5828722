//! `posix-rename@openssh.com`: an atomic rename over an existing file.
//!
//! The ssh2 crate's `Sftp::rename` sends a plain `SSH_FXP_RENAME`; with the
//! protocol version OpenSSH speaks (3) its flags are not transmitted and the
//! server refuses to replace an existing target. libssh2 (the bundled copy
//! ssh2 builds) implements the OpenSSH extension in
//! `libssh2_sftp_posix_rename_ex`, which ssh2 does not wrap and which needs
//! the raw SFTP handle ssh2 keeps private. So this module opens a second,
//! raw SFTP channel on the same session just for renames.

use std::ffi::{c_char, c_int};
use std::ptr::NonNull;

use libssh2_sys as raw;
use ssh2::Session;

use crate::error::{sftp_status_is_permanent, sftp_status_words, SftpError};

extern "C" {
    // Declared in libssh2_sftp.h of the bundled libssh2 (>= 1.11), which
    // libssh2-sys compiles and links statically; its Rust bindings omit it.
    fn libssh2_sftp_posix_rename_ex(
        sftp: *mut raw::LIBSSH2_SFTP,
        source_filename: *const c_char,
        source_filename_len: usize,
        dest_filename: *const c_char,
        dest_filename_len: usize,
    ) -> c_int;
}

/// What a posix-rename attempt gave.
#[derive(Debug)]
pub(crate) enum PosixRename {
    /// Renamed (atomically replacing any existing target).
    Done,
    /// The server does not offer the extension.
    Unsupported,
}

/// A raw SFTP channel used only for posix-rename. It must be shut down with
/// [`RenameChannel::shutdown`] before its session is dropped.
pub(crate) struct RenameChannel {
    sftp: NonNull<raw::LIBSSH2_SFTP>,
}

// SAFETY: the handle is only touched while holding the session's lock
// (`Session::raw()`), the same discipline ssh2 uses for its own handles, and
// the owning `Connection` is used by one thread at a time.
unsafe impl Send for RenameChannel {}

impl RenameChannel {
    /// Opens the channel on an authenticated session.
    pub(crate) fn open(session: &Session) -> Result<RenameChannel, SftpError> {
        let ptr = {
            let mut guard = session.raw();
            let sess: *mut raw::LIBSSH2_SESSION = &mut *guard;
            // SAFETY: `sess` is the live session, locked by `guard`.
            unsafe { raw::libssh2_sftp_init(sess) }
        };
        match NonNull::new(ptr) {
            Some(sftp) => Ok(RenameChannel { sftp }),
            None => {
                let e =
                    ssh2::Error::last_session_error(session).unwrap_or_else(ssh2::Error::unknown);
                Err(SftpError::transport(
                    "opening an SFTP channel for renames",
                    &e,
                ))
            }
        }
    }

    /// Renames `src` to `dst`, replacing `dst` atomically if it exists.
    pub(crate) fn rename(
        &self,
        session: &Session,
        src: &str,
        dst: &str,
    ) -> Result<PosixRename, SftpError> {
        let (rc, status) = {
            let _guard = session.raw();
            // SAFETY: the channel belongs to this session, which `_guard`
            // keeps locked; the pointers and lengths describe live buffers.
            unsafe {
                let rc = libssh2_sftp_posix_rename_ex(
                    self.sftp.as_ptr(),
                    src.as_ptr().cast(),
                    src.len(),
                    dst.as_ptr().cast(),
                    dst.len(),
                );
                let status = if rc == raw::LIBSSH2_ERROR_SFTP_PROTOCOL {
                    raw::libssh2_sftp_last_error(self.sftp.as_ptr()) as c_int
                } else {
                    0
                };
                (rc, status)
            }
        };
        if rc == 0 {
            return Ok(PosixRename::Done);
        }
        if rc == raw::LIBSSH2_ERROR_SFTP_PROTOCOL {
            if status == raw::LIBSSH2_FX_OP_UNSUPPORTED {
                return Ok(PosixRename::Unsupported);
            }
            return Err(SftpError::Remote {
                op: "rename",
                path: format!("{src} -> {dst}"),
                reason: sftp_status_words(status),
                permanent: sftp_status_is_permanent(status),
            });
        }
        let e = ssh2::Error::last_session_error(session).unwrap_or_else(ssh2::Error::unknown);
        Err(SftpError::transport(&format!("rename {src} -> {dst}"), &e))
    }

    /// Closes the channel (best effort: the session may already be dead).
    pub(crate) fn shutdown(self, session: &Session) {
        let _guard = session.raw();
        // SAFETY: the channel belongs to this live, locked session and is
        // not used again (self is consumed).
        unsafe {
            raw::libssh2_sftp_shutdown(self.sftp.as_ptr());
        }
    }
}
