//! The TLS step of a probe: the handshake as a pinned Tailscale client does it (the
//! `sha256-raw:` pin checked by [`crate::pin`], or WebPKI roots, or nothing for
//! InsecureForTests), with a verifier that records the presented chain so that a failure can
//! be explained (both pins, a metacert and the client versions it breaks, a missing IP SAN,
//! an expired leaf; spec §2.4, §3, §11).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::options::ProbeOptions;
use super::report::{Check, MetacertInfo, TlsInfo};
use crate::derpmap::DerpNode;
use crate::duration::fmt_duration;
use crate::key::NodePublicKey;
use crate::pin::{PIN_PREFIX, Pin, PinnedVerifier, common_name, parse_metacert};

/// Records the presented chain, then lets `inner` verify it: the workspace's
/// [`PinnedVerifier`] (pinned or, for InsecureForTests and nodes without roots, accepting any
/// certificate) or WebPKI against trust anchors for `name` (CertName when domain fronting).
/// Signatures are always checked, by `inner`.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    /// The name to verify instead of the dialed one (domain fronting).
    name: Option<ServerName<'static>>,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        {
            // No await while locked.
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        let name = self.name.as_ref().unwrap_or(server_name);
        self.inner
            .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

pub(super) type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// One established TLS connection plus what it showed.
pub(super) struct TlsOutcome {
    pub(super) check: Check,
    pub(super) info: Option<TlsInfo>,
    pub(super) notes: Vec<String>,
    pub(super) stream: Option<TlsStream>,
    pub(super) metacert_key: Option<NodePublicKey>,
}

fn tls_version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "unknown".into(),
    }
}

/// Explains a pin that differs from the presented end-entity certificate's.
fn pin_mismatch(expected: &str, presented: &str) -> String {
    let mut m = format!(
        "pinned certificate mismatch: the map expects {expected} (CertName) but the node \
         presented {presented}"
    );
    if expected.eq_ignore_ascii_case(presented) {
        m.push_str(
            "; they differ only in letter case and clients compare lowercase hex exactly \
             (spec §3.1): write the pin in lowercase",
        );
    } else {
        m.push_str("; publish the presented pin in the map or serve the pinned certificate");
    }
    m
}

/// Dials TLS on `tcp` as a client of `node` would and explains what it saw, in five steps:
/// choose how the certificate is verified, build a client that records the chain, hand
/// shake, read the chain, judge.
pub(super) async fn tls_connect(
    node: &DerpNode,
    tcp: TcpStream,
    opts: &ProbeOptions,
    with_notes: bool,
) -> TlsOutcome {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verification = match Verification::for_node(node, &opts.roots, &provider) {
        Ok(v) => v,
        Err(e) => return tls_fail(e),
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = match recording_client_config(provider, &verification, seen.clone()) {
        Ok(c) => c,
        Err(e) => return tls_fail(e),
    };
    // SNI = HostName unless it is an IP literal (spec §9.3); domain fronting verifies for
    // CertName but still sends HostName.
    let sni = match server_name_of(&node.host_name) {
        Ok(n) => n,
        Err(e) => return tls_fail(e),
    };
    let start = Instant::now();
    let res = tokio::time::timeout(
        opts.timeout,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(sni, tcp),
    )
    .await;
    let latency = start.elapsed();
    let chain: Vec<CertificateDer<'static>> =
        seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let report = ChainReport::read(&chain, node, verification.pin.is_some(), with_notes);
    let stream = match res {
        Err(_) => {
            return report.failure(format!(
                "TLS handshake timed out after {}",
                fmt_duration(opts.timeout)
            ));
        }
        Ok(Err(e)) => {
            let msg = report.handshake_error(&e);
            return report.failure(msg);
        }
        Ok(Ok(s)) => s,
    };
    // The chain verified against the pin parsed in any letter case; clients would not.
    if let Some(msg) = report.pin_mismatch() {
        return report.failure(msg);
    }
    let version = tls_version_name(stream.get_ref().1.protocol_version());
    let check = verification.verdict(
        node,
        &version,
        report.expired,
        report.presented_pin.as_deref(),
        latency,
    );
    TlsOutcome {
        check,
        info: report.info.map(|mut i| {
            i.version = version;
            i
        }),
        notes: report.notes,
        stream: Some(stream),
        metacert_key: report.metacert_key,
    }
}

/// How a node's certificate is verified, decided by its CertName: a `sha256-raw:` pin, any
/// certificate (InsecureForTests, or no trust anchors given), or WebPKI for CertName (domain
/// fronting) or HostName.
struct Verification {
    /// The pin, parsed in any letter case: clients compare the lowercase hex exactly (spec
    /// §3.1), so a pin in another case is reported after the handshake.
    pin: Option<Pin>,
    /// The name a WebPKI chain is verified for.
    verify_name: String,
    /// No pin, not InsecureForTests and no trust anchors: the chain is accepted unverified.
    unverified: bool,
    /// Checks the chain (and always the handshake signatures).
    inner: Arc<dyn ServerCertVerifier>,
    /// The name to verify instead of the dialed one (WebPKI).
    name: Option<ServerName<'static>>,
}

impl Verification {
    fn for_node(
        node: &DerpNode,
        roots: &[CertificateDer<'static>],
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, String> {
        let pin = node
            .cert_name
            .strip_prefix(PIN_PREFIX)
            .and_then(|hex| Pin::parse_hex(hex).ok());
        let fronting = !node.cert_name.is_empty() && pin.is_none();
        let verify_name = if fronting {
            node.cert_name.clone()
        } else {
            node.host_name.clone()
        };
        let mut unverified = false;
        let (inner, name): (Arc<dyn ServerCertVerifier>, _) = if node.insecure_for_tests {
            (Arc::new(PinnedVerifier::insecure(provider)), None)
        } else if let Some(p) = pin {
            (Arc::new(PinnedVerifier::new(p, provider)), None)
        } else if roots.is_empty() {
            unverified = true;
            (Arc::new(PinnedVerifier::insecure(provider)), None)
        } else {
            let mut store = rustls::RootCertStore::empty();
            for c in roots {
                let _ = store.add(c.clone());
            }
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| format!("building the WebPKI verifier: {e}"))?;
            (v, Some(server_name_of(&verify_name)?))
        };
        Ok(Self {
            pin,
            verify_name,
            unverified,
            inner,
            name,
        })
    }

    /// The check of a completed handshake: a leaf outside its validity fails, else it says
    /// how the certificate was verified.
    fn verdict(
        &self,
        node: &DerpNode,
        version: &str,
        expired: Option<String>,
        presented_pin: Option<&str>,
        latency: std::time::Duration,
    ) -> Check {
        if let Some(why) = expired {
            Check::fail(why)
        } else if let Some(p) = presented_pin
            && self.pin.is_some()
        {
            Check::pass(format!("{version}, pin matches ({p})"), Some(latency))
        } else if node.insecure_for_tests {
            Check::pass(
                format!("{version}, not verified (InsecureForTests)"),
                Some(latency),
            )
        } else if self.unverified {
            Check::pass(
                format!(
                    "{version}, certificate NOT verified: no sha256-raw pin and no trust \
                     anchors (pass --ca-file to verify WebPKI nodes)"
                ),
                Some(latency),
            )
        } else {
            Check::pass(
                format!("{version}, chain verified for {}", self.verify_name),
                Some(latency),
            )
        }
    }
}

/// A client configuration whose verifier records the presented chain in `seen` before
/// `verification` checks it.
fn recording_client_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verification: &Verification,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
) -> Result<rustls::ClientConfig, String> {
    let verifier = RecordingVerifier {
        inner: verification.inner.clone(),
        name: verification.name.clone(),
        seen,
    };
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        })
        .map_err(|e| format!("TLS configuration: {e}"))
}

/// What the presented chain shows, read whether or not the handshake succeeded.
struct ChainReport {
    /// For the report (its version is filled in after a successful handshake).
    info: Option<TlsInfo>,
    /// Notes for people (metacert, expiry soon, missing IP SAN), when asked for.
    notes: Vec<String>,
    /// The map's pin, when CertName is one.
    expected_pin: Option<String>,
    /// The pin of the presented end-entity certificate.
    presented_pin: Option<String>,
    /// Certificates after the end entity that are not metacerts (pinned clients refuse them).
    extra: usize,
    /// Why the leaf is outside its validity period.
    expired: Option<String>,
    /// The key named by the metacert, when one was presented.
    metacert_key: Option<NodePublicKey>,
}

impl ChainReport {
    fn read(
        chain: &[CertificateDer<'static>],
        node: &DerpNode,
        pinned: bool,
        with_notes: bool,
    ) -> Self {
        // The metacert rule is the pin module's (`parse_metacert`), the one pinned clients use.
        let meta = chain.iter().find_map(|c| parse_metacert(c).map(|m| (c, m)));
        let extra = chain
            .iter()
            .skip(1)
            .filter(|c| parse_metacert(c).is_none())
            .count();
        let leaf = chain.first();
        let presented_pin = leaf.map(|l| Pin::of_der(l).to_string());
        let expected_pin = pinned.then(|| node.cert_name.clone());
        let metacert =
            meta.map(|(der, _)| metacert_info(common_name(der).unwrap_or_default(), pinned));
        let mut notes = Vec::new();
        if let Some(m) = &metacert
            && with_notes
        {
            notes.push(metacert_note(m));
        }
        let leaf = leaf
            .map(|l| LeafFindings::read(l, &node.host_name, pinned, with_notes))
            .unwrap_or_default();
        notes.extend(leaf.notes);
        let info = (!chain.is_empty()).then(|| TlsInfo {
            version: String::new(),
            expected_pin: expected_pin.clone(),
            presented_pin: presented_pin.clone(),
            chain_len: chain.len(),
            leaf_not_after: leaf.not_after,
            metacert,
        });
        Self {
            info,
            notes,
            expected_pin,
            presented_pin,
            extra,
            expired: leaf.expired,
            metacert_key: meta.map(|(_, m)| m.key),
        }
    }

    /// The explanation when the map's pin and the presented leaf's differ.
    fn pin_mismatch(&self) -> Option<String> {
        match (&self.expected_pin, &self.presented_pin) {
            (Some(exp), Some(got)) if exp != got => Some(pin_mismatch(exp, got)),
            _ => None,
        }
    }

    /// Why a handshake failed with `e`, in the words of what the chain shows.
    fn handshake_error(&self, e: &std::io::Error) -> String {
        if let Some(m) = self.pin_mismatch() {
            m
        } else if self.expected_pin.is_some() && self.extra > 0 {
            format!(
                "the node presented {} certificate(s) after the leaf that are not metacerts; \
                 with a sha256-raw pin clients accept exactly one (no intermediates, spec \
                 §2.4)",
                self.extra
            )
        } else {
            format!("TLS handshake failed: {e}")
        }
    }

    /// A failed TLS step that still reports the chain and the notes.
    fn failure(self, msg: String) -> TlsOutcome {
        TlsOutcome {
            check: Check::fail(msg),
            info: self.info,
            notes: self.notes,
            stream: None,
            metacert_key: None,
        }
    }
}

/// A presented metacert, with the clients it breaks: pinned nodes break Tailscale
/// v1.82.0–v1.82.5, which refuse any chain longer than one certificate.
fn metacert_info(common_name: String, pinned: bool) -> MetacertInfo {
    let breaks = if pinned {
        "Tailscale v1.82.0–v1.82.5 clients reject this pinned node: with a sha256-raw \
         CertName they refuse any chain of more than one certificate ('unexpected multiple \
         certs presented'; spec §2.4, §11 P1). v1.84+ skip the metacert and use fast start."
            .to_owned()
    } else {
        String::new()
    };
    MetacertInfo {
        common_name,
        matches_server_key: None,
        breaks,
    }
}

/// The note on a presented metacert (its CN shortened).
fn metacert_note(m: &MetacertInfo) -> String {
    let cn = m.common_name.get(..15).unwrap_or(&m.common_name);
    if m.breaks.is_empty() {
        format!(
            "metacert presented (CN {cn}…): TLS 1.3 clients use fast start; harmless for \
             WebPKI verification"
        )
    } else {
        format!("metacert presented (CN {cn}…): {}", m.breaks)
    }
}

/// What the end-entity certificate shows.
#[derive(Debug, Default, PartialEq)]
struct LeafFindings {
    /// Its NotAfter (RFC 3339), when it parses.
    not_after: Option<String>,
    /// Why it is outside its validity period.
    expired: Option<String>,
    /// Expiry within 14 days; a pinned IP-literal HostName missing from its IP SANs.
    notes: Vec<String>,
}

impl LeafFindings {
    fn read(der: &[u8], host_name: &str, pinned: bool, with_notes: bool) -> Self {
        let mut out = Self::default();
        let Ok((_, x)) = x509_parser::parse_x509_certificate(der) else {
            return out;
        };
        let na = x.validity().not_after.to_datetime();
        out.not_after = na
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        if !x.validity().is_valid() {
            out.expired = Some(format!(
                "the leaf certificate is outside its validity period (NotBefore {}, NotAfter \
                 {}); clients of every version reject it",
                x.validity().not_before,
                x.validity().not_after
            ));
        } else if with_notes {
            let left = na - time::OffsetDateTime::now_utc();
            if left < time::Duration::days(14) {
                out.notes.push(format!(
                    "the leaf certificate expires in {} days",
                    left.whole_days()
                ));
            }
        }
        if with_notes
            && pinned
            && let Ok(ip) = host_name.parse::<IpAddr>()
            && !has_ip_san(&x, ip)
        {
            out.notes.push(format!(
                "the leaf has no IP SAN for {ip}: Tailscale v1.82–v1.84.x pinned clients \
                 reject it (spec §11 P2)"
            ));
        }
        out
    }
}

/// Whether `cert` names `ip` in its subject alternative names.
fn has_ip_san(cert: &x509_parser::certificate::X509Certificate<'_>, ip: IpAddr) -> bool {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|g| match g {
                x509_parser::extensions::GeneralName::IPAddress(b) => match ip {
                    IpAddr::V4(v4) => *b == v4.octets().as_slice(),
                    IpAddr::V6(v6) => *b == v6.octets().as_slice(),
                },
                _ => false,
            })
        })
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, String> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => {
            ServerName::try_from(name.to_owned()).map_err(|e| format!("TLS name {name:?}: {e}"))
        }
    }
}

fn tls_fail(msg: String) -> TlsOutcome {
    TlsOutcome {
        check: Check::fail(msg),
        info: None,
        notes: Vec::new(),
        stream: None,
        metacert_key: None,
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    /// A self-signed certificate for `ips`, valid from `not_before` to `not_after`.
    fn leaf(
        ips: &[IpAddr],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        p.not_before = not_before;
        p.not_after = not_after;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn valid_leaf(ips: &[IpAddr]) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        leaf(
            ips,
            now - time::Duration::hours(1),
            now + time::Duration::days(90),
        )
    }

    fn localhost() -> IpAddr {
        IpAddr::from([127, 0, 0, 1])
    }

    fn node(host: &str, cert_name: &str) -> DerpNode {
        DerpNode {
            host_name: host.into(),
            cert_name: cert_name.into(),
            ..DerpNode::default()
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn der(v: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from(v.to_vec())
    }

    #[test]
    fn verification_follows_the_cert_name() {
        let pin = Pin::of_der(b"x");
        let pinned =
            Verification::for_node(&node("127.0.0.1", &pin.to_string()), &[], &provider()).unwrap();
        assert_eq!(pinned.pin, Some(pin));
        assert!(!pinned.unverified && pinned.name.is_none());
        // an upper-case pin still parses, so the mismatch can be explained after the handshake
        let upper = format!("{PIN_PREFIX}{}", pin.hex().to_uppercase());
        let v = Verification::for_node(&node("127.0.0.1", &upper), &[], &provider()).unwrap();
        assert_eq!(v.pin, Some(pin));
        // no pin and no trust anchors: accepted, and said to be unverified
        let v = Verification::for_node(&node("derp.example", ""), &[], &provider()).unwrap();
        assert!(v.unverified && v.pin.is_none());
        assert_eq!(v.verify_name, "derp.example");
        let mut insecure = node("derp.example", "");
        insecure.insecure_for_tests = true;
        assert!(
            !Verification::for_node(&insecure, &[], &provider())
                .unwrap()
                .unverified
        );
        // domain fronting with trust anchors: WebPKI for CertName
        let root = der(&valid_leaf(&[localhost()]));
        let v = Verification::for_node(&node("203.0.113.1", "front.example"), &[root], &provider())
            .unwrap();
        assert_eq!(v.verify_name, "front.example");
        assert_eq!(v.name, Some(ServerName::try_from("front.example").unwrap()));
        assert!(!v.unverified);
    }

    #[test]
    fn verdict_fails_an_expired_leaf_and_otherwise_says_how_it_verified() {
        let ms = std::time::Duration::from_millis(3);
        let pin = Pin::of_der(b"x").to_string();
        let pinned = Verification::for_node(&node("127.0.0.1", &pin), &[], &provider()).unwrap();
        let n = node("127.0.0.1", &pin);
        let c = pinned.verdict(&n, "TLSv1.3", Some("expired".into()), Some(&pin), ms);
        assert_eq!(c, Check::fail("expired"));
        let c = pinned.verdict(&n, "TLSv1.3", None, Some(&pin), ms);
        assert_eq!(c.message, format!("TLSv1.3, pin matches ({pin})"));
        let open = node("derp.example", "");
        let v = Verification::for_node(&open, &[], &provider()).unwrap();
        let c = v.verdict(&open, "TLSv1.3", None, Some(&pin), ms);
        assert!(c.message.contains("NOT verified"), "{}", c.message);
        let root = der(&valid_leaf(&[localhost()]));
        let v = Verification::for_node(&open, &[root], &provider()).unwrap();
        let c = v.verdict(&open, "TLSv1.2", None, Some(&pin), ms);
        assert_eq!(c.message, "TLSv1.2, chain verified for derp.example");
    }

    #[test]
    fn chain_report_finds_the_metacert_and_counts_other_extra_certificates() {
        let leaf = der(&valid_leaf(&[localhost()]));
        let meta = crate::tls::metacert(&[7; 32]).unwrap();
        let stray = der(&valid_leaf(&[localhost()]));
        let pin = Pin::of_der(&leaf).to_string();
        let n = node("127.0.0.1", &pin);
        let r = ChainReport::read(&[leaf.clone(), meta.clone()], &n, true, true);
        assert_eq!(r.extra, 0);
        assert_eq!(r.metacert_key, Some(NodePublicKey::from_bytes([7; 32])));
        assert_eq!(r.presented_pin.as_deref(), Some(pin.as_str()));
        assert_eq!(r.pin_mismatch(), None);
        let info = r.info.unwrap();
        assert_eq!(info.chain_len, 2);
        assert!(info.metacert.unwrap().breaks.contains("v1.82.0"));
        assert!(r.notes[0].starts_with("metacert presented (CN derpkey07070707…)"));
        let r = ChainReport::read(&[leaf, stray, meta], &n, true, false);
        assert_eq!(r.extra, 1);
        assert!(r.notes.is_empty(), "no notes unless asked: {:?}", r.notes);
        let e = std::io::Error::other("bad certificate");
        assert!(
            r.handshake_error(&e)
                .starts_with("the node presented 1 certificate(s) after the leaf")
        );
    }

    #[test]
    fn chain_report_explains_a_pin_mismatch_before_the_handshake_error() {
        let leaf = der(&valid_leaf(&[localhost()]));
        let other = Pin::of_der(b"other").to_string();
        let r = ChainReport::read(
            std::slice::from_ref(&leaf),
            &node("127.0.0.1", &other),
            true,
            false,
        );
        let e = std::io::Error::other("bad certificate");
        let msg = r.handshake_error(&e);
        assert!(msg.starts_with("pinned certificate mismatch"), "{msg}");
        assert_eq!(r.pin_mismatch(), Some(msg));
        // not pinned: the handshake error as it is
        let r = ChainReport::read(&[leaf], &node("derp.example", ""), false, false);
        assert_eq!(r.expected_pin, None);
        assert_eq!(
            r.handshake_error(&e),
            "TLS handshake failed: bad certificate"
        );
        let empty = ChainReport::read(&[], &node("derp.example", ""), false, true);
        assert!(empty.info.is_none() && empty.presented_pin.is_none());
    }

    #[test]
    fn leaf_findings_note_soon_expiry_and_a_missing_ip_san_for_pinned_ip_hosts() {
        let now = time::OffsetDateTime::now_utc();
        let soon = leaf(
            &[localhost()],
            now - time::Duration::hours(1),
            now + time::Duration::days(3),
        );
        let f = LeafFindings::read(&soon, "127.0.0.2", true, true);
        assert_eq!(f.expired, None);
        assert!(f.not_after.is_some());
        assert_eq!(f.notes.len(), 2, "{:?}", f.notes);
        assert!(f.notes[0].starts_with("the leaf certificate expires in 2 days"));
        assert!(f.notes[1].contains("no IP SAN for 127.0.0.2"));
        // the SAN is there; a DNS host name or an unpinned node is not checked
        assert_eq!(
            LeafFindings::read(&soon, "127.0.0.1", true, true)
                .notes
                .len(),
            1
        );
        assert_eq!(
            LeafFindings::read(&soon, "derp.example", true, true)
                .notes
                .len(),
            1
        );
        assert_eq!(
            LeafFindings::read(&soon, "127.0.0.2", false, true)
                .notes
                .len(),
            1
        );
        assert!(
            LeafFindings::read(&soon, "127.0.0.2", true, false)
                .notes
                .is_empty()
        );
    }

    #[test]
    fn leaf_findings_fail_a_leaf_outside_its_validity() {
        let now = time::OffsetDateTime::now_utc();
        let old = leaf(
            &[localhost()],
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        );
        let f = LeafFindings::read(&old, "127.0.0.1", true, true);
        let why = f.expired.unwrap();
        assert!(
            why.starts_with("the leaf certificate is outside its validity period"),
            "{why}"
        );
        assert!(f.notes.is_empty());
        assert_eq!(
            LeafFindings::read(b"not der", "127.0.0.1", true, true),
            LeafFindings::default()
        );
    }
}
