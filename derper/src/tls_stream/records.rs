//! TLS 1.3 record protection after the handshake (RFC 8446 §5), on keys rustls hands over
//! through its kernel-connection API (the interface kTLS users get).
//!
//! rustls keeps the key schedule (`KernelConnection` computes the next secrets on a
//! KeyUpdate); this module seals and opens records with ring's AEADs, in place in the
//! caller's buffers. Compared with driving rustls' unbuffered connection per record, it
//! allocates nothing per record and holds ≈ 2 KiB less per connection.
//!
//! Scope: application data, alerts (close_notify ends the stream, any other alert is an
//! error) and KeyUpdate. Every other post-handshake message is an error; TLS 1.2 never
//! reaches this module.

use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

/// TLS record header length.
pub(super) const HEADER_LEN: usize = 5;
/// Largest plaintext per record (RFC 8446 §5.1).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext length a record may declare (RFC 8446 §5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// AEAD tag length of every TLS 1.3 suite.
const TAG_LEN: usize = 16;
/// Records sealed under one key before we move to the next (RFC 8446 §5.5 allows 2^24.5
/// full-size AES-GCM records per key; ChaCha20-Poly1305 has no practical limit).
const TX_RECORDS_PER_KEY: u64 = 1 << 23;

/// Alert content type.
pub(crate) const CONTENT_ALERT: u8 = 21;
/// Handshake content type.
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
/// Application data content type.
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;
/// KeyUpdate handshake message type.
pub(crate) const HANDSHAKE_KEY_UPDATE: u8 = 24;
/// close_notify alert description.
pub(crate) const ALERT_CLOSE_NOTIFY: u8 = 0;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One direction's key, IV and sequence number.
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl DirectionKey {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<DirectionKey> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(bad("unsupported TLS 1.3 cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| bad("bad traffic key"))?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| bad("bad traffic IV"))?;
        Ok(DirectionKey {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446 §5.3) for the current sequence number, which is then
    /// advanced.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut n = self.iv;
        for (b, s) in n.iter_mut().skip(4).zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| bad("TLS sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Both directions' keys: opens and seals single records.
pub(crate) struct RecordKeys {
    rx: DirectionKey,
    tx: DirectionKey,
}

/// One opened record.
#[derive(Debug, Clone)]
pub(crate) struct OpenedRecord {
    /// Bytes the record took in the input (header included).
    pub len: usize,
    /// Inner content type (RFC 8446 §5.4).
    pub typ: u8,
    /// Where the decrypted content sits in the input.
    pub content: std::ops::Range<usize>,
}

impl RecordKeys {
    /// Keys and sequence numbers as rustls extracted them.
    pub(crate) fn new(secrets: rustls::ExtractedSecrets) -> io::Result<RecordKeys> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(RecordKeys {
            rx: DirectionKey::new(rx_seq, rx)?,
            tx: DirectionKey::new(tx_seq, tx)?,
        })
    }

    /// Open the record at the start of `data` in place; `None` if it is not complete yet.
    pub(crate) fn open_one(&mut self, data: &mut [u8]) -> io::Result<Option<OpenedRecord>> {
        let Some(&[typ, v0, v1, l0, l1]) = data.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        if typ != CONTENT_APPLICATION_DATA || [v0, v1] != [3, 3] {
            return Err(bad(format!(
                "unexpected TLS record type {typ} (version {v0}.{v1}) after the handshake"
            )));
        }
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(bad(format!("TLS record length {len} out of range")));
        }
        let Some(record) = data.get_mut(..HEADER_LEN + len) else {
            return Ok(None);
        };
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let nonce = self.rx.next_nonce()?;
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| bad("TLS record failed to decrypt (bad_record_mac)"))?;
        // Inner plaintext: content ‖ type ‖ zero padding (RFC 8446 §5.4), at most 2^14 + 1
        // bytes padding included (§5.2 record_overflow).
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(bad("TLS record plaintext too long (record_overflow)"));
        }
        let Some(type_at) = plain.iter().rposition(|b| *b != 0) else {
            return Err(bad("TLS record without a content type"));
        };
        let typ = plain.get(type_at).copied().unwrap_or(0);
        Ok(Some(OpenedRecord {
            len: HEADER_LEN + len,
            typ,
            content: HEADER_LEN..HEADER_LEN + type_at,
        }))
    }

    /// Append one record of type `typ` holding `content` (at most 16 KiB) to `tx`.
    pub(crate) fn seal_record(
        &mut self,
        typ: u8,
        content: &[u8],
        tx: &mut Vec<u8>,
    ) -> io::Result<()> {
        let len = content.len() + 1 + TAG_LEN;
        let len16 = u16::try_from(len).map_err(|_| bad("record too long"))?;
        let [l0, l1] = len16.to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, l0, l1];
        tx.reserve(HEADER_LEN + len);
        tx.extend_from_slice(&header);
        let start = tx.len();
        tx.extend_from_slice(content);
        tx.push(typ);
        let nonce = self.tx.next_nonce()?;
        let body = tx.get_mut(start..).unwrap_or_default();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| bad("TLS record encryption failed"))?;
        tx.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// A TLS 1.3 server connection's record layer after the handshake.
pub(super) struct Records {
    kernel: KernelConnection<ServerConnectionData>,
    keys: RecordKeys,
    /// Records sealed under one key before a KeyUpdate ([`TX_RECORDS_PER_KEY`]).
    tx_records_per_key: u64,
}

/// What opening a run of records produced.
#[derive(Debug, Default)]
pub(super) struct Opened {
    /// Bytes of input used up (whole records).
    pub consumed: usize,
    /// The peer sent close_notify.
    pub eof: bool,
}

impl Records {
    /// Take over from rustls: the secrets and sequence numbers it extracted.
    pub(super) fn new(
        kernel: KernelConnection<ServerConnectionData>,
        secrets: rustls::ExtractedSecrets,
    ) -> io::Result<Records> {
        Ok(Records {
            kernel,
            keys: RecordKeys::new(secrets)?,
            tx_records_per_key: TX_RECORDS_PER_KEY,
        })
    }

    /// Tests: move to a new sending key after `n` records.
    #[cfg(test)]
    pub(super) fn set_tx_records_per_key(&mut self, n: u64) {
        self.tx_records_per_key = n;
    }

    /// Open every complete record at the start of `data` in place. Application data goes
    /// to `deliver`; a KeyUpdate that asks for ours appends it (sealed) to `tx`.
    pub(super) fn open(
        &mut self,
        data: &mut [u8],
        tx: &mut Vec<u8>,
        mut deliver: impl FnMut(&[u8]),
    ) -> io::Result<Opened> {
        let mut out = Opened::default();
        loop {
            let rest = data.get_mut(out.consumed..).unwrap_or_default();
            let Some(rec) = self.keys.open_one(rest)? else {
                return Ok(out);
            };
            let content = rest.get(rec.content.clone()).unwrap_or_default();
            out.consumed += rec.len;
            match rec.typ {
                CONTENT_APPLICATION_DATA => deliver(content),
                CONTENT_ALERT => match content {
                    [_, ALERT_CLOSE_NOTIFY] => {
                        out.eof = true;
                        return Ok(out);
                    }
                    [_, desc] => return Err(bad(format!("peer sent TLS alert {desc}"))),
                    _ => return Err(bad("malformed TLS alert")),
                },
                CONTENT_HANDSHAKE => {
                    // Only KeyUpdate is expected, alone in its record (it changes the key
                    // for the next record, RFC 8446 §4.6.3).
                    let &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] = content else {
                        return Err(bad("unexpected post-handshake message"));
                    };
                    if request > 1 {
                        return Err(bad("malformed KeyUpdate"));
                    }
                    let (seq, secrets) = self.kernel.update_rx_secret().map_err(tls_err)?;
                    self.keys.rx = DirectionKey::new(seq, secrets)?;
                    if request == 1 {
                        self.update_tx_key(tx)?;
                    }
                }
                _ => return Err(bad("unexpected TLS content type")),
            }
        }
    }

    /// Append `data` to `tx` as application data records.
    pub(super) fn seal(&mut self, data: &[u8], tx: &mut Vec<u8>) -> io::Result<()> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            if self.keys.tx.seq >= self.tx_records_per_key {
                self.update_tx_key(tx)?;
            }
            self.keys.seal_record(CONTENT_APPLICATION_DATA, chunk, tx)?;
        }
        Ok(())
    }

    /// Append a close_notify alert to `tx`.
    pub(super) fn close_notify(&mut self, tx: &mut Vec<u8>) -> io::Result<()> {
        self.keys
            .seal_record(CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY], tx)
    }

    /// Send KeyUpdate(update_not_requested) under the current key, then switch keys.
    fn update_tx_key(&mut self, tx: &mut Vec<u8>) -> io::Result<()> {
        self.keys
            .seal_record(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], tx)?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_err)?;
        self.keys.tx = DirectionKey::new(seq, secrets)?;
        Ok(())
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    const KEY: [u8; 32] = [7; 32];
    const IV: [u8; 12] = [9; 12];

    fn keys() -> RecordKeys {
        let secrets = |k: [u8; 32], iv: [u8; 12]| ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from(k),
            iv: Iv::new(iv),
        };
        RecordKeys::new(rustls::ExtractedSecrets {
            tx: (0, secrets([1; 32], [2; 12])),
            rx: (0, secrets(KEY, IV)),
        })
        .expect("keys")
    }

    /// A record holding `inner` (TLSInnerPlaintext) sealed as the peer would, sequence 0.
    fn sealed(inner: &[u8]) -> Vec<u8> {
        let len = u16::try_from(inner.len() + TAG_LEN).expect("length");
        let [l0, l1] = len.to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, l0, l1];
        let key = LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, &KEY).expect("key"));
        let mut body = inner.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(IV),
            Aad::from(header),
            &mut body,
        )
        .expect("seal");
        let mut rec = header.to_vec();
        rec.extend_from_slice(&body);
        rec
    }

    #[test]
    fn padding_counts_towards_the_plaintext_limit() {
        // Full-size content + type + padding up to 2^14 + 1 opens ...
        let mut inner = vec![b'x'; MAX_PLAINTEXT];
        inner.push(CONTENT_APPLICATION_DATA);
        let rec = keys().open_one(&mut sealed(&inner)).expect("opens");
        assert_eq!(rec.map(|r| r.content.len()), Some(MAX_PLAINTEXT));
        let mut inner = b"data".to_vec();
        inner.push(CONTENT_APPLICATION_DATA);
        inner.resize(MAX_PLAINTEXT + 1, 0);
        assert!(keys().open_one(&mut sealed(&inner)).is_ok());
        // ... one padding byte more is record_overflow (RFC 8446 §5.2, §5.4), as in rustls,
        // although the ciphertext is within 2^14 + 256.
        inner.push(0);
        let err = keys()
            .open_one(&mut sealed(&inner))
            .expect_err("record_overflow");
        assert!(err.to_string().contains("record_overflow"), "{err}");
    }
}
