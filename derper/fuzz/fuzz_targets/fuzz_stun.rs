//! STUN binding-request parser (spec §7.1) and the response it leads to (§7.2).
//!
//! Input: `[mode][addr: 16][port: 2][rest]`.
//!
//! * mode bit 0 clear: `rest` is a datagram as received.
//! * mode bit 0 set: `rest` describes a request that the harness builds like a Tailscale
//!   client: `[txid: 12]` then attributes `[type: 2][len: 1][value]`, padded, with a correct
//!   FINGERPRINT appended; mode bit 1 adds `SOFTWARE=tailnode` first. The parser must accept
//!   it exactly when a `SOFTWARE=tailnode` attribute is present, with this transaction ID.
//!
//! Whenever a datagram parses, the response for the address (IPv4 when mode bit 2 is set)
//! must decode back to the transaction ID and the client's address.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use derper::stun::{self, ParseError, TxId};
use derper_fuzz::Take;
use libfuzzer_sys::fuzz_target;

const SOFTWARE: u16 = 0x8022;
const FINGERPRINT: u16 = 0x8028;

fn build(mut t: Take<'_>, with_software: bool) -> (Vec<u8>, TxId, bool) {
    let tx = TxId(t.array());
    let mut m = vec![0x00, 0x01, 0, 0];
    m.extend_from_slice(&stun::MAGIC_COOKIE);
    m.extend_from_slice(&tx.0);
    let mut has_software = false;
    let mut attrs: Vec<(u16, Vec<u8>)> = Vec::new();
    if with_software {
        attrs.push((SOFTWARE, b"tailnode".to_vec()));
    }
    while !t.0.is_empty() {
        let typ = t.u16();
        let len = usize::from(t.u8());
        attrs.push((typ, t.bytes(len).to_vec()));
    }
    for (typ, v) in &attrs {
        has_software |= *typ == SOFTWARE && v == b"tailnode";
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&u16::try_from(v.len()).expect("short").to_be_bytes());
        m.extend_from_slice(v);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let body_len = u16::try_from(m.len() - stun::HEADER_LEN + 8).unwrap_or(u16::MAX);
    m[2..4].copy_from_slice(&body_len.to_be_bytes());
    let fp = stun::fingerprint(&m);
    m.extend_from_slice(&FINGERPRINT.to_be_bytes());
    m.extend_from_slice(&4u16.to_be_bytes());
    m.extend_from_slice(&fp.to_be_bytes());
    (m, tx, has_software)
}

/// Decodes a binding success response by RFC 5389, independently of the encoder.
fn decode_response(r: &[u8]) -> (TxId, SocketAddr) {
    assert_eq!(&r[0..2], &[0x01, 0x01], "not a binding success");
    assert_eq!(usize::from(u16::from_be_bytes([r[2], r[3]])), r.len() - 20);
    assert_eq!(&r[4..8], &stun::MAGIC_COOKIE);
    let tx = TxId(r[8..20].try_into().expect("12 bytes"));
    assert_eq!(&r[20..22], &[0x00, 0x20], "not XOR-MAPPED-ADDRESS");
    let alen = usize::from(u16::from_be_bytes([r[22], r[23]]));
    assert_eq!(alen, r.len() - 24);
    let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
    let mut key = stun::MAGIC_COOKIE.to_vec();
    key.extend_from_slice(&tx.0);
    let a: Vec<u8> = r[28..].iter().zip(&key).map(|(b, k)| b ^ k).collect();
    let ip = match (r[25], a.len()) {
        (1, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&a[..]).expect("4"))),
        (2, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&a[..]).expect("16"))),
        other => panic!("bad family/length {other:?}"),
    };
    (tx, SocketAddr::new(ip, port))
}

fuzz_target!(|input: &[u8]| {
    let mut t = Take(input);
    let mode = t.u8();
    let ip16: [u8; 16] = t.array();
    let port = t.u16();
    let ip = if mode & 4 != 0 {
        IpAddr::V4(Ipv4Addr::new(ip16[0], ip16[1], ip16[2], ip16[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(ip16))
    };
    let addr = SocketAddr::new(ip, port);

    let parsed = if mode & 1 == 0 {
        stun::parse_binding_request(t.rest())
    } else {
        let (m, tx, has_software) = build(t, mode & 2 != 0);
        let r = stun::parse_binding_request(&m);
        if has_software {
            assert_eq!(r, Ok(tx), "well-formed Tailscale request rejected");
        } else {
            assert_eq!(r, Err(ParseError::WrongSoftware));
        }
        r
    };
    let Ok(tx) = parsed else { return };
    let resp = stun::binding_response(tx, addr);
    let want_len = match ip.to_canonical() {
        IpAddr::V4(_) => stun::RESPONSE_LEN_V4,
        IpAddr::V6(_) => stun::RESPONSE_LEN_V6,
    };
    assert_eq!(resp.len(), want_len);
    let (got_tx, got_addr) = decode_response(&resp);
    assert_eq!(got_tx, tx);
    assert_eq!(got_addr, SocketAddr::new(ip.to_canonical(), port));
    // A response is never mistaken for a request (no reflection loops between relays).
    assert!(stun::parse_binding_request(&resp).is_err());
});
