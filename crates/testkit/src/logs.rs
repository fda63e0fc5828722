//! Captures log output in memory, so tests can assert what was (and was
//! never) logged, secrets above all.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

/// Log lines written so far, shared with the subscriber that writes them.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs a global subscriber at `level` (every thread, and the `log`
    /// crate through tracing-subscriber's bridge) writing here. Panics when
    /// the test binary already has one: keep such tests in their own file.
    pub fn install_global(level: tracing::Level) -> LogCapture {
        let capture = LogCapture::default();
        tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_max_level(level)
            .with_ansi(false)
            .try_init()
            .expect("the only subscriber of this test binary");
        capture
    }

    /// A subscriber writing here, for `tracing::subscriber::with_default`.
    pub fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish()
    }

    /// Everything captured, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}
