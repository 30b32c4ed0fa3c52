//! TLS 1.3 record protection of the relay's server stream (`tls_stream::records`) with fixed
//! keys, cross-checked against rustls' own record protection for the same suite and keys.
//!
//! Input: `[mode][suite][rx seq: 8][tx seq: 8][rest]`; suite is AES-256-GCM or
//! ChaCha20-Poly1305 (`suite & 1`). mode % 3:
//!
//! * 0: `rest` is what a client sent after the handshake; records are opened as the stream
//!   does (in place, one after the other). Never panics; what opens stays inside the input.
//! * 1: `rest` describes records `[type][len: 2][content]` (len % 16385; content cycled from
//!   the input when short) and a read plan at its front (`[n][plan: n]`). rustls seals
//!   them; our opener, fed in the planned chunks, must give back every type and content.
//!   Then we seal them and rustls must open each to the same type and content.
//! * 2: `rest` = `[padding: 2][inner plaintext]`: an arbitrary TLSInnerPlaintext with
//!   `padding % 17000` extra zero bytes, sealed with ring as TLS 1.3 does. Our opener and
//!   rustls must agree on accepting it as an alert, handshake or application-data record
//!   and on its content (RFC 8446 §5.2, §5.4).
#![no_main]

use derper::fuzzing::RecordKeys;
use derper_fuzz::{Take, read_size};
use libfuzzer_sys::fuzz_target;
use ring::aead;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage, Tls13AeadAlgorithm,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ExtractedSecrets, ProtocolVersion};

const RX_KEY: [u8; 32] = [0x11; 32];
const RX_IV: [u8; 12] = [0x22; 12];
const TX_KEY: [u8; 32] = [0x33; 32];
const TX_IV: [u8; 12] = [0x44; 12];
const MAX_CIPHERTEXT: usize = 16384 + 256;

#[derive(Clone, Copy)]
enum Suite {
    Aes256Gcm,
    Chacha20,
}

impl Suite {
    fn secrets(self, key: [u8; 32], iv: [u8; 12]) -> ConnectionTrafficSecrets {
        let (key, iv) = (AeadKey::from(key), Iv::new(iv));
        match self {
            Suite::Aes256Gcm => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
            Suite::Chacha20 => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        }
    }
    fn rustls(self) -> &'static dyn Tls13AeadAlgorithm {
        let s = match self {
            Suite::Aes256Gcm => rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            Suite::Chacha20 => rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        };
        s.tls13().expect("TLS 1.3 suite").aead_alg
    }
    fn ring(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20 => &aead::CHACHA20_POLY1305,
        }
    }
}

fn nonce(iv: [u8; 12], seq: u64) -> aead::Nonce {
    let mut n = iv;
    for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    aead::Nonce::assume_unique_for_key(n)
}

/// Opens records from the front of `buf` as the stream does; returns (type, content) of
/// each and whether an error ended it.
fn open_all(keys: &mut RecordKeys, buf: &mut Vec<u8>) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut out = Vec::new();
    loop {
        match keys.open_one(buf) {
            Ok(Some(r)) => {
                assert!(r.len <= buf.len(), "record longer than the input");
                assert!(r.content.start == 5 && r.content.end < r.len);
                out.push((r.typ, buf[r.content.clone()].to_vec()));
                buf.drain(..r.len);
            }
            Ok(None) => {
                let complete = buf.len() >= 5
                    && buf.len() >= 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
                assert!(!complete, "a complete record was reported incomplete");
                return (out, false);
            }
            Err(_) => return (out, true),
        }
    }
}

fn content(t: &mut Take<'_>, len: usize, salt: u8) -> Vec<u8> {
    let have = t.bytes(len);
    let mut v = have.to_vec();
    v.extend((v.len()..len).map(|i| (i as u8).wrapping_mul(31) ^ salt));
    v
}

fuzz_target!(|input: &[u8]| {
    let mut t = Take(input);
    let mode = t.u8() % 3;
    let suite = if t.u8() & 1 == 0 {
        Suite::Aes256Gcm
    } else {
        Suite::Chacha20
    };
    // Far from the 2^64 limit, which both sides refuse to reach.
    let rx_seq = t.u64() >> 1;
    let tx_seq = t.u64() >> 1;
    let mut keys = RecordKeys::new(ExtractedSecrets {
        tx: (tx_seq, suite.secrets(TX_KEY, TX_IV)),
        rx: (rx_seq, suite.secrets(RX_KEY, RX_IV)),
    })
    .expect("keys");

    match mode {
        0 => {
            let mut buf = t.rest().to_vec();
            let _ = open_all(&mut keys, &mut buf);
        }
        1 => {
            let n = usize::from(t.u8());
            let plan = t.bytes(n).to_vec();
            let mut records = Vec::new();
            while !t.0.is_empty() && records.len() < 8 {
                // Any inner type but 0 (none) and change_cipher_spec, which rustls refuses
                // to open at this layer and our record layer rejects one step later.
                let typ = match t.u8() {
                    0 | 20 => 23,
                    b => b,
                };
                let len = usize::from(t.u16()) % 16385;
                records.push((typ, content(&mut t, len, typ)));
            }
            // rustls seals, we open (fed in planned chunks).
            let mut enc = suite
                .rustls()
                .encrypter(AeadKey::from(RX_KEY), Iv::new(RX_IV));
            let mut wire = Vec::new();
            for (i, (typ, c)) in records.iter().enumerate() {
                let m = OutboundPlainMessage {
                    typ: ContentType::from(*typ),
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::Single(c),
                };
                wire.extend(enc.encrypt(m, rx_seq + i as u64).expect("seal").encode());
            }
            let mut got = Vec::new();
            let mut buf = Vec::new();
            let (mut pos, mut step) = (0, 0);
            while pos < wire.len() {
                let want = plan
                    .get(step % plan.len().max(1))
                    .map_or(usize::MAX, |&b| read_size(b).unwrap_or(1));
                step += 1;
                let n = want.min(wire.len() - pos);
                buf.extend_from_slice(&wire[pos..pos + n]);
                pos += n;
                let (opened, err) = open_all(&mut keys, &mut buf);
                assert!(!err, "a record sealed by rustls did not open");
                got.extend(opened);
            }
            assert!(buf.is_empty());
            assert_eq!(got, records, "records sealed by rustls opened differently");

            // We seal, rustls opens.
            let mut dec = suite
                .rustls()
                .decrypter(AeadKey::from(TX_KEY), Iv::new(TX_IV));
            for (i, (typ, c)) in records.iter().enumerate() {
                let mut tx = Vec::new();
                keys.seal_record(*typ, c, &mut tx).expect("seal");
                let body_len = usize::from(u16::from_be_bytes([tx[3], tx[4]]));
                assert_eq!(&tx[..3], &[23, 3, 3]);
                assert_eq!(body_len, tx.len() - 5);
                let msg = InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    &mut tx[5..],
                );
                let plain = dec
                    .decrypt(msg, tx_seq + i as u64)
                    .expect("rustls opens ours");
                assert_eq!(u8::from(plain.typ), *typ);
                assert_eq!(plain.payload, &c[..]);
            }
        }
        _ => {
            let pad = usize::from(t.u16()) % 17000;
            let mut inner = t.rest().to_vec();
            inner.resize(inner.len() + pad, 0);
            let len = inner.len() + 16;
            if len > u16::MAX as usize {
                return;
            }
            let header = [23, 3, 3, (len >> 8) as u8, len as u8];
            let key =
                aead::LessSafeKey::new(aead::UnboundKey::new(suite.ring(), &RX_KEY).expect("key"));
            key.seal_in_place_append_tag(nonce(RX_IV, rx_seq), aead::Aad::from(header), &mut inner)
                .expect("seal");
            let mut ours = header.to_vec();
            ours.extend_from_slice(&inner);
            let (opened, err) = open_all(&mut keys, &mut ours);
            if len > MAX_CIPHERTEXT || len < 17 {
                assert!(err && opened.is_empty(), "record of {len} bytes accepted");
                return;
            }
            let mut dec = suite
                .rustls()
                .decrypter(AeadKey::from(RX_KEY), Iv::new(RX_IV));
            let msg = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                &mut inner,
            );
            // Only alerts, handshake messages and application data go on; the record layer
            // above rejects every other inner type (rustls already here, for
            // change_cipher_spec).
            let ours = opened.first().filter(|(typ, _)| (21..=23).contains(typ));
            match dec.decrypt(msg, rx_seq) {
                Ok(plain) if (21..=23).contains(&u8::from(plain.typ)) => {
                    assert!(!err, "rustls opens what we reject");
                    assert_eq!(ours, Some(&(u8::from(plain.typ), plain.payload.to_vec())));
                }
                Ok(_) => assert!(ours.is_none()),
                Err(e) => assert!(ours.is_none(), "we accept what rustls rejects ({e})"),
            }
        }
    }
});
