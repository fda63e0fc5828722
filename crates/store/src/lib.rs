//! Job stores for batchrouter.
//!
//! [`SqliteStore`] is the embedded default: one file, one daemon.
//! [`PostgresStore`] lets several daemons share the work. Both implement
//! [`batchrouter_core::JobStore`] and pass the same conformance suite.

mod common;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use batchrouter_core::{JobStore, StoreError};

pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Which backend a `store.url` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH` (relative or absolute path).
    Sqlite(std::path::PathBuf),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl StoreUrl {
    /// Parses a store URL; the error says which forms are accepted.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(StoreError::Invalid(
                    "sqlite URL has no path (use sqlite://PATH)".into(),
                ));
            }
            return Ok(StoreUrl::Sqlite(path.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        Err(StoreError::Invalid(format!(
            "unsupported store URL `{}` (use sqlite://PATH or postgres://USER@HOST/DB)",
            redact_url(url)
        )))
    }
}

/// Opens the store a URL names, running migrations.
pub async fn open(url: &str) -> Result<Arc<dyn JobStore>, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => Ok(Arc::new(SqliteStore::open(path).await?)),
        StoreUrl::Postgres(url) => Ok(Arc::new(PostgresStore::open(&url).await?)),
    }
}

/// The URL with any password (and query) masked, for logs and errors.
pub fn redact_url(url: &str) -> String {
    batchrouter_core::secret::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            StoreUrl::parse("sqlite://./data/x.db").unwrap(),
            StoreUrl::Sqlite("./data/x.db".into())
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///var/lib/b.db").unwrap(),
            StoreUrl::Sqlite("/var/lib/b.db".into())
        );
        assert!(matches!(
            StoreUrl::parse("postgres://u@h/db").unwrap(),
            StoreUrl::Postgres(_)
        ));
        let err = StoreUrl::parse("mysql://u:pw@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("u:***@h/db") && !err.contains("pw"), "{err}");
        assert!(StoreUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
