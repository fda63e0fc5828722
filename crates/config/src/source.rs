//! Router keys from the environment in front of the file.

use std::collections::BTreeMap;
use std::sync::Arc;

use batchrouter_core::lookup::{env_name_for_key, ConfigSource};

use crate::env::Env;

/// Looks a dotted key up as an environment variable (literal name, then
/// RudderStack's `RSERVER_…` name), then in the file.
pub struct FileAndEnv {
    file: BTreeMap<String, String>,
    env: Arc<dyn Env>,
}

impl FileAndEnv {
    /// Combines flattened file keys with an environment.
    pub fn new(file: BTreeMap<String, String>, env: Arc<dyn Env>) -> Self {
        FileAndEnv { file, env }
    }
}

impl ConfigSource for FileAndEnv {
    fn get(&self, key: &str) -> Option<(String, String)> {
        if let Some(v) = self.env.var(key) {
            return Some((v, format!("environment variable {key}")));
        }
        let name = env_name_for_key(key);
        if let Some(v) = self.env.var(&name) {
            return Some((v, format!("environment variable {name}")));
        }
        self.file
            .get(key)
            .map(|v| (v.clone(), format!("config file {key}")))
    }
}
