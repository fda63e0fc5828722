//! `HTTP` as the registry sees it: its config keys (the table in
//! `docs/destinations/HTTP.md`), its validation without I/O and
//! the build of its manager from validated settings, joined by the shared
//! `TypedDestination` adapter.

// The destination constant keeps the name of the unit struct it replaced,
// so `lib.rs` and the registry line read as before.
#![allow(non_upper_case_globals)]

use batchrouter_core::registry::{ConfigKey, TypedDestination};
use batchrouter_core::{ConfigProblems, DestinationContext, SimpleAsyncDestinationManager};

use crate::upload::Client;
use crate::{HttpConfig, HttpUploader, CONFIG_KEYS, DESTINATION_TYPE};

/// Every key of the `config` table, in the order the docs list them.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "url",
        default: "required",
        doc: "`http://` or `https://` endpoint.",
    },
    ConfigKey {
        name: "method",
        default: "POST",
        doc: "`POST` or `PUT`.",
    },
    ConfigKey {
        name: "headers",
        default: "{}",
        doc: "Extra headers; values may use `${ENV}` and are treated as secrets (never printed or logged).",
    },
    ConfigKey {
        name: "mode",
        default: "batch",
        doc: "`batch`: a JSON array of up to `maxBatchSize` records per request, requests sent one after another; `single`: one request per record, up to `maxInFlight` at once.",
    },
    ConfigKey {
        name: "maxBatchSize",
        default: "500",
        doc: "Records per request in batch mode.",
    },
    ConfigKey {
        name: "maxInFlight",
        default: "32",
        doc: "Concurrent requests in single mode.",
    },
    ConfigKey {
        name: "timeout",
        default: "30s",
        doc: "Whole-request timeout.",
    },
    ConfigKey {
        name: "connectTimeout",
        default: "5s",
        doc: "TCP/TLS connect timeout.",
    },
];

/// The `HTTP` destination type, listed once in `batchrouter-destinations`.
pub const HttpDestination: TypedDestination<
    HttpConfig,
    SimpleAsyncDestinationManager<HttpUploader>,
> = TypedDestination::new(
    DESTINATION_TYPE,
    KEYS,
    CONFIG_KEYS,
    crate::config::validate,
    build,
);

/// The manager: an HTTP client (no connection yet) behind the uploader.
fn build(
    ctx: &DestinationContext,
    cfg: HttpConfig,
) -> Result<SimpleAsyncDestinationManager<HttpUploader>, ConfigProblems> {
    let client = Client::new(cfg, ctx.telemetry.clone()).map_err(ConfigProblems::one)?;
    Ok(SimpleAsyncDestinationManager::new(HttpUploader {
        destination_id: ctx.id.clone(),
        client,
    }))
}
