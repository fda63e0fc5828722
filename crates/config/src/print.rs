//! The effective configuration as text, secrets redacted: what
//! `check-config` prints and what the daemon logs at start.

use std::collections::BTreeMap;
use std::fmt::Write;

use batchrouter_core::lookup::KeyLookup;
use batchrouter_core::secret::{is_secret_key, redact_url, REDACTED};
use serde_json::Value;

use crate::{LoadedConfig, LogFormat};

/// Replaces every value whose key names a secret, at any depth.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(k) && !v.is_object() && !v.is_array() {
                        Value::String(REDACTED.into())
                    } else if let Value::String(text) = v {
                        // URLs may carry a password or a token in the query.
                        Value::String(redact_url(text))
                    } else if k.eq_ignore_ascii_case("headers") {
                        // Header values usually carry credentials.
                        match v {
                            Value::Object(h) => Value::Object(
                                h.keys()
                                    .map(|hk| (hk.clone(), Value::String(REDACTED.into())))
                                    .collect(),
                            ),
                            other => redact(other),
                        }
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        other => other.clone(),
    }
}

fn toml_value(v: &Value) -> String {
    match toml::Value::try_from(v) {
        Ok(t) => t.to_string(),
        Err(_) => v.to_string(),
    }
}

/// The effective config in TOML form with each router key's value and origin.
pub fn render_effective(cfg: &LoadedConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[server]");
    let _ = writeln!(out, "listen = \"{}\"", cfg.server.listen);
    let _ = writeln!(
        out,
        "authToken = {}",
        if cfg.server.auth_token.is_some() {
            format!("\"{REDACTED}\"")
        } else {
            "\"\"  # not set: /v1 is open".into()
        }
    );
    let _ = writeln!(out, "maxBodyBytes = {}", cfg.server.max_body_bytes);
    let _ = writeln!(out, "\n[store]");
    let _ = writeln!(out, "url = \"{}\"", cfg.store.redacted_url());
    let _ = writeln!(out, "stagingDir = \"{}\"", cfg.store.staging_dir.display());
    let _ = writeln!(out, "\n[logging]");
    let _ = writeln!(
        out,
        "format = \"{}\"",
        match cfg.logging.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    );
    let _ = writeln!(out, "level = \"{}\"", cfg.logging.level);
    let none = BTreeMap::new();
    let _ = writeln!(out, "\n# Store-wide router settings");
    let _ = writeln!(out, "[BatchRouter]");
    let global = KeyLookup::new(cfg.source.as_ref(), "", &none);
    for (key, value) in cfg.global.describe() {
        let origin = global
            .raw(key)
            .map(|(_, o)| o)
            .unwrap_or_else(|| "default".into());
        let _ = writeln!(out, "{key} = \"{value}\"  # {origin}");
    }
    for d in &cfg.destinations {
        let _ = writeln!(out, "\n[[destinations]]");
        let _ = writeln!(out, "id = \"{}\"", d.id);
        let _ = writeln!(out, "type = \"{}\"", d.kind);
        let _ = writeln!(out, "enabled = {}", d.enabled);
        let _ = writeln!(out, "[destinations.config]");
        if let Value::Object(map) = redact(&d.config) {
            for (k, v) in map {
                let _ = writeln!(out, "{k} = {}", toml_value(&v));
            }
        }
        let _ = writeln!(out, "# effective router settings for this destination");
        let _ = writeln!(out, "[destinations.router]");
        let lookup = KeyLookup::new(cfg.source.as_ref(), &d.kind, &d.router);
        for (key, value) in d.settings.describe() {
            let origin = lookup
                .raw(key)
                .map(|(_, o)| o)
                .unwrap_or_else(|| "default".into());
            let _ = writeln!(out, "{key} = \"{value}\"  # {origin}");
        }
    }
    out
}
