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
//! every problem at once.

pub mod env;
mod print;
mod source;
mod toml_text;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchrouter_core::destination::did_you_mean;
use batchrouter_core::lookup::{parse_bytes, ConfigSource, KeyLookup};
use batchrouter_core::secret::redact_urls_in;
use batchrouter_core::{Destination, DestinationSettings, Registry, Secret};
use batchrouter_router::settings::{self, IgnoredSetting, RouterSettings};
use serde_json::{Map, Value};

pub use config::FileFormat;
pub use env::{Env, MapEnv, OsEnv};
pub use print::render_effective;
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

/// `[server]`: the HTTP API.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Bearer token required on `/v1/*` when set.
    pub auth_token: Option<Secret>,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// Longest wait for a request's headers, counted from when the connection
    /// starts waiting for a request (so idle keep-alive connections close too).
    pub header_read_timeout: std::time::Duration,
    /// Longest wait for a whole request body once its headers arrived.
    pub body_read_timeout: std::time::Duration,
    /// A connection with no request running and nothing read or written for
    /// this long is closed (slow readers, stalled clients).
    pub idle_timeout: std::time::Duration,
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
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
const SERVER_KEYS: &[&str] = &[
    "listen",
    "authToken",
    "maxBodyBytes",
    "headerReadTimeout",
    "bodyReadTimeout",
    "idleTimeout",
    "maxConnections",
];
const STORE_KEYS: &[&str] = &["url", "stagingDir"];
const LOGGING_KEYS: &[&str] = &["format", "level"];
const DESTINATION_KEYS: &[&str] = &["id", "type", "enabled", "config", "router"];

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

    // [server]
    let server_t = table(root, "server", &mut problems).unwrap_or(&empty);
    check_keys("[server]", server_t, SERVER_KEYS, &mut problems);
    let listen = string_field(server_t, "server", "listen", &mut problems)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen = listen.parse::<SocketAddr>().unwrap_or_else(|e| {
        problems.push(format!(
            "server.listen `{listen}` is not an address like 127.0.0.1:8080: {e}"
        ));
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let auth_token = string_field(server_t, "server", "authToken", &mut problems)
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    // HTTP drops whitespace around header values (RFC 9110 5.5), so such a
    // token could never match a request: say so instead of locking out.
    if auth_token
        .as_ref()
        .is_some_and(|t| t.expose().trim() != t.expose())
    {
        problems.push(
            "server.authToken starts or ends with whitespace, which HTTP drops from the Authorization header; no request could match it"
                .into(),
        );
    }
    let max_body_bytes = match server_t.get("maxBodyBytes").map(scalar) {
        None => 16 << 20,
        Some(Some(v)) => parse_bytes(&v).unwrap_or_else(|e| {
            problems.push(format!("server.maxBodyBytes: {e}"));
            16 << 20
        }),
        Some(None) => {
            problems.push("server.maxBodyBytes must be a size like \"16MiB\"".into());
            16 << 20
        }
    };
    const SERVER_TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_millis(1);
    const SERVER_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(3600);
    let server_duration = |key: &str, default: u64, problems: &mut Vec<String>| {
        let default = std::time::Duration::from_secs(default);
        match server_t.get(key).map(scalar) {
            None => default,
            Some(Some(v)) => {
                batchrouter_core::lookup::parse_duration(&v, std::time::Duration::from_secs(1))
                    .and_then(|d| {
                        // Bounded so deadlines built from it never overflow.
                        if (SERVER_TIMEOUT_MIN..=SERVER_TIMEOUT_MAX).contains(&d) {
                            Ok(d)
                        } else {
                            Err(format!("`{v}` is out of range: must be 1ms to 1h"))
                        }
                    })
                    .unwrap_or_else(|e| {
                        problems.push(format!("server.{key}: {e}"));
                        default
                    })
            }
            Some(None) => {
                problems.push(format!("server.{key} must be a duration like \"10s\""));
                default
            }
        }
    };
    let header_read_timeout = server_duration("headerReadTimeout", 10, &mut problems);
    let body_read_timeout = server_duration("bodyReadTimeout", 30, &mut problems);
    let idle_timeout = server_duration("idleTimeout", 60, &mut problems);
    let max_connections = match server_t.get("maxConnections").map(scalar) {
        None => 1024,
        Some(Some(v)) => match batchrouter_core::lookup::parse_count(&v) {
            Ok(n) if (1..=1_000_000).contains(&n) => n as usize,
            Ok(_) => {
                problems.push("server.maxConnections must be 1 to 1000000".into());
                1024
            }
            Err(e) => {
                problems.push(format!("server.maxConnections: {e}"));
                1024
            }
        },
        Some(None) => {
            problems.push("server.maxConnections must be a number".into());
            1024
        }
    };

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
        server: ServerConfig {
            listen,
            auth_token,
            max_body_bytes,
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            max_connections,
        },
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

/// The problem for a store-wide key set per type or per destination.
fn global_only(key: &str, at: &str) -> String {
    format!("{key} is set in {at} but is global-only (it applies to the whole store): set it in [BatchRouter]")
}

fn flatten_router(
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
fn destination(
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
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
