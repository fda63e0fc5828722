//! The effective configuration as text, secrets redacted: what
//! `check-config` prints and what the daemon logs at start.

use std::collections::BTreeMap;
use std::fmt::Write;

use batchrouter_core::lookup::KeyLookup;
use batchrouter_core::secret::{is_secret_key, redact_urls_in, REDACTED};
use serde_json::Value;

use crate::{LoadedConfig, LogFormat};

/// Replaces every value whose key names a secret, at any depth, masks
/// header values, and masks the secrets of every URL in any string (arrays
/// included): userinfo and query values.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = match v {
                        _ if is_secret_key(k) && !v.is_object() && !v.is_array() => {
                            Value::String(REDACTED.into())
                        }
                        // Header values usually carry credentials.
                        Value::Object(h) if k.eq_ignore_ascii_case("headers") => Value::Object(
                            h.keys()
                                .map(|hk| (hk.clone(), Value::String(REDACTED.into())))
                                .collect(),
                        ),
                        other => redact(other),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        // URLs may carry a password or a token in the query.
        Value::String(text) => Value::String(redact_urls_in(text)),
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
    for (key, d) in [
        ("headerReadTimeout", cfg.server.header_read_timeout),
        ("bodyReadTimeout", cfg.server.body_read_timeout),
        ("idleTimeout", cfg.server.idle_timeout),
    ] {
        let _ = writeln!(out, "{key} = \"{}ms\"", d.as_millis());
    }
    let _ = writeln!(out, "maxConnections = {}", cfg.server.max_connections);
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
        let origin =
            batchrouter_router::settings::origin(&global, key).unwrap_or_else(|| "default".into());
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
            let origin = batchrouter_router::settings::origin(&lookup, key)
                .unwrap_or_else(|| "default".into());
            let _ = writeln!(out, "{key} = \"{value}\"  # {origin}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_masked_at_any_depth_arrays_included() {
        let v = json!({
            "baseUrl": "https://a.test/api?key=SECRET_1",
            "mirrors": ["https://u:SECRET_2@b.test/x", {"url": "https://c.test/?t=SECRET_3"}],
            "note": "see https://d.test/?sig=SECRET_4 for details",
            "headers": {"X-Custom": "SECRET_5"},
            "clientSecret": "SECRET_6",
            "host": "sftp.test",
            "port": 22
        });
        let out = redact(&v);
        assert!(!out.to_string().contains("SECRET"), "{out}");
        assert_eq!(out["baseUrl"], "https://a.test/api?key=***");
        assert_eq!(out["mirrors"][0], "https://u:***@b.test/x");
        assert_eq!(out["mirrors"][1]["url"], "https://c.test/?t=***");
        assert_eq!(out["note"], "see https://d.test/?sig=*** for details");
        assert_eq!(out["host"], "sftp.test");
        assert_eq!(out["port"], 22);
    }
}
