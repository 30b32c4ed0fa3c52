//! Node keys: [`NodePublicKey`] (wire form of every DERP identity) and [`NodePrivateKey`]
//! (the server's persisted key, or a client key), plus the text forms of spec §5.5 and the
//! server key file of spec §8.3.
//!
//! Does not do any NaCl boxing itself; see [`crate::proto::handshake`].

use std::fmt;
use std::path::Path;

use base64::Engine as _;

/// Length of a raw Curve25519 key.
pub const KEY_LEN: usize = 32;

const NODEKEY_PREFIX: &str = "nodekey:";
const PRIVKEY_PREFIX: &str = "privkey:";

/// Errors parsing a key from text or a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text did not have the expected prefix.
    #[error("missing {0:?} prefix")]
    MissingPrefix(&'static str),
    /// The text is not exactly 64 hex digits.
    #[error("key must be exactly 64 hex digits")]
    BadHex,
    /// The all-zero key is never valid.
    #[error("all-zero key")]
    Zero,
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not the expected JSON.
    #[error("key file {path}: invalid JSON config: {reason}")]
    BadFile {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Parses exactly 64 hex digits (either case) into 32 bytes.
pub fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.len() != 64 {
        return Err(KeyError::BadHex);
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::BadHex)?;
    Ok(out)
}

/// Encodings (top bit clear) of the X25519 public keys of small order, the list libsodium
/// blocks: the u-coordinates 0, 1 and the two of order 8 (the curve's torsion points), −1
/// (p − 1, on the quadratic twist, which X25519 also accepts), and the non-canonical
/// encodings p and p + 1 of 0 and 1. Little-endian, p = 2^255 − 19.
const SMALL_ORDER: [[u8; KEY_LEN]; 7] = [
    [0; KEY_LEN],
    {
        let mut k = [0; KEY_LEN];
        k[0] = 1;
        k
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    near_p(0xec),
    near_p(0xed),
    near_p(0xee),
];

/// The little-endian encoding of p − 0xed + `low` (p − 1, p, p + 1 for 0xec, 0xed, 0xee).
const fn near_p(low: u8) -> [u8; KEY_LEN] {
    let mut k = [0xff; KEY_LEN];
    k[31] = 0x7f;
    k[0] = low;
    k
}

/// A Curve25519 public key identifying a DERP client or server (32 raw bytes on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublicKey([u8; KEY_LEN]);

impl NodePublicKey {
    /// Wraps raw bytes.
    pub const fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// Copies a key from a slice of exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = b.try_into().ok()?;
        Some(Self(arr))
    }

    /// Raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// True for the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; KEY_LEN]
    }

    /// True for a key of small order: X25519 with it yields the all-zero shared secret for
    /// every private key, so a box "from" it can be sealed and opened by anyone. Such keys
    /// (the all-zero key among them) are never valid identities.
    pub fn is_small_order(&self) -> bool {
        let mut k = self.0;
        // X25519 ignores the top bit (RFC 7748 §5), so it is ignored here too.
        k[31] &= 0x7f;
        SMALL_ORDER.contains(&k)
    }

    /// 64 lowercase hex digits ("untyped" form, spec §5.5).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `nodekey:` + 64 lowercase hex (spec §5.5).
    pub fn to_nodekey_string(&self) -> String {
        format!("{NODEKEY_PREFIX}{}", self.to_hex())
    }

    /// Parses `nodekey:<64 hex>`.
    pub fn parse_nodekey(s: &str) -> Result<Self, KeyError> {
        let rest = s
            .strip_prefix(NODEKEY_PREFIX)
            .ok_or(KeyError::MissingPrefix(NODEKEY_PREFIX))?;
        Ok(Self(parse_hex32(rest)?))
    }

    /// Parses 64 untyped hex digits.
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        Ok(Self(parse_hex32(s)?))
    }

    /// Log short form: `[` + first 5 chars of standard base64 + `]` (spec §5.5).
    pub fn short(&self) -> ShortKey {
        ShortKey(*self)
    }
}

impl fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublicKey({})", self.short())
    }
}

impl fmt::Display for NodePublicKey {
    /// Displays the short form; full keys are never logged (house-style §4.3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.short(), f)
    }
}

/// Display adapter for the `[abcde]` short form.
#[derive(Clone, Copy)]
pub struct ShortKey(NodePublicKey);

impl fmt::Display for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.0.0);
        write!(f, "[{}]", b64.get(..5).unwrap_or(""))
    }
}

impl fmt::Debug for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A Curve25519 private key. Debug output is redacted; the key is never logged.
#[derive(Clone)]
pub struct NodePrivateKey {
    bytes: [u8; KEY_LEN],
    secret: crypto_box::SecretKey,
    public: NodePublicKey,
}

impl NodePrivateKey {
    /// Generates a fresh clamped key (spec §5.5).
    pub fn generate() -> Self {
        let mut b: [u8; KEY_LEN] = rand::random();
        clamp(&mut b);
        Self::from_bytes(b)
    }

    /// Wraps raw private key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let secret = crypto_box::SecretKey::from_bytes(bytes);
        let public = NodePublicKey(secret.public_key().to_bytes());
        Self {
            bytes,
            secret,
            public,
        }
    }

    /// The matching public key.
    pub fn public(&self) -> NodePublicKey {
        self.public
    }

    /// The crypto_box secret key.
    pub(crate) fn secret(&self) -> &crypto_box::SecretKey {
        &self.secret
    }

    /// `privkey:` + 64 lowercase hex (spec §5.5). Handle with care: this is the secret.
    pub fn to_privkey_string(&self) -> String {
        format!("{PRIVKEY_PREFIX}{}", hex::encode(self.bytes))
    }

    /// Parses `privkey:<64 hex>`.
    pub fn parse_privkey(s: &str) -> Result<Self, KeyError> {
        let rest = s
            .strip_prefix(PRIVKEY_PREFIX)
            .ok_or(KeyError::MissingPrefix(PRIVKEY_PREFIX))?;
        let b = parse_hex32(rest)?;
        if b == [0u8; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(Self::from_bytes(b))
    }

    /// Loads the server key file (spec §8.3: JSON `{"PrivateKey": "privkey:…"}`), creating it
    /// (mode 0600, parent directories created) with a fresh key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let p = path.display().to_string();
        match std::fs::read(path) {
            Ok(data) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&data).map_err(|e| KeyError::BadFile {
                        path: p.clone(),
                        reason: e.to_string(),
                    })?;
                let s = v
                    .get("PrivateKey")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| KeyError::BadFile {
                        path: p.clone(),
                        reason: "missing string field PrivateKey".into(),
                    })?;
                Self::parse_privkey(s).map_err(|e| KeyError::BadFile {
                    path: p,
                    reason: e.to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = Self::generate();
                k.write_file(path)?;
                Ok(k)
            }
            Err(source) => Err(KeyError::Io { path: p, source }),
        }
    }

    /// Writes the key file (tab-indented JSON, mode 0600) atomically, through an exclusive
    /// temporary file ([`crate::certs`]' writer).
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        let p = path.display().to_string();
        let io = |source| KeyError::Io {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let body = format!("{{\n\t\"PrivateKey\": \"{}\"\n}}", self.to_privkey_string());
        crate::certs::write_file_atomic(path, body.as_bytes(), 0o600).map_err(io)
    }
}

impl fmt::Debug for NodePrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NodePrivateKey(<redacted>, public={})",
            self.public.short()
        )
    }
}

/// Clamps a Curve25519 private key (spec §5.5).
fn clamp(k: &mut [u8; KEY_LEN]) {
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
}

/// A 32-byte mesh pre-shared key (spec §6.10), compared in constant time.
#[derive(Clone)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    /// Parses 64 hex digits, surrounding whitespace trimmed (spec §6.10).
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        Ok(Self(parse_hex32(s.trim())?))
    }

    /// Wraps raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// 64 lowercase hex (the wire form in ClientInfo `meshKey`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time comparison against a candidate string from ClientInfo.
    pub fn matches_hex(&self, candidate: &str) -> bool {
        let Ok(other) = parse_hex32(candidate) else {
            return false;
        };
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER_PRIV: &str = "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60";
    const SERVER_PUB: &str = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c";

    #[test]
    fn public_key_derivation_matches_spec_vector() {
        let k = NodePrivateKey::from_bytes(parse_hex32(SERVER_PRIV).unwrap());
        assert_eq!(k.public().to_hex(), SERVER_PUB);
    }

    #[test]
    fn text_forms_round_trip() {
        let k = NodePrivateKey::generate();
        let s = k.to_privkey_string();
        let k2 = NodePrivateKey::parse_privkey(&s).unwrap();
        assert_eq!(k.public(), k2.public());
        let n = k.public().to_nodekey_string();
        assert_eq!(NodePublicKey::parse_nodekey(&n).unwrap(), k.public());
        assert!(NodePublicKey::parse_nodekey(&n.to_uppercase()).is_err());
        assert!(NodePublicKey::parse_hex(&k.public().to_hex().to_uppercase()).is_ok());
        assert!(NodePublicKey::parse_hex("abc").is_err());
    }

    #[test]
    fn generated_keys_are_clamped() {
        let k = NodePrivateKey::generate();
        assert_eq!(k.bytes[0] & 7, 0);
        assert_eq!(k.bytes[31] & 0xc0, 0x40);
    }

    #[test]
    fn short_form_is_five_base64_chars_in_brackets() {
        let k = NodePublicKey::from_bytes([0xff; 32]);
        assert_eq!(k.short().to_string(), "[/////]");
        assert_eq!(format!("{k}"), "[/////]");
        let dbg = format!("{:?}", NodePrivateKey::generate());
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn key_file_is_created_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/derper.key");
        let k1 = NodePrivateKey::load_or_create(&path).unwrap();
        let k2 = NodePrivateKey::load_or_create(&path).unwrap();
        assert_eq!(k1.public(), k2.public());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"PrivateKey\": \"privkey:"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "{}").unwrap();
        assert!(NodePrivateKey::load_or_create(&path).is_err());
    }

    #[test]
    fn small_order_keys_cover_the_torsion_and_all_give_a_zero_secret() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        use curve25519_dalek::montgomery::MontgomeryPoint;
        let with_top_bit = |mut k: [u8; 32]| {
            k[31] |= 0x80;
            k
        };
        // Every point of the curve of order dividing 8, as X25519 encodes it (computed by
        // the curve library, not taken from our list), in every encoding: with the top bit
        // set, and u + p where that is still below 2^255 (u = 0, 1).
        for p in EIGHT_TORSION {
            let u = p.to_montgomery().to_bytes();
            let mut encodings = vec![u, with_top_bit(u)];
            if u[1..] == [0; 31] && u[0] < 19 {
                let mut alt = [0xff; 32];
                alt[31] = 0x7f;
                alt[0] = 0xed + u[0];
                encodings.extend([alt, with_top_bit(alt)]);
            }
            for e in encodings {
                assert!(
                    NodePublicKey::from_bytes(e).is_small_order(),
                    "{}",
                    hex::encode(e)
                );
            }
        }
        // Everything blocked (the twist point u = −1 among them) gives X25519 an all-zero
        // shared secret with a real private key, with or without the top bit.
        for k in SMALL_ORDER {
            for e in [k, with_top_bit(k)] {
                assert!(NodePublicKey::from_bytes(e).is_small_order());
                let sk = NodePrivateKey::generate();
                assert_eq!(
                    MontgomeryPoint(e).mul_clamped(sk.bytes).to_bytes(),
                    [0; 32],
                    "{}",
                    hex::encode(e)
                );
            }
        }
        for _ in 0..1000 {
            assert!(!NodePrivateKey::generate().public().is_small_order());
        }
        let mut near = [0u8; 32];
        near[0] = 2;
        assert!(!NodePublicKey::from_bytes(near).is_small_order());
    }

    #[test]
    fn key_file_write_ignores_planted_temporary_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("derper.key");
        // A symlink where a predictable temporary name would be, pointing at a file the
        // key must never reach, and a world-readable file at the other obvious name.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        let planted = dir.path().join("derper.key.tmp");
        std::fs::write(&planted, "").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();

        let k = NodePrivateKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the key file is a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            NodePrivateKey::load_or_create(&path).unwrap().public(),
            k.public()
        );
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["derper.key", "derper.key.tmp", "derper.tmp", "victim"]
        );
    }

    #[test]
    fn mesh_key_compare() {
        let m = MeshKey::parse(&format!("  {}\n", "ab".repeat(32))).unwrap();
        assert!(m.matches_hex(&"AB".repeat(32)));
        assert!(!m.matches_hex(&"ac".repeat(32)));
        assert!(!m.matches_hex("null"));
    }
}
