//! Wires a loaded config into a running daemon: store, metrics, managers,
//! router and the HTTP API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use batchrouter_config::LoadedConfig;
use batchrouter_core::{DestinationContext, JobStore};
use batchrouter_router::{Metrics, Router, RouterBuilder, RouterOptions, ShutdownReport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState, DestinationInfo};
use crate::readiness::Readiness;
use crate::server::{self, ServerLimits};

/// A running daemon.
pub struct App {
    addr: SocketAddr,
    router: Router,
    store: Arc<dyn JobStore>,
    metrics: Arc<Metrics>,
    server: JoinHandle<()>,
    stop_server: oneshot::Sender<()>,
}

/// Opens the store, builds every enabled destination, recovers, starts the
/// router and binds the API.
pub async fn start(cfg: &LoadedConfig) -> anyhow::Result<App> {
    let store = batchrouter_store::open(cfg.store.url.expose())
        .await
        .with_context(|| format!("cannot open the job store {}", cfg.store.redacted_url()))?;
    let metrics = Metrics::new();
    let options = RouterOptions {
        staging_dir: cfg.store.staging_dir.clone(),
        finished_job_retention: cfg.global.finished_job_retention,
        job_retention: cfg.global.job_retention,
        owner: lease_owner()?,
        ..RouterOptions::new()
    };
    batchrouter_router::settings::warn_ignored(&cfg.ignored);
    let mut builder = RouterBuilder::new(store, metrics.clone(), options);
    let mut infos = BTreeMap::new();
    for d in &cfg.destinations {
        infos.insert(
            d.id.clone(),
            DestinationInfo {
                kind: d.kind.clone(),
                enabled: d.enabled,
            },
        );
        if !d.enabled {
            tracing::info!(destination_id = %d.id, "Destination disabled; its jobs wait.");
            continue;
        }
        let ctx = DestinationContext {
            id: d.id.clone(),
            destination_type: d.kind.clone(),
            telemetry: metrics.telemetry(&d.kind, &d.id),
        };
        // The one place a manager is built (loading the config only
        // validated). The error may quote a configured URL: mask its secrets.
        let manager = d.destination.build(&d.validated, &ctx).map_err(|e| {
            anyhow::anyhow!(
                "destination `{}`: {}",
                d.id,
                batchrouter_core::secret::redact_urls_in(&e.to_string())
            )
        })?;
        builder = builder.destination(d.id.clone(), d.kind.clone(), manager, d.settings.clone());
    }
    let router = builder.start().await.context("cannot start the router")?;
    let state = ApiState {
        store: router.store(),
        metrics: metrics.clone(),
        router: router.handle(),
        destinations: Arc::new(infos),
        auth_token: cfg.server.auth_token.clone(),
        max_body_bytes: usize::try_from(cfg.server.max_body_bytes).unwrap_or(usize::MAX),
        body_read_timeout: cfg.server.body_read_timeout,
        readiness: Readiness::new(router.store(), cfg.store.staging_dir.clone()),
    };
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    let (stop_server, stopped) = oneshot::channel::<()>();
    let app = api::routes(state);
    let limits = ServerLimits {
        header_read_timeout: cfg.server.header_read_timeout,
        idle_timeout: cfg.server.idle_timeout,
        max_connections: cfg.server.max_connections,
    };
    let server = tokio::spawn(server::serve(listener, app, limits, stopped));
    tracing::info!(
        %addr,
        store = %cfg.store.redacted_url(),
        destinations = cfg.destinations.len(),
        auth = cfg.server.auth_token.is_some(),
        "batchrouterd started."
    );
    let store = router.store();
    Ok(App {
        addr,
        router,
        store,
        metrics,
        server,
        stop_server,
    })
}

/// Environment variable naming this daemon's stable identity.
pub const INSTANCE_ID_ENV: &str = "BATCHROUTER_INSTANCE_ID";

/// The lease owner: `instance:<BATCHROUTER_INSTANCE_ID>:<nonce>` when the
/// id is set (the id is stable across restarts, so a restarted daemon takes
/// back its earlier runs' leases at once and fences a still-running earlier
/// run out; it must be unique among running daemons), else unique per process.
fn lease_owner() -> anyhow::Result<String> {
    match std::env::var(INSTANCE_ID_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(batchrouter_router::default_owner()),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{INSTANCE_ID_ENV} is not valid UTF-8")
        }
        Ok(id) => {
            let id = id.trim();
            if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
                anyhow::bail!(
                    "{INSTANCE_ID_ENV} must be 1 to 128 printable characters (e.g. the pod name), got {id:?}"
                );
            }
            Ok(batchrouter_router::instance_owner(id))
        }
    }
}

impl App {
    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store as the router uses it.
    pub fn store(&self) -> Arc<dyn JobStore> {
        self.store.clone()
    }

    /// Metric families.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Graceful stop: the API first (in-flight requests finish), then the
    /// router (stop claiming, release, let uploads finish).
    pub async fn shutdown(self) -> ShutdownReport {
        tracing::info!("Shutting down: no new requests, no new claims.");
        let _ = self.stop_server.send(());
        if tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .is_err()
        {
            tracing::warn!("HTTP server did not stop within 5s.");
        }
        self.router.shutdown().await
    }
}
