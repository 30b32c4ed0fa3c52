//! ClientInfo (spec §5.3): opening the sealed payload with the relay's key and parsing the
//! JSON. The relay key is fixed (the spec §5.6 test-vector key).
//!
//! Input: `[mode][rest]`, mode % 3:
//!
//! * 0: `rest` is a ClientInfo payload as received. It must not panic; if it opens, the key
//!   it reports is the one at the front of the payload and is not all-zero.
//! * 1: `rest` = `[client private key: 32][nonce: 24][plaintext]`: the harness seals the
//!   plaintext as a client would; opening must give the client's public key and exactly what
//!   the JSON parser makes of the plaintext (or `BadJson`).
//! * 2: `rest` is JSON: whatever parses must survive `to_json` → `from_json` unchanged.
#![no_main]

use crypto_box::aead::Aead as _;
use derper::key::{NodePrivateKey, parse_hex32};
use derper::proto::DecodeError;
use derper::proto::handshake::{ClientInfo, open_client_info};
use derper_fuzz::Take;
use libfuzzer_sys::fuzz_target;

const SERVER_PRIV: &str = "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60";

fn server() -> &'static NodePrivateKey {
    static KEY: std::sync::OnceLock<NodePrivateKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| NodePrivateKey::from_bytes(parse_hex32(SERVER_PRIV).expect("hex")))
}

fn json_round_trip(json: &[u8]) -> Result<ClientInfo, DecodeError> {
    let info = ClientInfo::from_json(json)?;
    let again = ClientInfo::from_json(info.to_json().as_bytes()).expect("our own JSON parses");
    assert_eq!(again, info, "ClientInfo JSON does not round-trip");
    Ok(info)
}

fuzz_target!(|input: &[u8]| {
    let mut t = Take(input);
    match t.u8() % 3 {
        0 => {
            let payload = t.rest();
            if let Ok((key, _)) = open_client_info(server(), payload) {
                assert_eq!(key.as_bytes()[..], payload[..32]);
                assert!(!key.is_zero());
            }
        }
        1 => {
            let client_bytes: [u8; 32] = t.array();
            let client = NodePrivateKey::from_bytes(client_bytes);
            let nonce: [u8; 24] = t.array();
            let plain = t.rest();
            let sealed = crypto_box::SalsaBox::new(
                &crypto_box::PublicKey::from_bytes(*server().public().as_bytes()),
                &crypto_box::SecretKey::from_bytes(client_bytes),
            )
            .encrypt(crypto_box::Nonce::from_slice(&nonce), plain)
            .expect("seal");
            let mut payload = client.public().as_bytes().to_vec();
            payload.extend_from_slice(&nonce);
            payload.extend_from_slice(&sealed);
            let got = open_client_info(server(), &payload);
            match json_round_trip(plain) {
                Ok(info) => assert_eq!(got, Ok((client.public(), info))),
                Err(e) => assert_eq!(got, Err(e)),
            }
        }
        _ => {
            let _ = json_round_trip(t.rest());
        }
    }
});
