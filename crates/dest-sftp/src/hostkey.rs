//! Host-key verification: the server proves who it is before any credential
//! leaves this process.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use ssh2::{CheckResult, HashType, KnownHostFileKind, KnownHosts, Session};

use crate::config::{HostKeyPolicy, Settings};
use crate::error::SftpError;
use crate::key::read_ssh_string;

/// Host-key algorithms in OpenSSH's own order of preference, so the key we
/// check is the one `ssh` shows its users (and writes to `known_hosts`).
pub const DEFAULT_HOST_KEY_METHODS: &str =
    "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256,ssh-rsa";

/// A `SHA256:…` host-key fingerprint as `ssh-keygen -lf` prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint {
    digest: [u8; 32],
}

impl Fingerprint {
    /// Parses `SHA256:<base64>` (padding optional); other hashes are refused.
    pub fn parse(text: &str) -> Result<Fingerprint, String> {
        let t = text.trim();
        let Some(b64) = t.strip_prefix("SHA256:") else {
            return Err(format!(
                "`{t}` is not a SHA256 fingerprint (expected `SHA256:…` as `ssh-keygen -lf <key.pub>` prints it)"
            ));
        };
        let bytes = STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|_| format!("`{t}` is not valid base64 after `SHA256:`"))?;
        let digest: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("`{t}` does not hold a 32-byte SHA-256 digest"))?;
        Ok(Fingerprint { digest })
    }

    /// The fingerprint of a SHA-256 digest of a key blob.
    pub fn from_digest(digest: &[u8]) -> Option<Fingerprint> {
        Some(Fingerprint {
            digest: digest.try_into().ok()?,
        })
    }

    /// Whether `digest` (SHA-256 of the server's key blob) is this fingerprint.
    pub fn matches(&self, digest: &[u8]) -> bool {
        self.digest[..] == *digest
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", STANDARD_NO_PAD.encode(self.digest))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Reads an OpenSSH `known_hosts` file (no network), returning its entry count.
pub fn load_known_hosts(path: &Path) -> Result<usize, String> {
    let session = Session::new().map_err(|e| format!("cannot set up libssh2: {e}"))?;
    let kh = read_known_hosts(&session, path)?;
    kh.hosts()
        .map(|h| h.len())
        .map_err(|e| format!("cannot list its entries: {}", e.message()))
}

fn read_known_hosts(session: &Session, path: &Path) -> Result<KnownHosts, String> {
    if !path.is_file() {
        return Err("is not a readable file".into());
    }
    let mut kh = session
        .known_hosts()
        .map_err(|e| format!("cannot set up known-hosts checks: {}", e.message()))?;
    kh.read_file(path, KnownHostFileKind::OpenSSH)
        .map_err(|e| format!("is not a valid OpenSSH known_hosts file: {}", e.message()))?;
    Ok(kh)
}

/// The key type named at the start of an SSH public-key blob.
pub fn key_type(blob: &[u8]) -> String {
    read_ssh_string(blob)
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or("unknown")
        .to_string()
}

/// Host-key algorithms that can produce one of `types` (an `ssh-rsa` key
/// is presented with SHA-2 signatures).
fn methods_for(types: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    for t in types {
        let names: &[&str] = match t.as_str() {
            "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
            "ssh-ed25519" => &["ssh-ed25519"],
            "ecdsa-sha2-nistp256" => &["ecdsa-sha2-nistp256"],
            "ecdsa-sha2-nistp384" => &["ecdsa-sha2-nistp384"],
            "ecdsa-sha2-nistp521" => &["ecdsa-sha2-nistp521"],
            "ssh-dss" => &["ssh-dss"],
            _ => &[],
        };
        for n in names {
            if !out.contains(n) {
                out.push(n);
            }
        }
    }
    out.join(",")
}

/// Prepares host-key checking on a fresh session before its handshake: for
/// `knownHosts`, reads the file and asks the server for a key type the file
/// knows for this host (so a host with several keys is checked against the
/// recorded one). Returns the loaded file for [`verify`].
pub(crate) fn prepare(
    session: &Session,
    settings: &Settings,
) -> Result<Option<KnownHosts>, SftpError> {
    let HostKeyPolicy::KnownHosts(path) = &settings.host_key else {
        session
            .method_pref(ssh2::MethodType::HostKey, DEFAULT_HOST_KEY_METHODS)
            .map_err(|e| SftpError::transport("setting host-key algorithms", &e))?;
        return Ok(None);
    };
    let kh = read_known_hosts(session, path).map_err(|e| {
        SftpError::HostKey(format!(
            "cannot check the host key of {}: knownHosts {} {e}",
            settings.address(),
            path.display()
        ))
    })?;
    let mut types = Vec::new();
    if let Ok(hosts) = kh.hosts() {
        for h in hosts {
            let Ok(blob) = STANDARD.decode(h.key()) else {
                continue;
            };
            if matches!(
                kh.check_port(&settings.host, settings.port, &blob),
                CheckResult::Match
            ) {
                let t = key_type(&blob);
                if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
    }
    let methods = methods_for(&types);
    let methods = if methods.is_empty() {
        DEFAULT_HOST_KEY_METHODS.to_string()
    } else {
        methods
    };
    session
        .method_pref(ssh2::MethodType::HostKey, &methods)
        .map_err(|e| SftpError::transport("setting host-key algorithms", &e))?;
    Ok(Some(kh))
}

/// Checks the key the server presented in the handshake against the policy.
pub(crate) fn verify(
    session: &Session,
    settings: &Settings,
    known: Option<&KnownHosts>,
) -> Result<(), SftpError> {
    let address = settings.address();
    let Some((blob, _)) = session.host_key() else {
        return Err(SftpError::Transport {
            message: format!("{address} presented no host key"),
            timed_out: false,
        });
    };
    let kind = key_type(blob);
    let presented = session
        .host_key_hash(HashType::Sha256)
        .and_then(Fingerprint::from_digest)
        .ok_or_else(|| SftpError::Transport {
            message: format!("cannot hash the host key of {address}"),
            timed_out: false,
        })?;
    match (&settings.host_key, known) {
        (HostKeyPolicy::Insecure, _) => {
            tracing::debug!(address = %address, key_type = %kind, fingerprint = %presented, "host key accepted without verification (insecureSkipHostKeyCheck)");
            Ok(())
        }
        (HostKeyPolicy::Fingerprint(expected), _) => {
            if expected.matches(&presented.digest) {
                Ok(())
            } else {
                Err(SftpError::HostKey(format!(
                    "host key mismatch for {address}: the server presented {kind} key {presented}, \
                     but hostKeyFingerprint is {expected}; no credentials were sent \
                     (update hostKeyFingerprint only after confirming the key change with the server's owner)"
                )))
            }
        }
        (HostKeyPolicy::KnownHosts(path), Some(kh)) => match kh.check_port(&settings.host, settings.port, blob) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(SftpError::HostKey(format!(
                "host key mismatch for {address}: the server presented {kind} key {presented}, \
                 which differs from the key recorded in knownHosts {}; no credentials were sent",
                path.display()
            ))),
            CheckResult::NotFound => Err(SftpError::HostKey(format!(
                "host key of {address} ({kind} {presented}) is not in knownHosts {}; \
                 add it after confirming the fingerprint (e.g. `ssh-keyscan -p {} -t {kind} {}`)",
                path.display(),
                settings.port,
                settings.host
            ))),
            CheckResult::Failure => Err(SftpError::HostKey(format!(
                "could not check the host key of {address} ({kind} {presented}) against knownHosts {}",
                path.display()
            ))),
        },
        (HostKeyPolicy::KnownHosts(path), None) => Err(SftpError::HostKey(format!(
            "knownHosts {} was not loaded for {address}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_reject_other_hashes() {
        let f = Fingerprint::parse("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU").unwrap();
        // SHA-256 of the empty string.
        assert_eq!(f.digest[..4], [0xe3, 0xb0, 0xc4, 0x42]);
        assert_eq!(
            f.to_string(),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
        let padded =
            Fingerprint::parse("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(padded, f);
        assert!(Fingerprint::parse("MD5:00:11")
            .unwrap_err()
            .contains("not a SHA256 fingerprint"));
        assert!(Fingerprint::parse("SHA256:!!")
            .unwrap_err()
            .contains("not valid base64"));
        assert!(Fingerprint::parse("SHA256:AAAA")
            .unwrap_err()
            .contains("32-byte"));
    }

    #[test]
    fn key_types_and_methods() {
        let mut blob = 11u32.to_be_bytes().to_vec();
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&[0, 0, 0, 32]);
        assert_eq!(key_type(&blob), "ssh-ed25519");
        assert_eq!(key_type(&[0, 0]), "unknown");
        assert_eq!(
            methods_for(&["ssh-rsa".into(), "ssh-ed25519".into(), "x".into()]),
            "rsa-sha2-512,rsa-sha2-256,ssh-rsa,ssh-ed25519"
        );
    }

    #[test]
    fn known_hosts_files_are_parsed_offline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        std::fs::write(
            &p,
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKwDZx0s3fKp7DDAfGdKwSJrTvfY3eWI1FzPUwKYbTv7\n",
        )
        .unwrap();
        assert_eq!(load_known_hosts(&p), Ok(1));
        assert!(load_known_hosts(&dir.path().join("none"))
            .unwrap_err()
            .contains("not a readable file"));
    }
}
