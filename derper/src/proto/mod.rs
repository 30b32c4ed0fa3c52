//! The DERP wire protocol: frame types, limits and protocol constants (spec §4).
//!
//! Pure: no I/O besides the small async [`codec::FrameReader`] buffering helper. The
//! handshake frames (ServerKey / ClientInfo / ServerInfo, NaCl box) live in [`handshake`].

pub mod codec;
pub mod handshake;

use bytes::{BufMut, BytesMut};

/// Frame header length: type (1) + big-endian length (4) (spec §4.1).
pub const FRAME_HEADER_LEN: usize = 5;
/// Protocol version sent in ServerInfo / ClientInfo and the 101 response (spec §4.2).
pub const PROTOCOL_VERSION: u32 = 2;
/// `"DERP🔑"`, the start of the ServerKey payload (spec §4.2).
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91];
/// NaCl nonce length (spec §4.2).
pub const NONCE_LEN: usize = 24;
/// Maximum packet bytes in Send/Recv/ForwardPacket, excluding keys (spec §4.2).
pub const MAX_PACKET_SIZE: usize = 64 * 1024;
/// Maximum frame a client accepts from a server (spec §4.6: 1 MiB).
pub const MAX_FRAME_FROM_SERVER: usize = 1 << 20;
/// Maximum ClientInfo payload accepted by the server (spec §4.5: 256 KiB).
pub const MAX_CLIENT_INFO_LEN: usize = 256 * 1024;
/// Minimum ClientInfo payload (key + nonce) (spec §4.5: 56).
pub const MIN_CLIENT_INFO_LEN: usize = 32 + NONCE_LEN;
/// Smallest / largest accepted Ping payload from a client (spec §4.5).
pub const MIN_PING_LEN: usize = 8;
/// Largest accepted Ping payload from a client (spec §4.5).
pub const MAX_PING_LEN: usize = 1000;
/// PeerPresent payload length written by current servers (spec §4.3: 51).
pub const PEER_PRESENT_LEN: usize = 32 + 16 + 2 + 1;
/// Maximum ServerInfo JSON size a client accepts (spec §4.2 MaxInfoLen).
pub const MAX_INFO_LEN: usize = 1 << 20;
/// Disco magic prefix `"TS💬"` (spec §6.3).
pub const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac];
/// Minimum length of a disco-looking packet: magic + key + nonce (spec §6.3).
pub const DISCO_MIN_LEN: usize = 6 + 32 + 24;

/// Writes a frame header.
pub fn write_header(buf: &mut BytesMut, typ: FrameType, len: usize) {
    buf.reserve(FRAME_HEADER_LEN + len);
    buf.put_u8(typ as u8);
    // Every caller passes a length bounded by the protocol limits (< 4 GiB).
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// DERP frame types (spec §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// S→C magic + server public key.
    ServerKey = 0x01,
    /// C→S client key + nonce + box.
    ClientInfo = 0x02,
    /// S→C nonce + box.
    ServerInfo = 0x03,
    /// C→S dst key + packet.
    SendPacket = 0x04,
    /// S→C src key + packet.
    RecvPacket = 0x05,
    /// S→C empty.
    KeepAlive = 0x06,
    /// C→S one byte: 1 = home.
    NotePreferred = 0x07,
    /// S→C peer key + reason.
    PeerGone = 0x08,
    /// S→C (watchers) key + ip + port + flags.
    PeerPresent = 0x09,
    /// C→S (mesh) src + dst + packet.
    ForwardPacket = 0x0a,
    /// C→S (mesh) empty.
    WatchConns = 0x10,
    /// C→S (mesh) target key.
    ClosePeer = 0x11,
    /// 8 bytes of data.
    Ping = 0x12,
    /// 8 bytes echoed.
    Pong = 0x13,
    /// S→C UTF-8 text.
    Health = 0x14,
    /// S→C reconnect-in ms + try-for ms.
    Restarting = 0x15,
}

impl FrameType {
    /// Maps a wire byte to a known frame type.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::ServerKey,
            0x02 => Self::ClientInfo,
            0x03 => Self::ServerInfo,
            0x04 => Self::SendPacket,
            0x05 => Self::RecvPacket,
            0x06 => Self::KeepAlive,
            0x07 => Self::NotePreferred,
            0x08 => Self::PeerGone,
            0x09 => Self::PeerPresent,
            0x0a => Self::ForwardPacket,
            0x10 => Self::WatchConns,
            0x11 => Self::ClosePeer,
            0x12 => Self::Ping,
            0x13 => Self::Pong,
            0x14 => Self::Health,
            0x15 => Self::Restarting,
            _ => return None,
        })
    }
}

/// PeerGone reasons (spec §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// 0x00: the peer disconnected.
    Disconnected,
    /// 0x01: the server does not know the destination.
    NotHere,
    /// Any other value.
    Other(u8),
}

impl PeerGoneReason {
    /// Wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Disconnected => 0x00,
            Self::NotHere => 0x01,
            Self::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            0x00 => Self::Disconnected,
            0x01 => Self::NotHere,
            b => Self::Other(b),
        }
    }
}

/// PeerPresent flag: regular client (spec §4.3).
pub const PEER_PRESENT_IS_REGULAR: u8 = 0x01;
/// PeerPresent flag: mesh peer (spec §4.3).
pub const PEER_PRESENT_IS_MESH_PEER: u8 = 0x02;
/// PeerPresent flag: prober (spec §4.3).
pub const PEER_PRESENT_IS_PROBER: u8 = 0x04;
/// PeerPresent flag: not ideal node (spec §4.3).
pub const PEER_PRESENT_NOT_IDEAL: u8 = 0x08;

/// True if the packet looks like a disco message (spec §6.3).
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.len() >= DISCO_MIN_LEN && packet.starts_with(&DISCO_MAGIC)
}

/// Errors decoding a frame payload. Small and `Copy`; no heap (house-style §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Payload shorter than the frame type requires.
    #[error("frame type {typ:#04x}: payload too short ({len} bytes)")]
    TooShort {
        /// Frame type byte.
        typ: u8,
        /// Payload length.
        len: usize,
    },
    /// Payload longer than the frame type allows.
    #[error("frame type {typ:#04x}: payload too long ({len} bytes)")]
    TooLong {
        /// Frame type byte.
        typ: u8,
        /// Payload length.
        len: usize,
    },
    /// A different frame type was expected here.
    #[error("unexpected frame type {got:#04x}, want {want:#04x}")]
    UnexpectedType {
        /// Received type.
        got: u8,
        /// Expected type.
        want: u8,
    },
    /// ServerKey magic mismatch.
    #[error("invalid server greeting")]
    BadMagic,
    /// The NaCl box did not open.
    #[error("box did not open")]
    BadBox,
    /// The boxed JSON did not decode.
    #[error("invalid JSON in boxed message")]
    BadJson,
    /// A key of small order (the all-zero key among them) was presented: boxes "from" it
    /// open with an all-zero shared secret, so it proves nothing.
    #[error("small-order (weak) key")]
    SmallOrderKey,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_type_round_trips() {
        for b in 0..=255u8 {
            if let Some(t) = FrameType::from_u8(b) {
                assert_eq!(t as u8, b);
            }
        }
        assert_eq!(FrameType::from_u8(0x20), None);
    }

    #[test]
    fn disco_detection() {
        let mut p = DISCO_MAGIC.to_vec();
        p.resize(62, 0);
        assert!(looks_like_disco(&p));
        assert!(!looks_like_disco(&p[..61]));
        p[0] = 0;
        assert!(!looks_like_disco(&p));
    }
}
