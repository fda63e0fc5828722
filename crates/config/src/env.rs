//! The process environment as the config sees it, and `${NAME}` substitution.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

/// Where environment variables come from (the OS, or a map in tests/demo).
pub trait Env: Send + Sync {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct OsEnv;

impl Env for OsEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Variables from a map, optionally in front of another environment.
#[derive(Default)]
pub struct MapEnv {
    vars: BTreeMap<String, String>,
    fallback: Option<Arc<dyn Env>>,
}

impl MapEnv {
    /// Only these variables.
    pub fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        MapEnv {
            vars: vars.into_iter().collect(),
            fallback: None,
        }
    }

    /// These variables in front of `fallback`.
    pub fn over(vars: impl IntoIterator<Item = (String, String)>, fallback: Arc<dyn Env>) -> Self {
        MapEnv {
            vars: vars.into_iter().collect(),
            fallback: Some(fallback),
        }
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars
            .get(name)
            .cloned()
            .or_else(|| self.fallback.as_ref().and_then(|f| f.var(name)))
    }
}

/// Replaces `${NAME}` in every string of `value` from `env` (`$${` writes a
/// literal `${`). Every missing variable is reported with where it was used.
pub fn substitute(value: &mut Value, env: &dyn Env, path: &str, problems: &mut Vec<String>) {
    match value {
        Value::String(s) if s.contains("${") => match expand(s, env) {
            Ok(v) => *s = v,
            Err(missing) => {
                for name in missing {
                    problems.push(format!(
                        "{path}: environment variable `{name}` is not set (referenced as ${{{name}}})"
                    ));
                }
            }
        },
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                substitute(v, env, &format!("{path}[{i}]"), problems);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                substitute(v, env, &p, problems);
            }
        }
        _ => {}
    }
}

fn expand(s: &str, env: &dyn Env) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            match tail.find('}') {
                Some(end) => {
                    let name = &tail[..end];
                    match env.var(name) {
                        Some(v) => out.push_str(&v),
                        None => missing.push(name.to_string()),
                    }
                    rest = &tail[end + 1..];
                }
                None => {
                    out.push_str(after);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expands_escapes_and_reports_every_missing_variable() {
        let env = MapEnv::new([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ]);
        let mut v =
            json!({"x": "${A}-${B}", "y": ["$${A}", "cost $5"], "z": {"w": "${NOPE} ${NADA}"}});
        let mut problems = Vec::new();
        substitute(&mut v, &env, "", &mut problems);
        assert_eq!(v["x"], "1-two");
        assert_eq!(v["y"][0], "${A}");
        assert_eq!(v["y"][1], "cost $5");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("z.w: environment variable `NOPE` is not set"),
            "{problems:?}"
        );
    }
}
