//! `SFTP` as the registry sees it: its config keys (the table in
//! `docs/destinations/SFTP.md`), its validation without I/O and
//! the build of its manager from validated settings, joined by the shared
//! `TypedDestination` adapter.

// The destination constant keeps the name of the unit struct it replaced,
// so `lib.rs` and the registry line read as before.
#![allow(non_upper_case_globals)]

use batchrouter_core::registry::{ConfigKey, TypedDestination};
use batchrouter_core::{ConfigProblems, DestinationContext, SimpleAsyncDestinationManager};

use crate::{Settings, SftpUploader, CONFIG_KEYS, DESTINATION_TYPE};

/// Every key of the `config` table, in the order the docs list them.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "host",
        default: "required",
        doc: "Server name or IP address (no `sftp://`, no port).",
    },
    ConfigKey {
        name: "port",
        default: "22",
        doc: "Server port (a number, or a string such as `\"2222\"`).",
    },
    ConfigKey {
        name: "username",
        default: "required",
        doc: "Login name.",
    },
    ConfigKey {
        name: "authMethod",
        default: "required",
        doc: "`keyAuth` or `passwordAuth`.",
    },
    ConfigKey {
        name: "privateKey",
        default: "one of the two for keyAuth, secret",
        doc: "Private key text (OpenSSH `-----BEGIN OPENSSH PRIVATE KEY-----` or PEM).",
    },
    ConfigKey {
        name: "privateKeyPath",
        default: "",
        doc: "Path of a private key file, read at every connect (rotation needs no restart).",
    },
    ConfigKey {
        name: "privateKeyPassphrase",
        default: "none, secret",
        doc: "Passphrase of an encrypted key.",
    },
    ConfigKey {
        name: "password",
        default: "required for passwordAuth, secret",
        doc: "Password.",
    },
    ConfigKey {
        name: "fileFormat",
        default: "required",
        doc: "`csv`, `json` (NDJSON: one record a line) or `jsonArray`.",
    },
    ConfigKey {
        name: "filePath",
        default: "required",
        doc: "Remote path template, see *Paths*.",
    },
    ConfigKey {
        name: "columnOrder",
        default: "[]",
        doc: "CSV columns that come first, in this order (present even when no record has them).",
    },
    ConfigKey {
        name: "sortColumnNames",
        default: "false",
        doc: "Sort the other CSV columns by name instead of first-seen order.",
    },
    ConfigKey {
        name: "knownHosts",
        default: "one of the three",
        doc: "Path of an OpenSSH `known_hosts` file holding the server's key (hashed names work).",
    },
    ConfigKey {
        name: "hostKeyFingerprint",
        default: "",
        doc: "The server key's fingerprint exactly as `ssh-keygen -lf <key.pub>` prints it: `SHA256:…`.",
    },
    ConfigKey {
        name: "insecureSkipHostKeyCheck",
        default: "false",
        doc: "`true` skips host-key verification (a warning is logged at start).",
    },
    ConfigKey {
        name: "connectTimeout",
        default: "10s",
        doc: "Bound on the host-name lookup and the TCP connect together (`500ms`, `10s`, or seconds as a number; 100ms–1h).",
    },
    ConfigKey {
        name: "ioTimeout",
        default: "30s",
        doc: "Bound on every single SSH exchange: the handshake, each authentication step, each SFTP request and each write acknowledgement (100ms–1h).",
    },
];

/// The `SFTP` destination type, listed once in `batchrouter-destinations`.
pub const SftpDestination: TypedDestination<Settings, SimpleAsyncDestinationManager<SftpUploader>> =
    TypedDestination::new(
        DESTINATION_TYPE,
        KEYS,
        CONFIG_KEYS,
        Settings::from_config,
        build,
    );

/// The manager: the uploader, which connects on first use.
fn build(
    ctx: &DestinationContext,
    settings: Settings,
) -> Result<SimpleAsyncDestinationManager<SftpUploader>, ConfigProblems> {
    Ok(SimpleAsyncDestinationManager::new(SftpUploader::new(
        ctx, settings,
    )))
}
