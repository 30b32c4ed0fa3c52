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
//!
//! Limits a hostile peer meets (each ends the connection with a [`RecordError`]):
//! * a record longer than 2^14 + 256 bytes, or whose inner plaintext (content, type and
//!   padding) is longer than 2^14 + 1 bytes: record_overflow (RFC 8446 §5.2, §5.4);
//! * more than [`MAX_KEY_UPDATES_WITHOUT_DATA`] KeyUpdates in a row without application
//!   data in between (rustls allows 32, Go 16).
//!
//! KeyUpdate requests are coalesced: the peer's update_requested only marks our reply as
//! owed, and one KeyUpdate of ours answers every request received before it is sent
//! (RFC 8446 §4.6.3), so a stream of requests cannot make the reply queue grow.

use std::borrow::Cow;
use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

/// TLS record header length.
pub(super) const HEADER_LEN: usize = 5;
/// Largest plaintext per record (RFC 8446 §5.1).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest TLSInnerPlaintext: content, content type and padding (RFC 8446 §5.4: 2^14 + 1).
const MAX_INNER_PLAINTEXT: usize = MAX_PLAINTEXT + 1;
/// Largest ciphertext length a record may declare (RFC 8446 §5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// AEAD tag length of every TLS 1.3 suite.
const TAG_LEN: usize = 16;
/// Records sealed under one key before we move to the next (RFC 8446 §5.5 allows 2^24.5
/// full-size AES-GCM records per key; ChaCha20-Poly1305 has no practical limit).
const TX_RECORDS_PER_KEY: u64 = 1 << 23;
/// KeyUpdates the peer may send in a row without application data in between; the next
/// one ends the connection (rustls allows 32, Go 16).
pub(crate) const MAX_KEY_UPDATES_WITHOUT_DATA: u8 = 32;
/// A KeyUpdate message: type, 24-bit length 1, request_update.
const KEY_UPDATE_LEN: usize = 5;
/// Bytes one sealed KeyUpdate record takes.
pub(super) const KEY_UPDATE_RECORD_LEN: usize = HEADER_LEN + KEY_UPDATE_LEN + 1 + TAG_LEN;
/// Bytes one sealed alert record takes.
pub(super) const ALERT_RECORD_LEN: usize = HEADER_LEN + 2 + 1 + TAG_LEN;

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
/// unexpected_message alert description.
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
/// bad_record_mac alert description.
const ALERT_BAD_RECORD_MAC: u8 = 20;
/// record_overflow alert description.
pub(crate) const ALERT_RECORD_OVERFLOW: u8 = 22;
/// illegal_parameter alert description.
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
/// decode_error alert description.
const ALERT_DECODE_ERROR: u8 = 50;

/// Why the record layer ended a connection. It travels inside the [`io::Error`]
/// ([`io::ErrorKind::InvalidData`]) the stream returns; [`RecordError::find`] gets it back.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct RecordError {
    /// The fatal alert we owe the peer (RFC 8446 §6.2); `None` when the peer sent one.
    alert: Option<u8>,
    /// Metric label ([`RecordError::reason`]).
    reason: &'static str,
    detail: Cow<'static, str>,
}

impl RecordError {
    /// The record-layer error inside `e`, if that is what `e` is.
    pub(crate) fn find(e: &io::Error) -> Option<&RecordError> {
        e.get_ref()?.downcast_ref()
    }

    /// A short label for metrics: `tls_record_overflow`, `tls_key_update_limit`,
    /// `tls_send_buffer_limit`, `tls_bad_record_mac`, `tls_peer_alert` or
    /// `tls_protocol_error`.
    pub(crate) fn reason(&self) -> &'static str {
        self.reason
    }

    /// The fatal alert to send the peer, if any.
    pub(super) fn alert(&self) -> Option<u8> {
        self.alert
    }
}

/// A fatal record-layer error as an [`io::Error`].
pub(super) fn fatal(
    alert: Option<u8>,
    reason: &'static str,
    detail: impl Into<Cow<'static, str>>,
) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        RecordError {
            alert,
            reason,
            detail: detail.into(),
        },
    )
}

fn protocol(alert: u8, detail: impl Into<Cow<'static, str>>) -> io::Error {
    fatal(Some(alert), "tls_protocol_error", detail)
}

fn overflow(detail: impl Into<Cow<'static, str>>) -> io::Error {
    fatal(Some(ALERT_RECORD_OVERFLOW), "tls_record_overflow", detail)
}

/// Local failures (bad key material, exhausted sequence numbers): not the peer's fault.
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
            return Err(protocol(
                ALERT_UNEXPECTED_MESSAGE,
                format!("unexpected TLS record type {typ} (version {v0}.{v1}) after the handshake"),
            ));
        }
        if len > MAX_CIPHERTEXT {
            return Err(overflow(format!(
                "TLS record length {len} out of range (record_overflow)"
            )));
        }
        if len <= TAG_LEN {
            return Err(protocol(
                ALERT_DECODE_ERROR,
                format!("TLS record length {len} out of range"),
            ));
        }
        // Known before decrypting: the inner plaintext is the ciphertext less the tag.
        if len - TAG_LEN > MAX_INNER_PLAINTEXT {
            return Err(overflow(format!(
                "TLS record plaintext of {} bytes with padding exceeds 2^14 + 1 (record_overflow)",
                len - TAG_LEN
            )));
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
            .map_err(|_| {
                fatal(
                    Some(ALERT_BAD_RECORD_MAC),
                    "tls_bad_record_mac",
                    "TLS record failed to decrypt (bad_record_mac)",
                )
            })?;
        // Inner plaintext: content ‖ type ‖ zero padding (RFC 8446 §5.4).
        let Some(type_at) = plain.iter().rposition(|b| *b != 0) else {
            return Err(protocol(
                ALERT_UNEXPECTED_MESSAGE,
                "TLS record without a content type",
            ));
        };
        let typ = plain.get(type_at).copied().unwrap_or(0);
        Ok(Some(OpenedRecord {
            len: HEADER_LEN + len,
            typ,
            content: HEADER_LEN..HEADER_LEN + type_at,
        }))
    }

    /// Append one record of type `typ` holding `content` (at most 16 KiB) to `tx`. On an
    /// error `tx` is left as it was.
    pub(crate) fn seal_record(
        &mut self,
        typ: u8,
        content: &[u8],
        tx: &mut Vec<u8>,
    ) -> io::Result<()> {
        let len = content.len() + 1 + TAG_LEN;
        let len16 = u16::try_from(len).map_err(|_| bad("record too long"))?;
        let nonce = self.tx.next_nonce()?;
        let [l0, l1] = len16.to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, l0, l1];
        // Sealed in place past the end of what `tx` holds; cut off again on failure.
        let record_start = tx.len();
        tx.reserve(HEADER_LEN + len);
        tx.extend_from_slice(&header);
        let start = tx.len();
        tx.extend_from_slice(content);
        tx.push(typ);
        let body = tx.get_mut(start..).unwrap_or_default();
        match self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
        {
            Ok(tag) => {
                tx.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                tx.truncate(record_start);
                Err(bad("TLS record encryption failed"))
            }
        }
    }

    /// Switch to the peer's next sending key (after its KeyUpdate).
    pub(crate) fn set_rx(&mut self, seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<()> {
        self.rx = DirectionKey::new(seq, secrets)?;
        Ok(())
    }
}

/// A TLS 1.3 server connection's record layer after the handshake.
pub(super) struct Records {
    kernel: KernelConnection<ServerConnectionData>,
    keys: RecordKeys,
    /// Records sealed under one key before a KeyUpdate ([`TX_RECORDS_PER_KEY`]).
    tx_records_per_key: u64,
    /// KeyUpdates received since the last application data.
    key_updates_in_a_row: u8,
    /// The peer asked for a KeyUpdate (update_requested) and ours has not been sealed yet.
    key_update_owed: bool,
    /// Sending-key updates so far (tests).
    #[cfg(test)]
    pub(super) tx_key_updates: u32,
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
            key_updates_in_a_row: 0,
            key_update_owed: false,
            #[cfg(test)]
            tx_key_updates: 0,
        })
    }

    /// Tests: move to a new sending key after `n` records.
    #[cfg(test)]
    pub(super) fn set_tx_records_per_key(&mut self, n: u64) {
        self.tx_records_per_key = n;
    }

    /// Open every complete record at the start of `data` in place. Application data goes
    /// to `deliver`. A KeyUpdate that asks for ours only marks it owed
    /// ([`Records::owes_key_update`]): it goes out with [`Records::answer_key_update`] or
    /// before the next application data we seal, whichever comes first, and answers every
    /// request received until then.
    pub(super) fn open(
        &mut self,
        data: &mut [u8],
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
                CONTENT_APPLICATION_DATA => {
                    // Empty records carry nothing and do not count as progress.
                    if !content.is_empty() {
                        self.key_updates_in_a_row = 0;
                    }
                    deliver(content);
                }
                CONTENT_ALERT => match content {
                    [_, ALERT_CLOSE_NOTIFY] => {
                        out.eof = true;
                        return Ok(out);
                    }
                    [_, desc] => {
                        return Err(fatal(
                            None,
                            "tls_peer_alert",
                            format!("peer sent TLS alert {desc}"),
                        ));
                    }
                    _ => return Err(protocol(ALERT_DECODE_ERROR, "malformed TLS alert")),
                },
                CONTENT_HANDSHAKE => {
                    // Only KeyUpdate is expected, alone in its record (it changes the key
                    // for the next record, RFC 8446 §4.6.3).
                    let &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] = content else {
                        return Err(protocol(
                            ALERT_UNEXPECTED_MESSAGE,
                            "unexpected post-handshake message",
                        ));
                    };
                    if request > 1 {
                        return Err(protocol(ALERT_ILLEGAL_PARAMETER, "malformed KeyUpdate"));
                    }
                    if self.key_updates_in_a_row >= MAX_KEY_UPDATES_WITHOUT_DATA {
                        return Err(fatal(
                            Some(ALERT_UNEXPECTED_MESSAGE),
                            "tls_key_update_limit",
                            format!(
                                "more than {MAX_KEY_UPDATES_WITHOUT_DATA} KeyUpdates without \
                                 application data in between"
                            ),
                        ));
                    }
                    self.key_updates_in_a_row += 1;
                    let (seq, secrets) = self.kernel.update_rx_secret().map_err(tls_err)?;
                    self.keys.set_rx(seq, secrets)?;
                    self.key_update_owed |= request == 1;
                }
                _ => {
                    return Err(protocol(
                        ALERT_UNEXPECTED_MESSAGE,
                        "unexpected TLS content type",
                    ));
                }
            }
        }
    }

    /// The peer asked for a KeyUpdate that we have not sent yet.
    pub(super) fn owes_key_update(&self) -> bool {
        self.key_update_owed
    }

    /// Append the KeyUpdate the peer asked for (if any) to `tx`.
    pub(super) fn answer_key_update(&mut self, tx: &mut Vec<u8>) -> io::Result<()> {
        if self.key_update_owed {
            self.update_tx_key(tx)?;
        }
        Ok(())
    }

    /// Append `data` to `tx` as application data records (after the KeyUpdate we owe, if
    /// any).
    pub(super) fn seal(&mut self, data: &[u8], tx: &mut Vec<u8>) -> io::Result<()> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            if self.key_update_owed || self.keys.tx.seq >= self.tx_records_per_key {
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

    /// Append a fatal alert with description `desc` to `tx`.
    pub(super) fn fatal_alert(&mut self, desc: u8, tx: &mut Vec<u8>) -> io::Result<()> {
        self.keys.seal_record(CONTENT_ALERT, &[2, desc], tx)
    }

    /// Send KeyUpdate(update_not_requested) under the current key, then switch keys. It
    /// answers every request received so far. On an error `tx` is left as it was.
    fn update_tx_key(&mut self, tx: &mut Vec<u8>) -> io::Result<()> {
        // The next key first: if rustls cannot derive it, nothing has been sent that
        // promises it.
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_err)?;
        let next = DirectionKey::new(seq, secrets)?;
        self.keys
            .seal_record(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], tx)?;
        self.keys.tx = next;
        self.key_update_owed = false;
        #[cfg(test)]
        {
            self.tx_key_updates += 1;
        }
        Ok(())
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
