//! The client side of STUN (spec §7): the binding request Tailscale clients send, a parser
//! for the server's answer, and one probe of a STUN server with retries. The server side
//! (parsing requests, answering) is [`crate::stun`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::duration::fmt_duration;
use crate::stun::{MAGIC_COOKIE, TxId};

/// SOFTWARE attribute type (spec §7.1).
const STUN_ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute type (spec §7.1).
const STUN_ATTR_FINGERPRINT: u16 = 0x8028;
/// XOR-MAPPED-ADDRESS (spec §7.2).
const STUN_ATTR_XOR_MAPPED: u16 = 0x0020;
/// Non-standard XOR-MAPPED-ADDRESS type Go clients also accept (spec §7.2).
const STUN_ATTR_XOR_MAPPED_ALT: u16 = 0x8020;
/// Plain MAPPED-ADDRESS, Go's fallback (spec §7.2).
const STUN_ATTR_MAPPED: u16 = 0x0001;

/// Builds the 40-byte binding request Tailscale clients send (spec §7.1): SOFTWARE
/// `tailnode`, then FINGERPRINT. Go's derper answers nothing else.
pub fn stun_binding_request(tx: TxId) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&[0x00, 0x01, 0x00, 0x14]);
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&tx.0);
    m.extend_from_slice(&STUN_ATTR_SOFTWARE.to_be_bytes());
    m.extend_from_slice(&[0x00, 0x08]);
    m.extend_from_slice(b"tailnode");
    let fp = crate::stun::fingerprint(&m);
    m.extend_from_slice(&STUN_ATTR_FINGERPRINT.to_be_bytes());
    m.extend_from_slice(&[0x00, 0x04]);
    m.extend_from_slice(&fp.to_be_bytes());
    m
}

/// Why a STUN response was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunResponseError {
    /// Too short, not a Binding Success Response, or no magic cookie.
    #[error("not a STUN binding success response")]
    NotResponse,
    /// The transaction ID is not ours.
    #[error("transaction ID mismatch")]
    WrongTxId,
    /// Attributes run past the end.
    #[error("malformed attributes")]
    Malformed,
    /// No (XOR-)MAPPED-ADDRESS attribute.
    #[error("no mapped address in the response")]
    NoAddress,
}

/// Parses a binding success response to `tx` and returns the mapped address (an
/// IPv4-mapped IPv6 address is un-mapped, as Go does). Never panics.
pub fn parse_binding_response(buf: &[u8], tx: TxId) -> Result<SocketAddr, StunResponseError> {
    let hdr = buf.get(..20).ok_or(StunResponseError::NotResponse)?;
    if hdr.get(..2) != Some(&[0x01, 0x01]) || hdr.get(4..8) != Some(&MAGIC_COOKIE) {
        return Err(StunResponseError::NotResponse);
    }
    if hdr.get(8..20) != Some(&tx.0) {
        return Err(StunResponseError::WrongTxId);
    }
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let attrs = buf.get(20..20 + len).ok_or(StunResponseError::Malformed)?;
    let mut fallback = None;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let val = attrs
            .get(i + 4..i + 4 + alen)
            .ok_or(StunResponseError::Malformed)?;
        match typ {
            STUN_ATTR_XOR_MAPPED | STUN_ATTR_XOR_MAPPED_ALT => {
                if let Some(a) = decode_address(val, Some(&tx)) {
                    return Ok(a);
                }
            }
            STUN_ATTR_MAPPED => fallback = fallback.or_else(|| decode_address(val, None)),
            _ => {}
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    fallback.ok_or(StunResponseError::NoAddress)
}

fn decode_address(val: &[u8], xor_tx: Option<&TxId>) -> Option<SocketAddr> {
    let family = *val.get(1)?;
    let mut port = u16::from_be_bytes([*val.get(2)?, *val.get(3)?]);
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE);
    if let Some(tx) = xor_tx {
        port ^= 0x2112;
        mask[4..].copy_from_slice(&tx.0);
    } else {
        mask = [0; 16];
    }
    let ip = match family {
        1 => {
            let a = val.get(4..8)?;
            let mut o = [0u8; 4];
            for (k, b) in o.iter_mut().enumerate() {
                *b = a[k] ^ mask[k];
            }
            IpAddr::from(o)
        }
        2 => {
            let a = val.get(4..20)?;
            let mut o = [0u8; 16];
            for (k, b) in o.iter_mut().enumerate() {
                *b = a[k] ^ mask[k];
            }
            let v6 = std::net::Ipv6Addr::from(o);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Sends binding requests to `target` (three attempts spread over `timeout`) and returns
/// the mapped address and the round-trip time of the answered request.
pub async fn stun_probe(
    target: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, Duration), String> {
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    let attempts = 3u32;
    let per = timeout / attempts;
    let mut buf = [0u8; 1024];
    for _ in 0..attempts {
        let tx = TxId(rand::random());
        let req = stun_binding_request(tx);
        let start = Instant::now();
        sock.send_to(&req, target)
            .await
            .map_err(|e| format!("sending to {target}: {e}"))?;
        let deadline = start + per;
        loop {
            let r = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await;
            match r {
                Err(_) => break,
                Ok(Err(e)) => {
                    // ICMP port unreachable surfaces as ECONNREFUSED on some systems.
                    return Err(format!("no STUN answer from {target}: {e}"));
                }
                Ok(Ok((n, from))) => {
                    if from != target {
                        continue;
                    }
                    match parse_binding_response(buf.get(..n).unwrap_or_default(), tx) {
                        Ok(mapped) => return Ok((mapped, start.elapsed())),
                        Err(StunResponseError::WrongTxId) => continue,
                        Err(e) => return Err(format!("bad STUN answer from {target}: {e}")),
                    }
                }
            }
        }
    }
    Err(format!(
        "no STUN answer from {target} within {} ({attempts} requests)",
        fmt_duration(timeout)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_request_matches_spec_vector() {
        let tx = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(
            hex::encode(stun_binding_request(tx)),
            "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f"
        );
        assert_eq!(
            crate::stun::parse_binding_request(&stun_binding_request(tx)),
            Ok(tx)
        );
    }

    #[test]
    fn stun_response_vectors_parse() {
        let tx = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let v4 = hex::decode("0101000c2112a4420102030405060708090a0b0c00200008000183bbea12d545")
            .unwrap();
        assert_eq!(
            parse_binding_response(&v4, tx).unwrap(),
            "203.0.113.7:41641".parse().unwrap()
        );
        let v6 = hex::decode(
            "010100182112a4420102030405060708090a0b0c00200014000283bb0113a9fa0102030405060708090a0b0d",
        )
        .unwrap();
        assert_eq!(
            parse_binding_response(&v6, tx).unwrap(),
            "[2001:db8::1]:41641".parse().unwrap()
        );
        let other = TxId([9; 12]);
        assert_eq!(
            parse_binding_response(&v4, other),
            Err(StunResponseError::WrongTxId)
        );
        for n in 0..v6.len() {
            let _ = parse_binding_response(&v6[..n], tx);
        }
    }
}
