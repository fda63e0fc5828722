//! `KLAVIYO_BULK_UPLOAD` as the registry sees it: its config keys (the table in
//! `docs/destinations/KLAVIYO_BULK_UPLOAD.md`), its validation without I/O and
//! the build of its manager from validated settings, joined by the shared
//! `TypedDestination` adapter.

// The destination constant keeps the name of the unit struct it replaced,
// so `lib.rs` and the registry line read as before.
#![allow(non_upper_case_globals)]

use batchrouter_core::registry::{ConfigKey, TypedDestination};

use crate::{KlaviyoConfig, KlaviyoManager, CONFIG_KEYS, DESTINATION_TYPE};

/// Every key of the `config` table, in the order the docs list them.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "privateApiKey",
        default: "required, secret",
        doc: "Klaviyo private API key (`pk_…`), sent as `Authorization: Klaviyo-API-Key …`.",
    },
    ConfigKey {
        name: "listId",
        default: "none",
        doc: "List to add every imported profile to (`relationships.lists`).",
    },
    ConfigKey {
        name: "baseUrl",
        default: "https://a.klaviyo.com",
        doc: "API root; point it at the stand-in for tests and the demo.",
    },
    ConfigKey {
        name: "revision",
        default: "2025-01-15",
        doc: "The `revision` header (`YYYY-MM-DD` or `YYYY-MM-DD.suffix`).",
    },
    ConfigKey {
        name: "maxProfileBytes",
        default: "100000 (Klaviyo's 100 KB)",
        doc: "Largest profile, measured as the compact JSON actually sent.",
    },
    ConfigKey {
        name: "maxProfilesPerRequest",
        default: "10000",
        doc: "Profiles per import request, 1–10,000 (Klaviyo's limit).",
    },
    ConfigKey {
        name: "maxRequestBytes",
        default: "4500000",
        doc: "Largest request body, 4 KB–5 MB: Klaviyo refuses bodies over 5 MB, the default keeps a 10 % margin.",
    },
    ConfigKey {
        name: "rateLimitPerSecond",
        default: "10",
        doc: "Requests in any one-second window (Klaviyo's burst limit).",
    },
    ConfigKey {
        name: "rateLimitPerMinute",
        default: "150",
        doc: "Requests in any one-minute window (Klaviyo's steady limit).",
    },
    ConfigKey {
        name: "connectTimeout",
        default: "10s",
        doc: "TCP/TLS connect timeout of every request (`250ms`, `10s`, or seconds as a number), at most `1h`.",
    },
    ConfigKey {
        name: "requestTimeout",
        default: "60s",
        doc: "Whole-request timeout of every request (body upload and answer), at most `1h`.",
    },
    ConfigKey {
        name: "uploadTimeBudget",
        default: "8m",
        doc: "No request of one upload (or of one read of import errors) starts later than this after the call began; see *Upload time budget*.",
    },
];

/// The `KLAVIYO_BULK_UPLOAD` destination type, listed once in `batchrouter-destinations`.
pub const KlaviyoDestination: TypedDestination<KlaviyoConfig, KlaviyoManager> =
    TypedDestination::new(
        DESTINATION_TYPE,
        KEYS,
        CONFIG_KEYS,
        KlaviyoConfig::from_value,
        KlaviyoManager::from_settings,
    );
