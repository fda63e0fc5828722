//! Shared classification of HTTP answers, so every destination treats
//! status codes and `Retry-After` the same way unless it knows better.

use std::time::{Duration, SystemTime};

use crate::error::DestinationError;

/// What an HTTP status means for the records in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpClass {
    /// 2xx: delivered.
    Success,
    /// 408, 5xx except 501: try again later.
    Retryable,
    /// 429: slow down, do not burn attempts.
    Throttled,
    /// Any other status: retrying cannot help.
    Permanent,
}

/// Classifies a status code by the conventions users expect.
pub fn classify_status(status: u16) -> HttpClass {
    match status {
        200..=299 => HttpClass::Success,
        429 => HttpClass::Throttled,
        408 => HttpClass::Retryable,
        501 => HttpClass::Permanent,
        500..=599 => HttpClass::Retryable,
        _ => HttpClass::Permanent,
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A short single-line excerpt of a response body for a job's reason.
pub fn excerpt(body: &str, max_chars: usize) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max_chars {
        flat.to_string()
    } else {
        let cut: String = flat.chars().take(max_chars).collect();
        format!("{cut}…")
    }
}

/// The innermost cause of an error chain (reqwest wraps hyper wraps io),
/// which says what actually went wrong without the URL the outer layers add.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut source = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// The destination error for a non-success status, with the body excerpt.
pub fn error_for_status(
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
) -> Option<DestinationError> {
    let text = if body.trim().is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", excerpt(body, 200))
    };
    match classify_status(status) {
        HttpClass::Success => None,
        HttpClass::Retryable => Some(DestinationError::Retryable {
            message: text,
            retry_after,
        }),
        HttpClass::Throttled => Some(DestinationError::Throttled {
            message: text,
            retry_after,
        }),
        HttpClass::Permanent => Some(DestinationError::Permanent { message: text }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(classify_status(200), HttpClass::Success);
        assert_eq!(classify_status(204), HttpClass::Success);
        assert_eq!(classify_status(429), HttpClass::Throttled);
        assert_eq!(classify_status(408), HttpClass::Retryable);
        assert_eq!(classify_status(500), HttpClass::Retryable);
        assert_eq!(classify_status(503), HttpClass::Retryable);
        assert_eq!(classify_status(501), HttpClass::Permanent);
        assert_eq!(classify_status(400), HttpClass::Permanent);
        assert_eq!(classify_status(404), HttpClass::Permanent);
        assert_eq!(classify_status(302), HttpClass::Permanent);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        assert_eq!(excerpt("a\nb", 10), "a b");
        assert_eq!(excerpt(&"x".repeat(300), 5), "xxxxx…");
        let e = error_for_status(400, "{\"error\":\"bad\"}", None).unwrap();
        assert!(matches!(e, DestinationError::Permanent { .. }));
        assert_eq!(e.message(), "HTTP 400: {\"error\":\"bad\"}");
        assert!(error_for_status(201, "", None).is_none());
    }
}
