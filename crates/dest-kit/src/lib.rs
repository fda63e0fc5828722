//! Plumbing shared by the destinations, so each one writes only what is
//! particular to its API. [`http`] is the toolkit of every HTTP-based
//! destination (HTTP, Marketo, Klaviyo): it lives here rather than in
//! `batchrouter-core` because the core must not depend on `reqwest`.

pub mod http;
