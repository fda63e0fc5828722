//! RudderStack `BatchRouter.*` keys batchrouter accepts but does not use,
//! and renamed keys whose meaning changed: finding the ones a config sets
//! and warning about them at startup. Split from `settings.rs` because it is
//! a separate concern from declaring and resolving the keys that do apply.

use batchrouter_core::lookup::ConfigSource;

/// A RudderStack `BatchRouter.*` key batchrouter accepts but does not use,
/// with the reason; setting one logs a warning at startup.
#[derive(Clone, Copy, Debug)]
pub struct IgnoredKey {
    /// The key after `BatchRouter.` (or `BatchRouter.<TYPE>.`).
    pub name: &'static str,
    /// Why it has no effect here, and what to use instead.
    pub why: &'static str,
}

const NO_PARTITION_BUFFER: &str =
    "jobs are staged as soon as they are claimed; there is no in-memory partition buffer";
const NO_LIMITER: &str = "concurrency is per destination: maxConcurrentImports, and each destination's own request limits";
const NO_BREAKER: &str = "there is no circuit breaker: failed uploads back off per job (minRetryBackoff, maxRetryBackoff) and throttling pauses the destination";
const NO_RSOURCES: &str = "jobs carry no source job run id; every job uses maxRetries (maxFailedCountForJob) and retryTimeWindow";

/// Every RudderStack `BatchRouter.*` key that has no effect here.
pub const IGNORED_RUDDERSTACK_KEYS: &[IgnoredKey] = &[
    IgnoredKey { name: "asyncUploadWorkerTimeout", why: "batches are uploaded as soon as they are due (count, bytes or asyncUploadTimeout); there is no upload tick" },
    IgnoredKey { name: "maxImportingQueryIterations", why: "an import's jobs are read by import id in one query" },
    IgnoredKey { name: "jobQueryBatchSize", why: "a worker claims at most maxEventsInABatch jobs at a time" },
    IgnoredKey { name: "PayloadLimit", why: "claims are bounded by maxEventsInABatch and MaxUploadLimit" },
    IgnoredKey { name: "pingFrequency", why: "every destination has its own worker; there is no partition ping loop" },
    IgnoredKey { name: "partitionWorker.maxJobsToBuffer", why: NO_PARTITION_BUFFER },
    IgnoredKey { name: "partitionWorker.concurrency", why: NO_PARTITION_BUFFER },
    IgnoredKey { name: "partitionWorker.addJobMaxDelaySeconds", why: NO_PARTITION_BUFFER },
    IgnoredKey { name: "Limiter.read.limit", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.upload.limit", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.process.limit", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.read.dynamicPeriod", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.upload.dynamicPeriod", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.process.dynamicPeriod", why: NO_LIMITER },
    IgnoredKey { name: "Limiter.statsPeriod", why: NO_LIMITER },
    IgnoredKey { name: "timeout", why: NO_BREAKER },
    IgnoredKey { name: "maxConsecutiveFailures", why: NO_BREAKER },
    IgnoredKey { name: "isolationMode", why: "work is always isolated per destination (RudderStack's `destination` mode)" },
    IgnoredKey { name: "httpTimeout", why: "each destination's config sets its own timeouts (e.g. HTTP `timeout`, Marketo and Klaviyo `requestTimeout`)" },
    IgnoredKey { name: "RSources.maxFailedCountForJob", why: NO_RSOURCES },
    IgnoredKey { name: "RSources.retryTimeWindow", why: NO_RSOURCES },
    IgnoredKey { name: "RSources.retryTimeWindowInMins", why: NO_RSOURCES },
    IgnoredKey { name: "MaxEventsLimit", why: "RudderStack reads it only for Bing Ads and Eloqua, which batchrouter does not implement; use maxEventsInABatch" },
    IgnoredKey { name: "SuccessStatusCode", why: "RudderStack reads it only for Eloqua, which batchrouter does not implement" },
];

/// The ignored RudderStack key `name` (relative to `BatchRouter.` or
/// `BatchRouter.<TYPE>.`; `RSources.<TYPE>.key` counts as `RSources.key`).
pub fn ignored_key(name: &str) -> Option<&'static IgnoredKey> {
    let parts: Vec<&str> = name.split('.').collect();
    let normal = match parts.as_slice() {
        ["RSources", _, key] => format!("RSources.{key}"),
        _ => name.to_string(),
    };
    IGNORED_RUDDERSTACK_KEYS.iter().find(|k| k.name == normal)
}

/// Whether a table named `name` under `[BatchRouter]` holds ignored keys
/// (`partitionWorker`, `Limiter`, `RSources`).
pub fn is_ignored_prefix(name: &str) -> bool {
    IGNORED_RUDDERSTACK_KEYS
        .iter()
        .any(|k| k.name.starts_with(&format!("{name}.")))
}

/// An ignored RudderStack key that is set, for the startup warning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredSetting {
    /// The full key as set (`BatchRouter.isolationMode`).
    pub key: String,
    /// Where it was set (an environment variable, the config file, a router table).
    pub origin: String,
    /// Why it has no effect (or, for a renamed key, how its meaning changed).
    pub why: &'static str,
    /// For a key whose meaning changed with a rename: the key that now has
    /// its old meaning and is not set (the warning names both).
    pub renamed_to: Option<&'static str>,
}

impl std::fmt::Display for IgnoredSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.renamed_to {
            Some(other) => write!(
                f,
                "{} is set ({}) and {} is not: {}",
                self.key, self.origin, other, self.why
            ),
            None => write!(
                f,
                "RudderStack key {} is set ({}) but ignored: {}",
                self.key, self.origin, self.why
            ),
        }
    }
}

/// Keys whose meaning changed when our old meaning moved to a new name:
/// `(key, new name of the old meaning, what changed)`.
const MEANING_CHANGED: &[(&str, &str, &str)] = &[
    (
        "asyncUploadTimeout",
        "uploadCallTimeout",
        "asyncUploadTimeout used to be the upload call's timeout and now is the age at which a staged batch is uploaded (RudderStack's meaning); the call timeout is now uploadCallTimeout",
    ),
    (
        "jobRetention",
        "finishedJobRetention",
        "jobRetention used to be how long finished jobs are kept before deletion and now aborts waiting/failed jobs that old (RudderStack's meaning); deletion of finished jobs is now finishedJobRetention",
    ),
];

/// Renamed keys set (globally, for one of `types`, or in a destination's
/// `router` table, given as `(id, type, table)`) while their new name is set
/// neither there nor in a broader scope: an old config may mean the old
/// meaning, so these join the ignored-key warnings.
pub fn meaning_changes_in(
    source: &dyn ConfigSource,
    types: &[&str],
    router_tables: &[(&str, &str, &std::collections::BTreeMap<String, String>)],
) -> Vec<IgnoredSetting> {
    let mut found = Vec::new();
    let set = |scope: &str, key: &str| source.get(&format!("{scope}.{key}")).is_some();
    for (key, other, why) in MEANING_CHANGED {
        let global_other = set("BatchRouter", other);
        let mut scopes = vec!["BatchRouter".to_string()];
        scopes.extend(types.iter().map(|t| format!("BatchRouter.{t}")));
        for scope in scopes {
            let at = format!("{scope}.{key}");
            if let Some((_, origin)) = source.get(&at) {
                if !global_other && !set(&scope, other) {
                    found.push(IgnoredSetting {
                        key: at,
                        origin,
                        why,
                        renamed_to: Some(other),
                    });
                }
            }
        }
        for (id, kind, router) in router_tables {
            let other_set = global_other
                || set(&format!("BatchRouter.{kind}"), other)
                || router.contains_key(*other);
            if router.contains_key(*key) && !other_set {
                found.push(IgnoredSetting {
                    key: key.to_string(),
                    origin: format!("router table of destination `{id}`"),
                    why,
                    renamed_to: Some(other),
                });
            }
        }
    }
    found
}

/// Every ignored RudderStack key set in `source`, globally or for one of
/// `types` (environment under either name, or the file).
pub fn ignored_in(source: &dyn ConfigSource, types: &[&str]) -> Vec<IgnoredSetting> {
    let mut found = Vec::new();
    for k in IGNORED_RUDDERSTACK_KEYS {
        let mut candidates = vec![format!("BatchRouter.{}", k.name)];
        for t in types {
            candidates.push(format!("BatchRouter.{t}.{}", k.name));
            if let Some(rest) = k.name.strip_prefix("RSources.") {
                candidates.push(format!("BatchRouter.RSources.{t}.{rest}"));
            }
        }
        for key in candidates {
            if let Some((_, origin)) = source.get(&key) {
                found.push(IgnoredSetting {
                    key,
                    origin,
                    why: k.why,
                    renamed_to: None,
                });
            }
        }
    }
    found
}

/// Ignored RudderStack keys in a destination's own `router` table.
pub fn ignored_in_router_table(
    destination_id: &str,
    router: &std::collections::BTreeMap<String, String>,
) -> Vec<IgnoredSetting> {
    router
        .keys()
        .filter_map(|name| {
            ignored_key(name).map(|k| IgnoredSetting {
                key: name.clone(),
                origin: format!("router table of destination `{destination_id}`"),
                why: k.why,
                renamed_to: None,
            })
        })
        .collect()
}

/// Logs one warning per ignored key that is set, naming the key.
pub fn warn_ignored(settings: &[IgnoredSetting]) {
    for s in settings {
        tracing::warn!(key = %s.key, origin = %s.origin, "{s}");
    }
}
