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
