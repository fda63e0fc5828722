//! SFTP file drops (`SFTP`): every batch becomes one file on an SSH server.
//!
//! A fire-and-forget destination: [`SftpUploader`] implements
//! [`batchrouter_core::Uploader`] and [`SftpDestination`] wraps it in
//! [`batchrouter_core::SimpleAsyncDestinationManager`], so delivery is final
//! when `upload` returns.
//!
//! What it guarantees, and how:
//! - **Host keys are verified** (`knownHosts` or `hostKeyFingerprint`);
//!   skipping needs `insecureSkipHostKeyCheck = true` and logs a warning.
//! - **Atomic, idempotent files**: the content goes to `<name>.part`, its
//!   remote size is checked, then it is renamed over `<name>` with
//!   `posix-rename@openssh.com`. The name derives from the batch id, so a
//!   retried batch replaces its own earlier attempt instead of adding a file;
//!   a `.part` that a broken upload left under another name is removed after
//!   the next successful connect (remembered in memory only).
//! - **Classified failures**: transport problems and full disks fail the
//!   batch (retried with backoff); authentication failures, host-key
//!   mismatches and permission problems abort it at once with
//!   `destination_rejected`; a bad record aborts only its own job.
//! - **One session per destination**, opened lazily on the first upload
//!   (never at build time), reused while it works, dropped after any error.
//! - **Flat memory and no blocking on the runtime**: every libssh2 call and
//!   every file read runs on a blocking thread; the file is rendered from the
//!   staged batch straight into the remote file in large chunks.
//!
//! Module map: [`config`] (keys and validation), [`path`] (file name
//! templates), [`transform`] (job → staged line), [`render`] (CSV/JSON file
//! content), [`pipeline`] (keeps the SFTP write pipe full), [`hostkey`]
//! (host-key checks), `key` (private-key reading and checks), `client` (SSH session, bounded name lookup),
//! `remote` (mkdir -p, unlink, write errors), `rename` (posix-rename), `strays` (`.part` files of failed uploads),
//! [`upload`] (the uploader), [`error`] (failure classes).

#![warn(missing_docs)]

mod client;
pub mod config;
pub mod destination;
pub mod error;
pub mod hostkey;
mod key;
pub mod path;
pub mod pipeline;
mod remote;
mod rename;
pub mod render;
mod strays;
pub mod transform;
pub mod upload;

pub use config::{Auth, FileFormat, HostKeyPolicy, KeySource, Settings};
pub use destination::SftpDestination;
pub use error::SftpError;
pub use upload::SftpUploader;

/// The destination type name users write and the registry lists.
pub const DESTINATION_TYPE: &str = "SFTP";

/// Every key accepted under `[destinations.config]`, for did-you-mean hints.
pub const CONFIG_KEYS: &[&str] = config::CONFIG_KEYS;
