//! Every metric batchrouter exports, declared once. Names carry the
//! `batchrouter_` prefix; per-destination metrics carry `destination_type`
//! and `destination_id` labels.

use std::sync::Arc;

use batchrouter_core::DestinationTelemetry;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

const DEST: &[&str] = &["destination_type", "destination_id"];

/// The metric families, registered on one registry.
pub struct Metrics {
    registry: Registry,
    /// Jobs accepted into the store.
    pub jobs_received: IntCounterVec,
    /// Jobs reaching a terminal state, by state.
    pub jobs_total: IntCounterVec,
    /// Jobs currently in each state (refreshed from the store).
    pub jobs_in_state: IntGaugeVec,
    /// Uploads by result.
    pub uploads_total: IntCounterVec,
    /// Upload call durations.
    pub upload_duration: HistogramVec,
    /// Staged bytes handed to uploads.
    pub upload_bytes: IntCounterVec,
    /// Jobs written to staging files.
    pub staged_jobs: IntCounterVec,
    /// Polls by result.
    pub polls_total: IntCounterVec,
    /// Imports pending or processing (refreshed from the store).
    pub imports_in_progress: IntGaugeVec,
    /// Time from job creation to its terminal state.
    pub job_latency: HistogramVec,
    /// Store call durations by operation.
    pub store_op_duration: HistogramVec,
    /// Requests to destinations by status.
    pub destination_requests: IntCounterVec,
    /// Jobs scheduled for another attempt.
    pub retries_total: IntCounterVec,
    /// Failed and aborted jobs by error code.
    pub job_errors: IntCounterVec,
    /// Per-record results from a destination that matched no job.
    pub unmatched_results: IntCounterVec,
    /// Writes refused because the job or import was no longer held by us.
    pub fenced_writes_rejected: IntCounterVec,
}

#[allow(
    clippy::expect_used,
    reason = "metric names, labels and the prefix are constants and each family is registered once; every test builds `Metrics::new`"
)]
fn counter(r: &Registry, name: &str, help: &str, extra: &[&str]) -> IntCounterVec {
    let labels: Vec<&str> = DEST.iter().chain(extra).copied().collect();
    let c = IntCounterVec::new(Opts::new(name, help), &labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

#[allow(
    clippy::expect_used,
    reason = "metric names, labels and the prefix are constants and each family is registered once; every test builds `Metrics::new`"
)]
fn gauge(r: &Registry, name: &str, help: &str, extra: &[&str]) -> IntGaugeVec {
    let labels: Vec<&str> = DEST.iter().chain(extra).copied().collect();
    let g = IntGaugeVec::new(Opts::new(name, help), &labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

#[allow(
    clippy::expect_used,
    reason = "metric names, labels and the prefix are constants and each family is registered once; every test builds `Metrics::new`"
)]
fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    /// Creates and registers every family on a fresh registry.
    #[allow(
        clippy::expect_used,
        reason = "metric names, labels and the prefix are constants and each family is registered once; every test builds `Metrics::new`"
    )]
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new_custom(Some("batchrouter".into()), None).expect("valid prefix");
        Arc::new(Metrics {
            jobs_received: counter(
                &r,
                "jobs_received_total",
                "Jobs accepted into the store.",
                &[],
            ),
            jobs_total: counter(
                &r,
                "jobs_total",
                "Jobs that reached a terminal state.",
                &["state"],
            ),
            jobs_in_state: gauge(
                &r,
                "jobs_in_state",
                "Jobs currently in each state.",
                &["state"],
            ),
            uploads_total: counter(&r, "uploads_total", "Uploads by result.", &["result"]),
            upload_duration: histogram(
                &r,
                "upload_duration_seconds",
                "Duration of upload calls.",
                DEST,
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0,
                ],
            ),
            upload_bytes: counter(
                &r,
                "upload_bytes_total",
                "Staged bytes handed to uploads.",
                &[],
            ),
            staged_jobs: counter(
                &r,
                "staged_jobs_total",
                "Jobs written to staging files.",
                &[],
            ),
            polls_total: counter(
                &r,
                "polls_total",
                "Polls of imports in flight by result.",
                &["result"],
            ),
            imports_in_progress: gauge(
                &r,
                "imports_in_progress",
                "Imports pending or processing.",
                &[],
            ),
            job_latency: histogram(
                &r,
                "job_latency_seconds",
                "Time from job creation to its terminal state.",
                DEST,
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    10800.0, 86400.0,
                ],
            ),
            store_op_duration: histogram(
                &r,
                "store_op_duration_seconds",
                "Duration of job store operations.",
                &["op"],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            destination_requests: counter(
                &r,
                "destination_requests_total",
                "Requests to destinations by status.",
                &["status"],
            ),
            retries_total: counter(
                &r,
                "retries_total",
                "Jobs scheduled for another attempt.",
                &[],
            ),
            job_errors: counter(
                &r,
                "job_errors_total",
                "Failed and aborted job transitions by error code.",
                &["code"],
            ),
            unmatched_results: counter(
                &r,
                "unmatched_results_total",
                "Per-record results from a destination that matched no job.",
                &[],
            ),
            fenced_writes_rejected: counter(
                &r,
                "fenced_writes_rejected_total",
                "Job or import writes refused because another owner holds them now.",
                &[],
            ),
            registry: r,
        })
    }

    /// The registry, for `/metrics` and for registering more collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "Could not encode metrics.");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Telemetry handle for a destination's manager, labels bound.
    pub fn telemetry(
        self: &Arc<Self>,
        destination_type: &str,
        destination_id: &str,
    ) -> Arc<dyn DestinationTelemetry> {
        Arc::new(BoundTelemetry {
            metrics: self.clone(),
            labels: [destination_type.to_string(), destination_id.to_string()],
        })
    }
}

struct BoundTelemetry {
    metrics: Arc<Metrics>,
    labels: [String; 2],
}

impl DestinationTelemetry for BoundTelemetry {
    fn request(&self, status: &str) {
        self.metrics
            .destination_requests
            .with_label_values(&[self.labels[0].as_str(), self.labels[1].as_str(), status])
            .inc();
    }
}
