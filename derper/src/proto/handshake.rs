//! Handshake frames (spec §5): ServerKey, ClientInfo and ServerInfo, the latter two sealed
//! with NaCl `crypto_box` (X25519 + XSalsa20-Poly1305, tag first as in libsodium's
//! `crypto_box_easy`).
//!
//! Pure functions; the caller supplies nonces (random in production, fixed in tests).

use bytes::{BufMut, Bytes, BytesMut};
use crypto_box::aead::Aead as _;
use serde::Deserialize;

use super::{
    DecodeError, FrameType, MAGIC, MIN_CLIENT_INFO_LEN, NONCE_LEN, PROTOCOL_VERSION, write_header,
};
use crate::key::{KEY_LEN, NodePrivateKey, NodePublicKey};

/// Length of the ServerKey payload Go sends: magic + key (spec §5.2).
pub const SERVER_KEY_PAYLOAD_LEN: usize = MAGIC.len() + KEY_LEN;

/// Appends the 45-byte ServerKey frame.
pub fn write_server_key(buf: &mut BytesMut, key: &NodePublicKey) {
    write_header(buf, FrameType::ServerKey, SERVER_KEY_PAYLOAD_LEN);
    buf.put_slice(&MAGIC);
    buf.put_slice(key.as_bytes());
}

/// Parses a ServerKey payload: magic + key, extra bytes ignored (spec §5.2 / §4.6).
pub fn parse_server_key(payload: &[u8]) -> Result<NodePublicKey, DecodeError> {
    if payload.len() < SERVER_KEY_PAYLOAD_LEN {
        return Err(DecodeError::TooShort {
            typ: FrameType::ServerKey as u8,
            len: payload.len(),
        });
    }
    if payload.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(DecodeError::BadMagic);
    }
    let key = payload
        .get(MAGIC.len()..SERVER_KEY_PAYLOAD_LEN)
        .and_then(NodePublicKey::from_slice)
        .ok_or(DecodeError::BadMagic)?;
    if key.is_small_order() {
        return Err(DecodeError::SmallOrderKey);
    }
    Ok(key)
}

/// The client's JSON (spec §5.3). Unknown keys are ignored; key names are matched
/// case-insensitively like Go's decoder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Mesh key as sent (64 hex), if any.
    pub mesh_key: Option<String>,
    /// Client protocol version.
    pub version: u32,
    /// Client answers server pings.
    pub can_ack_pings: bool,
    /// Client is a prober.
    pub is_prober: bool,
}

impl ClientInfo {
    /// The JSON a client sends, in Go's field order and capitalisation.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        if let Some(k) = &self.mesh_key {
            s.push_str("\"meshKey\":");
            s.push_str(&serde_json::Value::from(k.as_str()).to_string());
            s.push(',');
        }
        s.push_str(&format!(
            "\"version\":{},\"CanAckPings\":{}",
            self.version, self.can_ack_pings
        ));
        if self.is_prober {
            s.push_str(",\"IsProber\":true");
        }
        s.push('}');
        s
    }

    /// Parses ClientInfo JSON leniently (spec §5.3, P7–P9).
    pub fn from_json(data: &[u8]) -> Result<Self, DecodeError> {
        let v: serde_json::Value =
            serde_json::from_slice(data).map_err(|_| DecodeError::BadJson)?;
        let obj = v.as_object().ok_or(DecodeError::BadJson)?;
        let mut out = ClientInfo::default();
        for (k, v) in obj {
            match k.to_ascii_lowercase().as_str() {
                // A malformed mesh key is treated as no mesh key (spec P7: lenient).
                "meshkey" => out.mesh_key = v.as_str().map(str::to_owned),
                "version" => {
                    out.version = v.as_u64().and_then(|x| u32::try_from(x).ok()).unwrap_or(0)
                }
                "canackpings" => out.can_ack_pings = v.as_bool().unwrap_or(false),
                "isprober" => out.is_prober = v.as_bool().unwrap_or(false),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The server's JSON (spec §5.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ServerInfo {
    /// Server protocol version.
    #[serde(default)]
    pub version: u32,
    /// Client-side token bucket rate (never sent by us).
    #[serde(default, rename = "TokenBucketBytesPerSecond")]
    pub token_bucket_bytes_per_second: u64,
    /// Client-side token bucket burst (never sent by us).
    #[serde(default, rename = "TokenBucketBytesBurst")]
    pub token_bucket_bytes_burst: u64,
}

/// Exactly what the Go server sends: `{"version":2}` (spec §5.4).
pub const SERVER_INFO_JSON: &str = "{\"version\":2}";

fn nonce(n: &[u8; NONCE_LEN]) -> crypto_box::Nonce {
    *crypto_box::Nonce::from_slice(n)
}

fn seal(to: &NodePublicKey, from: &NodePrivateKey, n: &[u8; NONCE_LEN], msg: &[u8]) -> Vec<u8> {
    let b = crypto_box::SalsaBox::new(
        &crypto_box::PublicKey::from_bytes(*to.as_bytes()),
        from.secret(),
    );
    // Encryption with a correct-length nonce and no AAD cannot fail.
    b.encrypt(&nonce(n), msg).unwrap_or_default()
}

fn open(
    sender: &NodePublicKey,
    me: &NodePrivateKey,
    n: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, DecodeError> {
    let n: [u8; NONCE_LEN] = n.try_into().map_err(|_| DecodeError::BadBox)?;
    let b = crypto_box::SalsaBox::new(
        &crypto_box::PublicKey::from_bytes(*sender.as_bytes()),
        me.secret(),
    );
    b.decrypt(&nonce(&n), sealed)
        .map_err(|_| DecodeError::BadBox)
}

/// Appends a ClientInfo frame sealed to `server` with the given nonce.
pub fn write_client_info(
    buf: &mut BytesMut,
    client: &NodePrivateKey,
    server: &NodePublicKey,
    info: &ClientInfo,
    n: &[u8; NONCE_LEN],
) {
    let sealed = seal(server, client, n, info.to_json().as_bytes());
    write_header(
        buf,
        FrameType::ClientInfo,
        KEY_LEN + NONCE_LEN + sealed.len(),
    );
    buf.put_slice(client.public().as_bytes());
    buf.put_slice(n);
    buf.put_slice(&sealed);
}

/// Opens a ClientInfo payload with the server key (spec §5.3, §4.5 rules).
pub fn open_client_info(
    server: &NodePrivateKey,
    payload: &[u8],
) -> Result<(NodePublicKey, ClientInfo), DecodeError> {
    let typ = FrameType::ClientInfo as u8;
    if payload.len() < MIN_CLIENT_INFO_LEN {
        return Err(DecodeError::TooShort {
            typ,
            len: payload.len(),
        });
    }
    let key = payload
        .get(..KEY_LEN)
        .and_then(NodePublicKey::from_slice)
        .ok_or(DecodeError::TooShort {
            typ,
            len: payload.len(),
        })?;
    if key.is_small_order() {
        return Err(DecodeError::SmallOrderKey);
    }
    let n = payload
        .get(KEY_LEN..MIN_CLIENT_INFO_LEN)
        .unwrap_or_default();
    let sealed = payload.get(MIN_CLIENT_INFO_LEN..).unwrap_or_default();
    let json = open(&key, server, n, sealed)?;
    Ok((key, ClientInfo::from_json(&json)?))
}

/// Appends a ServerInfo frame sealed to `client` (plaintext [`SERVER_INFO_JSON`]).
pub fn write_server_info(
    buf: &mut BytesMut,
    server: &NodePrivateKey,
    client: &NodePublicKey,
    n: &[u8; NONCE_LEN],
) {
    let sealed = seal(client, server, n, SERVER_INFO_JSON.as_bytes());
    write_header(buf, FrameType::ServerInfo, NONCE_LEN + sealed.len());
    buf.put_slice(n);
    buf.put_slice(&sealed);
}

/// Opens a ServerInfo payload (spec §5.4).
pub fn open_server_info(
    client: &NodePrivateKey,
    server: &NodePublicKey,
    payload: &Bytes,
) -> Result<ServerInfo, DecodeError> {
    if payload.len() < NONCE_LEN {
        return Err(DecodeError::TooShort {
            typ: FrameType::ServerInfo as u8,
            len: payload.len(),
        });
    }
    let json = open(
        server,
        client,
        payload.get(..NONCE_LEN).unwrap_or_default(),
        payload.get(NONCE_LEN..).unwrap_or_default(),
    )?;
    let _ = PROTOCOL_VERSION;
    serde_json::from_slice(&json).map_err(|_| DecodeError::BadJson)
}

/// A fresh random nonce.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::parse_hex32;
    use proptest::prelude::*;

    const SERVER_PRIV: &str = "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60";
    const CLIENT_PRIV: &str = "2022232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40";
    const SERVER_KEY_FRAME: &str = "010000002844455250f09f949107a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c";
    const CLIENT_INFO_FRAME: &str = concat!(
        "02000000685869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b",
        "6465666768696a6b6c6d6e6f707172737475767778797a7b",
        "cba66775b0b5b0964c138cc2d6b011d9",
        "8517d9971faac8afed66fcfa4e109c714c76dbad4dcd2235388a0557b5cd384c"
    );
    const SERVER_INFO_FRAME: &str = concat!(
        "0300000035c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf",
        "cd3843f659d9fb5b5516ab933ad12215",
        "8e086eaf89d049e7450ca2975f"
    );

    fn keys() -> (NodePrivateKey, NodePrivateKey) {
        (
            NodePrivateKey::from_bytes(parse_hex32(SERVER_PRIV).unwrap()),
            NodePrivateKey::from_bytes(parse_hex32(CLIENT_PRIV).unwrap()),
        )
    }

    fn seq(start: u8) -> [u8; 24] {
        std::array::from_fn(|i| start + u8::try_from(i).unwrap())
    }

    #[test]
    fn golden_server_key_frame() {
        let (s, _) = keys();
        let mut b = BytesMut::new();
        write_server_key(&mut b, &s.public());
        assert_eq!(hex::encode(&b), SERVER_KEY_FRAME);
        assert_eq!(parse_server_key(&b[5..]).unwrap(), s.public());
    }

    #[test]
    fn golden_client_info_frame() {
        let (s, c) = keys();
        let mut b = BytesMut::new();
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        assert_eq!(info.to_json(), r#"{"version":2,"CanAckPings":true}"#);
        write_client_info(&mut b, &c, &s.public(), &info, &seq(100));
        assert_eq!(hex::encode(&b), CLIENT_INFO_FRAME);
        let (k, got) = open_client_info(&s, &b[5..]).unwrap();
        assert_eq!(k, c.public());
        assert_eq!(got, info);
    }

    #[test]
    fn golden_server_info_frame() {
        let (s, c) = keys();
        let mut b = BytesMut::new();
        write_server_info(&mut b, &s, &c.public(), &seq(200));
        assert_eq!(hex::encode(&b), SERVER_INFO_FRAME);
        let info = open_server_info(&c, &s.public(), &Bytes::copy_from_slice(&b[5..])).unwrap();
        assert_eq!(info.version, 2);
        assert_eq!(info.token_bucket_bytes_per_second, 0);
    }

    #[test]
    fn client_info_rejections() {
        let (s, c) = keys();
        assert!(open_client_info(&s, &[0u8; 55]).is_err());
        // all-zero key
        assert_eq!(
            open_client_info(&s, &[0u8; 80]),
            Err(DecodeError::SmallOrderKey)
        );
        // box sealed to another key does not open
        let other = NodePrivateKey::generate();
        let mut b = BytesMut::new();
        write_client_info(&mut b, &c, &other.public(), &ClientInfo::default(), &seq(1));
        assert_eq!(open_client_info(&s, &b[5..]), Err(DecodeError::BadBox));
    }

    #[test]
    fn client_info_json_is_lenient_and_case_insensitive() {
        let j = br#"{"MeshKey":"ab","VERSION":2,"canackpings":true,"IsProber":true,"AppName":"x"}"#;
        let i = ClientInfo::from_json(j).unwrap();
        assert_eq!(i.mesh_key.as_deref(), Some("ab"));
        assert_eq!(i.version, 2);
        assert!(i.can_ack_pings && i.is_prober);
        let i = ClientInfo::from_json(br#"{"meshKey":null}"#).unwrap();
        assert_eq!(i.mesh_key, None);
        assert!(ClientInfo::from_json(b"[1]").is_err());
        assert!(ClientInfo::from_json(b"{").is_err());
    }

    proptest! {
        #[test]
        fn handshake_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (s, c) = keys();
            let _ = open_client_info(&s, &data);
            let _ = open_server_info(&c, &s.public(), &Bytes::from(data.clone()));
            let _ = parse_server_key(&data);
            let _ = ClientInfo::from_json(&data);
        }

        #[test]
        fn perturbed_client_info_never_panics(flip in any::<usize>(), cut in any::<usize>()) {
            let (s, c) = keys();
            let mut b = BytesMut::new();
            write_client_info(&mut b, &c, &s.public(), &ClientInfo::default(), &seq(3));
            let mut v = b[5..].to_vec();
            let i = flip % v.len();
            v[i] ^= 1;
            v.truncate(cut % (v.len() + 1));
            prop_assert!(open_client_info(&s, &v).is_err());
        }
    }
}
