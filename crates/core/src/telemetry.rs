//! The narrow window through which destinations report their own metrics;
//! the router implements it with labels already bound, so destination crates
//! never depend on the metrics registry. (Unmatched per-record results are
//! reported through `UploadStats::unmatched`; the router counts them.)

/// Destination-level counters (`destination_requests_total`).
pub trait DestinationTelemetry: Send + Sync {
    /// One request to the destination finished with `status`: an HTTP code
    /// for HTTP APIs; `ok`, `rejected` (auth or host key refused), `timeout`
    /// or `error` for other protocols.
    fn request(&self, status: &str);
}

/// Telemetry that records nothing, for tests and tools.
pub struct NoopTelemetry;

impl DestinationTelemetry for NoopTelemetry {
    fn request(&self, _status: &str) {}
}
