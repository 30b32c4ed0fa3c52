//! Shared harness for the fuzz targets: the input layout that lets one fuzz input drive both
//! the bytes of a stream and how they are split into reads, an in-memory stream that serves
//! them that way, and a minimal executor for futures that need no runtime.
//!
//! Input layout used by the stream targets:
//!
//! ```text
//! [flags: u8][n: u8][plan: n bytes][stream bytes …]
//! ```
//!
//! Each plan byte is one read: `0` = the read is not ready (`Pending`, woken at once),
//! `1..=0xef` = at most that many bytes, `0xf0..=0xff` = at most `(b - 0xef) * 4096` bytes.
//! The plan repeats; an empty plan serves everything the reader asks for.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A fuzz input split into flags, read plan and stream bytes.
#[derive(Debug, Clone, Copy)]
pub struct Split<'a> {
    /// Target-specific option bits.
    pub flags: u8,
    /// Read sizes (see the crate docs).
    pub plan: &'a [u8],
    /// The bytes of the stream.
    pub data: &'a [u8],
}

/// Splits `input` as described in the crate docs; missing parts are empty.
pub fn split(input: &[u8]) -> Split<'_> {
    let flags = input.first().copied().unwrap_or(0);
    let n = usize::from(input.get(1).copied().unwrap_or(0));
    let rest = input.get(2..).unwrap_or_default();
    let n = n.min(rest.len());
    Split {
        flags,
        plan: &rest[..n],
        data: &rest[n..],
    }
}

/// What one plan byte asks for: `None` = not ready this time.
pub fn read_size(b: u8) -> Option<usize> {
    match b {
        0 => None,
        1..=0xef => Some(usize::from(b)),
        _ => Some(usize::from(b - 0xef) * 4096),
    }
}

/// An in-memory stream: reads follow a plan, writes are collected.
#[derive(Debug)]
pub struct PlannedStream {
    data: Vec<u8>,
    pos: usize,
    plan: Vec<u8>,
    step: usize,
    last_pending: bool,
    /// Everything written to the stream.
    pub written: Arc<Mutex<Vec<u8>>>,
}

impl PlannedStream {
    /// A stream serving `data` in reads shaped by `plan`.
    pub fn new(data: &[u8], plan: &[u8]) -> Self {
        Self {
            data: data.to_vec(),
            pos: 0,
            plan: plan.to_vec(),
            step: 0,
            last_pending: false,
            written: Arc::default(),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
}

impl AsyncRead for PlannedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let limit = if this.plan.is_empty() {
            Some(usize::MAX)
        } else {
            let b = this.plan[this.step % this.plan.len()];
            this.step += 1;
            read_size(b)
        };
        match limit {
            Some(limit) => {
                this.last_pending = false;
                serve(this, buf, limit)
            }
            // Never two Pendings in a row, so a plan of zeros cannot stall a reader.
            None if !this.last_pending => {
                this.last_pending = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => {
                this.last_pending = false;
                serve(this, buf, usize::MAX)
            }
        }
    }
}

fn serve(s: &mut PlannedStream, buf: &mut ReadBuf<'_>, limit: usize) -> Poll<io::Result<()>> {
    let n = limit.min(buf.remaining()).min(s.remaining());
    buf.put_slice(&s.data[s.pos..s.pos + n]);
    s.pos += n;
    Poll::Ready(Ok(()))
}

impl AsyncWrite for PlannedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a relay that writes without end would be a bug of its own.
        assert!(w.len() < 64 << 20, "unbounded output");
        w.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that only waits on a [`PlannedStream`] (which wakes at once) to completion.
/// Panics if it stays pending: that would be a reader that hangs.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..(1u32 << 22) {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future still pending after 4M polls: a reader hangs");
}

/// A cursor taking fixed-size pieces from the front of a fuzz input (zeros once it is used up).
#[derive(Debug)]
pub struct Take<'a>(pub &'a [u8]);

impl<'a> Take<'a> {
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        let b = self.0.first().copied().unwrap_or(0);
        self.0 = self.0.get(1..).unwrap_or_default();
        b
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// A big-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
    /// `N` bytes.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }
    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
