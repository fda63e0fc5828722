//! What of a PostgreSQL URL must never reach an error message or a log
//! line: the redacted URL to show instead, and the password as written and
//! percent-decoded, to scrub from driver messages that quote it.

/// What must never leak into an error message or a log line.
pub(super) struct Secrets {
    pub(super) redacted_url: String,
    /// The password as written in the URL (user info or `?password=`).
    passwords: Vec<String>,
}

impl Secrets {
    pub(super) fn new(url: &str) -> Self {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let in_userinfo = base
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|auth| auth.rsplit_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, pw)| pw.to_string());
        let in_query = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.eq_ignore_ascii_case("password"))
            .map(|(_, v)| v.to_string());
        let mut passwords = Vec::new();
        for pw in in_userinfo
            .into_iter()
            .chain(in_query)
            .filter(|pw| !pw.is_empty())
        {
            // Messages may quote it as written or percent-decoded.
            let decoded = percent_decode(&pw);
            if decoded != pw && !decoded.is_empty() {
                passwords.push(decoded);
            }
            passwords.push(pw);
        }
        Secrets {
            redacted_url: crate::redact_url(url),
            passwords,
        }
    }

    pub(super) fn scrub(&self, text: String) -> String {
        self.passwords
            .iter()
            .fold(text, |text, pw| text.replace(pw.as_str(), "***"))
    }
}

/// `%XX` escapes decoded (invalid ones kept as written).
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
