//! DERP frame reader + frame decoders under arbitrary read chunking.
//!
//! Input: `[flags][n][plan][stream]` (see the harness). flags bit 0: read as a client reads
//! a server (`FromServer`) instead of as the relay reads a client; bit 1: the first
//! `flags >> 3` stream bytes are handed over as already-buffered (pipelined after the HTTP
//! head), as the relay does; bit 2: read as the relay reads a rate-limited client
//! (`next_header`, then `read_frame_exact`), where the announced header must be the one of
//! the frame that follows.
//!
//! Oracle: the frames and the way the stream ends must equal those of a plain reference
//! model of spec §4.1/§4.5/§4.6 over the whole stream, whatever the chunking; every frame's
//! payload goes through the matching decoder, and decoded frames re-encode to the same bytes
//! where the encoding is canonical.
#![no_main]

use bytes::{Bytes, BytesMut};
use derper::key::NodePublicKey;
use derper::proto::codec::{
    self, ClientFrame, FrameReader, RawFrame, ReadError, ReadPolicy, ServerFrame,
};
use derper_fuzz::{PlannedStream, block_on, split};
use libfuzzer_sys::fuzz_target;

const SKIP_BUFFER_MAX: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum End {
    Clean,
    TooLarge { typ: u8, len: usize },
    Eof,
    Io,
}

/// Spec §4.5 (relay reading a client) and §4.6 (client reading the relay): `Some(max)` or
/// `None` = skipped whatever its size (buffered up to 64 KiB, streamed over beyond).
fn limit(from_server: bool, typ: u8) -> Option<usize> {
    if from_server {
        return Some(1 << 20);
    }
    match typ {
        0x02 => Some(256 * 1024),
        0x04 => Some(32 + 65536),
        0x0a => Some(64 + 65536),
        0x07 => Some(1),
        0x10 => Some(0),
        0x11 => Some(32),
        0x12 => Some(1000),
        _ => None,
    }
}

fn model(data: &[u8], from_server: bool) -> (Vec<RawFrame>, End) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        if rest.is_empty() {
            return (frames, End::Clean);
        }
        if rest.len() < 5 {
            return (frames, End::Eof);
        }
        let typ = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        match limit(from_server, typ) {
            Some(max) if len > max => return (frames, End::TooLarge { typ, len }),
            None if len > SKIP_BUFFER_MAX => {
                frames.push(RawFrame {
                    typ,
                    payload: Bytes::new(),
                    skipped_len: len,
                });
                if rest.len() - 5 < len {
                    return (frames, End::Eof);
                }
            }
            _ => {
                if rest.len() - 5 < len {
                    return (frames, End::Eof);
                }
                frames.push(RawFrame {
                    typ,
                    payload: Bytes::copy_from_slice(&rest[5..5 + len]),
                    skipped_len: 0,
                });
            }
        }
        pos += 5 + len;
    }
}

fn check_client_frame(f: &RawFrame) {
    let p = &f.payload[..];
    let Ok(frame) = codec::decode_client_frame(f.typ, f.payload.clone()) else {
        return;
    };
    let mut b = BytesMut::new();
    match &frame {
        ClientFrame::SendPacket { dst, packet } => codec::write_send_packet(&mut b, dst, packet),
        ClientFrame::ForwardPacket { src, dst, packet } => {
            codec::write_forward_packet(&mut b, src, dst, packet)
        }
        ClientFrame::ClosePeer(k) => codec::write_close_peer(&mut b, k),
        ClientFrame::WatchConns => codec::write_watch_conns(&mut b),
        ClientFrame::NotePreferred(pref) => {
            assert_eq!(p.len(), 1);
            assert_eq!(*pref, p[0] != 0);
            return;
        }
        ClientFrame::Ping(d) => {
            assert!(
                (8..=1000).contains(&p.len()),
                "ping of {} bytes accepted",
                p.len()
            );
            assert_eq!(&d[..], &p[..8]);
            return;
        }
        ClientFrame::ClientInfo(x) => {
            assert_eq!(x, &f.payload);
            return;
        }
        ClientFrame::Other(t) => {
            assert_eq!(*t, f.typ);
            return;
        }
    }
    assert_eq!(b[0], f.typ);
    assert_eq!(&b[5..], p, "{frame:?} does not re-encode to its payload");
}

fn check_server_frame(f: &RawFrame) {
    let p = &f.payload[..];
    let Ok(frame) = codec::decode_server_frame(f.typ, f.payload.clone()) else {
        return;
    };
    let mut b = BytesMut::new();
    match &frame {
        ServerFrame::RecvPacket { src, packet } => codec::write_recv_packet(&mut b, src, packet),
        ServerFrame::PeerPresent { key, addr, flags } if p.len() == 51 => {
            codec::write_peer_present(&mut b, key, *addr, *flags)
        }
        ServerFrame::Restarting {
            reconnect_in,
            try_for,
        } if p.len() == 8 => codec::write_restarting(
            &mut b,
            u32::try_from(reconnect_in.as_millis()).expect("u32 ms"),
            u32::try_from(try_for.as_millis()).expect("u32 ms"),
        ),
        ServerFrame::Ping(d) if p.len() == 8 => codec::write_ping(&mut b, d),
        ServerFrame::Pong(d) if p.len() == 8 => codec::write_pong(&mut b, d),
        ServerFrame::Health(t) if std::str::from_utf8(p).is_ok() => codec::write_health(&mut b, t),
        ServerFrame::PeerGone { key, reason } if p.len() == 33 => {
            codec::write_peer_gone(&mut b, key, *reason)
        }
        ServerFrame::ServerKey(k) => {
            assert_eq!(Some(*k), NodePublicKey::from_slice(&p[8..40]));
            return;
        }
        _ => return,
    }
    assert_eq!(b[0], f.typ);
    assert_eq!(&b[5..], p, "{frame:?} does not re-encode to its payload");
}

fuzz_target!(|input: &[u8]| {
    let s = split(input);
    let from_server = s.flags & 1 != 0;
    let policy = if from_server {
        ReadPolicy::FromServer
    } else {
        ReadPolicy::FromClient
    };
    let (initial, streamed) = if s.flags & 2 != 0 {
        s.data.split_at(usize::from(s.flags >> 3).min(s.data.len()))
    } else {
        (&[][..], s.data)
    };
    let mut r = FrameReader::new(
        PlannedStream::new(streamed, s.plan),
        BytesMut::from(initial),
        policy,
    );
    let rate_limited = s.flags & 4 != 0;
    let (frames, end) = block_on(async {
        let mut frames = Vec::new();
        loop {
            let next = if rate_limited {
                match r.next_header().await {
                    Ok(Some((typ, len))) => match r.read_frame_exact().await {
                        Ok(Some(f)) => {
                            assert_eq!(f.typ, typ, "next_header announced another type");
                            assert_eq!(f.payload.len().max(f.skipped_len), len);
                            Ok(Some(f))
                        }
                        other => other,
                    },
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            } else {
                r.read_frame().await
            };
            match next {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, End::Clean),
                Err(ReadError::TooLarge { typ, len }) => {
                    return (frames, End::TooLarge { typ, len });
                }
                Err(ReadError::UnexpectedEof) => return (frames, End::Eof),
                Err(ReadError::Io(_)) => return (frames, End::Io),
            }
        }
    });
    let (want_frames, want_end) = model(s.data, from_server);
    assert_eq!(end, want_end, "stream end differs from the model");
    assert_eq!(
        frames.len(),
        want_frames.len(),
        "frame count differs from the model"
    );
    for (got, want) in frames.iter().zip(&want_frames) {
        assert_eq!(got, want, "frame differs from the model");
        if from_server {
            check_server_frame(got);
        } else {
            check_client_frame(got);
        }
    }
});
