//! `MARKETO_BULK_UPLOAD` as the registry sees it: its config keys (the table in
//! `docs/destinations/MARKETO_BULK_UPLOAD.md`), its validation without I/O and
//! the build of its manager from validated settings, joined by the shared
//! `TypedDestination` adapter.

// The destination constant keeps the name of the unit struct it replaced,
// so `lib.rs` and the registry line read as before.
#![allow(non_upper_case_globals)]

use batchrouter_core::registry::{ConfigKey, TypedDestination};

use crate::{MarketoManager, Settings, CONFIG_KEYS, DESTINATION_TYPE};

/// Every key of the `config` table, in the order the docs list them.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "munchkinId",
        default: "required",
        doc: "Marketo instance id (`123-ABC-456`).",
    },
    ConfigKey {
        name: "clientId",
        default: "required",
        doc: "Client id of the Marketo LaunchPoint API user.",
    },
    ConfigKey {
        name: "clientSecret",
        default: "required, secret",
        doc: "Its client secret.",
    },
    ConfigKey {
        name: "deDuplicationField",
        default: "email",
        doc: "Marketo `lookupField` (field API name).",
    },
    ConfigKey {
        name: "columnFieldsMapping",
        default: "[]",
        doc: "List of `{from, to}`: payload key → Marketo field API name.",
    },
    ConfigKey {
        name: "passUnmappedFields",
        default: "false",
        doc: "When `true`, payload keys that are not mapped become columns under their own names.",
    },
    ConfigKey {
        name: "listId",
        default: "none",
        doc: "Static list id (number) to add imported leads to.",
    },
    ConfigKey {
        name: "partitionName",
        default: "none",
        doc: "Lead partition to import into.",
    },
    ConfigKey {
        name: "baseUrl",
        default: "https://<munchkinId>.mktorest.com",
        doc: "Instance root (not `…/rest`).",
    },
    ConfigKey {
        name: "connectTimeout",
        default: "10s",
        doc: "TCP/TLS connect timeout of every request (`250ms`, `10s`, or seconds as a number).",
    },
    ConfigKey {
        name: "requestTimeout",
        default: "120s",
        doc: "Whole-request timeout of every request, at most `1h`.",
    },
    ConfigKey {
        name: "maxFileSize",
        default: "9500000",
        doc: "Largest CSV file per import (`9MB`, `9500000`); at least 1000 bytes and below Marketo's 10,000,000.",
    },
    ConfigKey {
        name: "uploadTimeBudget",
        default: "8m",
        doc: "Longest time one upload (all its files) may take; files whose turn comes later are not sent and wait for a later upload.",
    },
];

/// The `MARKETO_BULK_UPLOAD` destination type, listed once in `batchrouter-destinations`.
pub const MarketoDestination: TypedDestination<Settings, MarketoManager> = TypedDestination::new(
    DESTINATION_TYPE,
    KEYS,
    CONFIG_KEYS,
    Settings::from_config,
    MarketoManager::new,
);
