//! The STUN responder (spec §7): parses Tailscale binding requests and answers with an
//! XOR-MAPPED-ADDRESS, plus the UDP serve loop and its metrics.
//!
//! Parity with Go's `net/stun` + `net/stunserver`: only binding requests carrying
//! `SOFTWARE = "tailnode"` and a valid trailing FINGERPRINT are answered (spec §7.1);
//! everything else is dropped silently and counted as `not_stun`. One deliberate
//! difference (spec §7.2 "SHOULD"): an IPv4 client seen on a dual-stack socket as
//! `::ffff:a.b.c.d` is answered with family `01` and its IPv4 address.
//!
//! Not here: binding the socket (the caller owns listener set-up) and any client side.
#![warn(clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// STUN header length (spec §7.1).
pub const HEADER_LEN: usize = 20;
/// The magic cookie at bytes 4–7 (spec §7.1, RFC 5389).
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Message type of a Binding Request (spec §7.1).
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
/// Message type of a Binding Success Response (spec §7.2).
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
/// SOFTWARE attribute type (spec §7.1).
const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute type (spec §7.1).
const ATTR_FINGERPRINT: u16 = 0x8028;
/// XOR-MAPPED-ADDRESS attribute type (spec §7.2).
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// The SOFTWARE value Tailscale clients send (spec §7.1).
const SOFTWARE: &[u8] = b"tailnode";
/// FINGERPRINT = CRC-32 XOR this ("STUN", spec §7.1, RFC 5389 §15.5).
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Bytes the FINGERPRINT attribute takes at the end of the datagram (type+len+crc).
const FINGERPRINT_ATTR_LEN: usize = 8;
/// Largest datagram read (spec §7.1: 64 KiB).
const MAX_DATAGRAM: usize = 64 * 1024;
/// Response sizes (spec §7.2).
pub const RESPONSE_LEN_V4: usize = 32;
/// Response size for an IPv6 client (spec §7.2).
pub const RESPONSE_LEN_V6: usize = 44;
/// Largest response; the size of the buffer [`write_binding_response`] needs.
pub const MAX_RESPONSE_LEN: usize = RESPONSE_LEN_V6;

/// A 12-byte STUN transaction ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TxId(pub [u8; 12]);

/// Why a datagram is not answered. All of these count as `not_stun` (spec §7.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ParseError {
    /// Shorter than 20 bytes, top two bits set, or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message, but not a Binding Request.
    #[error("not a STUN binding request")]
    NotBindingRequest,
    /// An attribute runs past the end of the datagram.
    #[error("malformed STUN attributes")]
    MalformedAttrs,
    /// No SOFTWARE attribute equal to `tailnode`.
    #[error("missing or wrong SOFTWARE attribute")]
    WrongSoftware,
    /// The last attribute is not a 4-byte FINGERPRINT.
    #[error("FINGERPRINT is not the last attribute")]
    NoFingerprint,
    /// The FINGERPRINT does not match the datagram.
    #[error("wrong STUN FINGERPRINT")]
    WrongFingerprint,
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// Parse a Tailscale STUN binding request exactly as Go's `stun.ParseBindingRequest`
/// (spec §7.1). Never panics.
pub fn parse_binding_request(buf: &[u8]) -> Result<TxId, ParseError> {
    // 1. "Is STUN".
    let header = buf.get(..HEADER_LEN).ok_or(ParseError::NotStun)?;
    let (Some(first), Some(cookie), Some(tx)) =
        (header.first(), header.get(4..8), header.get(8..HEADER_LEN))
    else {
        return Err(ParseError::NotStun);
    };
    if first & 0b1100_0000 != 0 || cookie != MAGIC_COOKIE {
        return Err(ParseError::NotStun);
    }
    // 2. Binding request.
    if header.get(..2) != Some(&BINDING_REQUEST[..]) {
        return Err(ParseError::NotBindingRequest);
    }
    let tx = TxId(tx.try_into().map_err(|_| ParseError::NotStun)?);

    // 3. Walk the attributes to the end of the datagram (the header length is ignored).
    let mut rest = buf.get(HEADER_LEN..).unwrap_or_default();
    let mut software_ok = false;
    let mut last: Option<(u16, &[u8])> = None;
    while !rest.is_empty() {
        let (Some(typ), Some(len)) = (u16_at(rest, 0), u16_at(rest, 2)) else {
            return Err(ParseError::MalformedAttrs);
        };
        let len = usize::from(len);
        let padded = (len + 3) & !3;
        let body = rest.get(4..).unwrap_or_default();
        let (Some(value), Some(next)) = (body.get(..len), body.get(padded..)) else {
            return Err(ParseError::MalformedAttrs);
        };
        if typ == ATTR_SOFTWARE && value == SOFTWARE {
            software_ok = true;
        }
        last = Some((typ, value));
        rest = next;
    }
    // 4. SOFTWARE = tailnode.
    if !software_ok {
        return Err(ParseError::WrongSoftware);
    }
    // 5. FINGERPRINT last, over everything before it.
    let Some((ATTR_FINGERPRINT, fp)) = last else {
        return Err(ParseError::NoFingerprint);
    };
    let got = <[u8; 4]>::try_from(fp).map_err(|_| ParseError::NoFingerprint)?;
    let covered = buf
        .len()
        .checked_sub(FINGERPRINT_ATTR_LEN)
        .and_then(|n| buf.get(..n))
        .ok_or(ParseError::NoFingerprint)?;
    if u32::from_be_bytes(got) != fingerprint(covered) {
        return Err(ParseError::WrongFingerprint);
    }
    Ok(tx)
}

/// STUN FINGERPRINT value of `data`: CRC-32/IEEE XOR `0x5354554e`.
pub fn fingerprint(data: &[u8]) -> u32 {
    crc32(data) ^ FINGERPRINT_XOR
}

/// CRC-32/IEEE (reflected, polynomial `0xedb88320`), table-driven.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        let [low, ..] = crc.to_le_bytes();
        let idx = usize::from(low ^ b);
        // `idx` < 256 = table length, so this never fails.
        crc = CRC32_TABLE.get(idx).copied().unwrap_or(0) ^ (crc >> 8);
    }
    !crc
}

// Evaluated at compile time: an out-of-bounds index or a bad cast would fail the build.
#[allow(clippy::indexing_slicing, clippy::cast_possible_truncation)]
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// Write the binding success response for `tx` / `addr` into `out` (spec §7.2) and return
/// its length: 32 for IPv4 (including IPv4-mapped IPv6 addresses), 44 for IPv6.
pub fn write_binding_response(
    tx: TxId,
    addr: SocketAddr,
    out: &mut [u8; MAX_RESPONSE_LEN],
) -> usize {
    let ip = addr.ip().to_canonical();
    let (family, attr_len) = match ip {
        IpAddr::V4(_) => (1u8, 8u16),
        IpAddr::V6(_) => (2u8, 20u16),
    };
    let mut w = Writer { out, pos: 0 };
    w.put(&BINDING_SUCCESS);
    w.put(&(attr_len + 4).to_be_bytes());
    w.put(&MAGIC_COOKIE);
    w.put(&tx.0);
    w.put(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    w.put(&attr_len.to_be_bytes());
    w.put(&[0, family]);
    w.put(&(addr.port() ^ 0x2112).to_be_bytes());
    // Address XOR (cookie ‖ transaction ID).
    let mut mask = [0u8; 16];
    for (m, k) in mask.iter_mut().zip(MAGIC_COOKIE.iter().chain(tx.0.iter())) {
        *m = *k;
    }
    match ip {
        IpAddr::V4(v4) => {
            let mut a = v4.octets();
            a.iter_mut().zip(mask).for_each(|(b, m)| *b ^= m);
            w.put(&a);
        }
        IpAddr::V6(v6) => {
            let mut a = v6.octets();
            a.iter_mut().zip(mask).for_each(|(b, m)| *b ^= m);
            w.put(&a);
        }
    }
    w.pos
}

/// Bounds-checked cursor over the fixed response buffer (sizes are compile-time known to
/// fit: at most 44 bytes are written into 44).
struct Writer<'a> {
    out: &'a mut [u8; MAX_RESPONSE_LEN],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        if let Some(dst) = self.out.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
            self.pos = end;
        }
    }
}

/// The binding success response for `tx` / `addr` (spec §7.2) as a new vector.
pub fn binding_response(tx: TxId, addr: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let n = write_binding_response(tx, addr, &mut out);
    out.get(..n).unwrap_or_default().to_vec()
}

/// STUN counters, modelled on Go's `stun_requests{disposition}` and
/// `stun_addrfamily{family}` (spec §10). Registered without a prefix of their own: the
/// caller's registry carries `derper_`, giving `derper_stun_requests_total` and
/// `derper_stun_addrfamily_total`.
///
/// The counters are resolved once at registration, so counting costs one atomic add.
#[derive(Clone, Debug)]
pub struct StunMetrics {
    success: Counter,
    not_stun: Counter,
    read_error: Counter,
    write_error: Counter,
    ipv4: Counter,
    ipv6: Counter,
}

type Labels = [(&'static str, &'static str); 1];

impl StunMetrics {
    /// Register the STUN metrics in `registry` (every label value pre-created at 0).
    pub fn register(registry: &mut Registry) -> StunMetrics {
        let requests = Family::<Labels, Counter>::default();
        let families = Family::<Labels, Counter>::default();
        registry.register(
            "stun_requests",
            "STUN datagrams received, by disposition: success (answered), not_stun (not a \
             Tailscale binding request, ignored), read_error, write_error (answer not sent)",
            requests.clone(),
        );
        registry.register(
            "stun_addrfamily",
            "STUN binding requests answered, by the client's address family",
            families.clone(),
        );
        let get = |f: &Family<Labels, Counter>, k: &'static str, v: &'static str| {
            f.get_or_create(&[(k, v)]).clone()
        };
        StunMetrics {
            success: get(&requests, "disposition", "success"),
            not_stun: get(&requests, "disposition", "not_stun"),
            read_error: get(&requests, "disposition", "read_error"),
            write_error: get(&requests, "disposition", "write_error"),
            ipv4: get(&families, "family", "ipv4"),
            ipv6: get(&families, "family", "ipv6"),
        }
    }

    /// Metrics not attached to any registry (tests, or STUN without metrics).
    pub fn unregistered() -> StunMetrics {
        StunMetrics::register(&mut Registry::default())
    }

    /// Answered requests.
    pub fn success(&self) -> u64 {
        self.success.get()
    }

    /// Ignored datagrams (not a Tailscale binding request).
    pub fn not_stun(&self) -> u64 {
        self.not_stun.get()
    }

    /// Failed receives and failed sends: `(read_error, write_error)`.
    pub fn errors(&self) -> (u64, u64) {
        (self.read_error.get(), self.write_error.get())
    }

    /// Answered requests by family: `(ipv4, ipv6)`.
    pub fn families(&self) -> (u64, u64) {
        (self.ipv4.get(), self.ipv6.get())
    }
}

/// Answer STUN binding requests on `socket` until `cancel` fires.
///
/// Receives up to 32 datagrams (`BATCH`) per `recvmmsg(2)` and sends the answers with one
/// `sendmmsg(2)` (see [`crate::udp`]); buffers are allocated once; never panics; logs per
/// datagram only at `trace`.
pub async fn serve(socket: UdpSocket, metrics: StunMetrics, cancel: CancellationToken) {
    // Each slot takes a whole 64 KiB datagram (spec §7.1), so a long datagram is parsed
    // like Go parses it, never truncated into something that looks valid. The slots are
    // one lazily paged allocation: only the pages datagrams land in become resident.
    let mut rx = crate::udp::RecvBatch::new(BATCH, MAX_DATAGRAM);
    let mut tx = crate::udp::SendBatch::new(BATCH, MAX_RESPONSE_LEN);
    if let Ok(addr) = socket.local_addr() {
        tracing::info!(%addr, "STUN server listening");
    }
    // One cancellation future for the whole loop, not one per datagram.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut counts = Counts::default();
    'outer: loop {
        counts.flush(&metrics);
        tokio::select! {
            biased;
            () = &mut cancelled => break,
            r = socket.readable() => if r.is_err() {
                metrics.read_error.inc();
                tokio::select! {
                    () = &mut cancelled => break,
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                continue;
            },
        }
        // Drain what is queued without a select! or a readiness wait per batch; at most
        // TURNS batches per wakeup so other tasks (and cancellation) get to run.
        for _ in 0..TURNS {
            match rx.try_recv(&socket) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue 'outer,
                Err(e) => {
                    metrics.read_error.inc();
                    tracing::trace!(error = %e, "stun read error");
                    // ICMP-induced errors (refused/reset) are per-datagram; anything else
                    // may persist, so do not spin on it.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) {
                        counts.flush(&metrics);
                        tokio::select! {
                            () = &mut cancelled => break 'outer,
                            () = tokio::time::sleep(Duration::from_millis(10)) => {}
                        }
                        continue 'outer;
                    }
                    continue;
                }
            }
            for d in rx.iter() {
                let Some(src) = d.src else {
                    counts.not_stun += 1;
                    continue;
                };
                let parsed = if d.truncated {
                    // Longer than 64 KiB: Go reads only the first 64 KiB too, and the
                    // FINGERPRINT cannot be the last attribute of what it read.
                    Err(ParseError::NoFingerprint)
                } else {
                    parse_binding_request(d.data)
                };
                let txid = match parsed {
                    Ok(txid) => txid,
                    Err(e) => {
                        counts.not_stun += 1;
                        tracing::trace!(%src, error = %e, "ignoring non-STUN datagram");
                        continue;
                    }
                };
                match src.ip().to_canonical() {
                    IpAddr::V4(_) => counts.ipv4 += 1,
                    IpAddr::V6(_) => counts.ipv6 += 1,
                };
                tx.push(
                    Some(src),
                    |slot| match <&mut [u8; MAX_RESPONSE_LEN]>::try_from(slot) {
                        Ok(out) => write_binding_response(txid, src, out),
                        Err(_) => 0,
                    },
                );
            }
            while tx.pending() > 0 {
                match tx.try_send(&socket) {
                    Ok(n) => counts.success += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Send buffer full: wait for room, as a plain send_to would.
                        counts.flush(&metrics);
                        tokio::select! {
                            biased;
                            () = &mut cancelled => break 'outer,
                            r = socket.writable() => if r.is_err() {
                                counts.write_error += tx.pending() as u64;
                                tx.clear();
                            },
                        }
                    }
                    Err(e) => {
                        counts.write_error += 1;
                        tracing::trace!(error = %e, "stun write error");
                        tx.skip_one();
                    }
                }
            }
        }
        // A full set of batches: let other tasks run before draining more.
        counts.flush(&metrics);
        tokio::task::yield_now().await;
    }
    counts.flush(&metrics);
}

/// Datagrams per `recvmmsg` / `sendmmsg` call.
const BATCH: usize = 32;
/// Batches handled per readiness wakeup before the task yields.
const TURNS: usize = 4;

/// Per-batch counters, added to the shared metrics once per batch.
#[derive(Debug, Default)]
struct Counts {
    success: u64,
    not_stun: u64,
    write_error: u64,
    ipv4: u64,
    ipv6: u64,
}

impl Counts {
    fn flush(&mut self, m: &StunMetrics) {
        for (n, c) in [
            (self.success, &m.success),
            (self.not_stun, &m.not_stun),
            (self.write_error, &m.write_error),
            (self.ipv4, &m.ipv4),
            (self.ipv6, &m.ipv6),
        ] {
            if n > 0 {
                c.inc_by(n);
            }
        }
        *self = Self::default();
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REQUEST: &str =
        "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f";
    const RESPONSE_V4: &str = "0101000c2112a4420102030405060708090a0b0c00200008000183bbea12d545";
    const RESPONSE_V6: &str =
        "010100182112a4420102030405060708090a0b0c00200014000283bb0113a9fa0102030405060708090a0b0d";
    const TX: TxId = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

    fn req() -> Vec<u8> {
        hex::decode(REQUEST).expect("hex")
    }

    /// Build a request with the given attributes and a correct trailing FINGERPRINT.
    fn build(typ: [u8; 2], attrs: &[(u16, &[u8])], with_fp: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&typ);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&TX.0);
        for (t, v) in attrs {
            b.extend_from_slice(&t.to_be_bytes());
            b.extend_from_slice(&u16::try_from(v.len()).expect("len").to_be_bytes());
            b.extend_from_slice(v);
            while b.len() % 4 != 0 {
                b.push(0);
            }
        }
        if with_fp {
            b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
            b.extend_from_slice(&4u16.to_be_bytes());
            let fp = fingerprint(&b[..b.len() - 4]);
            b.extend_from_slice(&fp.to_be_bytes());
        }
        let len = u16::try_from(b.len() - HEADER_LEN).expect("len");
        b[2..4].copy_from_slice(&len.to_be_bytes());
        if with_fp {
            // The length field is covered by the fingerprint: recompute.
            let n = b.len();
            let fp = fingerprint(&b[..n - 8]);
            b[n - 4..].copy_from_slice(&fp.to_be_bytes());
        }
        b
    }

    #[test]
    fn golden_request_parses() {
        assert_eq!(parse_binding_request(&req()), Ok(TX));
        assert_eq!(
            build(BINDING_REQUEST, &[(ATTR_SOFTWARE, SOFTWARE)], true),
            req()
        );
    }

    #[test]
    fn golden_responses() {
        let v4: SocketAddr = "203.0.113.7:41641".parse().expect("addr");
        assert_eq!(hex::encode(binding_response(TX, v4)), RESPONSE_V4);
        let v6: SocketAddr = "[2001:db8::1]:41641".parse().expect("addr");
        assert_eq!(hex::encode(binding_response(TX, v6)), RESPONSE_V6);
        assert_eq!(binding_response(TX, v4).len(), RESPONSE_LEN_V4);
        assert_eq!(binding_response(TX, v6).len(), RESPONSE_LEN_V6);
        // An IPv4 client seen as ::ffff:a.b.c.d on a dual-stack socket gets family 01.
        let mapped: SocketAddr = "[::ffff:203.0.113.7]:41641".parse().expect("addr");
        assert_eq!(hex::encode(binding_response(TX, mapped)), RESPONSE_V4);
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn bad_fingerprint_is_rejected() {
        let mut b = req();
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(parse_binding_request(&b), Err(ParseError::WrongFingerprint));
        // Any change in the covered bytes breaks it too (e.g. the transaction ID).
        let mut b = req();
        b[10] ^= 0x80;
        assert_eq!(parse_binding_request(&b), Err(ParseError::WrongFingerprint));
    }

    #[test]
    fn software_must_be_tailnode() {
        let no_sw = build(BINDING_REQUEST, &[], true);
        assert_eq!(
            parse_binding_request(&no_sw),
            Err(ParseError::WrongSoftware)
        );
        let other = build(BINDING_REQUEST, &[(ATTR_SOFTWARE, b"tailnodf")], true);
        assert_eq!(
            parse_binding_request(&other),
            Err(ParseError::WrongSoftware)
        );
        let longer = build(BINDING_REQUEST, &[(ATTR_SOFTWARE, b"tailnode2")], true);
        assert_eq!(
            parse_binding_request(&longer),
            Err(ParseError::WrongSoftware)
        );
        // Extra attributes are fine as long as FINGERPRINT is last.
        let extra = build(
            BINDING_REQUEST,
            &[
                (0x0006, b"user"),
                (ATTR_SOFTWARE, SOFTWARE),
                (0x8029, &[0; 8]),
            ],
            true,
        );
        assert_eq!(parse_binding_request(&extra), Ok(TX));
    }

    #[test]
    fn fingerprint_must_be_last_and_present() {
        let no_fp = build(BINDING_REQUEST, &[(ATTR_SOFTWARE, SOFTWARE)], false);
        assert_eq!(
            parse_binding_request(&no_fp),
            Err(ParseError::NoFingerprint)
        );
        let mut trailing = req();
        trailing.extend_from_slice(&[0x00, 0x06, 0x00, 0x00]);
        assert_eq!(
            parse_binding_request(&trailing),
            Err(ParseError::NoFingerprint)
        );
    }

    #[test]
    fn non_binding_and_non_stun_are_rejected() {
        let indication = build([0x00, 0x11], &[(ATTR_SOFTWARE, SOFTWARE)], true);
        assert_eq!(
            parse_binding_request(&indication),
            Err(ParseError::NotBindingRequest)
        );
        let response = build(BINDING_SUCCESS, &[(ATTR_SOFTWARE, SOFTWARE)], true);
        assert_eq!(
            parse_binding_request(&response),
            Err(ParseError::NotBindingRequest)
        );
        let mut top_bits = req();
        top_bits[0] |= 0x40;
        assert_eq!(parse_binding_request(&top_bits), Err(ParseError::NotStun));
        let mut cookie = req();
        cookie[5] ^= 1;
        assert_eq!(parse_binding_request(&cookie), Err(ParseError::NotStun));
        assert_eq!(
            parse_binding_request(b"GET / HTTP/1.1\r\n\r\nxx"),
            Err(ParseError::NotStun)
        );
        assert_eq!(parse_binding_request(&[]), Err(ParseError::NotStun));
    }

    #[test]
    fn truncated_requests_are_rejected() {
        let full = req();
        for n in 0..full.len() {
            assert!(
                parse_binding_request(&full[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        // A header-only binding request has neither SOFTWARE nor FINGERPRINT.
        assert_eq!(
            parse_binding_request(&full[..20]),
            Err(ParseError::WrongSoftware)
        );
        // Attribute header cut short / value running past the end.
        assert_eq!(
            parse_binding_request(&full[..22]),
            Err(ParseError::MalformedAttrs)
        );
        assert_eq!(
            parse_binding_request(&full[..30]),
            Err(ParseError::MalformedAttrs)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_binding_request(&bytes);
        }

        #[test]
        fn parse_never_panics_on_perturbed_vector(
            flips in proptest::collection::vec((0usize..40, any::<u8>()), 1..4),
            cut in 0usize..48,
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut b = req();
            for (i, x) in &flips {
                b[*i] ^= *x;
            }
            b.truncate(cut.min(b.len()));
            b.extend_from_slice(&tail);
            let r = parse_binding_request(&b);
            // Only the intact vector may parse, and then with its own transaction ID.
            if b == req() {
                prop_assert_eq!(r, Ok(TX));
            }
        }

        #[test]
        fn response_roundtrips_any_address(
            tx in any::<[u8; 12]>(),
            ip in any::<IpAddr>(),
            port in any::<u16>(),
        ) {
            let addr = SocketAddr::new(ip, port);
            let r = binding_response(TxId(tx), addr);
            let canonical = ip.to_canonical();
            prop_assert_eq!(r.len(), if canonical.is_ipv4() { 32 } else { 44 });
            prop_assert_eq!(&r[..2], &[1, 1]);
            prop_assert_eq!(usize::from(u16::from_be_bytes([r[2], r[3]])), r.len() - HEADER_LEN);
            prop_assert_eq!(&r[8..20], &tx);
            let port_back = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
            prop_assert_eq!(port_back, port);
            let mut key = MAGIC_COOKIE.to_vec();
            key.extend_from_slice(&tx);
            let addr_back: Vec<u8> = r[28..].iter().zip(key).map(|(a, k)| a ^ k).collect();
            let expect = match canonical {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            prop_assert_eq!(addr_back, expect);
        }
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn recv_reply(sock: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 128];
        match tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn udp_loop_answers_requests_and_ignores_garbage() {
        let mut registry = Registry::with_prefix("derper");
        let metrics = StunMetrics::register(&mut registry);
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(server, metrics.clone(), cancel.clone()));

        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(server_addr).await.expect("connect");
        let client_addr = client.local_addr().expect("addr");

        // Garbage and a non-Tailscale request first: no reply.
        client.send(b"definitely not stun").await.expect("send");
        let no_sw = build(BINDING_REQUEST, &[], true);
        client.send(&no_sw).await.expect("send");
        assert_eq!(recv_reply(&client).await, None);

        client.send(&req()).await.expect("send");
        let reply = recv_reply(&client).await.expect("reply");
        let mut expect = [0u8; MAX_RESPONSE_LEN];
        let n = write_binding_response(TX, client_addr, &mut expect);
        assert_eq!(reply, &expect[..n]);
        assert_eq!(reply.len(), RESPONSE_LEN_V4);

        // `success` is counted right after the send returns: wait for it.
        wait_for(|| metrics.success() == 1).await;
        assert_eq!(metrics.not_stun(), 2);
        assert_eq!(metrics.families(), (1, 0));
        assert_eq!(metrics.errors(), (0, 0));

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"derper_stun_requests_total{disposition="success"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"derper_stun_requests_total{disposition="not_stun"} 2"#));
        assert!(text.contains(r#"derper_stun_requests_total{disposition="write_error"} 0"#));
        assert!(text.contains(r#"derper_stun_addrfamily_total{family="ipv4"} 1"#));

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve stops on cancel")
            .expect("no panic");
    }

    #[tokio::test]
    async fn udp_loop_answers_ipv6_clients() {
        // IPv6 loopback (::1) exists on every machine this suite runs on (other tests dial
        // it too): failing to bind it fails the test instead of skipping it.
        let server = UdpSocket::bind("[::1]:0")
            .await
            .expect("bind [::1]:0 (IPv6 loopback is required)");
        let server_addr = server.local_addr().expect("addr");
        let metrics = StunMetrics::unregistered();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(server, metrics.clone(), cancel.clone()));
        let client = UdpSocket::bind("[::1]:0").await.expect("bind");
        client.connect(server_addr).await.expect("connect");
        client.send(&req()).await.expect("send");
        let reply = recv_reply(&client).await.expect("reply");
        assert_eq!(
            reply,
            binding_response(TX, client.local_addr().expect("addr"))
        );
        assert_eq!(reply.len(), RESPONSE_LEN_V6);
        assert_eq!(metrics.families(), (0, 1));
        wait_for(|| metrics.success() == 1).await;
        cancel.cancel();
        task.await.expect("no panic");
    }
}
