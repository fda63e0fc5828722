//! The `[server]` section: the HTTP API's address, token, body limit,
//! timeouts and connection cap. Split from `lib.rs` so each config section
//! reads on its own; `lib.rs` keeps the loading and the other sections.

use std::net::SocketAddr;

use batchrouter_core::lookup::parse_bytes;
use batchrouter_core::Secret;
use serde_json::{Map, Value};

use crate::{check_keys, scalar, string_field, table};

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

/// The keys `[server]` accepts.
pub(crate) const SERVER_KEYS: &[&str] = &[
    "listen",
    "authToken",
    "maxBodyBytes",
    "headerReadTimeout",
    "bodyReadTimeout",
    "idleTimeout",
    "maxConnections",
];

/// Reads and checks `[server]` from the config's top-level table, adding
/// every problem to `problems` (defaults stand in for bad values).
pub(crate) fn parse(root: &Map<String, Value>, problems: &mut Vec<String>) -> ServerConfig {
    let empty = Map::new();
    let server_t = table(root, "server", problems).unwrap_or(&empty);
    check_keys("[server]", server_t, SERVER_KEYS, problems);
    let listen = string_field(server_t, "server", "listen", problems)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen = listen.parse::<SocketAddr>().unwrap_or_else(|e| {
        problems.push(format!(
            "server.listen `{listen}` is not an address like 127.0.0.1:8080: {e}"
        ));
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let auth_token = string_field(server_t, "server", "authToken", problems)
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
    let header_read_timeout = server_duration("headerReadTimeout", 10, problems);
    let body_read_timeout = server_duration("bodyReadTimeout", 30, problems);
    let idle_timeout = server_duration("idleTimeout", 60, problems);
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
    ServerConfig {
        listen,
        auth_token,
        max_body_bytes,
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
        max_connections,
    }
}
