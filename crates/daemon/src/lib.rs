//! The batchrouterd daemon as a library, so tests and the demo can run it
//! in-process; `main.rs` is the command line around it.

pub mod api;
pub mod app;
#[cfg(feature = "demo")]
pub mod demo;
pub mod enqueue;
pub mod logging;
pub mod readiness;
pub mod server;
