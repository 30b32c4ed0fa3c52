//! Manual-mode TLS certificates: loading `<certdir>/<name>.crt|.key`, generating the
//! self-signed IP certificate like upstream `derper -certmode manual`, the `sha256-raw:` pin
//! and the DERPNode JSON line printed at start-up (spec §3).
//!
//! This module owns files and certificate contents only. It does not build TLS configs,
//! serve certificates or watch files for changes: that is [`crate::tls`].
//!
//! Deliberate differences from upstream (spec §3.2):
//! * if exactly one of the two files exists we fail instead of silently overwriting the
//!   other one with a freshly generated pair;
//! * a self-signed leaf followed by extra certificates in the `.crt` file is served alone
//!   (pinned clients accept exactly one certificate, spec §2.4);
//! * a certificate outside its validity window is logged at `warn` (upstream says nothing).

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::defaults::{DEFAULT_DERP_PORT, DEFAULT_STUN_PORT};
use crate::pin::Pin;

/// Name of the DERPNode in the printed start-up snippet (spec §3.2, upstream's literal).
const SNIPPET_NODE_NAME: &str = "custom";
/// Region of the printed start-up snippet (spec §3.2; 900–999 are for user-run DERPs, §9.2).
const SNIPPET_REGION_ID: u32 = 900;

/// A certificate chain and private key ready to be served.
pub struct LoadedCert {
    /// Leaf first, then intermediates (never empty). A self-signed leaf is alone.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// `sha256-raw:<lowercase hex sha256 of the leaf DER>` when the leaf is self-signed
    /// (spec §3.1), i.e. when clients can only trust it by pinning.
    pub pin: Option<String>,
    /// True when this process generated the certificate (and wrote it to the certdir).
    pub generated: bool,
}

impl Clone for LoadedCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            pin: self.pin.clone(),
            generated: self.generated,
        }
    }
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("LoadedCert")
            .field("chain_len", &self.chain.len())
            .field("leaf_sha256", &self.leaf().map(|l| Pin::of_der(l).hex()))
            .field("pin", &self.pin)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl LoadedCert {
    /// The leaf (end-entity) certificate, `None` only if `chain` was emptied by hand.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }

    /// Lowercase hex SHA-256 of the leaf DER (the pin without its prefix), for logs.
    pub fn leaf_sha256_hex(&self) -> String {
        self.leaf()
            .map(|l| Pin::of_der(l).hex())
            .unwrap_or_default()
    }
}

/// Errors of loading or generating manual-mode certificates. Each names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file or the certdir could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid PEM.
    #[error("{path}: invalid PEM: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        #[source]
        source: io::Error,
    },
    /// The `.crt` file holds no `CERTIFICATE` block.
    #[error("{path}: no PEM CERTIFICATE block found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The `.key` file holds no private key block.
    #[error("{path}: no PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY) found")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The leaf certificate is not well-formed X.509.
    #[error("{path}: cannot parse the leaf certificate: {reason}")]
    ParseCertificate {
        /// The file.
        path: PathBuf,
        /// What the X.509 parser said.
        reason: String,
    },
    /// The private key is unusable or does not belong to the leaf certificate.
    #[error("{key_path}: private key unusable for the certificate in {cert_path}: {source}")]
    Key {
        /// The `.key` file.
        key_path: PathBuf,
        /// The `.crt` file.
        cert_path: PathBuf,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The leaf has no SAN matching the hostname (upstream: fatal `cert invalid for hostname`).
    #[error(
        "{path}: certificate invalid for hostname {hostname:?}: no matching {kind} \
         subject alternative name (clients check it, spec §2.4)"
    )]
    HostnameMismatch {
        /// The `.crt` file.
        path: PathBuf,
        /// The configured hostname.
        hostname: String,
        /// `IP` or `DNS`.
        kind: &'static str,
    },
    /// Only one of the two files exists.
    #[error(
        "{present} exists but {missing} does not; provide both, or delete {present} to \
         generate a new self-signed certificate"
    )]
    Incomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Neither file exists and the hostname is a DNS name, so nothing can be generated.
    #[error(
        "no certificate for hostname {hostname:?}: {cert_path} and {key_path} must exist in \
         manual cert mode (a self-signed certificate is only generated for an IP address \
         hostname)"
    )]
    Missing {
        /// The configured hostname.
        hostname: String,
        /// Expected `.crt` path.
        cert_path: PathBuf,
        /// Expected `.key` path.
        key_path: PathBuf,
    },
    /// The hostname is empty or has no character allowed in a file name.
    #[error("hostname {hostname:?} gives an empty certificate file name")]
    EmptyStem {
        /// The configured hostname.
        hostname: String,
    },
    /// rcgen failed to build the self-signed certificate.
    #[error("generating a self-signed certificate for {hostname}: {source}")]
    Generate {
        /// The IP hostname.
        hostname: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// Upstream's file-name rule (spec §3.2): keep only ASCII letters, digits, `-` and `.`.
///
/// `2001:db8::1` becomes `2001db81`.
pub fn cert_file_stem(hostname: &str) -> String {
    hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect()
}

/// Paths `(<certdir>/<stem>.crt, <certdir>/<stem>.key)` for `hostname`.
pub fn cert_paths(certdir: &Path, hostname: &str) -> (PathBuf, PathBuf) {
    let stem = cert_file_stem(hostname);
    (
        certdir.join(format!("{stem}.crt")),
        certdir.join(format!("{stem}.key")),
    )
}

/// The leaf's notAfter as Unix seconds (`None` when the DER does not parse).
pub fn not_after_unix(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// Manual cert mode (spec §3.2): load `<certdir>/<stem>.crt` and `.key` when both exist;
/// when neither exists and `hostname` is an IP address, generate a self-signed certificate,
/// write both files (key mode 0600) and return it with `generated = true`; otherwise fail.
///
/// Loaded certificates are checked like upstream does at start-up: the key must match the
/// leaf and the leaf must have an IP SAN (IP hostname) or DNS SAN (DNS hostname) for
/// `hostname`.
pub fn load_or_generate(certdir: &Path, hostname: &str) -> Result<LoadedCert, CertError> {
    let (cert_path, key_path) = checked_paths(certdir, hostname)?;
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => load_pair(&cert_path, &key_path, hostname),
        (true, false) => Err(CertError::Incomplete {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(CertError::Incomplete {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            let Ok(ip) = hostname.parse::<IpAddr>() else {
                return Err(CertError::Missing {
                    hostname: hostname.to_owned(),
                    cert_path,
                    key_path,
                });
            };
            let (cert_pem, key_pem) = generate_self_signed_ip(hostname, ip)?;
            create_certdir(certdir)?;
            // Key first: a crash in between leaves `Incomplete`, never a cert without key
            // that a later start would pair with a different key.
            write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
            write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
            let mut loaded = load_pair(&cert_path, &key_path, hostname)?;
            loaded.generated = true;
            tracing::info!(
                cert = %cert_path.display(),
                pin = loaded.pin.as_deref().unwrap_or_default(),
                "generated self-signed certificate"
            );
            Ok(loaded)
        }
    }
}

/// Load `<certdir>/<stem>.crt` and `.key` without ever generating (used for reloads).
pub fn load(certdir: &Path, hostname: &str) -> Result<LoadedCert, CertError> {
    let (cert_path, key_path) = checked_paths(certdir, hostname)?;
    load_pair(&cert_path, &key_path, hostname)
}

/// Load and validate a PEM certificate chain file and a PEM key file for `hostname`.
pub fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    hostname: &str,
) -> Result<LoadedCert, CertError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    parse_pair(&cert_pem, &key_pem, cert_path, key_path, hostname)
}

/// Parse and validate PEM bytes; the paths are only used in error messages.
///
/// Accepts a chain of one or more `CERTIFICATE` blocks (leaf first) and a PKCS#8, SEC1
/// (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) key.
pub fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    hostname: &str,
) -> Result<LoadedCert, CertError> {
    let mut chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: cert_path.to_owned(),
            source,
        })?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| CertError::Pem {
            path: key_path.to_owned(),
            source,
        })?
        .ok_or_else(|| CertError::NoPrivateKey {
            path: key_path.to_owned(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: cert_path.to_owned(),
        });
    };

    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::ParseCertificate {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    check_hostname(&parsed, hostname, cert_path)?;
    if !parsed.validity().is_valid() {
        tracing::warn!(
            cert = %cert_path.display(),
            not_before = %parsed.validity().not_before,
            not_after = %parsed.validity().not_after,
            "certificate is outside its validity period; clients will reject it"
        );
    }
    let self_signed = parsed.issuer().as_raw() == parsed.subject().as_raw();
    drop(parsed);

    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(vec![leaf.clone()], key.clone_key(), &provider).map_err(
        |source| CertError::Key {
            key_path: key_path.to_owned(),
            cert_path: cert_path.to_owned(),
            source,
        },
    )?;

    let pin = if self_signed {
        if chain.len() > 1 {
            tracing::warn!(
                cert = %cert_path.display(),
                dropped = chain.len() - 1,
                "self-signed leaf: ignoring the other certificates in the file \
                 (pinned clients accept exactly one)"
            );
            chain.truncate(1);
        }
        Some(Pin::of_der(leaf_of(&chain)).to_string())
    } else {
        None
    };
    Ok(LoadedCert {
        chain,
        key,
        pin,
        generated: false,
    })
}

/// The DERPNode JSON line upstream prints for a self-signed IP certificate (spec §3.2):
/// `{"Name":"custom","RegionID":900,"HostName":"<host>","CertName":"<pin>"}`.
///
/// `pin` is the full CertName (`sha256-raw:<hex>`). With the default ports (443, 3478) the
/// output is byte-identical to upstream's; otherwise `STUNPort` (`-1` = STUN disabled)
/// and/or `DERPPort` are added in `tailcfg.DERPNode` field order, which upstream forgets.
pub fn derp_node_json(hostname: &str, pin: &str, derp_port: u16, stun_port: i32) -> String {
    let mut out = String::with_capacity(128 + hostname.len() + pin.len());
    out.push_str(r#"{"Name":"#);
    push_go_json_string(&mut out, SNIPPET_NODE_NAME);
    out.push_str(&format!(r#","RegionID":{SNIPPET_REGION_ID},"HostName":"#));
    push_go_json_string(&mut out, hostname);
    if !pin.is_empty() {
        out.push_str(r#","CertName":"#);
        push_go_json_string(&mut out, pin);
    }
    if stun_port != 0 && stun_port != i32::from(DEFAULT_STUN_PORT) {
        out.push_str(&format!(r#","STUNPort":{stun_port}"#));
    }
    if derp_port != 0 && derp_port != DEFAULT_DERP_PORT {
        out.push_str(&format!(r#","DERPPort":{derp_port}"#));
    }
    out.push('}');
    out
}

/// Upstream's two-line start-up notice for an IP hostname (spec §3.2), without the Go log
/// timestamp prefix; `node_json` is [`derp_node_json`]'s output.
pub fn self_signed_notice(hostname: &str, node_json: &str) -> String {
    let mut quoted = String::new();
    push_go_json_string(&mut quoted, hostname);
    format!(
        "Using self-signed certificate for IP address {quoted}. Configure it in DERPMap \
         using: (https://tailscale.com/s/custom-derp)\n  {node_json}"
    )
}

/// Append `s` as a JSON string the way Go's `json.Marshal` does (HTML-safe escaping).
fn push_go_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn leaf_of<'a>(chain: &'a [CertificateDer<'static>]) -> &'a [u8] {
    chain.first().map(|c| c.as_ref()).unwrap_or_default()
}

fn checked_paths(certdir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), CertError> {
    if cert_file_stem(hostname).is_empty() {
        return Err(CertError::EmptyStem {
            hostname: hostname.to_owned(),
        });
    }
    Ok(cert_paths(certdir, hostname))
}

fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Go's `VerifyHostname` as used at upstream start-up: IP hostnames need an equal IP SAN,
/// DNS hostnames a matching DNS SAN (leftmost `*` wildcard allowed, no CN fallback).
fn check_hostname(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    hostname: &str,
    path: &Path,
) -> Result<(), CertError> {
    let sans: Vec<GeneralName<'_>> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(CertError::ParseCertificate {
                path: path.to_owned(),
                reason: format!("subject alternative name: {e}"),
            });
        }
    };
    let (ok, kind) = match hostname.parse::<IpAddr>() {
        Ok(ip) => (
            sans.iter().any(|n| match n {
                GeneralName::IPAddress(raw) => ip_from_san(raw) == Some(ip),
                _ => false,
            }),
            "IP",
        ),
        Err(_) => (
            sans.iter().any(|n| match n {
                GeneralName::DNSName(pattern) => dns_name_matches(pattern, hostname),
                _ => false,
            }),
            "DNS",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(CertError::HostnameMismatch {
            path: path.to_owned(),
            hostname: hostname.to_owned(),
            kind,
        })
    }
}

fn ip_from_san(raw: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(raw) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(raw).ok().map(IpAddr::from)
}

/// Case-insensitive DNS match, ignoring one trailing dot; `*.example.com` matches exactly
/// one extra leftmost label.
fn dns_name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    let host = host.strip_suffix('.').unwrap_or(host);
    if pattern.eq_ignore_ascii_case(host) {
        return true;
    }
    match (pattern.strip_prefix("*."), host.split_once('.')) {
        (Some(rest), Some((label, host_rest))) => {
            !label.is_empty() && !rest.is_empty() && rest.eq_ignore_ascii_case(host_rest)
        }
        _ => false,
    }
}

/// Build upstream's self-signed IP certificate (spec §3.2); returns `(cert PEM, key PEM)`.
fn generate_self_signed_ip(hostname: &str, ip: IpAddr) -> Result<(String, String), CertError> {
    let gen_err = |source| CertError::Generate {
        hostname: hostname.to_owned(),
        source,
    };
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;

    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, hostname);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip)];
    // Random serial < 2^128, like upstream.
    let serial: [u8; 16] = rand::random();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    params.not_before = now;
    params.not_after = add_one_year(now);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    // Basic constraints, cA = false, critical — as Go writes it. Added by hand because
    // rcgen's `IsCa::ExplicitNoCa` also adds a Subject Key Identifier, which Go does not.
    params.is_ca = rcgen::IsCa::NoCa;
    params.custom_extensions = vec![basic_constraints_not_ca()];

    let cert = params.self_signed(&key_pair).map_err(gen_err)?;
    let key_pem = sec1_pem_from_p256_pkcs8(key_pair.serialized_der())
        .unwrap_or_else(|| pem_encode("PRIVATE KEY", key_pair.serialized_der()));
    Ok((cert.pem(), key_pem))
}

/// A critical Basic Constraints extension with `cA = false` (an empty SEQUENCE).
pub(crate) fn basic_constraints_not_ca() -> rcgen::CustomExtension {
    // OID 2.5.29.19 = id-ce-basicConstraints; value: SEQUENCE {} (DER `30 00`).
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
    ext.set_criticality(true);
    ext
}

/// `t` plus one calendar year (29 February becomes 1 March), like Go's `AddDate(1, 0, 0)`.
fn add_one_year(t: OffsetDateTime) -> OffsetDateTime {
    let next = t.year() + 1;
    t.replace_year(next).unwrap_or_else(|_| {
        t.replace_day(28)
            .and_then(|d| d.replace_year(next))
            .map(|d| d + time::Duration::days(1))
            .unwrap_or(t + time::Duration::days(365))
    })
}

/// ring's PKCS#8 v1 encoding of a P-256 key is a fixed template; the bytes before the
/// 32-byte private scalar and between it and the 65-byte public point:
const RING_P256_PKCS8_PREFIX: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];
const RING_P256_PKCS8_MIDDLE: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];

/// Re-encode ring's P-256 PKCS#8 as SEC1 `EC PRIVATE KEY` with the curve parameters, the
/// form upstream writes (spec §3.2). `None` if the input is not in ring's exact template.
fn sec1_pem_from_p256_pkcs8(pkcs8: &[u8]) -> Option<String> {
    let rest = pkcs8.strip_prefix(&RING_P256_PKCS8_PREFIX[..])?;
    let (scalar, rest) = rest.split_at_checked(32)?;
    let point = rest.strip_prefix(&RING_P256_PKCS8_MIDDLE[..])?;
    if point.len() != 65 {
        return None;
    }
    let mut der = Vec::with_capacity(121);
    // ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING,
    //                             [0] parameters (prime256v1), [1] publicKey BIT STRING }
    der.extend_from_slice(&[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
    der.extend_from_slice(scalar);
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    der.extend_from_slice(&RING_P256_PKCS8_MIDDLE);
    der.extend_from_slice(point);
    // Sanity check: the result must load as a key again.
    let sec1 = PrivateKeyDer::Sec1(der.clone().into());
    rustls::crypto::ring::sign::any_ecdsa_type(&sec1).ok()?;
    Some(pem_encode("EC PRIVATE KEY", &der))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn create_certdir(dir: &Path) -> Result<(), CertError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Write `data` to a temporary file next to `path` with `mode`, fsync, then rename.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    write_file_atomic(path, data, mode).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` atomically: a new, randomly named temporary file next to it,
/// created exclusively (`O_EXCL`, so nothing planted at that name, file or symlink, is
/// followed or reused) with `mode` from the start, fsynced, then renamed over `path`.
/// Readers see the old file or the whole new one, never a partial or wider-permission one.
pub(crate) fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Best effort: make the rename durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pin::PIN_PREFIX;
    use x509_parser::prelude::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn pin_of_known_der_is_lowercase_sha256_hex() {
        // sha256("abc") is a classic test vector.
        assert_eq!(
            Pin::of_der(b"abc").to_string(),
            "sha256-raw:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn stem_keeps_letters_digits_dash_dot() {
        assert_eq!(cert_file_stem("2001:db8::1"), "2001db81");
        assert_eq!(cert_file_stem("203.0.113.5"), "203.0.113.5");
        assert_eq!(cert_file_stem("derp-1.Example.com"), "derp-1.Example.com");
        assert_eq!(cert_file_stem("a_b/c\\d é*"), "abcd");
        assert_eq!(cert_file_stem("[::1]"), "1");
        let (c, k) = cert_paths(Path::new("/certs"), "2001:db8::1");
        assert_eq!(c, Path::new("/certs/2001db81.crt"));
        assert_eq!(k, Path::new("/certs/2001db81.key"));
    }

    #[test]
    fn derp_node_json_matches_upstream_bytes() {
        let pin = "sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        assert_eq!(
            derp_node_json("203.0.113.5", pin, 443, 3478),
            r#"{"Name":"custom","RegionID":900,"HostName":"203.0.113.5","CertName":"sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"}"#
        );
        assert_eq!(
            derp_node_json("2001:db8::1", "sha256-raw:ab", 8443, -1),
            r#"{"Name":"custom","RegionID":900,"HostName":"2001:db8::1","CertName":"sha256-raw:ab","STUNPort":-1,"DERPPort":8443}"#
        );
        assert_eq!(
            derp_node_json("h<&>", "", 0, 0),
            r#"{"Name":"custom","RegionID":900,"HostName":"h\u003c\u0026\u003e"}"#
        );
        let notice = self_signed_notice("203.0.113.5", "{}");
        assert_eq!(
            notice,
            "Using self-signed certificate for IP address \"203.0.113.5\". Configure it in \
             DERPMap using: (https://tailscale.com/s/custom-derp)\n  {}"
        );
    }

    #[test]
    fn dns_name_matching_follows_go_rules() {
        assert!(dns_name_matches("derp.example.com", "DERP.example.com."));
        assert!(dns_name_matches("*.example.com", "derp.example.com"));
        assert!(!dns_name_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_name_matches("*.example.com", "example.com"));
        assert!(!dns_name_matches("derp.example.com", "derp2.example.com"));
    }

    #[test]
    fn dns_hostname_without_files_is_a_clear_error() {
        let dir = tmp();
        let err = load_or_generate(dir.path(), "derp.example.com").expect_err("must fail");
        assert!(matches!(err, CertError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("derp.example.com.crt"), "{err}");
    }

    #[test]
    fn generate_then_reload_keeps_the_pin() {
        let dir = tmp();
        let certdir = dir.path().join("certs");
        let first = load_or_generate(&certdir, "127.0.0.1").expect("generate");
        assert!(first.generated);
        assert_eq!(first.chain.len(), 1);
        let pin = first.pin.clone().expect("self-signed is pinned");
        assert_eq!(pin, Pin::of_der(&first.chain[0]).to_string());
        assert!(pin.starts_with(PIN_PREFIX));
        assert_eq!(pin.len(), PIN_PREFIX.len() + 64);
        assert_eq!(pin, pin.to_lowercase());

        let second = load_or_generate(&certdir, "127.0.0.1").expect("reload");
        assert!(!second.generated);
        assert_eq!(second.pin.as_deref(), Some(pin.as_str()));
        assert_eq!(second.chain, first.chain);
        let third = load(&certdir, "127.0.0.1").expect("load");
        assert_eq!(third.pin.as_deref(), Some(pin.as_str()));

        // Upstream's on-disk formats.
        let key_pem = fs::read_to_string(certdir.join("127.0.0.1.key")).expect("key");
        assert!(
            key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"),
            "{key_pem}"
        );
        let crt_pem = fs::read_to_string(certdir.join("127.0.0.1.crt")).expect("crt");
        assert!(crt_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        // Debug never shows the key.
        let dbg = format!("{second:?}");
        assert!(dbg.contains("pin") && !dbg.contains("key:"), "{dbg}");
    }

    #[cfg(unix)]
    #[test]
    fn generated_files_have_upstream_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tmp();
        let certdir = dir.path().join("new");
        load_or_generate(&certdir, "2001:db8::1").expect("generate");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&certdir.join("2001db81.key")), 0o600);
        assert_eq!(mode(&certdir.join("2001db81.crt")), 0o644);
        assert_eq!(mode(&certdir), 0o700);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&certdir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn generated_cert_has_upstream_properties() {
        for host in ["127.0.0.1", "2001:db8::1"] {
            let dir = tmp();
            let c = load_or_generate(dir.path(), host).expect("generate");
            let (_, x) = parse_x509_certificate(&c.chain[0]).expect("parse");
            assert_eq!(x.version(), X509Version::V3);
            // Subject CN = hostname, issuer = subject.
            let cn: Vec<_> = x.subject().iter_common_name().collect();
            assert_eq!(cn.len(), 1);
            assert_eq!(cn[0].as_str().expect("cn"), host);
            assert_eq!(x.issuer().as_raw(), x.subject().as_raw());
            // ECDSA P-256 with SHA-256.
            assert_eq!(
                x.public_key().algorithm.algorithm,
                oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
            );
            let curve = x
                .public_key()
                .algorithm
                .parameters
                .as_ref()
                .expect("curve")
                .as_oid()
                .expect("oid");
            assert_eq!(curve, oid_registry::OID_EC_P256);
            assert_eq!(
                x.signature_algorithm.algorithm,
                oid_registry::OID_SIG_ECDSA_WITH_SHA256
            );
            // Serial: positive, < 2^128.
            assert!(x.serial.bits() <= 128);
            // Validity: now .. now + 1 year.
            let nb = x.validity().not_before.timestamp();
            let na = x.validity().not_after.timestamp();
            let now = OffsetDateTime::now_utc().unix_timestamp();
            assert!((now - nb).abs() < 120, "not_before {nb} now {now}");
            let days = (na - nb) / 86_400;
            assert!((365..=366).contains(&days), "{days} days");
            assert!(x.validity().is_valid());
            // Exactly one IP SAN = hostname.
            let san = x
                .subject_alternative_name()
                .expect("san")
                .expect("san present");
            let ip: IpAddr = host.parse().expect("ip");
            assert_eq!(san.value.general_names.len(), 1);
            match &san.value.general_names[0] {
                GeneralName::IPAddress(raw) => assert_eq!(ip_from_san(raw), Some(ip)),
                other => panic!("unexpected SAN {other:?}"),
            }
            // serverAuth only; digitalSignature + keyEncipherment; cA = false, critical.
            let eku = x.extended_key_usage().expect("eku").expect("eku present");
            assert!(eku.value.server_auth && !eku.value.client_auth);
            let ku = x.key_usage().expect("ku").expect("ku present");
            assert!(ku.value.digital_signature() && ku.value.key_encipherment());
            assert!(!ku.value.key_cert_sign());
            let bc = x.basic_constraints().expect("bc").expect("bc present");
            assert!(bc.critical && !bc.value.ca);
            assert!(!x.is_ca());
        }
    }

    fn write_pair(dir: &Path, stem: &str, crt: &str, key: &str) {
        fs::write(dir.join(format!("{stem}.crt")), crt).expect("write crt");
        fs::write(dir.join(format!("{stem}.key")), key).expect("write key");
    }

    fn ca_signed(host_san: &str) -> (String, String, String) {
        // A private CA and a leaf signed by it: (chain PEM leaf+ca, leaf key PKCS#8 PEM, ca PEM).
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "test ca");
        ca_params.distinguished_name = dn;
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params = rcgen::CertificateParams::new(vec![host_san.to_owned()]).expect("p");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");
        (
            format!("{}{}", leaf.pem(), ca.pem()),
            leaf_key.serialize_pem(),
            ca.pem(),
        )
    }

    #[test]
    fn user_provided_chain_is_loaded_unpinned() {
        let dir = tmp();
        let (chain, key, _) = ca_signed("derp.example.com");
        write_pair(dir.path(), "derp.example.com", &chain, &key);
        let c = load_or_generate(dir.path(), "derp.example.com").expect("load");
        assert_eq!(c.chain.len(), 2);
        assert_eq!(c.pin, None);
        assert!(!c.generated);
        assert!(matches!(c.key, PrivateKeyDer::Pkcs8(_)));
    }

    #[test]
    fn user_provided_self_signed_pkcs8_is_pinned_and_alone() {
        let dir = tmp();
        let ck = rcgen::generate_simple_self_signed(vec!["203.0.113.5".to_owned()]).expect("gen");
        let (extra, _, _) = ca_signed("x.example.com");
        // A self-signed leaf followed by unrelated certs: only the leaf is kept.
        write_pair(
            dir.path(),
            "203.0.113.5",
            &format!("{}{extra}", ck.cert.pem()),
            &ck.signing_key.serialize_pem(),
        );
        let c = load_or_generate(dir.path(), "203.0.113.5").expect("load");
        assert_eq!(c.chain.len(), 1);
        assert_eq!(c.pin, Some(Pin::of_der(ck.cert.der()).to_string()));
    }

    #[test]
    fn key_of_another_certificate_is_rejected() {
        let dir = tmp();
        let a = load_or_generate(&dir.path().join("a"), "127.0.0.1").expect("a");
        let b = load_or_generate(&dir.path().join("b"), "127.0.0.1").expect("b");
        assert_ne!(a.pin, b.pin);
        let crt = fs::read_to_string(dir.path().join("a/127.0.0.1.crt")).expect("crt");
        let key = fs::read_to_string(dir.path().join("b/127.0.0.1.key")).expect("key");
        let mixed = dir.path().join("mixed");
        fs::create_dir(&mixed).expect("mkdir");
        write_pair(&mixed, "127.0.0.1", &crt, &key);
        let err = load(&mixed, "127.0.0.1").expect_err("mismatch");
        assert!(matches!(err, CertError::Key { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1.key"), "{err}");
    }

    #[test]
    fn ip_san_mismatch_is_rejected() {
        let dir = tmp();
        let certdir = dir.path().join("c");
        load_or_generate(&certdir, "127.0.0.1").expect("generate");
        // Same files presented for another IP hostname (rename to its stem).
        fs::rename(certdir.join("127.0.0.1.crt"), certdir.join("127.0.0.2.crt")).expect("mv");
        fs::rename(certdir.join("127.0.0.1.key"), certdir.join("127.0.0.2.key")).expect("mv");
        let err = load_or_generate(&certdir, "127.0.0.2").expect_err("mismatch");
        assert!(
            matches!(err, CertError::HostnameMismatch { kind: "IP", .. }),
            "{err}"
        );
        let (chain, key, _) = ca_signed("derp.example.com");
        write_pair(&certdir, "other.example.com", &chain, &key);
        let err = load(&certdir, "other.example.com").expect_err("mismatch");
        assert!(
            matches!(err, CertError::HostnameMismatch { kind: "DNS", .. }),
            "{err}"
        );
    }

    #[test]
    fn one_missing_file_is_not_overwritten() {
        let dir = tmp();
        let crt = dir.path().join("127.0.0.1.crt");
        fs::write(&crt, "user data").expect("write");
        let err = load_or_generate(dir.path(), "127.0.0.1").expect_err("incomplete");
        assert!(matches!(err, CertError::Incomplete { .. }), "{err}");
        assert_eq!(fs::read_to_string(&crt).expect("read"), "user data");
    }

    #[test]
    fn garbage_files_give_errors_naming_the_file() {
        let dir = tmp();
        write_pair(dir.path(), "127.0.0.1", "not pem", "not pem either");
        let err = load(dir.path(), "127.0.0.1").expect_err("garbage");
        assert!(err.to_string().contains("127.0.0.1."), "{err}");
        let err = load(dir.path(), ":::").expect_err("empty stem");
        assert!(matches!(err, CertError::EmptyStem { .. }));
    }

    #[test]
    fn one_year_addition_handles_leap_day() {
        let at = |y, m, d| rcgen::date_time_ymd(y, m, d) + ::time::Duration::hours(12);
        assert_eq!(add_one_year(at(2028, 2, 29)), at(2029, 3, 1));
        assert_eq!(add_one_year(at(2026, 11, 28)), at(2027, 11, 28));
    }
}
