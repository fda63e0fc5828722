//! batchrouterd's configuration: one file (TOML; YAML and JSON by
//! extension), `${NAME}` substitution from the environment, and environment
//! overrides for router tunables using both the literal dotted key and
//! RudderStack's variable names. RudderStack's `BatchRouter.*` keys keep
//! their RudderStack meaning here or are ignored with a startup warning
//! (docs/configuration.md has the table).
//!
//! Router key precedence, highest first: the destination's own `router`
//! table; `BatchRouter.<TYPE>.<key>` (environment, then file);
//! `BatchRouter.<key>` (environment, then file); the built-in default.
//!
//! Loading validates everything it can without network I/O and reports
//! every problem at once. The `[server]` section is read in `server.rs`,
//! `[BatchRouter]` and `[[destinations]]` in `destinations.rs`.

mod destinations;
pub mod env;
mod print;
mod server;
mod source;
mod toml_text;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchrouter_core::destination::did_you_mean;
use batchrouter_core::lookup::{ConfigSource, KeyLookup};
use batchrouter_core::secret::redact_urls_in;
use batchrouter_core::{Destination, DestinationSettings, Registry, Secret};
use batchrouter_router::settings::{self, IgnoredSetting, RouterSettings};
use serde_json::{Map, Value};

use destinations::{destination, flatten_router, global_only};

pub use config::FileFormat;
pub use env::{Env, MapEnv, OsEnv};
pub use print::render_effective;
pub use server::ServerConfig;
pub use source::FileAndEnv;

/// Every problem found in a config, listed together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s) in the configuration:\n  - {}", .0.len(), .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[store]`: where jobs live.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://…` (may carry a password: see [`StoreConfig::redacted_url`]).
    pub url: Secret,
    /// Where staged batch files are written.
    pub staging_dir: PathBuf,
}

impl StoreConfig {
    /// The URL with any password masked, for logs.
    pub fn redacted_url(&self) -> String {
        batchrouter_store::redact_url(self.url.expose())
    }
}

/// `[logging]`.
#[derive(Clone, Debug)]
pub struct LoggingConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// A tracing filter (`info`, `batchrouter_router=debug,info`, …).
    pub level: String,
}

/// One `[[destinations]]` entry, validated.
#[derive(Clone)]
pub struct DestinationSpec {
    /// Unique id jobs refer to.
    pub id: String,
    /// Destination type (`HTTP`, `MARKETO_BULK_UPLOAD`, …).
    pub kind: String,
    /// Disabled destinations keep their jobs waiting.
    pub enabled: bool,
    /// The table handed to the destination (secrets inside; never print raw).
    pub config: Value,
    /// The destination type, from the registry the config was loaded with.
    pub destination: &'static dyn Destination,
    /// What the type's `validate` made of `config`; `run` builds the manager
    /// from it, once.
    pub validated: DestinationSettings,
    /// The destination's own router overrides.
    pub router: BTreeMap<String, String>,
    /// Effective router settings.
    pub settings: RouterSettings,
}

impl std::fmt::Debug for DestinationSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationSpec")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("enabled", &self.enabled)
            .field("config", &print::redact(&self.config))
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

/// A loaded, validated configuration.
#[derive(Clone)]
pub struct LoadedConfig {
    /// The file it came from, when any.
    pub path: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[[destinations]]`.
    pub destinations: Vec<DestinationSpec>,
    /// Store-wide router settings (no destination type), e.g. `jobRetention`.
    pub global: RouterSettings,
    /// Where router keys are looked up.
    pub source: Arc<FileAndEnv>,
    /// RudderStack keys that are set but have no effect here; the daemon
    /// logs a warning naming each at startup.
    pub ignored: Vec<IgnoredSetting>,
}

impl std::fmt::Debug for LoadedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedConfig")
            .field("path", &self.path)
            .field("server", &self.server)
            .field("store", &self.store.redacted_url())
            .field(
                "destinations",
                &self
                    .destinations
                    .iter()
                    .map(|d| (&d.id, &d.kind))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl LoadedConfig {
    /// The destination with this id.
    pub fn destination(&self, id: &str) -> Option<&DestinationSpec> {
        self.destinations.iter().find(|d| d.id == id)
    }
}

const TOP_KEYS: &[&str] = &["server", "store", "logging", "BatchRouter", "destinations"];
const STORE_KEYS: &[&str] = &["url", "stagingDir"];
const LOGGING_KEYS: &[&str] = &["format", "level"];
/// File formats, chosen by extension.
fn format_for(path: &Path) -> Result<config::FileFormat, String> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("toml") => Ok(config::FileFormat::Toml),
        Some("yaml") | Some("yml") => Ok(config::FileFormat::Yaml),
        Some("json") => Ok(config::FileFormat::Json),
        other => Err(format!(
            "{}: unknown config format {:?} (use .toml, .yaml, .yml or .json)",
            path.display(),
            other.unwrap_or("")
        )),
    }
}

/// Loads and validates a config file; destination tables are validated by
/// the types in `registry` (no manager is built).
pub fn load(
    path: &Path,
    env: Arc<dyn Env>,
    registry: &Registry,
) -> Result<LoadedConfig, ConfigErrors> {
    let format = format_for(path).map_err(|e| ConfigErrors(vec![e]))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
    let mut cfg = load_str(&text, format, env, registry)?;
    cfg.path = Some(path.to_path_buf());
    Ok(cfg)
}

/// Loads and validates config text in a given format. Every problem names
/// its key; URLs quoted in problems have their secrets masked. Destination
/// tables are validated by the types in `registry`.
pub fn load_str(
    text: &str,
    format: config::FileFormat,
    env: Arc<dyn Env>,
    registry: &Registry,
) -> Result<LoadedConfig, ConfigErrors> {
    load_unredacted(text, format, env, registry).map_err(|ConfigErrors(problems)| {
        // Problems quote values (a destination's `baseUrl`, a store URL);
        // check-config prints them and `run` logs them.
        ConfigErrors(problems.iter().map(|p| redact_urls_in(p)).collect())
    })
}

fn load_unredacted(
    text: &str,
    format: config::FileFormat,
    env: Arc<dyn Env>,
    registry: &Registry,
) -> Result<LoadedConfig, ConfigErrors> {
    // TOML is read here rather than by the generic loader, whose number
    // errors name no key ("number too large to fit in target type").
    let (raw, mut problems) = match format {
        config::FileFormat::Toml => toml_text::parse(text).map_err(|e| ConfigErrors(vec![e]))?,
        _ => (
            config::Config::builder()
                .add_source(config::File::from_str(text, format))
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|e| ConfigErrors(vec![format!("cannot parse config: {e}")]))?,
            Vec::new(),
        ),
    };
    match from_value(raw, env, registry) {
        Ok(cfg) if problems.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigErrors(problems)),
        Err(ConfigErrors(more)) => {
            problems.extend(more);
            Err(ConfigErrors(problems))
        }
    }
}

fn table<'a>(
    root: &'a Map<String, Value>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<&'a Map<String, Value>> {
    match root.get(key) {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            problems.push(format!("[{key}] must be a table"));
            None
        }
    }
}

fn check_keys(section: &str, map: &Map<String, Value>, known: &[&str], problems: &mut Vec<String>) {
    for k in map.keys() {
        if !known.contains(&k.as_str()) {
            let hint = did_you_mean(k, known)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_else(|| format!(" (known keys: {})", known.join(", ")));
            problems.push(format!("{section}: unknown key `{k}`{hint}"));
        }
    }
}

/// Scalar config values as text (numbers and booleans are accepted where a
/// duration, size or count is expected).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_field(
    map: &Map<String, Value>,
    section: &str,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    match map.get(key) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            problems.push(format!("{section}.{key} must be a string"));
            None
        }
    }
}

fn from_value(
    mut raw: Value,
    env: Arc<dyn Env>,
    registry: &Registry,
) -> Result<LoadedConfig, ConfigErrors> {
    let mut problems = Vec::new();
    env::substitute(&mut raw, env.as_ref(), "", &mut problems);
    let empty = Map::new();
    let root = match &raw {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => {
            return Err(ConfigErrors(vec![
                "the config must be a table at the top level".into(),
            ]))
        }
    };
    check_keys("top level", root, TOP_KEYS, &mut problems);

    let server = server::parse(root, &mut problems);

    // [store]
    let store_t = table(root, "store", &mut problems).unwrap_or(&empty);
    check_keys("[store]", store_t, STORE_KEYS, &mut problems);
    let url = string_field(store_t, "store", "url", &mut problems)
        .unwrap_or_else(|| "sqlite://./data/batchrouter.db".into());
    if let Err(e) = batchrouter_store::StoreUrl::parse(&url) {
        problems.push(format!("store.url: {e}"));
    }
    let staging_dir = string_field(store_t, "store", "stagingDir", &mut problems)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("./data/staging"));

    // [logging]
    let logging_t = table(root, "logging", &mut problems).unwrap_or(&empty);
    check_keys("[logging]", logging_t, LOGGING_KEYS, &mut problems);
    let format = match string_field(logging_t, "logging", "format", &mut problems).as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(format!("logging.format `{other}` must be `text` or `json`"));
            LogFormat::Text
        }
    };
    let level =
        string_field(logging_t, "logging", "level", &mut problems).unwrap_or_else(|| "info".into());

    // [BatchRouter]
    let known_types = registry.names();
    let key_names = settings::accepted_names();
    let mut file_keys = BTreeMap::new();
    if let Some(br) = table(root, "BatchRouter", &mut problems) {
        flatten_router(br, &known_types, &key_names, &mut file_keys, &mut problems);
    }
    let source = Arc::new(FileAndEnv::new(file_keys, env));

    // [[destinations]]
    let mut destinations = Vec::new();
    let mut ids = BTreeSet::new();
    match root.get("destinations") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some((id, d)) = destination(
                    i,
                    item,
                    registry,
                    &key_names,
                    source.as_ref(),
                    &mut problems,
                ) {
                    if !ids.insert(id.clone()) {
                        problems.push(format!("destinations: id `{id}` is used twice"));
                    }
                    destinations.extend(d);
                }
            }
        }
        Some(_) => problems.push("destinations must be a list of [[destinations]] tables".into()),
    }
    for key in settings::GLOBAL_ONLY_KEYS {
        for t in &known_types {
            if let Some((_, origin)) = source.get(&format!("BatchRouter.{t}.{key}")) {
                problems.push(global_only(key, &origin));
            }
        }
        for d in &destinations {
            if d.router.contains_key(*key) {
                let at = format!("the router table of destination `{}`", d.id);
                problems.push(global_only(key, &at));
            }
        }
    }
    let mut ignored = settings::ignored_in(source.as_ref(), &known_types);
    for d in &destinations {
        ignored.extend(settings::ignored_in_router_table(&d.id, &d.router));
    }
    let tables: Vec<_> = destinations
        .iter()
        .map(|d| (d.id.as_str(), d.kind.as_str(), &d.router))
        .collect();
    ignored.extend(settings::meaning_changes_in(
        source.as_ref(),
        &known_types,
        &tables,
    ));
    let no_overrides = BTreeMap::new();
    let global = RouterSettings::resolve(&KeyLookup::new(source.as_ref(), "", &no_overrides))
        .unwrap_or_else(|e| {
            problems.extend(e.0.into_iter().map(|p| format!("[BatchRouter]: {p}")));
            RouterSettings::default()
        });
    if !problems.is_empty() {
        // The same problem may surface once per destination; say it once.
        let mut seen = BTreeSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        return Err(ConfigErrors(problems));
    }
    Ok(LoadedConfig {
        path: None,
        server,
        store: StoreConfig {
            url: Secret::new(url),
            staging_dir,
        },
        logging: LoggingConfig { format, level },
        destinations,
        global,
        source,
        ignored,
    })
}
