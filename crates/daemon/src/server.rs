//! The HTTP server loop around the API router, with the defences against
//! slow and idle clients that `axum::serve` lacks: a header-read timeout
//! (which also closes idle keep-alive connections), an idle timeout (nothing
//! read or written while no request runs: stalled readers and writers), a
//! cap on connections served at once, and a graceful stop. The body-read
//! timeout lives where bodies are read (`api::jobs::read_body`).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tower::ServiceExt;

/// Connection limits, from the `[server]` config section.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Longest wait for a request's headers, counted from when the
    /// connection starts waiting for a request.
    pub header_read_timeout: Duration,
    /// A connection with no request running and no bytes moving for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` fires, then stops accepting and
/// lets every open connection finish its request in flight.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ServerLimits,
    stop: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, retry.
                    tracing::warn!(error = %e, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let app = app.clone();
        let closing = closing_rx.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            connection(stream, app, limits, closing).await;
            drop(permit);
            drop(alive);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(alive_tx);
    // Every connection task holds a sender; `None` once all are done.
    let _ = alive_rx.recv().await;
}

/// When a connection last moved a byte, and how many requests run on it.
struct Activity {
    epoch: Instant,
    last_millis: AtomicU64,
    requests: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_millis.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }
}

/// Counts a request as running until dropped.
struct Running(Arc<Activity>);

impl Running {
    fn new(a: &Arc<Activity>) -> Self {
        a.requests.fetch_add(1, Ordering::SeqCst);
        Running(a.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.touch();
        self.0.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `from + after`, or a far-future instant when that overflows, so an
/// oversized timeout means "practically never" instead of a panic.
fn deadline(from: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    from.checked_add(after)
        .or_else(|| from.checked_add(FAR))
        .unwrap_or(from)
}

async fn connection(
    stream: TcpStream,
    app: axum::Router,
    limits: ServerLimits,
    mut closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        last_millis: AtomicU64::new(0),
        requests: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let running = Running::new(&svc_activity);
        let app = app.clone();
        async move {
            let resp: Result<axum::response::Response, Infallible> =
                app.oneshot(req.map(Body::new)).await;
            drop(running);
            resp
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut shutting_down = *closing.borrow();
    if shutting_down {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // While a request runs the handler owns its time (the body-read
        // timeout bounds reading); look again one idle period later.
        let idle_at = if activity.requests.load(Ordering::SeqCst) > 0 {
            deadline(Instant::now(), limits.idle_timeout)
        } else {
            deadline(activity.last(), limits.idle_timeout)
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error.");
                }
                return;
            }
            changed = closing.changed(), if !shutting_down => {
                if changed.is_err() || *closing.borrow() {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep_until(idle_at.into()) => {
                let idle = activity.requests.load(Ordering::SeqCst) == 0
                    && activity.last().elapsed() >= limits.idle_timeout;
                if idle {
                    tracing::debug!(idle_timeout = ?limits.idle_timeout, "Closing an idle HTTP connection.");
                    return;
                }
            }
        }
    }
}

/// A TCP stream that records when bytes last moved either way.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_idle_timeout_gives_a_far_deadline_not_a_panic() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400));
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
