//! One SSH session with its SFTP channel: connect with bounded timeouts,
//! verify the host key, authenticate, and take it apart cleanly.
//! Every function here blocks; callers run them on a blocking thread.

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libssh2_sys as raw;
use ssh2::{ErrorCode as SshCode, Session, Sftp};

use crate::config::{Auth, KeySource, Settings};
use crate::error::SftpError;
use crate::hostkey;
use crate::key::read_key_file;
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
    // One deadline for the name lookup and the TCP connect together.
    let deadline = Instant::now() + settings.connect_timeout;
    let addrs = resolve(
        &settings.host,
        settings.port,
        settings.connect_timeout,
        system_lookup,
    )
    .map_err(|e| SftpError::Connect {
        address: address.clone(),
        reason: e.reason,
        timed_out: e.timed_out,
    })?;
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

/// Why a host name gave no address to connect to.
#[derive(Debug)]
pub(crate) struct Unresolved {
    /// For the job's reason, after "cannot connect to host:port: ".
    pub(crate) reason: String,
    /// The lookup did not answer in time.
    pub(crate) timed_out: bool,
}

/// Lookups that outlived their caller's timeout and still run (see
/// [`resolve`]).
static ABANDONED_LOOKUPS: AtomicUsize = AtomicUsize::new(0);

/// Beyond this many abandoned lookups in the process, [`resolve`] fails at
/// once instead of starting yet another thread on a resolver that hangs.
const MAX_ABANDONED_LOOKUPS: usize = 8;

/// A lookup thread's state, to count it as abandoned exactly once.
const LOOKUP_RUNNING: u8 = 0;
const LOOKUP_FINISHED: u8 = 1;
const LOOKUP_ABANDONED: u8 = 2;

/// The system resolver (`getaddrinfo`: /etc/hosts, DNS, …).
fn system_lookup(host: String, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host.as_str(), port).to_socket_addrs()?.collect())
}

/// Resolves `host` within `limit`. An IP address needs no lookup. A name is
/// looked up on its own thread, because `getaddrinfo` (behind std's
/// `to_socket_addrs`) has no timeout of its own and, with an unreachable
/// DNS server, blocks for the resolver's full retry schedule (5s per try and
/// server by default, often far longer). A thread that outlives `limit` is
/// left to finish on its own; at most [`MAX_ABANDONED_LOOKUPS`] may be
/// pending before further lookups fail without starting one.
pub(crate) fn resolve<F>(
    host: &str,
    port: u16,
    limit: Duration,
    lookup: F,
) -> Result<Vec<SocketAddr>, Unresolved>
where
    F: FnOnce(String, u16) -> std::io::Result<Vec<SocketAddr>> + Send + 'static,
{
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let pending = ABANDONED_LOOKUPS.load(Ordering::SeqCst);
    if pending >= MAX_ABANDONED_LOOKUPS {
        return Err(Unresolved {
            reason: format!(
                "cannot resolve the host name: {pending} earlier lookups are still hanging \
                 (the DNS resolver does not answer)"
            ),
            timed_out: true,
        });
    }
    let state = Arc::new(AtomicU8::new(LOOKUP_RUNNING));
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = {
        let state = state.clone();
        let host = host.to_string();
        std::thread::Builder::new()
            .name("sftp-resolve".into())
            .spawn(move || {
                let _ = tx.send(lookup(host, port));
                if state
                    .compare_exchange(
                        LOOKUP_RUNNING,
                        LOOKUP_FINISHED,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_err()
                {
                    // The caller gave up on us (and counted us) first.
                    ABANDONED_LOOKUPS.fetch_sub(1, Ordering::SeqCst);
                }
            })
    };
    if let Err(e) = spawned {
        return Err(Unresolved {
            reason: format!("cannot start a thread to resolve the host name: {e}"),
            timed_out: false,
        });
    }
    let answer = match rx.recv_timeout(limit) {
        Ok(answer) => answer,
        // It panicked: nothing left running to count.
        Err(RecvTimeoutError::Disconnected) => Err(std::io::Error::other(
            "the lookup thread ended without an answer",
        )),
        Err(RecvTimeoutError::Timeout) => {
            // Count before marking, so the thread's decrement never comes first.
            ABANDONED_LOOKUPS.fetch_add(1, Ordering::SeqCst);
            let marked = state.compare_exchange(
                LOOKUP_RUNNING,
                LOOKUP_ABANDONED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if marked.is_ok() {
                return Err(Unresolved {
                    reason: format!("resolving the host name timed out after {limit:?}"),
                    timed_out: true,
                });
            }
            // It finished just now: take its answer after all.
            ABANDONED_LOOKUPS.fetch_sub(1, Ordering::SeqCst);
            match rx.recv() {
                Ok(answer) => answer,
                Err(_) => Err(std::io::Error::other(
                    "the lookup thread ended without an answer",
                )),
            }
        }
    };
    match answer {
        Ok(addrs) if addrs.is_empty() => Err(Unresolved {
            reason: "the host name has no addresses".into(),
            timed_out: false,
        }),
        Ok(addrs) => Ok(addrs),
        Err(e) => Err(Unresolved {
            reason: format!("cannot resolve the host name: {e}"),
            timed_out: false,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use std::sync::Mutex;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A lookup that blocks until `release` is sent to (or dropped).
    fn blocked(
        release: Arc<Mutex<Receiver<()>>>,
    ) -> impl FnOnce(String, u16) -> std::io::Result<Vec<SocketAddr>> + Send + 'static {
        move |_, _| {
            let _ = release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            Ok(vec![addr("192.0.2.1:22")])
        }
    }

    fn wait_for_abandoned(n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while ABANDONED_LOOKUPS.load(Ordering::SeqCst) != n {
            assert!(
                Instant::now() < deadline,
                "abandoned lookups never reached {n}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Serialises the tests that start lookups: they share ABANDONED_LOOKUPS.
    static LOOKUP_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn a_hanging_lookup_is_bounded_and_abandoned_lookups_are_capped() {
        let _serial = LOOKUP_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        // A resolver that never answers in time: bounded by the limit.
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release = Arc::new(Mutex::new(release_rx));
        let started = Instant::now();
        let err = resolve(
            "dns.hangs.invalid",
            22,
            Duration::from_millis(200),
            blocked(release.clone()),
        )
        .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(err.timed_out);
        assert_eq!(err.reason, "resolving the host name timed out after 200ms");
        assert_eq!(ABANDONED_LOOKUPS.load(Ordering::SeqCst), 1);

        // Up to the cap, each new lookup gets its own thread; then no more.
        for _ in 1..MAX_ABANDONED_LOOKUPS {
            let e = resolve(
                "dns.hangs.invalid",
                22,
                Duration::from_millis(10),
                blocked(release.clone()),
            )
            .unwrap_err();
            assert!(e.reason.contains("timed out after 10ms"), "{}", e.reason);
        }
        assert_eq!(
            ABANDONED_LOOKUPS.load(Ordering::SeqCst),
            MAX_ABANDONED_LOOKUPS
        );
        let started = Instant::now();
        let e = resolve("dns.hangs.invalid", 22, Duration::from_secs(30), |_, _| {
            panic!("no lookup may start while the cap is reached")
        })
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(e.timed_out);
        assert!(
            e.reason.contains("8 earlier lookups are still hanging"),
            "{}",
            e.reason
        );

        // The hung lookups finish: the count goes back down and lookups work again.
        drop(release_tx);
        wait_for_abandoned(0);
        let ok = resolve(
            "dns.answers.invalid",
            2222,
            Duration::from_secs(5),
            |host, port| {
                assert_eq!((host.as_str(), port), ("dns.answers.invalid", 2222));
                Ok(vec![addr("192.0.2.7:2222")])
            },
        )
        .unwrap();
        assert_eq!(ok, vec![addr("192.0.2.7:2222")]);
        assert_eq!(ABANDONED_LOOKUPS.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn addresses_need_no_lookup_and_lookup_errors_are_reported() {
        let _serial = LOOKUP_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let never = |_: String, _: u16| -> std::io::Result<Vec<SocketAddr>> {
            panic!("an IP address needs no lookup")
        };
        assert_eq!(
            resolve("127.0.0.1", 22, Duration::from_secs(1), never).unwrap(),
            vec![addr("127.0.0.1:22")]
        );
        assert_eq!(
            resolve("::1", 2222, Duration::from_secs(1), never).unwrap(),
            vec![addr("[::1]:2222")]
        );
        let e = resolve("x.invalid", 22, Duration::from_secs(5), |_, _| {
            Err(std::io::Error::other(
                "failed to lookup address information",
            ))
        })
        .unwrap_err();
        assert!(!e.timed_out);
        assert_eq!(
            e.reason,
            "cannot resolve the host name: failed to lookup address information"
        );
        let e = resolve("x.invalid", 22, Duration::from_secs(5), |_, _| Ok(vec![])).unwrap_err();
        assert_eq!(e.reason, "the host name has no addresses");
    }
}
