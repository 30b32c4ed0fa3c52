//! Self-signed IP certificates for relay nodes and their `sha256-raw:` pins
//! (derp-protocol.md §3).
//!
//! Owns: issuing (ECDSA P-256, SAN = the node's IPs, serverAuth, cA=false, like upstream
//! `derper --certmode manual`), parsing an existing certificate back (IPs, notAfter, pin, key
//! match) so the operator can decide whether to reuse it, and the pin computation.
//! Does not own: *when* to issue (that is `plan/`) or storing the result (`apply`).
//! The [`CertIssuer`] trait lets tests inject fixed certificates.

use std::net::IpAddr;

use time::OffsetDateTime;

/// Failure to issue or parse a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to generate the key or certificate.
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The PEM could not be parsed as an X.509 certificate.
    #[error("parse certificate: {0}")]
    Parse(String),
}

/// A freshly issued (or re-read) certificate with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// PEM `CERTIFICATE` (exactly one: no chain, no metacert).
    pub cert_pem: String,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
    /// `sha256-raw:<lowercase hex of SHA-256(leaf DER)>`.
    pub pin: String,
    /// Certificate notAfter.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedCert {
    // never print the private key
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("pin", &self.pin)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Issues node certificates. Implemented by [`RcgenIssuer`]; tests may inject their own.
pub trait CertIssuer: Send + Sync {
    /// Issue a certificate with CN `common_name` whose SANs are exactly `ips`, valid from
    /// `not_before` for `validity`.
    fn issue(
        &self,
        common_name: &str,
        ips: &[IpAddr],
        not_before: OffsetDateTime,
        validity: time::Duration,
    ) -> Result<IssuedCert, CertError>;
}

/// The production issuer: rcgen with ring, ECDSA P-256 / SHA-256.
#[derive(Debug, Default, Clone, Copy)]
pub struct RcgenIssuer;

impl CertIssuer for RcgenIssuer {
    fn issue(
        &self,
        common_name: &str,
        ips: &[IpAddr],
        not_before: OffsetDateTime,
        validity: time::Duration,
    ) -> Result<IssuedCert, CertError> {
        use rcgen::{
            CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType, SerialNumber,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // X.509 times have whole seconds: truncate so notAfter reads back identically
        let not_before = not_before.replace_nanosecond(0).unwrap_or(not_before);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.not_before = not_before;
        params.not_after = not_before + validity;
        // serial: random < 2^128 like upstream (§3.2); first byte cleared keeps it positive
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.self_signed(&key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            pin: pin_of_der(cert.der()),
            not_after: params.not_after,
        })
    }
}

/// The `CertName` pin of a leaf: `sha256-raw:` + lowercase hex SHA-256 of its DER
/// (derp-protocol.md §3.1), computed by the workspace's one [`derper::pin::Pin`].
pub fn pin_of_der(der: &[u8]) -> String {
    derper::pin::Pin::of_der(der).to_string()
}

/// What the operator needs to know about an existing certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCert {
    /// IP SANs, sorted.
    pub ips: Vec<IpAddr>,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// `sha256-raw:` pin.
    pub pin: String,
    /// Whether the PEM held exactly one certificate.
    pub single: bool,
}

/// Parse a PEM certificate (the first one; `single` says whether there were others).
pub fn parse_cert_pem(pem: &[u8]) -> Result<ParsedCert, CertError> {
    let mut iter = x509_parser::pem::Pem::iter_from_buffer(pem);
    let first = iter
        .next()
        .ok_or_else(|| CertError::Parse("no PEM block".into()))?
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let single = iter.next().is_none();
    if first.label != "CERTIFICATE" {
        return Err(CertError::Parse(format!(
            "PEM block is {:?}, not CERTIFICATE",
            first.label
        )));
    }
    let cert = first
        .parse_x509()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::IPAddress(bytes) = name {
                match bytes.len() {
                    4 => {
                        let b: [u8; 4] = (*bytes).try_into().expect("length checked");
                        ips.push(IpAddr::from(b));
                    }
                    16 => {
                        let b: [u8; 16] = (*bytes).try_into().expect("length checked");
                        ips.push(IpAddr::from(b));
                    }
                    _ => {}
                }
            }
        }
    }
    ips.sort();
    Ok(ParsedCert {
        ips,
        not_after: cert.validity().not_after.to_datetime(),
        pin: pin_of_der(&first.contents),
        single,
    })
}

/// Whether `key_pem` is the private key of the certificate in `cert_pem`.
pub fn key_matches(cert_pem: &[u8], key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Some(Ok(pem)) = x509_parser::pem::Pem::iter_from_buffer(cert_pem).next() else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// A DerpRegion duration field (`87600h`, `1h30m`, `60s`) as a [`time::Duration`]: Go's
/// grammar ([`derper::duration::parse_go_duration`]); `None` when it is not one.
pub fn parse_duration(s: &str) -> Option<time::Duration> {
    derper::duration::parse_go_duration(s)
        .ok()
        .and_then(|d| time::Duration::try_from(d).ok())
}

/// File stem of `<certdir>/<stem>.crt|.key` for a hostname: the relay's own rule
/// (derp-protocol.md §3.2), so the Secret's mount and the relay agree by construction.
pub use derper::certs::cert_file_stem;

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    #[test]
    fn issued_cert_has_ip_sans_pin_and_validity() {
        let ips: Vec<IpAddr> = vec![
            "203.0.113.5".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let c = RcgenIssuer
            .issue("203.0.113.5", &ips, t0(), time::Duration::days(3650))
            .unwrap();
        let parsed = parse_cert_pem(c.cert_pem.as_bytes()).unwrap();
        let mut want = ips.clone();
        want.sort();
        assert_eq!(parsed.ips, want);
        assert_eq!(parsed.pin, c.pin);
        assert!(parsed.single);
        assert_eq!(parsed.not_after, t0() + time::Duration::days(3650));
        assert!(c.pin.starts_with("sha256-raw:"));
        assert_eq!(c.pin.len(), "sha256-raw:".len() + 64);
        assert_eq!(c.pin, c.pin.to_lowercase());
        assert!(key_matches(c.cert_pem.as_bytes(), &c.key_pem));
    }

    #[test]
    fn key_of_another_cert_does_not_match() {
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let a = RcgenIssuer
            .issue("a", &ips, t0(), time::Duration::days(1))
            .unwrap();
        let b = RcgenIssuer
            .issue("b", &ips, t0(), time::Duration::days(1))
            .unwrap();
        assert!(!key_matches(a.cert_pem.as_bytes(), &b.key_pem));
        assert_ne!(a.pin, b.pin);
    }

    #[test]
    fn pin_is_sha256_of_der_lowercase_hex() {
        // SHA-256("abc")
        assert_eq!(
            pin_of_der(b"abc"),
            "sha256-raw:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(parse_cert_pem(b"not a pem").is_err());
        assert!(
            parse_cert_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        assert!(!key_matches(b"x", "y"));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("87600h"), Some(time::Duration::hours(87600)));
        assert_eq!(
            parse_duration("1h30m10s"),
            Some(time::Duration::seconds(5410))
        );
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("10d"), None);
    }
}
