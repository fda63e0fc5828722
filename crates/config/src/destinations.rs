//! The `[[destinations]]` entries and the `[BatchRouter]` table: ids, types,
//! each type's own config validation, and router keys (including ignored
//! RudderStack keys). Split from `lib.rs` so each config section reads on
//! its own; `lib.rs` keeps the loading and the other sections.

use std::collections::BTreeMap;

use batchrouter_core::destination::did_you_mean;
use batchrouter_core::lookup::KeyLookup;
use batchrouter_core::Registry;
use batchrouter_router::settings::{self, RouterSettings};
use serde_json::{Map, Value};

use crate::{check_keys, scalar, DestinationSpec, FileAndEnv};

const DESTINATION_KEYS: &[&str] = &["id", "type", "enabled", "config", "router"];

/// The problem for a store-wide key set per type or per destination.
pub(crate) fn global_only(key: &str, at: &str) -> String {
    format!("{key} is set in {at} but is global-only (it applies to the whole store): set it in [BatchRouter]")
}

pub(crate) fn flatten_router(
    br: &Map<String, Value>,
    known_types: &[&str],
    key_names: &[&str],
    out: &mut BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    for (k, v) in br {
        match v {
            Value::Object(_) if settings::is_ignored_prefix(k) => {
                ignored_table("BatchRouter", k, v, key_names, out, problems)
            }
            Value::Object(per_type) => {
                if !known_types.contains(&k.as_str()) {
                    let hint = did_you_mean(k, known_types)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_else(|| format!(" (known types: {})", known_types.join(", ")));
                    problems.push(format!("[BatchRouter.{k}]: not a destination type{hint}"));
                    continue;
                }
                for (k2, v2) in per_type {
                    if v2.is_object() && settings::is_ignored_prefix(k2) {
                        let prefix = format!("BatchRouter.{k}");
                        ignored_table(&prefix, k2, v2, key_names, out, problems);
                        continue;
                    }
                    if settings::GLOBAL_ONLY_KEYS.contains(&k2.as_str()) {
                        problems.push(global_only(k2, &format!("[BatchRouter.{k}]")));
                        continue;
                    }
                    router_key(
                        &format!("BatchRouter.{k}"),
                        k2,
                        v2,
                        key_names,
                        out,
                        problems,
                    );
                }
            }
            _ => router_key("BatchRouter", k, v, key_names, out, problems),
        }
    }
}

/// A table of dotted RudderStack keys we ignore (`[BatchRouter.Limiter.read]`):
/// each leaf is kept under its dotted name so the startup warning names it.
fn ignored_table(
    prefix: &str,
    name: &str,
    v: &Value,
    key_names: &[&str],
    out: &mut BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                ignored_table(prefix, &format!("{name}.{k}"), v, key_names, out, problems);
            }
        }
        _ => router_key(prefix, name, v, key_names, out, problems),
    }
}

fn router_key(
    prefix: &str,
    key: &str,
    v: &Value,
    key_names: &[&str],
    out: &mut BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    // RudderStack keys we do not use are accepted (and warned about).
    if !key_names.contains(&key) && settings::ignored_key(key).is_none() {
        let hint = did_you_mean(key, key_names)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        problems.push(format!("[{prefix}]: unknown router key `{key}`{hint}"));
        return;
    }
    match scalar(v) {
        Some(s) => {
            out.insert(format!("{prefix}.{key}"), s);
        }
        None => problems.push(format!("[{prefix}] {key} must be a number or a string")),
    }
}

/// One `[[destinations]]` entry: its id when it has a usable one, and the
/// spec when its type also validated its config.
pub(crate) fn destination(
    index: usize,
    item: &Value,
    registry: &Registry,
    key_names: &[&str],
    source: &FileAndEnv,
    problems: &mut Vec<String>,
) -> Option<(String, Option<DestinationSpec>)> {
    let known_types = registry.names();
    let Value::Object(map) = item else {
        problems.push(format!("destinations[{index}] must be a table"));
        return None;
    };
    let label = map
        .get("id")
        .and_then(Value::as_str)
        .map(|id| format!("destination `{id}`"))
        .unwrap_or_else(|| format!("destinations[{index}]"));
    check_keys(&label, map, DESTINATION_KEYS, problems);
    let id = match map.get("id").and_then(Value::as_str) {
        Some(id) if valid_id(id) => id.to_string(),
        Some(id) => {
            problems.push(format!("{label}: id `{id}` may only use letters, digits, `-`, `_` and `.` (1–128 characters)"));
            return None;
        }
        None => {
            problems.push(format!("{label}: `id` is required"));
            return None;
        }
    };
    let destination = match map.get("type").and_then(Value::as_str) {
        Some(t) if registry.find(t).is_some() => registry.find(t)?,
        Some(t) => {
            let hint = did_you_mean(t, &known_types)
                .map(|s| format!("did you mean `{s}`? "))
                .unwrap_or_default();
            problems.push(format!(
                "{label}: unknown type `{t}` ({hint}known types: {})",
                known_types.join(", ")
            ));
            return None;
        }
        None => {
            problems.push(format!(
                "{label}: `type` is required (one of {})",
                known_types.join(", ")
            ));
            return None;
        }
    };
    let kind = destination.name().to_string();
    let enabled = match map.get("enabled") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(format!("{label}: `enabled` must be true or false"));
            true
        }
    };
    let config = map
        .get("config")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let mut router = BTreeMap::new();
    match map.get("router") {
        None => {}
        Some(Value::Object(r)) => {
            for (k, v) in r {
                let mut one = BTreeMap::new();
                router_key(
                    &format!("{label} router"),
                    k,
                    v,
                    key_names,
                    &mut one,
                    problems,
                );
                if let Some(val) = one.into_values().next() {
                    router.insert(k.clone(), val);
                }
            }
        }
        Some(_) => problems.push(format!("{label}: `router` must be a table")),
    }
    let settings = match RouterSettings::resolve(&KeyLookup::new(source, &kind, &router)) {
        Ok(s) => s,
        Err(e) => {
            problems.extend(e.0.into_iter().map(|p| format!("{label}: {p}")));
            RouterSettings::default()
        }
    };
    // Validation only: managers are built once, by `run`.
    let validated = match destination.validate(&config) {
        Ok(v) => v,
        Err(p) => {
            problems.extend(p.0.into_iter().map(|p| format!("{label} config: {p}")));
            return Some((id, None));
        }
    };
    Some((
        id.clone(),
        Some(DestinationSpec {
            id,
            kind,
            enabled,
            config,
            destination,
            validated,
            router,
            settings,
        }),
    ))
}

/// Destination ids appear in paths, metrics and URLs: keep them simple.
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
