//! Certificate pins (`sha256-raw:<hex>`, spec §3.1) and the one pinned-certificate check of
//! the workspace.
//!
//! A pin names one exact certificate: the SHA-256 of its DER bytes. Everything that dials a
//! pinned relay (the mesh client, `derpprobe` and the operator's probes, `derp-bench`, the test
//! helpers) verifies the presented chain with [`check_chain`], usually through
//! [`PinnedVerifier`]. The rule:
//!
//! * the pin is compared with the **end-entity certificate**: the first certificate of the
//!   chain, whose key rustls uses to verify the handshake signature. Nothing else can satisfy
//!   the pin, so a server without the pinned certificate's private key cannot pass;
//! * every further certificate must parse as a metacert (subject CN `derpkey<64 hex>`, the
//!   way Tailscale clients read it, spec §2.3); anything else is refused with the Go client's
//!   words, `unexpected multiple certs presented`;
//! * the end entity must be within its validity period, and when the dialed name is a DNS
//!   name it must be valid for it (a relay dialed by IP literal sends no server name and is
//!   not name-checked, as in current Go clients, spec §2.4).
//!
//! Earlier code skipped *any* certificate whose DER merely contained the bytes `derpkey`
//! and pinned whatever was left, so a chain `[attacker cert with derpkey in its CN, victim's
//! real certificate]` passed while rustls checked the signature against the attacker's key.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::key::NodePublicKey;

/// The `CertName` prefix of a pin (spec §3.1).
pub const PIN_PREFIX: &str = "sha256-raw:";
/// Common name prefix of a metacert (`MetaCertCommonNamePrefix`, spec §2.1).
pub const METACERT_CN_PREFIX: &str = "derpkey";

/// A `sha256-raw:` pin: the SHA-256 of one certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pin([u8; 32]);

/// Why a string is not a pin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinParseError {
    /// The `sha256-raw:` prefix is missing.
    #[error("a pin must start with `{PIN_PREFIX}`, got {0:?}")]
    MissingPrefix(String),
    /// The part after the prefix is not 64 (lowercase) hex digits.
    #[error("`{PIN_PREFIX}` must be followed by 64 lowercase hex digits, got {0:?}")]
    BadHex(String),
}

impl Pin {
    /// The pin of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Parses a `CertName` pin, `sha256-raw:<64 lowercase hex>`, exactly as Tailscale
    /// clients compare it (they format the digest in lowercase and compare strings, so a pin
    /// written in uppercase matches no certificate for them).
    pub fn parse(s: &str) -> Result<Self, PinParseError> {
        let hex = s
            .strip_prefix(PIN_PREFIX)
            .ok_or_else(|| PinParseError::MissingPrefix(s.to_owned()))?;
        if hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(PinParseError::BadHex(hex.to_owned()));
        }
        Self::parse_hex(hex)
    }

    /// Parses 64 hex digits in either letter case (no prefix).
    pub fn parse_hex(hex: &str) -> Result<Self, PinParseError> {
        let mut out = [0u8; 32];
        if hex.len() != 64 || hex::decode_to_slice(hex, &mut out).is_err() {
            return Err(PinParseError::BadHex(hex.to_owned()));
        }
        Ok(Self(out))
    }

    /// Whether `der` is the pinned certificate.
    pub fn matches(&self, der: &[u8]) -> bool {
        *self == Self::of_der(der)
    }

    /// Lowercase hex of the digest, without the prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({self})")
    }
}

impl FromStr for Pin {
    type Err = PinParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a metacert carries (spec §2.1, §2.3): the relay's DERP key and protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metacert {
    /// The server's public key, from the CN `derpkey<64 hex>`.
    pub key: NodePublicKey,
    /// The serial number: the DERP protocol version (at most 255, as Go reads it).
    pub serial: u8,
}

/// The subject common name of a DER certificate, if it parses and has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}

/// Reads a metacert the way Tailscale clients do (`parseMetaCert`): subject CN `derpkey`
/// followed by a hex node key, serial number of at most 8 bits. `None` for anything else.
pub fn parse_metacert(der: &[u8]) -> Option<Metacert> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let key = NodePublicKey::parse_hex(cn.strip_prefix(METACERT_CN_PREFIX)?).ok()?;
    let serial = u8::try_from(&cert.serial).ok()?;
    Some(Metacert { key, serial })
}

/// Why a presented chain fails a pin. The messages follow the Go client's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// No certificate at all.
    #[error("no certificate presented")]
    Empty,
    /// The end-entity certificate is not the pinned one.
    #[error("cert hash does not match expected cert hash: want {expected}, got {presented}")]
    Mismatch {
        /// The pin that was expected.
        expected: Pin,
        /// The pin of the presented end-entity certificate.
        presented: Pin,
    },
    /// A certificate after the end entity is not a metacert.
    #[error("unexpected multiple certs presented (certificate {index} is not a metacert)")]
    ExtraCertificate {
        /// Its position in the chain (the end entity is 0).
        index: usize,
    },
    /// The pinned certificate does not parse as X.509.
    #[error("pinned certificate does not parse: {0}")]
    Unparseable(String),
    /// The pinned certificate is not valid for the dialed DNS name.
    #[error("cert does not match server name {0:?}")]
    NameMismatch(String),
    /// Outside the validity period.
    #[error("cert expired at {0} (unix seconds)")]
    Expired(i64),
    /// Not yet valid.
    #[error("cert not yet valid until {0} (unix seconds); is your clock correct?")]
    NotYetValid(i64),
}

/// Checks a presented chain against `pin` (see the module docs for the rule).
/// `dns_name` is the dialed name when it is a DNS name, `None` for an IP literal.
pub fn check_chain(
    pin: &Pin,
    end_entity: &[u8],
    intermediates: &[&[u8]],
    dns_name: Option<&str>,
    now: UnixTime,
) -> Result<(), PinError> {
    if end_entity.is_empty() {
        return Err(PinError::Empty);
    }
    let presented = Pin::of_der(end_entity);
    if presented != *pin {
        return Err(PinError::Mismatch {
            expected: *pin,
            presented,
        });
    }
    if let Some(i) = intermediates
        .iter()
        .position(|der| parse_metacert(der).is_none())
    {
        return Err(PinError::ExtraCertificate { index: i + 1 });
    }
    let (_, cert) =
        X509Certificate::from_der(end_entity).map_err(|e| PinError::Unparseable(e.to_string()))?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(PinError::NotYetValid(validity.not_before.timestamp()));
    }
    if now > validity.not_after.timestamp() {
        return Err(PinError::Expired(validity.not_after.timestamp()));
    }
    if let Some(name) = dns_name
        && !valid_for_dns_name(&cert, name)
    {
        return Err(PinError::NameMismatch(name.to_owned()));
    }
    Ok(())
}

/// Whether a subject-alternative DNS name of `cert` covers `name` (one leading `*` label).
fn valid_for_dns_name(cert: &X509Certificate<'_>, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|n| match n {
        GeneralName::DNSName(pattern) => dns_matches(&pattern.to_ascii_lowercase(), &name),
        _ => false,
    })
}

fn dns_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// The DNS name to check for a rustls server name (`None` for IP literals).
fn dns_name_of<'a>(name: &'a ServerName<'_>) -> Option<&'a str> {
    match name {
        ServerName::DnsName(d) => Some(d.as_ref()),
        _ => None,
    }
}

/// What a [`PinnedVerifier`] accepts.
#[derive(Debug, Clone)]
enum Accept {
    Pin(Pin),
    Anything,
}

/// The rustls verifier for pinned relays ([`check_chain`]), or, with
/// [`PinnedVerifier::insecure`], for tests that accept any certificate. Handshake signatures
/// are always verified, with the end-entity certificate's key.
#[derive(Debug)]
pub struct PinnedVerifier {
    accept: Accept,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// Accepts exactly the certificate named by `pin` (plus trailing metacerts).
    pub fn new(pin: Pin, provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            accept: Accept::Pin(pin),
            algs: provider.signature_verification_algorithms,
        }
    }

    /// Accepts any certificate (tests and diagnostics only); signatures are still checked.
    pub fn insecure(provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            accept: Accept::Anything,
            algs: provider.signature_verification_algorithms,
        }
    }

    /// A rustls client configuration (default protocol versions unless `versions` is given,
    /// no ALPN, like Go's DERP client) using this verifier.
    pub fn client_config(
        self,
        provider: Arc<rustls::crypto::CryptoProvider>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ClientConfig, rustls::Error> {
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth())
    }
}

/// [`check_chain`] with rustls' types and error, for verifiers that wrap this one (the
/// probe records the chain it was shown before checking it).
pub fn verify_rustls(
    pin: &Pin,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<ServerCertVerified, rustls::Error> {
    let rest: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
    check_chain(pin, end_entity, &rest, dns_name_of(server_name), now)
        .map(|()| ServerCertVerified::assertion())
        .map_err(|e| rustls::Error::General(e.to_string()))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.accept {
            Accept::Anything => Ok(ServerCertVerified::assertion()),
            Accept::Pin(pin) => verify_rustls(pin, end_entity, intermediates, server_name, now),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: &str, dns: &[&str], serial: Option<u64>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
            .unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = serial.map(rcgen::SerialNumber::from);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn meta_cn() -> String {
        format!("derpkey{}", "ab".repeat(32))
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn pin_parses_formats_and_hashes() {
        let p = Pin::of_der(b"abc");
        assert_eq!(
            p.to_string(),
            "sha256-raw:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Pin::parse(&p.to_string()).unwrap(), p);
        assert_eq!(p.to_string().parse::<Pin>().unwrap(), p);
        assert!(p.matches(b"abc"));
        assert!(!p.matches(b"abd"));
        // Clients compare lowercase hex: a CertName in uppercase names no certificate.
        let upper = format!("{PIN_PREFIX}{}", p.hex().to_uppercase());
        assert!(matches!(Pin::parse(&upper), Err(PinParseError::BadHex(_))));
        assert_eq!(Pin::parse_hex(&p.hex().to_uppercase()).unwrap(), p);
        assert!(matches!(
            Pin::parse(&p.hex()),
            Err(PinParseError::MissingPrefix(_))
        ));
        assert!(Pin::parse("sha256-raw:00").is_err());
        assert!(Pin::parse(&format!("sha256-raw:{}", "zz".repeat(32))).is_err());
        assert!(Pin::parse(&format!("sha256-raw:{}0", "00".repeat(32))).is_err());
    }

    #[test]
    fn metacerts_are_read_like_tailscale_clients_read_them() {
        let m = parse_metacert(&cert(&meta_cn(), &[], Some(2))).unwrap();
        assert_eq!(m.serial, 2);
        assert_eq!(m.key.to_hex().to_lowercase(), "ab".repeat(32));
        // The prefix alone, a short key, a serial over 8 bits, not a certificate at all.
        assert!(parse_metacert(&cert("derpkey", &[], Some(2))).is_none());
        assert!(parse_metacert(&cert("derpkeyabcd", &[], Some(2))).is_none());
        assert!(parse_metacert(&cert(&meta_cn(), &[], Some(256))).is_none());
        assert!(parse_metacert(b"derpkey not DER").is_none());
        // `derpkey` in a DNS name is not a metacert.
        assert!(parse_metacert(&cert("relay", &["derpkey.example.com"], None)).is_none());
    }

    #[test]
    fn the_pin_is_checked_on_the_end_entity_only() {
        let leaf = cert("relay", &[], None);
        let other = cert(&meta_cn(), &[], Some(2));
        let plain = cert("intermediate", &[], None);
        let pin = Pin::of_der(&leaf);
        assert_eq!(check_chain(&pin, &leaf, &[], None, now()), Ok(()));
        assert_eq!(check_chain(&pin, &leaf, &[&other], None, now()), Ok(()));
        assert!(matches!(
            check_chain(&pin, &other, &[&leaf], None, now()),
            Err(PinError::Mismatch { .. })
        ));
        assert_eq!(
            check_chain(&pin, &leaf, &[&other, &plain], None, now()),
            Err(PinError::ExtraCertificate { index: 2 })
        );
        assert_eq!(
            check_chain(&pin, &[], &[], None, now()),
            Err(PinError::Empty)
        );
        // Not DER at all, but pinned: refused as unparseable, never accepted.
        let junk = b"not a certificate".to_vec();
        assert!(matches!(
            check_chain(&Pin::of_der(&junk), &junk, &[], None, now()),
            Err(PinError::Unparseable(_))
        ));
    }

    #[test]
    fn dns_names_and_validity_are_checked() {
        let leaf = cert("relay", &["derp.example.com", "*.relays.example.com"], None);
        let pin = Pin::of_der(&leaf);
        for ok in [
            "derp.example.com",
            "DERP.example.com.",
            "a.relays.example.com",
        ] {
            assert_eq!(
                check_chain(&pin, &leaf, &[], Some(ok), now()),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "example.com",
            "relays.example.com",
            "a.b.relays.example.com",
            "x.com",
        ] {
            assert!(
                matches!(
                    check_chain(&pin, &leaf, &[], Some(bad), now()),
                    Err(PinError::NameMismatch(_))
                ),
                "{bad}"
            );
        }
        let far_future = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1 << 40));
        assert!(matches!(
            check_chain(&pin, &leaf, &[], None, far_future),
            Err(PinError::Expired(_))
        ));
        let past = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1));
        assert!(matches!(
            check_chain(&pin, &leaf, &[], None, past),
            Err(PinError::NotYetValid(_))
        ));
    }
}
