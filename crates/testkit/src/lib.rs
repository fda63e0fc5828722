//! Local stand-ins for the destinations' APIs, real-server harnesses and job
//! generators. Everything listens on 127.0.0.1 only, on a free port.
//!
//! The stand-ins follow the real APIs' contracts, limits and error codes
//! (see `docs/destinations/`), failure modes included, so managers are tested
//! against the shapes they will meet in production.
//!
//! Test support only (tests, benchmarks and the `demo` command): a failed
//! setup step or a broken assertion panics, because a panic is how a test
//! harness reports failure; so the workspace's unwrap/expect lints are
//! lifted for this crate alone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a panic is the failure report of a harness or stand-in"
)]

pub mod conformance;
pub mod http;
pub mod jobs;
pub mod klaviyo;
pub mod logs;
pub mod manager;
pub mod marketo;
pub mod measure;
pub mod postgres;
pub mod sshd;

/// Environment variable that turns a missing real server (sshd, PostgreSQL,
/// promtool) from a loud skip into a test failure; CI sets it.
pub const REQUIRE_REAL_SERVERS_ENV: &str = "BATCHROUTER_REQUIRE_REAL_SERVERS";

/// Whether tests must fail rather than skip when a real server is missing.
pub fn real_servers_required() -> bool {
    std::env::var(REQUIRE_REAL_SERVERS_ENV)
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// Called when a test's real server is unavailable: panics when servers are
/// required, otherwise prints a loud skip notice and returns.
pub fn skip_or_fail(test: &str, why: &str) {
    if real_servers_required() {
        panic!("{test}: {why} ({REQUIRE_REAL_SERVERS_ENV} is set, so this is a failure)");
    }
    eprintln!(
        "\n*** SKIPPED {test}: {why}. Install the server or set {REQUIRE_REAL_SERVERS_ENV}=1 to make this a failure. ***\n"
    );
}

/// Whether this process runs as root (effective uid 0): the harnesses then
/// drop privileges or use a dedicated account.
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
