//! Router tunables: every key, its default and unit, declared once. The same
//! table feeds lookups, validation, `check-config` output and the docs.
//! RudderStack keys that are accepted but ignored (or renamed) live in
//! `settings/ignored.rs` and are re-exported here.

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

/// Store-wide keys: refused per type and per destination, where they would
/// have no effect.
pub const GLOBAL_ONLY_KEYS: &[&str] = &["finishedJobRetention", "jobRetention"];

/// Every router key under its primary name. Per-destination keys may be
/// overridden per type and per destination; `finishedJobRetention` and
/// `jobRetention` apply to the whole store. Names shared with RudderStack's `BatchRouter.*` keys
/// mean what they mean there (see docs/configuration.md).
pub const KEYS: &[KeySpec] = &[
    KeySpec { name: "maxEventsInABatch", kind: KeyKind::Count(10_000), doc: "Jobs per staged batch before it is cut." },
    KeySpec { name: "MaxUploadLimit", kind: KeyKind::Bytes(32 << 20), doc: "Staged bytes per batch before it is cut (a destination may ask for less)." },
    KeySpec { name: "asyncUploadTimeout", kind: KeyKind::Duration(Duration::from_secs(30), MIN), doc: "Upload a staged batch this long after its first line even if it is not full." },
    KeySpec { name: "minIdleSleep", kind: KeyKind::Duration(Duration::from_secs(2), SEC), doc: "How often an idle worker looks for new jobs (new jobs from the API wake it at once)." },
    KeySpec { name: "pollStatusLoopSleep", kind: KeyKind::Duration(Duration::from_secs(10), SEC), doc: "Time between polls of an import in progress." },
    KeySpec { name: "minRetryBackoff", kind: KeyKind::Duration(Duration::from_secs(10), SEC), doc: "First retry delay; doubles per attempt, with jitter." },
    KeySpec { name: "maxRetryBackoff", kind: KeyKind::Duration(Duration::from_secs(300), SEC), doc: "Longest retry delay." },
    KeySpec { name: "maxRetries", kind: KeyKind::Count(3), doc: "Retries after the first upload before a failing job may be given up (with retryTimeWindow)." },
    KeySpec { name: "retryTimeWindow", kind: KeyKind::Duration(Duration::from_secs(180 * 60), MIN), doc: "A failing job is aborted (retries_exhausted) once this long has passed since its first upload and maxRetries are spent." },
    KeySpec { name: "uploadCallTimeout", kind: KeyKind::Duration(Duration::from_secs(10 * 60), MIN), doc: "An upload (or one poll or stats call) taking longer fails (deadline_exceeded) and is retried." },
    KeySpec { name: "asyncImportDeadline", kind: KeyKind::Duration(Duration::from_secs(3 * 3600), MIN), doc: "An import still in progress after this fails (deadline_exceeded) and is retried; one whose results cannot be read is aborted (results_unavailable)." },
    KeySpec { name: "maxConcurrentImports", kind: KeyKind::Count(1), doc: "Uploads plus imports in flight per destination; 1 = sync (ordered), more = pipelined." },
    KeySpec { name: "leaseTimeout", kind: KeyKind::Duration(Duration::from_secs(300), SEC), doc: "Claimed jobs and polled imports are taken back this long after their holder stops renewing." },
    KeySpec { name: "shutdownTimeout", kind: KeyKind::Duration(Duration::from_secs(30), SEC), doc: "Graceful shutdown waits this long for uploads in flight." },
    KeySpec { name: "finishedJobRetention", kind: KeyKind::Duration(Duration::from_secs(7 * 86400), HOUR), doc: "Finished jobs (succeeded, aborted) older than this are deleted (store-wide)." },
    KeySpec { name: "jobRetention", kind: KeyKind::Duration(Duration::from_secs(720 * 3600), HOUR), doc: "Waiting or failed jobs created more than jobRetention ago and untouched for that long are aborted (expired), configured destination or not; a claim, retry or re-drive restarts the clock (store-wide; RudderStack's meaning)." },
];

/// Another name read for one of [`KEYS`]: RudderStack's name (or our own
/// earlier one) with its own unit for bare numbers.
#[derive(Clone, Copy, Debug)]
pub struct Alias {
    /// The name as written under `[BatchRouter]` or in a `router` table.
    pub name: &'static str,
    /// The primary key it sets.
    pub of: &'static str,
    /// For durations, the unit of a bare number.
    pub bare_unit: Option<Duration>,
    /// Wins over the primary name when both are set at the same level.
    pub wins: bool,
    /// One line for docs.
    pub doc: &'static str,
}

/// Names read for a primary key. At the level that sets any of a key's
/// names, the first in precedence is used: aliases that `wins`, the primary
/// name, then the others (for `MaxUploadLimit` and `maxPayloadSizeInBytes`,
/// both caps, the smaller value wins).
pub const ALIASES: &[Alias] = &[
    Alias { name: "uploadInterval", of: "asyncUploadTimeout", bare_unit: Some(MIN), wins: true, doc: "RudderStack's per-destination upload interval (bare: minutes)." },
    Alias { name: "uploadFreqInS", of: "asyncUploadTimeout", bare_unit: Some(SEC), wins: false, doc: "Read as the batch age when no asyncUploadTimeout is set at the same or a more specific level (bare: seconds)." },
    Alias { name: "uploadFreq", of: "asyncUploadTimeout", bare_unit: Some(SEC), wins: false, doc: "Read as the batch age when no asyncUploadTimeout is set at the same or a more specific level (bare: seconds)." },
    Alias { name: "maxPayloadSizeInBytes", of: "MaxUploadLimit", bare_unit: None, wins: true, doc: "RudderStack's staged-bytes cap; with MaxUploadLimit at the same level the smaller wins." },
    Alias { name: "maxFailedCountForJob", of: "maxRetries", bare_unit: None, wins: true, doc: "RudderStack's attempt count: maxRetries = maxFailedCountForJob - 1." },
    Alias { name: "retryTimeWindowInMins", of: "retryTimeWindow", bare_unit: Some(MIN), wins: false, doc: "RudderStack's older name for retryTimeWindow (bare: minutes)." },
];

mod ignored;

pub use ignored::{
    ignored_in, ignored_in_router_table, ignored_key, is_ignored_prefix, meaning_changes_in,
    warn_ignored, IgnoredKey, IgnoredSetting, IGNORED_RUDDERSTACK_KEYS,
};

/// Every name of a primary key in precedence order (see [`ALIASES`]).
fn names_of(primary: &str) -> Vec<&str> {
    let of = |wins: bool| {
        ALIASES
            .iter()
            .filter(move |a| a.of == primary && a.wins == wins)
            .map(|a| a.name)
    };
    of(true).chain([primary]).chain(of(false)).collect()
}

/// Every name accepted as a router key: [`KEYS`] and [`ALIASES`].
pub fn accepted_names() -> Vec<&'static str> {
    KEYS.iter()
        .map(|k| k.name)
        .chain(ALIASES.iter().map(|a| a.name))
        .collect()
}

/// Resolved tunables for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterSettings {
    /// See [`KEYS`].
    pub max_events_in_batch: usize,
    /// See [`KEYS`].
    pub max_upload_bytes: u64,
    /// `asyncUploadTimeout`: a staged batch is uploaded this long after its first line.
    pub upload_freq: Duration,
    /// See [`KEYS`].
    pub min_idle_sleep: Duration,
    /// See [`KEYS`].
    pub poll_interval: Duration,
    /// See [`KEYS`].
    pub min_retry_backoff: Duration,
    /// See [`KEYS`].
    pub max_retry_backoff: Duration,
    /// `maxRetries` (or `maxFailedCountForJob` - 1).
    pub max_retries: u32,
    /// See [`KEYS`].
    pub retry_time_window: Duration,
    /// `uploadCallTimeout`: bound on one upload, poll or stats call.
    pub upload_timeout: Duration,
    /// See [`KEYS`].
    pub import_deadline: Duration,
    /// See [`KEYS`].
    pub max_concurrent_imports: u32,
    /// See [`KEYS`].
    pub lease_timeout: Duration,
    /// See [`KEYS`].
    pub shutdown_timeout: Duration,
    /// `finishedJobRetention`: finished jobs older than this are deleted.
    pub finished_job_retention: Duration,
    /// `jobRetention`: unprocessed jobs created longer ago than this and
    /// untouched for as long are aborted (`expired`).
    pub job_retention: Duration,
}

impl Default for RouterSettings {
    #[allow(
        clippy::expect_used,
        reason = "the built-in defaults resolve without a problem; every settings test builds them"
    )]
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

#[allow(
    clippy::expect_used,
    reason = "called only with names of keys declared in KEYS, each resolved by every settings test"
)]
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

    /// The names set for `primary` at the most specific level, in precedence order.
    fn names_set(&self, primary: &'static str) -> Vec<&'static str> {
        self.lookup.set_at_most_specific(&names_of(primary))
    }

    /// A duration read under its primary name or an alias (each with its unit).
    fn duration_any(&mut self, primary: &'static str) -> Duration {
        let Some(&name) = self.names_set(primary).first() else {
            return self.duration(primary);
        };
        let KeyKind::Duration(d, unit) = spec(primary).kind else {
            unreachable!("{primary} is a duration")
        };
        let unit = ALIASES
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.bare_unit)
            .unwrap_or(unit);
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
            max_upload_bytes: {
                let names = r.names_set("MaxUploadLimit");
                if names.is_empty() {
                    r.bytes("MaxUploadLimit")
                } else {
                    // Both are caps: the smaller one set at that level wins.
                    let KeyKind::Bytes(default) = spec("MaxUploadLimit").kind else {
                        unreachable!("MaxUploadLimit is a byte size")
                    };
                    names
                        .iter()
                        .map(|n| {
                            let v = r.lookup.bytes(n, default);
                            r.keep(v, default)
                        })
                        .min()
                        .unwrap_or(default)
                }
            },
            upload_freq: r.duration_any("asyncUploadTimeout"),
            min_idle_sleep: r.duration("minIdleSleep"),
            poll_interval: r.duration("pollStatusLoopSleep"),
            min_retry_backoff: r.duration("minRetryBackoff"),
            max_retry_backoff: r.duration("maxRetryBackoff"),
            max_retries: match r.names_set("maxRetries").first() {
                // RudderStack counts attempts: N attempts are N - 1 retries.
                Some(&"maxFailedCountForJob") => {
                    let v = r.lookup.count("maxFailedCountForJob", 4);
                    r.keep(v, 4).saturating_sub(1)
                }
                _ => r.count("maxRetries"),
            }
            .min(u32::MAX as u64) as u32,
            retry_time_window: r.duration_any("retryTimeWindow"),
            upload_timeout: r.duration("uploadCallTimeout"),
            import_deadline: r.duration("asyncImportDeadline"),
            max_concurrent_imports: r.count("maxConcurrentImports").min(u32::MAX as u64) as u32,
            lease_timeout: r.duration("leaseTimeout"),
            shutdown_timeout: r.duration("shutdownTimeout"),
            finished_job_retention: r.duration("finishedJobRetention"),
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
            ("asyncUploadTimeout", self.upload_freq),
            ("pollStatusLoopSleep", self.poll_interval),
            ("minIdleSleep", self.min_idle_sleep),
            ("uploadCallTimeout", self.upload_timeout),
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
            ("asyncUploadTimeout", fmt_duration(self.upload_freq)),
            ("minIdleSleep", fmt_duration(self.min_idle_sleep)),
            ("pollStatusLoopSleep", fmt_duration(self.poll_interval)),
            ("minRetryBackoff", fmt_duration(self.min_retry_backoff)),
            ("maxRetryBackoff", fmt_duration(self.max_retry_backoff)),
            ("maxRetries", self.max_retries.to_string()),
            ("retryTimeWindow", fmt_duration(self.retry_time_window)),
            ("uploadCallTimeout", fmt_duration(self.upload_timeout)),
            ("asyncImportDeadline", fmt_duration(self.import_deadline)),
            (
                "maxConcurrentImports",
                self.max_concurrent_imports.to_string(),
            ),
            ("leaseTimeout", fmt_duration(self.lease_timeout)),
            ("shutdownTimeout", fmt_duration(self.shutdown_timeout)),
            (
                "finishedJobRetention",
                fmt_duration(self.finished_job_retention),
            ),
            ("jobRetention", fmt_duration(self.job_retention)),
        ]
    }
}

/// Where the effective value of the primary key `key` came from, naming the
/// RudderStack (or older) name when that is what set it; `None` for a default.
pub fn origin(lookup: &KeyLookup<'_>, key: &str) -> Option<String> {
    let names = names_of(key);
    let set = lookup.set_at_most_specific(&names);
    let name = *set.first()?;
    let (_, origin) = lookup.raw(name)?;
    Some(if name == key {
        origin
    } else {
        format!("{origin}, as {name}")
    })
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
        assert_eq!(s.upload_timeout, Duration::from_secs(600));
        assert_eq!(s.poll_interval, Duration::from_secs(10));
        assert_eq!(s.min_retry_backoff, Duration::from_secs(10));
        assert_eq!(s.max_retry_backoff, Duration::from_secs(300));
        assert_eq!(s.max_retries, 3);
        assert_eq!(s.retry_time_window, Duration::from_secs(180 * 60));
        assert_eq!(s.import_deadline, Duration::from_secs(3 * 3600));
        assert_eq!(s.max_concurrent_imports, 1);
        assert_eq!(s.lease_timeout, Duration::from_secs(300));
        assert_eq!(s.finished_job_retention, Duration::from_secs(7 * 86400));
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

    fn resolve(
        pairs: &[(&str, &str)],
        own: &[(&str, &str)],
    ) -> Result<RouterSettings, SettingsError> {
        let src: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let own: BTreeMap<String, String> = own
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RouterSettings::resolve(&KeyLookup::new(&src, "HTTP", &own))
    }

    #[test]
    fn renamed_keys_resolve_under_their_new_names() {
        let s = resolve(
            &[
                ("BatchRouter.uploadCallTimeout", "2"),
                ("BatchRouter.finishedJobRetention", "48"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.upload_timeout, Duration::from_secs(120), "bare minutes");
        assert_eq!(
            s.finished_job_retention,
            Duration::from_secs(48 * 3600),
            "bare hours"
        );
        // `jobRetention` has RudderStack's meaning now (unprocessed jobs,
        // 720 h) and no longer sets the deletion of finished jobs.
        assert_eq!(s.job_retention, Duration::from_secs(720 * 3600));
        let s = resolve(&[("BatchRouter.jobRetention", "1")], &[]).unwrap();
        assert_eq!(s.finished_job_retention, Duration::from_secs(7 * 86400));
        assert_eq!(s.job_retention, Duration::from_secs(3600), "bare hours");
    }

    #[test]
    fn async_upload_timeout_has_rudderstacks_meaning_the_batch_age() {
        // RudderStack: bare minutes, the age at which a staged batch is uploaded.
        let s = resolve(&[("BatchRouter.asyncUploadTimeout", "5")], &[]).unwrap();
        assert_eq!(s.upload_freq, Duration::from_secs(300));
        assert_eq!(
            s.upload_timeout,
            Duration::from_secs(600),
            "the call timeout is untouched"
        );
        // Our earlier name still sets the batch age (bare seconds)...
        let s = resolve(&[("BatchRouter.uploadFreq", "20")], &[]).unwrap();
        assert_eq!(s.upload_freq, Duration::from_secs(20));
        // ...but asyncUploadTimeout wins at the same level, and a more
        // specific level wins over a less specific one whatever the name.
        let s = resolve(
            &[
                ("BatchRouter.uploadFreq", "20s"),
                ("BatchRouter.asyncUploadTimeout", "1m"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.upload_freq, Duration::from_secs(60));
        let s = resolve(
            &[
                ("BatchRouter.HTTP.uploadFreq", "20s"),
                ("BatchRouter.asyncUploadTimeout", "1m"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.upload_freq, Duration::from_secs(20));
        // RudderStack's per-destination uploadInterval (bare minutes) wins.
        let s = resolve(
            &[("BatchRouter.HTTP.asyncUploadTimeout", "30s")],
            &[("uploadInterval", "10")],
        )
        .unwrap();
        assert_eq!(s.upload_freq, Duration::from_secs(600));
    }

    #[test]
    fn rudderstack_counts_and_sizes_are_honoured() {
        // maxFailedCountForJob counts attempts: 5 attempts = 4 retries.
        let s = resolve(&[("BatchRouter.maxFailedCountForJob", "5")], &[]).unwrap();
        assert_eq!(s.max_retries, 4);
        let s = resolve(
            &[
                ("BatchRouter.maxFailedCountForJob", "128"),
                ("BatchRouter.HTTP.maxRetries", "2"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.max_retries, 2, "the more specific level wins");
        let s = resolve(&[("BatchRouter.retryTimeWindowInMins", "30")], &[]).unwrap();
        assert_eq!(s.retry_time_window, Duration::from_secs(1800));
        let s = resolve(&[("BatchRouter.maxPayloadSizeInBytes", "1048576")], &[]).unwrap();
        assert_eq!(s.max_upload_bytes, 1 << 20);
        let s = resolve(
            &[
                ("BatchRouter.maxPayloadSizeInBytes", "8MiB"),
                ("BatchRouter.MaxUploadLimit", "4MiB"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.max_upload_bytes, 4 << 20, "both caps: the smaller wins");
        let err = resolve(&[("BatchRouter.maxFailedCountForJob", "lots")], &[]).unwrap_err();
        assert!(err.to_string().contains("maxFailedCountForJob"), "{err}");
    }

    #[test]
    fn origin_names_the_key_that_set_the_value() {
        let src: BTreeMap<String, String> =
            [("BatchRouter.uploadFreq".to_string(), "5s".to_string())].into();
        let own = BTreeMap::new();
        let l = KeyLookup::new(&src, "HTTP", &own);
        assert_eq!(
            origin(&l, "asyncUploadTimeout").as_deref(),
            Some("map, as uploadFreq")
        );
        assert_eq!(origin(&l, "maxRetries"), None);
    }

    #[test]
    fn ignored_rudderstack_keys_are_found_and_logged_by_name() {
        let src: BTreeMap<String, String> = [
            (
                "BatchRouter.isolationMode".to_string(),
                "workspace".to_string(),
            ),
            (
                "BatchRouter.HTTP.partitionWorker.concurrency".to_string(),
                "4".to_string(),
            ),
            (
                "BatchRouter.RSources.HTTP.maxFailedCountForJob".to_string(),
                "3".to_string(),
            ),
            ("BatchRouter.maxRetries".to_string(), "3".to_string()),
        ]
        .into();
        let found = ignored_in(&src, &["HTTP", "SFTP"]);
        let keys: Vec<&str> = found.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "BatchRouter.HTTP.partitionWorker.concurrency",
                "BatchRouter.isolationMode",
                "BatchRouter.RSources.HTTP.maxFailedCountForJob",
            ]
        );
        let own: BTreeMap<String, String> =
            [("maxConsecutiveFailures".to_string(), "3".to_string())].into();
        let from_table = ignored_in_router_table("web", &own);
        assert_eq!(from_table.len(), 1);
        assert!(ignored_key("RSources.SFTP.retryTimeWindow").is_some());
        assert!(ignored_key("maxRetries").is_none());
        assert!(is_ignored_prefix("Limiter") && !is_ignored_prefix("HTTP"));

        let capture = batchrouter_testkit::logs::LogCapture::default();
        tracing::subscriber::with_default(capture.subscriber(tracing::Level::INFO), || {
            warn_ignored(&found);
            warn_ignored(&from_table);
        });
        let text = capture.text();
        for key in keys.iter().copied().chain(["maxConsecutiveFailures"]) {
            assert!(
                text.lines().any(|l| l.contains("WARN") && l.contains(key)),
                "a warning names {key}: {text}"
            );
        }
        assert!(text.contains("ignored"), "{text}");
    }

    #[test]
    fn every_key_table_is_disjoint() {
        let accepted = accepted_names();
        for k in IGNORED_RUDDERSTACK_KEYS {
            assert!(
                !accepted.contains(&k.name),
                "{} both read and ignored",
                k.name
            );
        }
        for a in ALIASES {
            assert!(
                KEYS.iter().any(|k| k.name == a.of),
                "{} aliases a key",
                a.name
            );
        }
    }
}
