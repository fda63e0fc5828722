//! A string that never shows itself in logs, `Debug` output or serialised config.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The placeholder printed instead of a secret.
pub const REDACTED: &str = "***redacted***";

/// Holds a credential. `Debug`, `Display` and `Serialize` print a placeholder;
/// only [`Secret::expose`] yields the value, so every use is greppable.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself; call only where it is sent to its service.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is empty (missing in config).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Whether a config key names a secret (tokens, passwords, keys, client
/// secrets), so config printers can redact values they do not know.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("path") || k.ends_with("file") {
        return false;
    }
    [
        "secret",
        "password",
        "passphrase",
        "token",
        "apikey",
        "api_key",
        "api-key",
        "privatekey",
        "private_key",
        "authorization",
        "cookie",
    ]
    .iter()
    .any(|needle| k.contains(needle))
}

/// A URL with any password and query string masked, for printing config
/// and errors (`https://u:***@host/path?***`). Text that is not a URL is
/// returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, _)) => (r, "?***"),
        None => (rest, ""),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(s.expose(), "hunter2");
        let back: Secret = serde_json::from_str("\"x\"").unwrap();
        assert_eq!(back.expose(), "x");
    }

    #[test]
    fn urls_lose_passwords_and_queries() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("https://h/hook?token=abc"), "https://h/hook?***");
        assert_eq!(redact_url("https://u@h/x"), "https://u@h/x");
        assert_eq!(redact_url("https://h/p@x"), "https://h/p@x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn recognises_secret_keys() {
        for k in [
            "clientSecret",
            "password",
            "privateApiKey",
            "authToken",
            "privateKey",
            "privateKeyPassphrase",
            "Authorization",
            "X-API-Key",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["clientId", "host", "username", "listId", "privateKeyPath"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
