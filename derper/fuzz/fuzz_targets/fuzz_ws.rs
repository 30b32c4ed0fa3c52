//! WebSocket framing (RFC 6455 subset of spec §1.6) under arbitrary read chunking.
//!
//! Input: `[flags][n][plan][stream]` (see the harness). The plan shapes the socket reads;
//! the caller's read sizes come from the stream's own length bytes cycled (1..=256).
//!
//! * flags bit 0 clear: the stream is raw bytes from a client. Oracle: the bytes delivered
//!   and whether the stream ends in an error must equal a reference model of the framing
//!   (data frames delivered unmasked, ping/pong skipped, close or EOF ends, other opcodes
//!   are an error), whatever the chunking.
//! * flags bit 0 set: the stream is a list of `[len: u8][mask?: u8][payload]` messages that
//!   are encoded with the relay's own encoder (masked as a client does when the mask byte is
//!   odd); reading them back must give their concatenation.
#![no_main]

use bytes::BytesMut;
use derper::ws::{Role, WsStream, encode_frame};
use derper_fuzz::{PlannedStream, Take, block_on, split};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

/// Returns the delivered bytes and whether the stream ended in an error.
fn model(mut b: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else {
            return (out, false);
        };
        let (len, mut off) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(x) => (u64::from(u16::from_be_bytes([x[0], x[1]])), 4),
                None => return (out, false),
            },
            127 => match b.get(2..10) {
                Some(x) => (u64::from_be_bytes(x.try_into().expect("8 bytes")), 10),
                None => return (out, false),
            },
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let Some(m) = b.get(off..off + 4) else {
                return (out, false);
            };
            off += 4;
            [m[0], m[1], m[2], m[3]]
        } else {
            [0; 4]
        };
        b = &b[off..];
        let avail = usize::try_from(len).unwrap_or(usize::MAX).min(b.len());
        match b0 & 0x0f {
            0..=2 => out.extend(b[..avail].iter().enumerate().map(|(i, x)| x ^ mask[i % 4])),
            8 => return (out, false),
            9 | 10 => {}
            _ => return (out, true),
        }
        if (avail as u64) < len {
            return (out, false);
        }
        b = &b[avail..];
    }
}

async fn read_all(ws: &mut WsStream<PlannedStream>, sizes: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    for i in 0.. {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(256, |&s| usize::from(s) + 1);
        match ws.read(&mut buf[..n]).await {
            Ok(0) => return (out, false),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(_) => return (out, true),
        }
    }
    unreachable!()
}

fuzz_target!(|input: &[u8]| {
    let s = split(input);
    let sizes: Vec<u8> = s.data.iter().take(16).copied().collect();
    if s.flags & 1 == 0 {
        let mut ws = WsStream::new(
            PlannedStream::new(s.data, s.plan),
            Role::Server,
            BytesMut::new(),
        );
        let got = block_on(read_all(&mut ws, &sizes));
        assert_eq!(
            got,
            model(s.data),
            "WebSocket reader differs from the model"
        );
    } else {
        let mut t = Take(s.data);
        let mut wire = BytesMut::new();
        let mut want = Vec::new();
        while !t.0.is_empty() {
            let len = usize::from(t.u8()) * 3;
            let m = t.u8();
            let payload = t.bytes(len);
            let mask = (m & 1 == 1).then(|| [m, m.wrapping_mul(7), m ^ 0x5a, !m]);
            encode_frame(&mut wire, payload, mask);
            want.extend_from_slice(payload);
        }
        let mut ws = WsStream::new(
            PlannedStream::new(&wire, s.plan),
            Role::Server,
            BytesMut::new(),
        );
        let (got, err) = block_on(read_all(&mut ws, &sizes));
        assert!(!err, "reading back our own frames failed");
        assert_eq!(got, want, "round trip through encode_frame lost bytes");
    }
});
