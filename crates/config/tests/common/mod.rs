//! Helpers shared by the config tests.

#![allow(dead_code)]

use std::sync::Arc;

use batchrouter_config::{ConfigErrors, Env, LoadedConfig, MapEnv};
use batchrouter_destinations::REGISTRY;
use config::FileFormat;

/// An environment holding exactly `vars`.
pub fn env(vars: &[(&str, &str)]) -> Arc<dyn Env> {
    Arc::new(MapEnv::new(
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    ))
}

/// Loads config `text` in `format`, destinations validated by the shipped registry.
pub fn load_str(
    text: &str,
    format: FileFormat,
    env: Arc<dyn Env>,
) -> Result<LoadedConfig, ConfigErrors> {
    batchrouter_config::load_str(text, format, env, &REGISTRY)
}

/// Loads a config file, destinations validated by the shipped registry.
pub fn load(path: &std::path::Path, env: Arc<dyn Env>) -> Result<LoadedConfig, ConfigErrors> {
    batchrouter_config::load(path, env, &REGISTRY)
}

/// Loads TOML `text` with exactly `vars` in the environment.
pub fn load_toml(text: &str, vars: &[(&str, &str)]) -> Result<LoadedConfig, ConfigErrors> {
    load_str(text, FileFormat::Toml, env(vars))
}

/// The problems loading TOML `text` (with an empty environment) reports;
/// fails when it loads.
pub fn problems(text: &str) -> Vec<String> {
    load_toml(text, &[]).unwrap_err().0
}
