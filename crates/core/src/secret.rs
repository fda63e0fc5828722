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

/// A URL with its secrets masked, for printing config and logging: the
/// password (`https://u:***@host`), a lone user name over http(s) (APIs take
/// tokens there: `https://***@host`), every query value (`?key=***&b=***`)
/// and any fragment (`#***`). Query keys, host and path stay readable. Text
/// that is not a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) if !f.is_empty() => (r, "#***"),
        Some((r, _)) => (r, "#"),
        None => (rest, ""),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{}", redact_query(q))),
        None => (rest, String::new()),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let web = ["http", "https", "ws", "wss"]
        .iter()
        .any(|w| scheme.eq_ignore_ascii_case(w));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None if web => format!("***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{path}{query}{fragment}")
}

/// `a=1&b&c=x` → `a=***&***&c=***`: a parameter without `=` may itself be
/// the token, so it is masked whole.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) => format!("{key}=***"),
            None if pair.is_empty() => String::new(),
            None => "***".to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Masks every URL inside free text (error messages, config problems) with
/// [`redact_url`]. A URL runs from its `scheme://` to the next whitespace,
/// quote, backslash, `<`, `>` or backtick (less trailing punctuation), so a
/// URL quoted in a message (`"https://h/x?key=…"`) is found too.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        let start = rest[..sep]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map(|(i, _)| i)
            .unwrap_or(sep);
        let after = sep + 3;
        let end = rest[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '<' | '>' | '`'))
            .map(|i| after + i)
            .unwrap_or(rest.len());
        // Sentence punctuation after a URL is not part of it.
        let end = after
            + rest[after..end]
                .trim_end_matches(['.', ',', ';', ':', ')', ']'])
                .len();
        out.push_str(&rest[..start]);
        if start == sep {
            // `://` without a scheme before it: not a URL.
            out.push_str(&rest[sep..after]);
            rest = &rest[after..];
            continue;
        }
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
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

    /// Checks `f` on each `(input, expected)` pair, naming the input.
    fn check(f: fn(&str) -> String, cases: &[(&str, &str)]) {
        for (input, want) in cases {
            assert_eq!(f(input), *want, "{input}");
        }
    }

    #[test]
    fn urls_lose_passwords_and_query_values() {
        check(
            redact_url,
            &[
                ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
                ("https://h/hook?token=abc", "https://h/hook?token=***"),
                (
                    "https://a.klaviyo.test/api?key=pk_SECRET&revision=2025-01-15",
                    "https://a.klaviyo.test/api?key=***&revision=***",
                ),
                ("https://h/x?SECRET&a=", "https://h/x?***&a=***"),
                ("https://h/x?", "https://h/x?"),
                ("https://h/cb#access_token=SECRET", "https://h/cb#***"),
                ("https://h/x?k=SECRET#frag", "https://h/x?k=***#***"),
                // A lone user name over http(s) is usually a token.
                ("https://tok_SECRET@h/x", "https://***@h/x"),
                ("postgres://u@h/db", "postgres://u@h/db"),
                ("https://h/p@x", "https://h/p@x"),
                ("not a url", "not a url"),
            ],
        );
    }

    #[test]
    fn urls_inside_text_are_masked() {
        check(
            redact_urls_in,
            &[
                (
                    "`baseUrl` \"https://u:pw@h/x?key=pk_1\" must not have a query; \
                     see https://docs.test/a?b=c.",
                    "`baseUrl` \"https://u:***@h/x?key=***\" must not have a query; \
                     see https://docs.test/a?b=***.",
                ),
                (
                    "cannot open postgres://br:pw@db/x (refused)",
                    "cannot open postgres://br:***@db/x (refused)",
                ),
                ("no urls :// here", "no urls :// here"),
                ("é://x?a=1 ok", "é://x?a=1 ok"),
                ("", ""),
            ],
        );
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
