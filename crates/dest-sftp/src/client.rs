//! One SSH session with its SFTP channel: connect with bounded timeouts,
//! verify the host key, authenticate, and take it apart cleanly.
//! Every function here blocks; callers run them on a blocking thread.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use libssh2_sys as raw;
use ssh2::{ErrorCode as SshCode, Session, Sftp};

use crate::config::{read_key_file, Auth, KeySource, Settings};
use crate::error::SftpError;
use crate::hostkey;
use crate::rename::{PosixRename, RenameChannel};

/// Ciphers in our order of preference, measured through libssh2 (see the
/// crate's benchmark): chacha20-poly1305 encrypts whole packets; AES-CTR
/// is a close second; libssh2 runs AES-GCM one 16-byte block per OpenSSL
/// call, which halves throughput, so it comes last. No CBC, no RC4.
const CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr,aes192-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";

/// MACs for the non-AEAD ciphers: SHA-2 only (encrypt-then-MAC first).
const MACS: &str =
    "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha2-256,hmac-sha2-512";

/// How long a broken session may take to be torn down.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// An authenticated session with an open SFTP channel.
pub(crate) struct Connection {
    renamer: Option<RenameChannel>,
    sftp: Sftp,
    session: Session,
    /// When it was established (for logs).
    pub(crate) opened_at: Instant,
    /// Negotiated cipher (for logs).
    pub(crate) cipher: String,
}

impl Connection {
    /// Connects, verifies the host key, authenticates and opens SFTP.
    pub(crate) fn open(settings: &Settings) -> Result<Connection, SftpError> {
        let tcp = connect_tcp(settings)?;
        // Best effort: small writes of the SSH protocol should not wait.
        let _ = tcp.set_nodelay(true);

        let mut session =
            Session::new().map_err(|e| SftpError::transport("cannot set up libssh2", &e))?;
        session.set_timeout(millis(settings.io_timeout));
        session.set_tcp_stream(tcp);
        let known = hostkey::prepare(&session, settings)?;
        for (method, prefs) in [
            (ssh2::MethodType::CryptCs, CIPHERS),
            (ssh2::MethodType::CryptSc, CIPHERS),
            (ssh2::MethodType::MacCs, MACS),
            (ssh2::MethodType::MacSc, MACS),
        ] {
            session
                .method_pref(method, prefs)
                .map_err(|e| SftpError::transport("setting algorithm preferences", &e))?;
        }
        session.handshake().map_err(|e| {
            SftpError::transport(&format!("SSH handshake with {}", settings.address()), &e)
        })?;
        hostkey::verify(&session, settings, known.as_ref())?;
        authenticate(&session, settings)?;
        let sftp = session.sftp().map_err(|e| {
            SftpError::transport(
                &format!("starting the SFTP subsystem on {}", settings.address()),
                &e,
            )
        })?;
        let cipher = session
            .methods(ssh2::MethodType::CryptCs)
            .unwrap_or("unknown")
            .to_string();
        Ok(Connection {
            cipher,
            renamer: None,
            sftp,
            session,
            opened_at: Instant::now(),
        })
    }

    /// The SFTP channel.
    pub(crate) fn sftp(&self) -> &Sftp {
        &self.sftp
    }

    /// The session's last libssh2 error code, to tell a server's SFTP status
    /// from a broken transport after a failed write.
    pub(crate) fn last_session_code(&self) -> Option<i32> {
        match ssh2::Error::last_session_error(&self.session)?.code() {
            SshCode::Session(c) => Some(c),
            SshCode::SFTP(_) => None,
        }
    }

    /// Renames with posix-rename@openssh.com (atomic, replaces `dst`).
    pub(crate) fn posix_rename(&mut self, src: &str, dst: &str) -> Result<PosixRename, SftpError> {
        if self.renamer.is_none() {
            self.renamer = Some(RenameChannel::open(&self.session)?);
        }
        match &self.renamer {
            Some(r) => r.rename(&self.session, src, dst),
            None => Ok(PosixRename::Unsupported),
        }
    }

    /// Closes a healthy session politely (at shutdown).
    pub(crate) fn close(mut self) {
        if let Some(r) = self.renamer.take() {
            r.shutdown(&self.session);
        }
        let _ = self
            .session
            .disconnect(Some(ssh2::DisconnectCode::ByApplication), "closing", None);
    }

    /// From now on, waits at most briefly on the peer: for a session whose
    /// stream may be broken, before anything else is sent on it.
    pub(crate) fn shorten_timeouts(&self) {
        self.session.set_timeout(millis(TEARDOWN_TIMEOUT));
    }

    /// Drops a session that failed, without waiting long on a dead peer.
    pub(crate) fn discard(self) {
        self.shorten_timeouts();
        drop(self);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(r) = self.renamer.take() {
            r.shutdown(&self.session);
        }
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

fn connect_tcp(settings: &Settings) -> Result<TcpStream, SftpError> {
    let address = settings.address();
    let addrs: Vec<SocketAddr> = (settings.host.as_str(), settings.port)
        .to_socket_addrs()
        .map_err(|e| SftpError::Connect {
            address: address.clone(),
            reason: format!("cannot resolve the host name: {e}"),
            timed_out: false,
        })?
        .collect();
    let deadline = Instant::now() + settings.connect_timeout;
    let mut last = None;
    for addr in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let timed_out = last.as_ref().is_none_or(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        )
    });
    Err(SftpError::Connect {
        address,
        reason: match last {
            Some(e) if timed_out => format!("timed out after {:?} ({e})", settings.connect_timeout),
            Some(e) => e.to_string(),
            None => format!("timed out after {:?}", settings.connect_timeout),
        },
        timed_out,
    })
}

fn authenticate(session: &Session, settings: &Settings) -> Result<(), SftpError> {
    let user = settings.username.as_str();
    let address = settings.address();
    let result = match &settings.auth {
        Auth::Password(p) => session.userauth_password(user, p.expose()),
        Auth::Key { key, passphrase } => {
            let text = match key {
                KeySource::Inline(s) => s.expose().to_string(),
                KeySource::File(path) => read_key_file(path).map_err(|e| {
                    SftpError::Auth(format!("privateKeyPath {} {e}", path.display()))
                })?,
            };
            session.userauth_pubkey_memory(
                user,
                None,
                &text,
                passphrase.as_ref().map(|p| p.expose()),
            )
        }
    };
    let method = match settings.auth {
        Auth::Password(_) => "password",
        Auth::Key { .. } => "public key",
    };
    match result {
        Ok(()) if session.authenticated() => Ok(()),
        Ok(()) => Err(SftpError::Auth(format!(
            "{address} did not accept {method} authentication for user `{user}`"
        ))),
        Err(e) => match e.code() {
            SshCode::Session(c)
                if c == raw::LIBSSH2_ERROR_AUTHENTICATION_FAILED
                    || c == raw::LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED
                    || c == raw::LIBSSH2_ERROR_PASSWORD_EXPIRED
                    || c == raw::LIBSSH2_ERROR_METHOD_NOT_SUPPORTED =>
            {
                Err(SftpError::Auth(format!(
                    "{address} refused {method} authentication for user `{user}` ({})",
                    e.message()
                )))
            }
            SshCode::Session(c) if c == raw::LIBSSH2_ERROR_FILE || c == raw::LIBSSH2_ERROR_KEYFILE_AUTH_FAILED => {
                Err(SftpError::Auth(format!(
                    "the private key for user `{user}` could not be used (wrong privateKeyPassphrase or unsupported key format): {}",
                    e.message()
                )))
            }
            _ => Err(SftpError::transport(&format!("authenticating `{user}` on {address}"), &e)),
        },
    }
}
