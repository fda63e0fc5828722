//! The destination-type contract the config loader and the daemon use: a
//! [`Destination`] names a type, declares its config keys, validates a
//! config table without building anything and builds a manager from the
//! validated settings. A [`Registry`] is a static list of them; the one the
//! daemon ships lives in `batchrouter-destinations`, so neither the router
//! nor the config loader depends on any destination crate.

use std::any::Any;
use std::sync::Arc;

use crate::destination::{ConfigProblems, DestinationContext};
use crate::manager::AsyncDestinationManager;

/// One key of a destination's `config` table, for hints and documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigKey {
    /// The key as users write it (`maxBatchSize`).
    pub name: &'static str,
    /// The default as the docs state it (`500`, `30s`), or `required` /
    /// `none` / `` (when it depends on other keys).
    pub default: &'static str,
    /// One line saying what it does.
    pub doc: &'static str,
}

/// A destination's validated config, opaque to everything but the
/// destination that produced it (which reads it back in [`Destination::build`]).
#[derive(Clone)]
pub struct DestinationSettings {
    kind: &'static str,
    value: Arc<dyn Any + Send + Sync>,
}

impl DestinationSettings {
    /// Wraps the settings `kind`'s `validate` produced.
    pub fn new<T: Any + Send + Sync>(kind: &'static str, value: T) -> Self {
        DestinationSettings {
            kind,
            value: Arc::new(value),
        }
    }

    /// The destination type that validated these settings.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The typed settings, or a problem when they belong to another type.
    pub fn get<T: Any + Send + Sync>(&self) -> Result<&T, ConfigProblems> {
        self.value.downcast_ref::<T>().ok_or_else(|| {
            ConfigProblems::one(format!(
                "settings validated by `{}` were handed to another destination type",
                self.kind
            ))
        })
    }
}

// Settings may hold secrets: say only whose they are.
impl std::fmt::Debug for DestinationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationSettings")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A destination type: what the registry knows about each one.
pub trait Destination: Send + Sync + 'static {
    /// The type name users write in `[[destinations]] type = "…"`.
    fn name(&self) -> &'static str;

    /// Every key its `config` table accepts, with defaults and docs.
    fn config_keys(&self) -> &'static [ConfigKey];

    /// Checks a `config` table, listing every problem; no network I/O and no
    /// manager is built.
    fn validate(&self, config: &serde_json::Value) -> Result<DestinationSettings, ConfigProblems>;

    /// Builds the manager from settings [`Destination::validate`] returned.
    fn build(
        &self,
        settings: &DestinationSettings,
        ctx: &DestinationContext,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems>;
}

/// The one [`Destination`] impl every destination type uses: it holds the
/// type's name, its keys, its typed validate fn and its typed build fn, and
/// does the shared part (boxing the settings into [`DestinationSettings`],
/// reading them back, wrapping the manager in an `Arc`), so a destination
/// crate declares only what is its own.
pub struct TypedDestination<S, M> {
    name: &'static str,
    keys: &'static [ConfigKey],
    validate: fn(&serde_json::Value) -> Result<S, ConfigProblems>,
    build: fn(&DestinationContext, S) -> Result<M, ConfigProblems>,
}

impl<S, M> TypedDestination<S, M> {
    /// A destination type called `name` with config `keys`, validating with
    /// `validate` (every problem, no I/O) and building with `build` (no I/O).
    /// `accepted` are the key names `validate` accepts; they must be the
    /// names of `keys`, checked when the constant is compiled so the docs
    /// table (pinned to `keys`) and the parser cannot drift.
    pub const fn new(
        name: &'static str,
        keys: &'static [ConfigKey],
        accepted: &[&str],
        validate: fn(&serde_json::Value) -> Result<S, ConfigProblems>,
        build: fn(&DestinationContext, S) -> Result<M, ConfigProblems>,
    ) -> Self {
        assert!(
            keys_agree(keys, accepted),
            "a destination's declared config keys differ from the keys its validate fn accepts"
        );
        TypedDestination {
            name,
            keys,
            validate,
            build,
        }
    }
}

impl<S, M> TypedDestination<S, M>
where
    S: Any + Clone + Send + Sync,
    M: AsyncDestinationManager,
{
    /// Validates `config` (every problem at once) and builds the manager in
    /// one call, for tests, benchmarks and tools that hold a raw config
    /// table rather than settings the registry validated; no network I/O.
    pub fn validate_and_build(
        &self,
        ctx: &DestinationContext,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        let settings = Destination::validate(self, config)?;
        Destination::build(self, &settings, ctx)
    }
}

impl<S, M> Destination for TypedDestination<S, M>
where
    S: Any + Clone + Send + Sync,
    M: AsyncDestinationManager,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn config_keys(&self) -> &'static [ConfigKey] {
        self.keys
    }

    fn validate(&self, config: &serde_json::Value) -> Result<DestinationSettings, ConfigProblems> {
        Ok(DestinationSettings::new(
            self.name,
            (self.validate)(config)?,
        ))
    }

    fn build(
        &self,
        settings: &DestinationSettings,
        ctx: &DestinationContext,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        let settings = settings.get::<S>()?.clone();
        Ok(Arc::new((self.build)(ctx, settings)?))
    }
}

/// Whether `declared` (a destination's `KEYS`) and `accepted` (the names its
/// parser accepts) name the same keys; `const` so [`TypedDestination::new`]
/// checks it at compile time.
pub const fn keys_agree(declared: &[ConfigKey], accepted: &[&str]) -> bool {
    let mut i = 0;
    while i < declared.len() {
        if !contains(accepted, declared[i].name) {
            return false;
        }
        i += 1;
    }
    let mut j = 0;
    while j < accepted.len() {
        let mut found = false;
        let mut i = 0;
        while i < declared.len() {
            found |= same_str(declared[i].name, accepted[j]);
            i += 1;
        }
        if !found {
            return false;
        }
        j += 1;
    }
    true
}

/// Whether `list` holds `name` (usable in `const` evaluation).
const fn contains(list: &[&str], name: &str) -> bool {
    let mut i = 0;
    while i < list.len() {
        if same_str(list[i], name) {
            return true;
        }
        i += 1;
    }
    false
}

/// String equality usable in `const` evaluation.
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Why a registry could not validate or build a destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The type name is not one the registry lists.
    #[error("unknown destination type `{kind}` (known types: {known})")]
    UnknownType {
        /// What the config said.
        kind: String,
        /// Every known type, comma-separated.
        known: String,
    },
    /// The destination rejected its config.
    #[error("{0}")]
    Config(#[from] ConfigProblems),
}

/// The destination types a build supports, in one static list.
#[derive(Clone, Copy)]
pub struct Registry {
    types: &'static [&'static dyn Destination],
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    /// A registry of these types (names must be unique).
    pub const fn new(types: &'static [&'static dyn Destination]) -> Self {
        Registry { types }
    }

    /// Every registered type, in registration order.
    pub fn types(&self) -> &'static [&'static dyn Destination] {
        self.types
    }

    /// Every type name, in registration order.
    pub fn names(&self) -> Vec<&'static str> {
        self.types.iter().map(|t| t.name()).collect()
    }

    /// The type called `kind`.
    pub fn find(&self, kind: &str) -> Option<&'static dyn Destination> {
        self.types.iter().copied().find(|t| t.name() == kind)
    }

    /// The type called `kind`, or an error naming the known ones.
    pub fn get(&self, kind: &str) -> Result<&'static dyn Destination, RegistryError> {
        self.find(kind).ok_or_else(|| RegistryError::UnknownType {
            kind: kind.to_string(),
            known: self.names().join(", "),
        })
    }

    /// Validates `config` and builds the manager of `ctx.destination_type`
    /// in one step (tests and benchmarks; the daemon keeps the two apart).
    pub fn build(
        &self,
        ctx: &DestinationContext,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, RegistryError> {
        let destination = self.get(&ctx.destination_type)?;
        let settings = destination.validate(config)?;
        Ok(destination.build(&settings, ctx)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[ConfigKey] = &[
        ConfigKey {
            name: "url",
            default: "required",
            doc: "Where.",
        },
        ConfigKey {
            name: "timeout",
            default: "30s",
            doc: "How long.",
        },
    ];

    #[test]
    fn keys_agree_in_any_order_and_only_when_the_names_match() {
        assert!(keys_agree(KEYS, &["timeout", "url"]));
        assert!(!keys_agree(KEYS, &["url"]), "an undeclared accepted key");
        assert!(!keys_agree(KEYS, &["url", "timeout", "mode"]));
        assert!(!keys_agree(KEYS, &["url", "timeouts"]), "a near miss");
        assert!(!keys_agree(KEYS, &["url", "timeou"]), "a prefix");
        assert!(keys_agree(&[], &[]));
    }

    fn parse(_: &serde_json::Value) -> Result<u8, ConfigProblems> {
        Ok(1)
    }

    fn build(
        _: &DestinationContext,
        _: u8,
    ) -> Result<crate::SimpleAsyncDestinationManager<NoUploader>, ConfigProblems> {
        Err(ConfigProblems::one("not built in this test"))
    }

    /// Stands for an uploader; never built.
    struct NoUploader;

    #[async_trait::async_trait]
    impl crate::Uploader for NoUploader {
        fn transform(&self, _: &crate::Job) -> Result<String, crate::TransformError> {
            Ok(String::new())
        }

        async fn upload(&self, batch: &crate::StagedBatch) -> crate::UploadOutput {
            crate::UploadOutput::all_succeeded(&batch.job_ids)
        }
    }

    #[test]
    fn typed_destinations_wrap_their_settings_under_their_name() {
        let t = TypedDestination::new("T", KEYS, &["url", "timeout"], parse, build);
        let settings = t.validate(&serde_json::json!({})).unwrap();
        assert_eq!(settings.kind(), "T");
        assert_eq!(settings.get::<u8>(), Ok(&1));
        assert!(settings.get::<u16>().is_err());
        assert_eq!(t.config_keys(), KEYS);
    }

    #[test]
    fn validate_and_build_reports_the_validate_problems_before_building() {
        fn refuse(_: &serde_json::Value) -> Result<u8, ConfigProblems> {
            Err(ConfigProblems(vec!["a".into(), "b".into()]))
        }
        let ctx = DestinationContext {
            id: "t1".into(),
            destination_type: "T".into(),
            telemetry: Arc::new(crate::NoopTelemetry),
        };
        let refused = TypedDestination::new("T", KEYS, &["url", "timeout"], refuse, build);
        let err = refused
            .validate_and_build(&ctx, &serde_json::json!({}))
            .err()
            .unwrap();
        assert_eq!(err.0, vec!["a".to_string(), "b".to_string()]);
        let valid = TypedDestination::new("T", KEYS, &["url", "timeout"], parse, build);
        let err = valid
            .validate_and_build(&ctx, &serde_json::json!({}))
            .err()
            .unwrap();
        assert_eq!(err, ConfigProblems::one("not built in this test"));
    }

    #[test]
    #[should_panic(expected = "declared config keys differ")]
    fn a_key_list_that_disagrees_with_the_parser_is_refused() {
        let _ = TypedDestination::new("T", KEYS, &["url"], parse, build);
    }
}
