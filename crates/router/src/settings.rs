//! Router tunables: every key, its default and unit, declared once. The same
//! table feeds lookups, validation, `check-config` output and the docs.

use std::time::Duration;

use batchrouter_core::lookup::{ByteSize, KeyLookup, LookupError};
use batchrouter_core::ManagerLimits;

const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// What kind of value a key holds, and for durations the unit of a bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A count.
    Count(u64),
    /// A byte size.
    Bytes(u64),
    /// A duration with the unit of a bare number.
    Duration(Duration, Duration),
}

/// One documented router key.
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    /// Key name as written under `[BatchRouter]`.
    pub name: &'static str,
    /// Type and default.
    pub kind: KeyKind,
    /// One line for docs and `check-config`.
    pub doc: &'static str,
}

/// Every router key. Per-destination keys may be overridden per type and
/// per destination; `jobRetention` applies to the whole store.
pub const KEYS: &[KeySpec] = &[
    KeySpec { name: "maxEventsInABatch", kind: KeyKind::Count(10_000), doc: "Jobs per staged batch before it is cut." },
    KeySpec { name: "MaxUploadLimit", kind: KeyKind::Bytes(32 << 20), doc: "Staged bytes per batch before it is cut (a destination may ask for less)." },
    KeySpec { name: "uploadFreq", kind: KeyKind::Duration(Duration::from_secs(30), SEC), doc: "Cut a batch this long after its first line even if it is not full." },
    KeySpec { name: "minIdleSleep", kind: KeyKind::Duration(Duration::from_secs(2), SEC), doc: "How often an idle worker looks for new jobs (new jobs from the API wake it at once)." },
    KeySpec { name: "pollStatusLoopSleep", kind: KeyKind::Duration(Duration::from_secs(10), SEC), doc: "Time between polls of an import in progress." },
    KeySpec { name: "minRetryBackoff", kind: KeyKind::Duration(Duration::from_secs(10), SEC), doc: "First retry delay; doubles per attempt, with jitter." },
    KeySpec { name: "maxRetryBackoff", kind: KeyKind::Duration(Duration::from_secs(300), SEC), doc: "Longest retry delay." },
    KeySpec { name: "maxRetries", kind: KeyKind::Count(3), doc: "Retries after the first upload; a job is uploaded at most 1 + maxRetries times." },
    KeySpec { name: "retryTimeWindow", kind: KeyKind::Duration(Duration::from_secs(180 * 60), MIN), doc: "After this long since the first upload a failing job is aborted (retries_exhausted)." },
    KeySpec { name: "asyncUploadTimeout", kind: KeyKind::Duration(Duration::from_secs(10 * 60), MIN), doc: "An upload taking longer fails (deadline_exceeded) and is retried." },
    KeySpec { name: "asyncImportDeadline", kind: KeyKind::Duration(Duration::from_secs(3 * 3600), MIN), doc: "An import still in progress after this fails (deadline_exceeded) and is retried." },
    KeySpec { name: "maxConcurrentImports", kind: KeyKind::Count(1), doc: "Uploads plus imports in flight per destination; 1 = sync (ordered), more = pipelined." },
    KeySpec { name: "leaseTimeout", kind: KeyKind::Duration(Duration::from_secs(300), SEC), doc: "Claimed jobs and polled imports are taken back this long after their holder stops renewing." },
    KeySpec { name: "shutdownTimeout", kind: KeyKind::Duration(Duration::from_secs(30), SEC), doc: "Graceful shutdown waits this long for uploads in flight." },
    KeySpec { name: "jobRetention", kind: KeyKind::Duration(Duration::from_secs(7 * 86400), HOUR), doc: "Terminal jobs older than this are deleted (store-wide)." },
];

/// Resolved tunables for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterSettings {
    /// See [`KEYS`].
    pub max_events_in_batch: usize,
    /// See [`KEYS`].
    pub max_upload_bytes: u64,
    /// See [`KEYS`].
    pub upload_freq: Duration,
    /// See [`KEYS`].
    pub min_idle_sleep: Duration,
    /// See [`KEYS`].
    pub poll_interval: Duration,
    /// See [`KEYS`].
    pub min_retry_backoff: Duration,
    /// See [`KEYS`].
    pub max_retry_backoff: Duration,
    /// See [`KEYS`].
    pub max_retries: u32,
    /// See [`KEYS`].
    pub retry_time_window: Duration,
    /// See [`KEYS`].
    pub upload_timeout: Duration,
    /// See [`KEYS`].
    pub import_deadline: Duration,
    /// See [`KEYS`].
    pub max_concurrent_imports: u32,
    /// See [`KEYS`].
    pub lease_timeout: Duration,
    /// See [`KEYS`].
    pub shutdown_timeout: Duration,
    /// See [`KEYS`].
    pub job_retention: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        let empty = std::collections::BTreeMap::new();
        RouterSettings::resolve(&KeyLookup::new(
            &batchrouter_core::lookup::EmptySource,
            "",
            &empty,
        ))
        .expect("built-in defaults are valid")
    }
}

/// Every problem found resolving a destination's settings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct SettingsError(pub Vec<String>);

fn spec(name: &str) -> &'static KeySpec {
    KEYS.iter()
        .find(|k| k.name == name)
        .expect("key declared in KEYS")
}

/// Looks keys up by their declared kind, keeping every problem.
struct Resolver<'a, 'b> {
    lookup: &'a KeyLookup<'b>,
    problems: Vec<String>,
}

impl Resolver<'_, '_> {
    fn keep<T>(&mut self, r: Result<T, LookupError>, default: T) -> T {
        r.unwrap_or_else(|e| {
            self.problems.push(e.to_string());
            default
        })
    }

    fn count(&mut self, name: &str) -> u64 {
        let KeyKind::Count(d) = spec(name).kind else {
            unreachable!("{name} is a count")
        };
        let r = self.lookup.count(name, d);
        self.keep(r, d)
    }

    fn bytes(&mut self, name: &str) -> u64 {
        let KeyKind::Bytes(d) = spec(name).kind else {
            unreachable!("{name} is a byte size")
        };
        let r = self.lookup.bytes(name, d);
        self.keep(r, d)
    }

    fn duration(&mut self, name: &str) -> Duration {
        let KeyKind::Duration(d, unit) = spec(name).kind else {
            unreachable!("{name} is a duration")
        };
        let r = self.lookup.duration(name, d, unit);
        self.keep(r, d)
    }
}

impl RouterSettings {
    /// Resolves every key through `lookup`, collecting all problems.
    pub fn resolve(lookup: &KeyLookup<'_>) -> Result<RouterSettings, SettingsError> {
        let mut r = Resolver {
            lookup,
            problems: Vec::new(),
        };
        let s = RouterSettings {
            max_events_in_batch: r.count("maxEventsInABatch") as usize,
            max_upload_bytes: r.bytes("MaxUploadLimit"),
            upload_freq: r.duration("uploadFreq"),
            min_idle_sleep: r.duration("minIdleSleep"),
            poll_interval: r.duration("pollStatusLoopSleep"),
            min_retry_backoff: r.duration("minRetryBackoff"),
            max_retry_backoff: r.duration("maxRetryBackoff"),
            max_retries: r.count("maxRetries").min(u32::MAX as u64) as u32,
            retry_time_window: r.duration("retryTimeWindow"),
            upload_timeout: r.duration("asyncUploadTimeout"),
            import_deadline: r.duration("asyncImportDeadline"),
            max_concurrent_imports: r.count("maxConcurrentImports").min(u32::MAX as u64) as u32,
            lease_timeout: r.duration("leaseTimeout"),
            shutdown_timeout: r.duration("shutdownTimeout"),
            job_retention: r.duration("jobRetention"),
        };
        let mut problems = r.problems;
        problems.extend(s.check());
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(SettingsError(problems))
        }
    }

    fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_events_in_batch == 0 {
            p.push("maxEventsInABatch must be at least 1".to_string());
        }
        if self.max_upload_bytes < 1024 {
            p.push(format!(
                "MaxUploadLimit must be at least 1KiB (got {})",
                ByteSize(self.max_upload_bytes)
            ));
        }
        if self.max_concurrent_imports == 0 {
            p.push("maxConcurrentImports must be at least 1".to_string());
        }
        if self.min_retry_backoff > self.max_retry_backoff {
            p.push(format!(
                "minRetryBackoff ({:?}) must not exceed maxRetryBackoff ({:?})",
                self.min_retry_backoff, self.max_retry_backoff
            ));
        }
        if self.lease_timeout < Duration::from_secs(1) {
            p.push("leaseTimeout must be at least 1s".to_string());
        }
        for (name, d) in [
            ("uploadFreq", self.upload_freq),
            ("pollStatusLoopSleep", self.poll_interval),
            ("minIdleSleep", self.min_idle_sleep),
            ("asyncUploadTimeout", self.upload_timeout),
            ("asyncImportDeadline", self.import_deadline),
        ] {
            if d.is_zero() {
                p.push(format!("{name} must be greater than zero"));
            }
        }
        p
    }

    /// Applies a destination's own limits where they are tighter.
    pub fn with_limits(mut self, limits: ManagerLimits) -> Self {
        if let Some(b) = limits.max_upload_bytes {
            self.max_upload_bytes = self.max_upload_bytes.min(b);
        }
        if let Some(n) = limits.max_events {
            self.max_events_in_batch = self.max_events_in_batch.min(n.max(1));
        }
        self
    }

    /// The effective values as `(key, value)` text, for `check-config`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("maxEventsInABatch", self.max_events_in_batch.to_string()),
            (
                "MaxUploadLimit",
                ByteSize(self.max_upload_bytes).to_string(),
            ),
            ("uploadFreq", fmt_duration(self.upload_freq)),
            ("minIdleSleep", fmt_duration(self.min_idle_sleep)),
            ("pollStatusLoopSleep", fmt_duration(self.poll_interval)),
            ("minRetryBackoff", fmt_duration(self.min_retry_backoff)),
            ("maxRetryBackoff", fmt_duration(self.max_retry_backoff)),
            ("maxRetries", self.max_retries.to_string()),
            ("retryTimeWindow", fmt_duration(self.retry_time_window)),
            ("asyncUploadTimeout", fmt_duration(self.upload_timeout)),
            ("asyncImportDeadline", fmt_duration(self.import_deadline)),
            (
                "maxConcurrentImports",
                self.max_concurrent_imports.to_string(),
            ),
            ("leaseTimeout", fmt_duration(self.lease_timeout)),
            ("shutdownTimeout", fmt_duration(self.shutdown_timeout)),
            ("jobRetention", fmt_duration(self.job_retention)),
        ]
    }
}

/// Formats a duration the way config files write it (`30s`, `3h`, `250ms`).
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn defaults_match_the_documented_values() {
        let s = RouterSettings::default();
        assert_eq!(s.max_events_in_batch, 10_000);
        assert_eq!(s.max_upload_bytes, 32 << 20);
        assert_eq!(s.upload_freq, Duration::from_secs(30));
        assert_eq!(s.poll_interval, Duration::from_secs(10));
        assert_eq!(s.min_retry_backoff, Duration::from_secs(10));
        assert_eq!(s.max_retry_backoff, Duration::from_secs(300));
        assert_eq!(s.max_retries, 3);
        assert_eq!(s.retry_time_window, Duration::from_secs(180 * 60));
        assert_eq!(s.import_deadline, Duration::from_secs(3 * 3600));
        assert_eq!(s.max_concurrent_imports, 1);
        assert_eq!(s.lease_timeout, Duration::from_secs(300));
        assert_eq!(s.job_retention, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn bare_numbers_use_each_keys_unit_and_all_problems_are_listed() {
        let mut src = BTreeMap::new();
        src.insert("BatchRouter.retryTimeWindow".to_string(), "90".to_string());
        src.insert(
            "BatchRouter.pollStatusLoopSleep".to_string(),
            "5".to_string(),
        );
        let own = BTreeMap::new();
        let s = RouterSettings::resolve(&KeyLookup::new(&src, "HTTP", &own)).unwrap();
        assert_eq!(s.retry_time_window, Duration::from_secs(90 * 60));
        assert_eq!(s.poll_interval, Duration::from_secs(5));

        src.insert("BatchRouter.maxRetries".to_string(), "many".to_string());
        src.insert(
            "BatchRouter.HTTP.MaxUploadLimit".to_string(),
            "12 parsecs".to_string(),
        );
        src.insert("BatchRouter.minRetryBackoff".to_string(), "10m".to_string());
        let err = RouterSettings::resolve(&KeyLookup::new(&src, "HTTP", &own)).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.to_string().contains("maxRetries"), "{err}");
        assert!(err.to_string().contains("MaxUploadLimit"), "{err}");
        assert!(
            err.to_string().contains("must not exceed maxRetryBackoff"),
            "{err}"
        );
    }

    #[test]
    fn destination_limits_only_tighten() {
        let s = RouterSettings::default().with_limits(ManagerLimits {
            max_upload_bytes: Some(10 << 20),
            max_events: Some(50_000),
        });
        assert_eq!(s.max_upload_bytes, 10 << 20);
        assert_eq!(s.max_events_in_batch, 10_000);
    }

    #[test]
    fn durations_print_like_config() {
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_secs(10800)), "3h");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn every_key_is_described() {
        let described: Vec<_> = RouterSettings::default()
            .describe()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let declared: Vec<_> = KEYS.iter().map(|k| k.name).collect();
        assert_eq!(described, declared);
    }
}
