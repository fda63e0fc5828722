//! Named crash points for the crash-point matrix tests
//! (`crates/daemon/tests/crash_matrix.rs`, `docs/operations.md`).
//!
//! Compiled in only with the `failpoints` cargo feature, which nothing but
//! the daemon's tests enables: without it every function here is an empty
//! inline body and the release binary carries neither the point names nor
//! the environment lookup. With it, `BATCHROUTER_CRASH_AT=<point>` makes the
//! process announce the point on stderr and then `kill -9` itself there, so
//! a test sees exactly what a crash at that step leaves in the store.

use batchrouter_core::{Outcome, UploadOutput};

/// Environment variable naming the point to crash at.
pub const ENV: &str = "BATCHROUTER_CRASH_AT";

/// Every point, in the order a job meets them.
pub const POINTS: [&str; 5] = [
    "after_claim",
    "after_staging",
    "after_accept",
    "after_poll_complete",
    "after_stats",
];

/// The destination answered an upload: `after_accept` when it took any
/// record (an import started or a record delivered), and, when that answer
/// is already final (a fire-and-forget destination: no import to poll, the
/// answer is the completion and the per-record result), `after_poll_complete`
/// and `after_stats` too, since that is where the router handles them.
/// `answered` is false when the call timed out or its output was invalid.
#[inline(always)]
pub(crate) fn upload_answered(output: &UploadOutput, answered: bool) {
    if !cfg!(feature = "failpoints") || !answered {
        return;
    }
    let accepted = !output.imports.is_empty()
        || output
            .outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Succeeded { .. }));
    if accepted {
        point("after_accept");
        if output.imports.is_empty() {
            point("after_poll_complete");
            point("after_stats");
        }
    }
}

/// Crashes here when this point is armed (feature `failpoints` only).
#[cfg(feature = "failpoints")]
pub(crate) fn point(name: &'static str) {
    if armed() != Some(name) {
        return;
    }
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "batchrouter crash point `{name}` reached ({ENV}); killing the process"
    );
    let _ = err.flush();
    // SAFETY: kill(2) on our own pid with SIGKILL has no memory-safety
    // preconditions; it ends the process at once, as `kill -9` would.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort();
}

/// Without the feature a crash point is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn point(_name: &'static str) {}

/// The armed point, read once; an unknown name is reported, not ignored.
#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| parse(std::env::var(ENV).ok().as_deref()))
}

/// Maps the variable's value to a known point, warning on anything else.
#[cfg(feature = "failpoints")]
fn parse(value: Option<&str>) -> Option<&'static str> {
    let value = value?.trim();
    if value.is_empty() {
        return None;
    }
    let found = POINTS.iter().copied().find(|p| *p == value);
    if found.is_none() {
        eprintln!(
            "{ENV}={value:?} names no crash point (known: {}); none armed",
            POINTS.join(", ")
        );
    }
    found
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn only_known_points_are_armed() {
        assert_eq!(parse(Some("after_accept")), Some("after_accept"));
        assert_eq!(parse(Some(" after_stats\n")), Some("after_stats"));
        assert_eq!(parse(Some("after_everything")), None);
        assert_eq!(parse(Some("")), None);
        assert_eq!(parse(None), None);
    }
}
