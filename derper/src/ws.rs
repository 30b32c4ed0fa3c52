//! Minimal RFC 6455 WebSocket framing for DERP over WebSocket (spec §1.6).
//!
//! DERP treats the binary message payloads as one concatenated byte stream, so
//! [`WsStream`] simply exposes `AsyncRead`/`AsyncWrite` over the payloads: every write
//! becomes one binary frame (masked when acting as a client), reads unmask and concatenate
//! data frames, pings/pongs are discarded and a close frame is EOF. No extensions, no
//! compression. Also provides the `Sec-WebSocket-Accept` computation (SHA-1, implemented
//! here to avoid a dependency).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest WebSocket message payload we emit per write call. Tailscale's Go clients (and
/// upstream derper) read WebSocket messages with coder/websocket's default limit of 32 KiB and
/// drop the connection on a bigger one; message boundaries carry no meaning in the DERP byte
/// stream, so a 64 KiB DERP frame simply goes out as several messages.
const MAX_OUT_FRAME: usize = 32 << 10;

/// Which side of the connection we are (clients must mask their frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Server: sends unmasked frames.
    Server,
    /// Client: sends masked frames.
    Client,
}

#[derive(Debug)]
enum ReadState {
    Header,
    Payload {
        remaining: u64,
        mask: Option<[u8; 4]>,
        pos: usize,
        deliver: bool,
    },
    Closed,
}

/// A byte stream carried in WebSocket binary messages.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: S,
    role: Role,
    rbuf: BytesMut,
    state: ReadState,
    wbuf: BytesMut,
}

impl<S> WsStream<S> {
    /// Wraps an upgraded stream; `initial` holds bytes already read past the HTTP head.
    pub fn new(inner: S, role: Role, initial: BytesMut) -> Self {
        Self {
            inner,
            role,
            rbuf: initial,
            state: ReadState::Header,
            wbuf: BytesMut::new(),
        }
    }
}

/// Parses a frame header; returns (header length, fin/opcode byte, payload length, mask).
fn parse_header(b: &[u8]) -> Option<(usize, u8, u64, Option<[u8; 4]>)> {
    let b0 = *b.first()?;
    let b1 = *b.get(1)?;
    let masked = b1 & 0x80 != 0;
    let (len, mut off) = match b1 & 0x7f {
        126 => {
            let x = b.get(2..4)?;
            (u64::from(u16::from_be_bytes([x[0], x[1]])), 4)
        }
        127 => {
            let x: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(x), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
        off += 4;
        Some(m)
    } else {
        None
    };
    Some((off, b0, len, mask))
}

impl<S: AsyncRead + Unpin> WsStream<S> {
    /// Reads more raw bytes; Ok(false) on EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut tmp = [0u8; 8192];
        let mut rb = ReadBuf::new(&mut tmp);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let filled = rb.filled();
        if filled.is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.rbuf.extend_from_slice(filled);
        Poll::Ready(Ok(true))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match &mut this.state {
                ReadState::Closed => return Poll::Ready(Ok(())),
                ReadState::Header => {
                    let Some((hl, b0, len, mask)) = parse_header(&this.rbuf) else {
                        if !ready!(this.poll_fill(cx))? {
                            this.state = ReadState::Closed;
                        }
                        continue;
                    };
                    this.rbuf.advance(hl);
                    let opcode = b0 & 0x0f;
                    match opcode {
                        0..=2 => {
                            this.state = ReadState::Payload {
                                remaining: len,
                                mask,
                                pos: 0,
                                deliver: true,
                            }
                        }
                        8 => this.state = ReadState::Closed,
                        9 | 10 => {
                            this.state = ReadState::Payload {
                                remaining: len,
                                mask,
                                pos: 0,
                                deliver: false,
                            }
                        }
                        _ => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "bad websocket opcode",
                            )));
                        }
                    }
                }
                ReadState::Payload {
                    remaining,
                    mask,
                    pos,
                    deliver,
                } => {
                    if *remaining == 0 {
                        this.state = ReadState::Header;
                        continue;
                    }
                    if this.rbuf.is_empty() {
                        if !ready!(this.poll_fill(cx))? {
                            this.state = ReadState::Closed;
                        }
                        continue;
                    }
                    let avail = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(this.rbuf.len());
                    if *deliver {
                        let n = avail.min(out.remaining());
                        let chunk = this.rbuf.split_to(n);
                        let mut chunk = chunk.to_vec();
                        if let Some(m) = mask {
                            for b in chunk.iter_mut() {
                                *b ^= m[*pos % 4];
                                *pos += 1;
                            }
                        }
                        out.put_slice(&chunk);
                        *remaining -= n as u64;
                        return Poll::Ready(Ok(()));
                    }
                    this.rbuf.advance(avail);
                    *remaining -= avail as u64;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// Appends one binary frame carrying `payload`.
pub fn encode_frame(out: &mut BytesMut, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(payload.len() + 14);
    out.put_u8(0x82);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.put_u8(mbit | u8::try_from(n).unwrap_or(125)),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(mbit | 126);
            out.put_u16(u16::try_from(n).unwrap_or(u16::MAX));
        }
        n => {
            out.put_u8(mbit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(m) => {
            out.put_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.put_slice(payload),
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(MAX_OUT_FRAME);
        let mask = match this.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        encode_frame(&mut this.wbuf, buf.get(..n).unwrap_or_default(), mask);
        // Opportunistically start writing; the rest goes out on flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut input = key.trim().as_bytes().to_vec();
    input.extend_from_slice(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha1(&input))
}

/// SHA-1 (only used for the WebSocket accept key, which is not a security function).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate().take(16) {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_key_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            hex::encode(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[tokio::test]
    async fn stream_survives_arbitrary_message_boundaries() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut client = WsStream::new(a, Role::Client, BytesMut::new());
        let mut server = WsStream::new(b, Role::Server, BytesMut::new());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let w = tokio::spawn(async move {
            for chunk in d2.chunks(7777) {
                client.write_all(chunk).await.unwrap();
            }
            client.flush().await.unwrap();
            client
        });
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        let mut client = w.await.unwrap();
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        let mut four = [0u8; 4];
        client.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
    }

    #[tokio::test]
    async fn ping_frames_are_skipped_and_close_is_eof() {
        let mut raw = BytesMut::new();
        raw.extend_from_slice(&[0x89, 0x02, b'h', b'i']); // ping
        encode_frame(&mut raw, b"abc", Some([1, 2, 3, 4]));
        raw.extend_from_slice(&[0x88, 0x00]); // close
        let mut s = WsStream::new(&raw[..], Role::Server, BytesMut::new());
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        assert_eq!(v, b"abc");
    }
}
