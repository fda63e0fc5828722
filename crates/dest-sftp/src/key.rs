//! Private keys for `authMethod = "keyAuth"`: reading them and telling, before
//! any connection, whether the text really is a usable private key.
//!
//! Config validation (`check-config`) and every connect read keys the same
//! way, so a key that passes validation is the key libssh2 is handed. The
//! inspection is deliberately shallow: it catches the common mistakes (a
//! public key pasted instead of the private one, truncated text, an
//! encrypted key without a passphrase) without parsing key material, which
//! stays libssh2's job.

use std::path::Path;

use base64::Engine as _;
use batchrouter_core::ConfigProblems;

/// Normalises `privateKey` text and lists what is wrong with it; the
/// returned text is what a connect hands to libssh2.
pub(crate) fn check_inline_key(
    text: &str,
    has_passphrase: bool,
    problems: &mut ConfigProblems,
) -> String {
    let text = normalise_key_text(text);
    match inspect_private_key(&text) {
        Ok(encrypted) => {
            if encrypted && !has_passphrase {
                problems.push("`privateKey` is encrypted: set `privateKeyPassphrase`");
            }
        }
        Err(why) => problems.push(format!("`privateKey` {why}")),
    }
    text
}

/// Lists what is wrong with the key file named by `privateKeyPath` (it is
/// read again at each connect, so a rotated key is picked up).
pub(crate) fn check_key_file(path: &Path, has_passphrase: bool, problems: &mut ConfigProblems) {
    match read_key_file(path) {
        Ok(text) => match inspect_private_key(&text) {
            Ok(encrypted) => {
                if encrypted && !has_passphrase {
                    problems.push(format!(
                        "`privateKeyPath` {} is encrypted: set `privateKeyPassphrase`",
                        path.display()
                    ));
                }
            }
            Err(why) => problems.push(format!("`privateKeyPath` {}: {why}", path.display())),
        },
        Err(e) => problems.push(format!("`privateKeyPath` {}: {e}", path.display())),
    }
}

/// Key text from an environment variable often carries `\n` escapes instead
/// of line breaks; turn them back into lines so libssh2 can parse it.
fn normalise_key_text(text: &str) -> String {
    let mut t = if !text.contains('\n') && text.contains("\\n") {
        text.replace("\\n", "\n")
    } else {
        text.to_string()
    };
    t = t.trim().to_string();
    t.push('\n');
    t
}

/// Reads a private key file (small; only at build and at connect).
pub(crate) fn read_key_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a file".into());
    }
    if meta.len() > 64 * 1024 {
        return Err("is too large to be a private key".into());
    }
    std::fs::read_to_string(path)
        .map(|t| normalise_key_text(&t))
        .map_err(|e| format!("cannot be read: {e}"))
}

/// Checks that `text` is a private key (not a public key or garbage) and
/// tells whether it is encrypted.
fn inspect_private_key(text: &str) -> Result<bool, String> {
    let t = text.trim_start();
    if t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.contains("PUBLIC KEY-----") {
        return Err("holds a public key; it needs the private key".into());
    }
    let Some(begin) = t
        .lines()
        .next()
        .filter(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"))
    else {
        return Err("is not a PEM or OpenSSH private key (it must start with `-----BEGIN … PRIVATE KEY-----`)".into());
    };
    if !t.contains("-----END ") {
        return Err("is truncated (no `-----END … PRIVATE KEY-----` line)".into());
    }
    if begin.contains("ENCRYPTED") || t.contains("Proc-Type: 4,ENCRYPTED") {
        return Ok(true);
    }
    if begin == "-----BEGIN OPENSSH PRIVATE KEY-----" {
        let body: String = t
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("-----END "))
            .flat_map(|l| l.trim().chars())
            .collect();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|_| "is not valid OpenSSH key text (bad base64)".to_string())?;
        let magic = b"openssh-key-v1\0";
        if !blob.starts_with(magic) {
            return Err("is not valid OpenSSH key text".into());
        }
        let rest = &blob[magic.len()..];
        let cipher =
            read_ssh_string(rest).ok_or_else(|| "is not valid OpenSSH key text".to_string())?;
        return Ok(cipher != b"none");
    }
    Ok(false)
}

/// Reads one SSH wire-format string (u32 length + bytes).
pub(crate) fn read_ssh_string(buf: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    buf.get(4..4 + len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unencrypted-looking OpenSSH key body (`cipher` "none") of the
    /// given cipher, wrapped at 70 columns like ssh-keygen does.
    pub(crate) fn openssh_key(cipher: &str) -> String {
        let mut blob = b"openssh-key-v1\0".to_vec();
        for field in [cipher, cipher, ""] {
            blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
            blob.extend_from_slice(field.as_bytes());
        }
        blob.extend_from_slice(&1u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 40]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(70)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn openssh_keys_report_their_cipher() {
        assert_eq!(inspect_private_key(&openssh_key("none")), Ok(false));
        assert_eq!(inspect_private_key(&openssh_key("aes256-ctr")), Ok(true));
        assert!(inspect_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n").is_err());
    }
}
