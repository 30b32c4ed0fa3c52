//! Frame encoding and decoding (spec §4).
//!
//! * Encoders append whole frames to a caller-owned [`BytesMut`], so a writer can coalesce
//!   many frames into one buffer and flush once.
//! * [`FrameReader`] buffers an [`AsyncRead`] and yields `(type, payload)` where the payload
//!   is a zero-copy [`Bytes`] slice of the read buffer. It enforces the per-type size limits
//!   of spec §4.5 (server side) or §4.6 (client side) *before* reading a payload, and streams
//!   over oversize frames that are allowed to be skipped.
//! * [`decode_client_frame`] / [`decode_server_frame`] are pure and never panic.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{
    DecodeError, FRAME_HEADER_LEN, FrameType, MAX_CLIENT_INFO_LEN, MAX_FRAME_FROM_SERVER,
    MAX_PACKET_SIZE, MAX_PING_LEN, MIN_PING_LEN, PeerGoneReason, write_header,
};
use crate::key::{KEY_LEN, NodePublicKey};

/// Appends a frame with an arbitrary type byte and payload (tests, unknown frames).
pub fn write_raw_frame(buf: &mut BytesMut, typ: u8, payload: &[u8]) {
    buf.reserve(FRAME_HEADER_LEN + payload.len());
    buf.put_u8(typ);
    buf.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    buf.put_slice(payload);
}

/// Appends RecvPacket(src, packet).
pub fn write_recv_packet(buf: &mut BytesMut, src: &NodePublicKey, packet: &[u8]) {
    write_header(buf, FrameType::RecvPacket, KEY_LEN + packet.len());
    buf.put_slice(src.as_bytes());
    buf.put_slice(packet);
}

/// Appends SendPacket(dst, packet).
pub fn write_send_packet(buf: &mut BytesMut, dst: &NodePublicKey, packet: &[u8]) {
    write_header(buf, FrameType::SendPacket, KEY_LEN + packet.len());
    buf.put_slice(dst.as_bytes());
    buf.put_slice(packet);
}

/// Appends ForwardPacket(src, dst, packet).
pub fn write_forward_packet(
    buf: &mut BytesMut,
    src: &NodePublicKey,
    dst: &NodePublicKey,
    packet: &[u8],
) {
    write_header(buf, FrameType::ForwardPacket, 2 * KEY_LEN + packet.len());
    buf.put_slice(src.as_bytes());
    buf.put_slice(dst.as_bytes());
    buf.put_slice(packet);
}

/// Appends KeepAlive.
pub fn write_keepalive(buf: &mut BytesMut) {
    write_header(buf, FrameType::KeepAlive, 0);
}

/// Appends NotePreferred.
pub fn write_note_preferred(buf: &mut BytesMut, preferred: bool) {
    write_header(buf, FrameType::NotePreferred, 1);
    buf.put_u8(u8::from(preferred));
}

/// Appends PeerGone(key, reason).
pub fn write_peer_gone(buf: &mut BytesMut, key: &NodePublicKey, reason: PeerGoneReason) {
    write_header(buf, FrameType::PeerGone, KEY_LEN + 1);
    buf.put_slice(key.as_bytes());
    buf.put_u8(reason.to_u8());
}

/// Appends a 51-byte PeerPresent(key, ip, port, flags) (spec §4.3; IPv4 as `::ffff:` mapped).
pub fn write_peer_present(
    buf: &mut BytesMut,
    key: &NodePublicKey,
    addr: Option<SocketAddr>,
    flags: u8,
) {
    write_header(buf, FrameType::PeerPresent, super::PEER_PRESENT_LEN);
    buf.put_slice(key.as_bytes());
    let (ip, port) = match addr {
        Some(a) => {
            let ip6 = match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            (ip6.octets(), a.port())
        }
        None => ([0u8; 16], 0),
    };
    buf.put_slice(&ip);
    buf.put_u16(port);
    buf.put_u8(flags);
}

/// Appends WatchConns.
pub fn write_watch_conns(buf: &mut BytesMut) {
    write_header(buf, FrameType::WatchConns, 0);
}

/// Appends ClosePeer(key).
pub fn write_close_peer(buf: &mut BytesMut, key: &NodePublicKey) {
    write_header(buf, FrameType::ClosePeer, KEY_LEN);
    buf.put_slice(key.as_bytes());
}

/// Appends Ping(data).
pub fn write_ping(buf: &mut BytesMut, data: &[u8; 8]) {
    write_header(buf, FrameType::Ping, 8);
    buf.put_slice(data);
}

/// Appends Pong(data).
pub fn write_pong(buf: &mut BytesMut, data: &[u8; 8]) {
    write_header(buf, FrameType::Pong, 8);
    buf.put_slice(data);
}

/// Appends Health(text); empty text means "healthy again".
pub fn write_health(buf: &mut BytesMut, text: &str) {
    write_header(buf, FrameType::Health, text.len());
    buf.put_slice(text.as_bytes());
}

/// Appends Restarting(reconnect_in_ms, try_for_ms).
pub fn write_restarting(buf: &mut BytesMut, reconnect_in_ms: u32, try_for_ms: u32) {
    write_header(buf, FrameType::Restarting, 8);
    buf.put_u32(reconnect_in_ms);
    buf.put_u32(try_for_ms);
}

/// A frame decoded by the server from a client (spec §4.5 rules applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// ClientInfo payload (only valid as the first frame).
    ClientInfo(Bytes),
    /// SendPacket.
    SendPacket {
        /// Destination key.
        dst: NodePublicKey,
        /// Packet bytes (0..=65536).
        packet: Bytes,
    },
    /// NotePreferred.
    NotePreferred(bool),
    /// ForwardPacket (mesh only).
    ForwardPacket {
        /// Original sender.
        src: NodePublicKey,
        /// Destination.
        dst: NodePublicKey,
        /// Packet bytes.
        packet: Bytes,
    },
    /// WatchConns (mesh only).
    WatchConns,
    /// ClosePeer (mesh only).
    ClosePeer(NodePublicKey),
    /// Ping; only the first 8 bytes are kept.
    Ping([u8; 8]),
    /// Any other frame (Pong, KeepAlive, unknown …): read and discarded.
    Other(u8),
}

fn key_at(p: &[u8], off: usize) -> Option<NodePublicKey> {
    p.get(off..off + KEY_LEN)
        .and_then(NodePublicKey::from_slice)
}

fn first8(p: &[u8]) -> Option<[u8; 8]> {
    p.get(..8).and_then(|s| s.try_into().ok())
}

/// Decodes a client→server frame (spec §4.5). Never panics.
pub fn decode_client_frame(typ: u8, payload: Bytes) -> Result<ClientFrame, DecodeError> {
    let len = payload.len();
    let short = DecodeError::TooShort { typ, len };
    let long = DecodeError::TooLong { typ, len };
    let Some(ft) = FrameType::from_u8(typ) else {
        return Ok(ClientFrame::Other(typ));
    };
    Ok(match ft {
        FrameType::ClientInfo => ClientFrame::ClientInfo(payload),
        FrameType::SendPacket => {
            let dst = key_at(&payload, 0).ok_or(short)?;
            if len - KEY_LEN > MAX_PACKET_SIZE {
                return Err(long);
            }
            ClientFrame::SendPacket {
                dst,
                packet: payload.slice(KEY_LEN..),
            }
        }
        FrameType::NotePreferred => match payload.first() {
            Some(b) if len == 1 => ClientFrame::NotePreferred(*b != 0),
            Some(_) => return Err(long),
            None => return Err(short),
        },
        FrameType::ForwardPacket => {
            let src = key_at(&payload, 0).ok_or(short)?;
            let dst = key_at(&payload, KEY_LEN).ok_or(short)?;
            if len - 2 * KEY_LEN > MAX_PACKET_SIZE {
                return Err(long);
            }
            ClientFrame::ForwardPacket {
                src,
                dst,
                packet: payload.slice(2 * KEY_LEN..),
            }
        }
        FrameType::WatchConns => {
            if len != 0 {
                return Err(long);
            }
            ClientFrame::WatchConns
        }
        FrameType::ClosePeer => {
            if len > KEY_LEN {
                return Err(long);
            }
            ClientFrame::ClosePeer(key_at(&payload, 0).ok_or(short)?)
        }
        FrameType::Ping => {
            if len < MIN_PING_LEN {
                return Err(short);
            }
            if len > MAX_PING_LEN {
                return Err(long);
            }
            ClientFrame::Ping(first8(&payload).ok_or(short)?)
        }
        _ => ClientFrame::Other(typ),
    })
}

/// A frame decoded by a client from the server (spec §4.6 rules applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// ServerKey (late ones are ignored by Go clients).
    ServerKey(NodePublicKey),
    /// ServerInfo payload (nonce + box).
    ServerInfo(Bytes),
    /// A relayed packet.
    RecvPacket {
        /// Source key.
        src: NodePublicKey,
        /// Packet bytes.
        packet: Bytes,
    },
    /// KeepAlive.
    KeepAlive,
    /// PeerGone.
    PeerGone {
        /// The peer.
        key: NodePublicKey,
        /// Why (absent ⇒ Disconnected).
        reason: PeerGoneReason,
    },
    /// PeerPresent (watchers).
    PeerPresent {
        /// The peer.
        key: NodePublicKey,
        /// Its address if known (IPv4 un-mapped).
        addr: Option<SocketAddr>,
        /// Flags (0 if absent).
        flags: u8,
    },
    /// Ping from the server.
    Ping([u8; 8]),
    /// Pong.
    Pong([u8; 8]),
    /// Health text; empty = healthy again.
    Health(String),
    /// Server is restarting.
    Restarting {
        /// Reconnect after this long.
        reconnect_in: Duration,
        /// Keep trying for this long.
        try_for: Duration,
    },
    /// Unknown or unexpected frame; skipped.
    Unknown(u8),
}

/// Decodes a server→client frame (spec §4.6). Never panics.
pub fn decode_server_frame(typ: u8, payload: Bytes) -> Result<ServerFrame, DecodeError> {
    let len = payload.len();
    let short = DecodeError::TooShort { typ, len };
    let Some(ft) = FrameType::from_u8(typ) else {
        return Ok(ServerFrame::Unknown(typ));
    };
    Ok(match ft {
        FrameType::ServerKey => {
            ServerFrame::ServerKey(super::handshake::parse_server_key(&payload)?)
        }
        FrameType::ServerInfo => ServerFrame::ServerInfo(payload),
        FrameType::RecvPacket => ServerFrame::RecvPacket {
            src: key_at(&payload, 0).ok_or(short)?,
            packet: payload.slice(KEY_LEN..),
        },
        FrameType::KeepAlive => ServerFrame::KeepAlive,
        FrameType::PeerGone => ServerFrame::PeerGone {
            key: key_at(&payload, 0).ok_or(short)?,
            reason: PeerGoneReason::from_u8(payload.get(KEY_LEN).copied().unwrap_or(0)),
        },
        FrameType::PeerPresent => {
            let key = key_at(&payload, 0).ok_or(short)?;
            let addr = match (payload.get(32..48), payload.get(48..50)) {
                (Some(ip), Some(port)) => {
                    let ip: [u8; 16] = ip.try_into().map_err(|_| short)?;
                    let port = u16::from_be_bytes([port[0], port[1]]);
                    let ip6 = Ipv6Addr::from(ip);
                    if ip6.is_unspecified() && port == 0 {
                        None
                    } else {
                        let ip = match ip6.to_ipv4_mapped() {
                            Some(v4) => IpAddr::V4(v4),
                            None => IpAddr::V6(ip6),
                        };
                        Some(SocketAddr::new(ip, port))
                    }
                }
                _ => None,
            };
            ServerFrame::PeerPresent {
                key,
                addr,
                flags: payload.get(50).copied().unwrap_or(0),
            }
        }
        FrameType::Ping => ServerFrame::Ping(first8(&payload).ok_or(short)?),
        FrameType::Pong => ServerFrame::Pong(first8(&payload).ok_or(short)?),
        FrameType::Health => ServerFrame::Health(String::from_utf8_lossy(&payload).into_owned()),
        FrameType::Restarting => {
            let a = payload.get(0..4).ok_or(short)?;
            let b = payload.get(4..8).ok_or(short)?;
            ServerFrame::Restarting {
                reconnect_in: Duration::from_millis(u64::from(u32::from_be_bytes([
                    a[0], a[1], a[2], a[3],
                ]))),
                try_for: Duration::from_millis(u64::from(u32::from_be_bytes([
                    b[0], b[1], b[2], b[3],
                ]))),
            }
        }
        _ => ServerFrame::Unknown(typ),
    })
}

/// Which side's size limits a [`FrameReader`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Server reading client frames: strict per-type maxima for known client frames
    /// (spec §4.5), everything else streamed to /dev/null without a bound.
    FromClient,
    /// Client reading server frames: anything over 1 MiB is fatal (spec §4.6).
    FromServer,
}

enum Limit {
    Max(usize),
    Skip,
}

impl ReadPolicy {
    fn limit(self, typ: u8) -> Limit {
        match self {
            Self::FromServer => Limit::Max(MAX_FRAME_FROM_SERVER),
            Self::FromClient => match FrameType::from_u8(typ) {
                Some(FrameType::ClientInfo) => Limit::Max(MAX_CLIENT_INFO_LEN),
                Some(FrameType::SendPacket) => Limit::Max(KEY_LEN + MAX_PACKET_SIZE),
                Some(FrameType::ForwardPacket) => Limit::Max(2 * KEY_LEN + MAX_PACKET_SIZE),
                Some(FrameType::NotePreferred) => Limit::Max(1),
                Some(FrameType::WatchConns) => Limit::Max(0),
                Some(FrameType::ClosePeer) => Limit::Max(KEY_LEN),
                Some(FrameType::Ping) => Limit::Max(MAX_PING_LEN),
                _ => Limit::Skip,
            },
        }
    }
}

/// Frames to be skipped that are at most this large are buffered like any other; larger
/// ones are streamed over without buffering.
const SKIP_BUFFER_MAX: usize = 64 * 1024;
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// How far [`FrameReader::next_header`] reads ahead of a rate-limited client's next
/// header: payload bytes read before the limiter is asked stay below this.
pub const RATE_LIMITED_READ_AHEAD: usize = MIN_READ;

/// Error reading frames from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The underlying stream failed.
    #[error("read: {0}")]
    Io(#[from] io::Error),
    /// A frame exceeded its size limit.
    #[error("frame type {typ:#04x} too large: {len} bytes")]
    TooLarge {
        /// Type byte.
        typ: u8,
        /// Declared length.
        len: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("unexpected EOF inside a frame")]
    UnexpectedEof,
}

/// A raw frame as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Type byte.
    pub typ: u8,
    /// Payload (empty for streamed-over skipped frames; see `skipped_len`).
    pub payload: Bytes,
    /// Non-zero when the payload was too large to buffer and is being discarded.
    pub skipped_len: usize,
}

/// Buffered frame reader over an [`AsyncRead`].
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    policy: ReadPolicy,
    skip: usize,
    read_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Creates a reader; `initial` holds bytes already read from the stream (e.g. bytes
    /// pipelined after an HTTP request head), which are consumed first.
    pub fn new(inner: R, initial: BytesMut, policy: ReadPolicy) -> Self {
        Self {
            inner,
            buf: initial,
            policy,
            skip: 0,
            read_size: MIN_READ,
        }
    }

    /// Switches the size policy.
    pub fn set_policy(&mut self, policy: ReadPolicy) {
        self.policy = policy;
    }

    /// True when no complete or partial frame bytes are buffered.
    pub fn buffer_is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Returns the inner reader and any unconsumed buffered bytes.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// The next frame if the buffer already holds all of it, without I/O; `Ok(None)` when
    /// more bytes are needed (a frame being skipped is consumed as far as buffered).
    pub fn try_frame(&mut self) -> Result<Option<RawFrame>, ReadError> {
        if self.skip > 0 {
            let n = self.skip.min(self.buf.len());
            self.buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let Some(hdr) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let typ = hdr[0];
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        match self.policy.limit(typ) {
            Limit::Max(m) if len > m => Err(ReadError::TooLarge { typ, len }),
            Limit::Skip if len > SKIP_BUFFER_MAX => {
                self.buf.advance(FRAME_HEADER_LEN);
                self.skip = len;
                Ok(Some(RawFrame {
                    typ,
                    payload: Bytes::new(),
                    skipped_len: len,
                }))
            }
            _ => {
                let need = FRAME_HEADER_LEN + len;
                if self.buf.len() >= need {
                    self.buf.advance(FRAME_HEADER_LEN);
                    let payload = self.buf.split_to(len).freeze();
                    return Ok(Some(RawFrame {
                        typ,
                        payload,
                        skipped_len: 0,
                    }));
                }
                self.buf.reserve(need - self.buf.len());
                Ok(None)
            }
        }
    }

    /// Reads the next frame. `Ok(None)` is a clean EOF at a frame boundary.
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, ReadError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            // Inside a skipped frame, EOF is a truncation.
            if !self.fill(self.skip > 0).await? {
                return Ok(None);
            }
        }
    }

    /// Rate-limited reading, step 1 (spec §6.8): waits until the next frame's header is
    /// buffered and returns its type and declared length without consuming it, so the
    /// caller can wait on its limiter for the length *before* the payload is read. Reads
    /// at most [`RATE_LIMITED_READ_AHEAD`] bytes past what it has, finishing a frame being
    /// skipped first. `Ok(None)` is a clean EOF at a frame boundary; a header over its
    /// type's limit is [`ReadError::TooLarge`] right away.
    pub async fn next_header(&mut self) -> Result<Option<(u8, usize)>, ReadError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len());
                self.buf.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    let want = self.skip.min(MAX_READ);
                    self.fill_at_most(want, true).await?;
                    continue;
                }
            }
            if let Some(hdr) = self.buf.get(..FRAME_HEADER_LEN) {
                let typ = hdr[0];
                let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
                if let Limit::Max(m) = self.policy.limit(typ)
                    && len > m
                {
                    return Err(ReadError::TooLarge { typ, len });
                }
                return Ok(Some((typ, len)));
            }
            let more = if self.buf.is_empty() {
                // The idle path of `fill`: at most MIN_READ (= the read-ahead bound) bytes
                // through a stack buffer, and no heap buffer kept while the client is idle.
                self.read_size = MIN_READ;
                let r = self.fill(false).await;
                self.read_size = MIN_READ;
                r?
            } else {
                self.fill_at_most(RATE_LIMITED_READ_AHEAD, true).await?
            };
            if !more {
                return Ok(None);
            }
        }
    }

    /// Rate-limited reading, step 2: the frame whose header [`next_header`] returned,
    /// reading no further than its end.
    ///
    /// [`next_header`]: Self::next_header
    pub async fn read_frame_exact(&mut self) -> Result<Option<RawFrame>, ReadError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            let missing = match self.buf.get(..FRAME_HEADER_LEN) {
                Some(hdr) => {
                    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
                    (FRAME_HEADER_LEN + len).saturating_sub(self.buf.len())
                }
                None => FRAME_HEADER_LEN - self.buf.len(),
            };
            if !self
                .fill_at_most(missing.clamp(1, MAX_READ), !self.buf.is_empty())
                .await?
            {
                return Ok(None);
            }
        }
    }

    /// Reads at most `max` more bytes. Returns false on clean EOF outside a frame.
    async fn fill_at_most(&mut self, max: usize, in_frame: bool) -> Result<bool, ReadError> {
        self.buf.reserve(max);
        let mut limited = (&mut self.inner).take(max as u64);
        let n = limited.read_buf(&mut self.buf).await?;
        if n == 0 {
            if in_frame || self.skip > 0 {
                return Err(ReadError::UnexpectedEof);
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads more bytes. Returns false on clean EOF with an empty buffer.
    async fn fill(&mut self, in_frame: bool) -> Result<bool, ReadError> {
        if self.buf.is_empty() && self.read_size == MIN_READ {
            // Nothing buffered and not streaming: read through a stack buffer that lives
            // only inside one poll. If no data is ready the connection is going idle, so
            // the heap buffer is released while it waits (performance.md §7, T5); if data
            // is ready it is appended to the existing buffer (no allocation under load).
            let inner = &mut self.inner;
            let buf = &mut self.buf;
            let n = std::future::poll_fn(|cx| {
                let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); MIN_READ];
                let mut rb = tokio::io::ReadBuf::uninit(&mut stack);
                match std::pin::Pin::new(&mut *inner).poll_read(cx, &mut rb) {
                    std::task::Poll::Pending => {
                        if buf.capacity() > 0 {
                            *buf = BytesMut::new();
                        }
                        std::task::Poll::Pending
                    }
                    std::task::Poll::Ready(r) => {
                        buf.extend_from_slice(rb.filled());
                        std::task::Poll::Ready(r.map(|()| rb.filled().len()))
                    }
                }
            })
            .await?;
            if n == 0 {
                if in_frame {
                    return Err(ReadError::UnexpectedEof);
                }
                return Ok(false);
            }
            if n == MIN_READ {
                // A full read: the peer is busy; use a growing heap buffer from now on.
                self.read_size *= 2;
            }
            return Ok(true);
        }
        if self.buf.is_empty() && self.buf.capacity() > 2 * MAX_READ {
            // Idle connections should not keep a burst-sized buffer (performance.md §7).
            self.buf = BytesMut::new();
            self.read_size = MIN_READ;
        }
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(self.read_size);
        }
        let was_empty = self.buf.is_empty();
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            if self.buf.is_empty() && !in_frame {
                return Ok(false);
            }
            return Err(ReadError::UnexpectedEof);
        }
        if n == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        } else if was_empty && n < MIN_READ {
            // Traffic is light again: go back to the idle (stack) path above.
            self.read_size = MIN_READ;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> NodePublicKey {
        NodePublicKey::from_bytes([b; 32])
    }

    #[test]
    fn recv_packet_layout() {
        let mut b = BytesMut::new();
        write_recv_packet(&mut b, &key(1), b"hi");
        assert_eq!(b.len(), 5 + 32 + 2);
        assert_eq!(&b[..5], &[0x05, 0, 0, 0, 34]);
        assert_eq!(&b[37..], b"hi");
    }

    #[test]
    fn peer_present_is_51_bytes_with_mapped_v4() {
        let mut b = BytesMut::new();
        let addr: SocketAddr = "203.0.113.5:41641".parse().unwrap();
        write_peer_present(&mut b, &key(2), Some(addr), 0x01);
        assert_eq!(b.len(), 5 + 51);
        assert_eq!(
            &b[5 + 32..5 + 32 + 12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        let payload = Bytes::copy_from_slice(&b[5..]);
        match decode_server_frame(0x09, payload).unwrap() {
            ServerFrame::PeerPresent {
                key: k,
                addr: a,
                flags,
            } => {
                assert_eq!(k, key(2));
                assert_eq!(a, Some(addr));
                assert_eq!(flags, 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Old 32-byte form is accepted.
        let f = decode_server_frame(0x09, Bytes::copy_from_slice(&[3u8; 32])).unwrap();
        assert!(matches!(
            f,
            ServerFrame::PeerPresent {
                addr: None,
                flags: 0,
                ..
            }
        ));
    }

    #[test]
    fn client_frame_limits() {
        let p = |n: usize| Bytes::from(vec![0u8; n]);
        assert!(decode_client_frame(0x04, p(31)).is_err());
        assert!(decode_client_frame(0x04, p(32)).is_ok());
        assert!(decode_client_frame(0x04, p(32 + 65536)).is_ok());
        assert!(decode_client_frame(0x04, p(32 + 65537)).is_err());
        assert!(decode_client_frame(0x07, p(0)).is_err());
        assert!(decode_client_frame(0x07, p(2)).is_err());
        assert_eq!(
            decode_client_frame(0x07, Bytes::from_static(&[1])).unwrap(),
            ClientFrame::NotePreferred(true)
        );
        assert!(decode_client_frame(0x12, p(7)).is_err());
        assert!(decode_client_frame(0x12, p(8)).is_ok());
        assert!(decode_client_frame(0x12, p(1000)).is_ok());
        assert!(decode_client_frame(0x12, p(1001)).is_err());
        assert!(decode_client_frame(0x10, p(1)).is_err());
        assert!(decode_client_frame(0x11, p(31)).is_err());
        assert_eq!(
            decode_client_frame(0x20, p(5)).unwrap(),
            ClientFrame::Other(0x20)
        );
        assert_eq!(
            decode_client_frame(0x13, p(8)).unwrap(),
            ClientFrame::Other(0x13)
        );
    }

    #[test]
    fn restarting_and_peer_gone_decode() {
        let mut b = BytesMut::new();
        write_restarting(&mut b, 1000, 2000);
        let f = decode_server_frame(b[0], Bytes::copy_from_slice(&b[5..])).unwrap();
        assert_eq!(
            f,
            ServerFrame::Restarting {
                reconnect_in: Duration::from_secs(1),
                try_for: Duration::from_secs(2)
            }
        );
        let f = decode_server_frame(0x08, Bytes::copy_from_slice(&[7u8; 32])).unwrap();
        assert_eq!(
            f,
            ServerFrame::PeerGone {
                key: key(7),
                reason: PeerGoneReason::Disconnected
            }
        );
    }

    async fn read_all(bytes: Vec<u8>, policy: ReadPolicy) -> Result<Vec<RawFrame>, ReadError> {
        let mut r = FrameReader::new(&bytes[..], BytesMut::new(), policy);
        let mut out = Vec::new();
        while let Some(f) = r.read_frame().await? {
            out.push(f);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn reader_splits_frames_and_skips_huge_unknown() {
        let mut b = BytesMut::new();
        write_keepalive(&mut b);
        write_raw_frame(&mut b, 0x20, &vec![9u8; 200_000]);
        write_pong(&mut b, &[1; 8]);
        let frames = read_all(b.to_vec(), ReadPolicy::FromClient).await.unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1].skipped_len, 200_000);
        assert_eq!(frames[2].typ, 0x13);
        assert_eq!(&frames[2].payload[..], &[1; 8]);
    }

    #[tokio::test]
    async fn reader_rejects_oversize_and_truncated() {
        let mut b = BytesMut::new();
        write_raw_frame(&mut b, 0x04, &vec![0u8; 32 + 65537]);
        assert!(matches!(
            read_all(b.to_vec(), ReadPolicy::FromClient).await,
            Err(ReadError::TooLarge { typ: 4, .. })
        ));
        let mut b = BytesMut::new();
        write_ping(&mut b, &[0; 8]);
        b.truncate(9);
        assert!(matches!(
            read_all(b.to_vec(), ReadPolicy::FromClient).await,
            Err(ReadError::UnexpectedEof)
        ));
        assert!(matches!(
            read_all(vec![1, 0, 0x20, 0, 0], ReadPolicy::FromServer).await,
            Err(ReadError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(typ in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_client_frame(typ, Bytes::from(data.clone()));
            let _ = decode_server_frame(typ, Bytes::from(data));
        }

        #[test]
        fn reader_never_panics_on_arbitrary_streams(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let _ = read_all(data.clone(), ReadPolicy::FromClient).await;
                let _ = read_all(data, ReadPolicy::FromServer).await;
            });
        }

        #[test]
        fn send_packet_round_trip(dst in any::<[u8; 32]>(), pkt in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut b = BytesMut::new();
            let dst = NodePublicKey::from_bytes(dst);
            write_send_packet(&mut b, &dst, &pkt);
            prop_assert_eq!(b.len(), 5 + 32 + pkt.len());
            let f = decode_client_frame(b[0], Bytes::copy_from_slice(&b[5..])).unwrap();
            prop_assert_eq!(f, ClientFrame::SendPacket { dst, packet: Bytes::from(pkt) });
        }

        #[test]
        fn perturbed_frames_never_panic(pkt in proptest::collection::vec(any::<u8>(), 0..200), flip in any::<usize>(), cut in any::<usize>()) {
            let mut b = BytesMut::new();
            write_send_packet(&mut b, &key(1), &pkt);
            write_peer_present(&mut b, &key(2), None, 1);
            write_restarting(&mut b, 1, 2);
            let mut v = b.to_vec();
            let i = flip % v.len();
            v[i] ^= 0x5a;
            v.truncate(cut % (v.len() + 1));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                if let Ok(frames) = read_all(v.clone(), ReadPolicy::FromServer).await {
                    for f in frames { let _ = decode_server_frame(f.typ, f.payload); }
                }
                if let Ok(frames) = read_all(v, ReadPolicy::FromClient).await {
                    for f in frames { let _ = decode_client_frame(f.typ, f.payload); }
                }
            });
        }
    }
}
