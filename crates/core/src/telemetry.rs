//! The narrow window through which destinations report their own metrics;
//! the router implements it with labels already bound, so destination crates
//! never depend on the metrics registry.

/// Destination-level counters (`destination_requests_total`, unmatched results).
pub trait DestinationTelemetry: Send + Sync {
    /// One request to the destination finished with `status`: an HTTP code
    /// for HTTP APIs; `ok`, `rejected` (auth or host key refused), `timeout`
    /// or `error` for other protocols.
    fn request(&self, status: &str);

    /// Result rows from the destination that matched no job.
    fn unmatched_results(&self, count: u64);
}

/// Telemetry that records nothing, for tests and tools.
pub struct NoopTelemetry;

impl DestinationTelemetry for NoopTelemetry {
    fn request(&self, _status: &str) {}
    fn unmatched_results(&self, _count: u64) {}
}
