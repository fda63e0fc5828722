//! Keeps libssh2's SFTP write pipeline full.
//!
//! libssh2's `sftp_write` cuts the buffer it is given into 30 000-byte
//! `SSH_FXP_WRITE` requests, sends them all, and returns as soon as the
//! first one is acknowledged; the caller must then pass the same buffer
//! again from the first unacknowledged byte, and any bytes added at its end
//! become new requests. A plain `BufWriter` waits for its whole buffer to be
//! acknowledged before taking more data, so the pipe drains to empty once
//! per buffer (a full round trip lost every few megabytes; on a WAN link a
//! large share of the bandwidth). This writer instead keeps between
//! `low` and `high` bytes in flight at all times, like OpenSSH's `sftp`
//! keeps its 64 outstanding requests.

use std::io::{self, Write};

/// A write pipeline over an SFTP file (or any writer with libssh2's
/// partial-acknowledgement contract). Unacknowledged bytes are kept until
/// acknowledged; nothing is written on drop (call `flush` to finish).
pub struct Pipelined<W: Write> {
    inner: W,
    buf: Vec<u8>,
    /// First byte not yet acknowledged.
    start: usize,
    /// Push to the server while at least this much is pending.
    high: usize,
}

impl<W: Write> Pipelined<W> {
    /// Keeps up to about `high` bytes in flight.
    pub fn new(inner: W, high: usize) -> Self {
        Pipelined {
            inner,
            buf: Vec::with_capacity(high + high / 2),
            start: 0,
            high: high.max(1),
        }
    }

    /// The wrapped writer (bytes not yet acknowledged stay behind).
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// One call into the inner writer: returns once something is acknowledged.
    fn push_once(&mut self) -> io::Result<()> {
        let n = self.inner.write(&self.buf[self.start..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the remote file accepted no bytes",
            ));
        }
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.high {
            // Compact rarely (once per `high` acknowledged bytes): the bytes
            // keep their order, which is all libssh2 relies on.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }
}

impl<W: Write> Write for Pipelined<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.pending() >= self.high {
            self.push_once()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.pending() > 0 {
            self.push_once()?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mimics libssh2: accepts at most `ack` bytes per call, and records
    /// how much was offered each time.
    struct Acks {
        ack: usize,
        got: Vec<u8>,
        offered: Vec<usize>,
        fail_after: Option<usize>,
    }

    impl Write for Acks {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail_after.is_some_and(|f| self.got.len() >= f) {
                return Err(io::Error::other("connection lost"));
            }
            self.offered.push(buf.len());
            let n = buf.len().min(self.ack);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn acks(ack: usize) -> Acks {
        Acks {
            ack,
            got: Vec::new(),
            offered: Vec::new(),
            fail_after: None,
        }
    }

    #[test]
    fn bytes_arrive_in_order_and_the_pipe_never_drains_mid_stream() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut p = Pipelined::new(acks(3000), 64 * 1024);
        for chunk in data.chunks(10_000) {
            p.write_all(chunk).unwrap();
        }
        // Before the final flush, every call offered at least `high` bytes.
        let before_flush = p.inner.offered.len();
        assert!(
            p.inner.offered.iter().all(|&o| o >= 64 * 1024),
            "the pipe drained mid-stream"
        );
        p.flush().unwrap();
        let inner = p.into_inner();
        assert_eq!(inner.got, data);
        assert!(inner.offered.len() > before_flush);
    }

    #[test]
    fn errors_surface_and_nothing_is_written_after() {
        let mut inner = acks(1000);
        inner.fail_after = Some(5000);
        let mut p = Pipelined::new(inner, 4096);
        let err = p.write_all(&[1u8; 20_000]).unwrap_err();
        assert_eq!(err.to_string(), "connection lost");
        assert_eq!(p.into_inner().got.len(), 5000);
    }

    #[test]
    fn a_writer_that_accepts_nothing_is_an_error() {
        let mut p = Pipelined::new(acks(0), 10);
        assert_eq!(
            p.write(&[0u8; 20]).unwrap_err().kind(),
            io::ErrorKind::WriteZero
        );
    }
}
