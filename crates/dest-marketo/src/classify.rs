//! Marketo's error codes (`errors[].code`, strings in an HTTP 200 answer)
//! sorted into what they mean for the jobs: refresh the token, slow down,
//! retry later, or give up.

use std::time::Duration;

use batchrouter_core::render::excerpt;
use batchrouter_core::DestinationError;
use serde::{Deserialize, Deserializer};

/// One entry of Marketo's `errors` array.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    /// Marketo's code; a string in the real API, accepted as a number too.
    #[serde(deserialize_with = "code_as_string")]
    pub code: String,
    /// Marketo's explanation.
    #[serde(default)]
    pub message: String,
}

fn code_as_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// What an error code asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeClass {
    /// 601/602: the access token is invalid or expired; refresh once, repeat.
    Token,
    /// 606/607/615/1016/1029: rate limit, quota or full import queue.
    Throttle,
    /// 604/608/611/614/713/719: timeout or temporary unavailability.
    Retryable,
    /// Everything else (603, 605, 609, 610, 612, 616, record-level 1xxx …).
    Permanent,
}

/// Classifies one Marketo error code.
pub fn class_of(code: &str) -> CodeClass {
    match code.trim() {
        "601" | "602" => CodeClass::Token,
        "606" | "607" | "615" | "1016" | "1029" => CodeClass::Throttle,
        "604" | "608" | "611" | "614" | "713" | "719" => CodeClass::Retryable,
        _ => CodeClass::Permanent,
    }
}

/// Permanent codes that say nothing about the request's content but about
/// the account or the setup (603 access denied, 605 method, 610 resource not
/// found, 612 content type, 616 subscription): every other request of the
/// destination would get the same answer.
pub fn is_account_wide(code: &str) -> bool {
    matches!(code.trim(), "603" | "605" | "610" | "612" | "616")
}

/// HTTP statuses that refuse every request alike (authentication, access,
/// a wrong base URL), as opposed to this request's content (400, 413, 422).
pub fn is_account_wide_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 404 | 405 | 501)
}

/// Pause Marketo documents for a throttle code: 606 is a 20-second rate
/// window, 607 a daily quota (wait long, the router's backoff takes over).
pub fn throttle_hint(code: &str) -> Option<Duration> {
    match code.trim() {
        "606" => Some(Duration::from_secs(20)),
        "607" => Some(Duration::from_secs(3600)),
        _ => None,
    }
}

/// A request-level failure before it becomes a job outcome: a token problem
/// is handled inside the client (refresh once), the rest is classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 601/602: refresh the token and repeat the call once.
    Token(String),
    /// Any other, already classified failure.
    Destination(DestinationError),
    /// A permanent refusal every request of the destination would get
    /// (bad credentials, access denied, wrong URL): see [`is_account_wide`].
    AccountWide(DestinationError),
}

impl Failure {
    /// The classified error, whatever its reach; a token failure that is
    /// not handled by a refresh is transient.
    pub fn into_error(self) -> DestinationError {
        match self {
            Failure::Token(reason) => DestinationError::retryable(reason),
            Failure::Destination(e) | Failure::AccountWide(e) => e,
        }
    }
}

impl From<DestinationError> for Failure {
    fn from(e: DestinationError) -> Self {
        Failure::Destination(e)
    }
}

/// Classifies a `success: false` answer. The most actionable class wins
/// (token, then throttle, then retryable, then permanent); the reason names
/// every code and message so a user sees exactly what Marketo said.
pub fn classify_errors(errors: &[ApiError], retry_after: Option<Duration>) -> Failure {
    if errors.is_empty() {
        return Failure::Destination(DestinationError::retryable(
            "Marketo answered success=false without any error",
        ));
    }
    let text = errors
        .iter()
        .map(|e| format!("Marketo error {}: {}", e.code, excerpt(&e.message, 200)))
        .collect::<Vec<_>>()
        .join("; ");
    let classes: Vec<CodeClass> = errors.iter().map(|e| class_of(&e.code)).collect();
    if classes.contains(&CodeClass::Token) {
        return Failure::Token(text);
    }
    if classes.contains(&CodeClass::Throttle) {
        let hint = errors
            .iter()
            .filter_map(|e| throttle_hint(&e.code))
            .max()
            .into_iter()
            .chain(retry_after)
            .max();
        return Failure::Destination(DestinationError::throttled(text, hint));
    }
    if classes.contains(&CodeClass::Retryable) {
        return Failure::Destination(DestinationError::Retryable {
            message: text,
            retry_after,
        });
    }
    let e = DestinationError::permanent(text);
    if errors.iter().any(|e| is_account_wide(&e.code)) {
        Failure::AccountWide(e)
    } else {
        Failure::Destination(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str) -> ApiError {
        ApiError {
            code: code.into(),
            message: format!("m{code}"),
        }
    }

    #[test]
    fn codes_fall_into_the_documented_classes() {
        for c in ["601", "602"] {
            assert_eq!(class_of(c), CodeClass::Token, "{c}");
        }
        for c in ["606", "607", "615", "1016", "1029"] {
            assert_eq!(class_of(c), CodeClass::Throttle, "{c}");
        }
        for c in ["604", "608", "611", "614", "713", "719"] {
            assert_eq!(class_of(c), CodeClass::Retryable, "{c}");
        }
        for c in [
            "603", "605", "609", "610", "612", "616", "1003", "1006", "", "abc",
        ] {
            assert_eq!(class_of(c), CodeClass::Permanent, "{c}");
        }
    }

    #[test]
    fn classification_keeps_code_message_and_hints() {
        match classify_errors(&[err("606")], None) {
            Failure::Destination(DestinationError::Throttled {
                message,
                retry_after,
            }) => {
                assert_eq!(message, "Marketo error 606: m606");
                assert_eq!(retry_after, Some(Duration::from_secs(20)));
            }
            other => panic!("{other:?}"),
        }
        match classify_errors(&[err("1016")], Some(Duration::from_secs(3))) {
            Failure::Destination(e @ DestinationError::Throttled { .. }) => {
                assert_eq!(e.retry_after(), Some(Duration::from_secs(3)))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify_errors(&[err("610"), err("602")], None),
            Failure::Token(_)
        ));
        assert!(matches!(
            classify_errors(&[err("610"), err("611")], None),
            Failure::Destination(DestinationError::Retryable { .. })
        ));
        match classify_errors(&[err("610")], None) {
            Failure::AccountWide(DestinationError::Permanent { message }) => {
                assert_eq!(message, "Marketo error 610: m610")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify_errors(&[err("1003")], None),
            Failure::Destination(DestinationError::Permanent { .. })
        ));
        for code in ["603", "605", "610", "612", "616"] {
            assert!(
                matches!(
                    classify_errors(&[err(code)], None),
                    Failure::AccountWide(DestinationError::Permanent { .. })
                ),
                "{code}"
            );
        }
        assert!(matches!(
            classify_errors(&[err("603"), err("1016")], None),
            Failure::Destination(DestinationError::Throttled { .. })
        ));
        assert!(matches!(
            classify_errors(&[], None),
            Failure::Destination(DestinationError::Retryable { .. })
        ));
    }

    #[test]
    fn numeric_codes_are_accepted() {
        let e: ApiError =
            serde_json::from_str(r#"{"code":1016,"message":"Too many imports"}"#).unwrap();
        assert_eq!(e.code, "1016");
    }
}
