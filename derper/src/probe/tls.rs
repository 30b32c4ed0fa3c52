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

fn is_metacert(der: &[u8]) -> bool {
    parse_metacert(der).is_some()
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

pub(super) async fn tls_connect(
    node: &DerpNode,
    tcp: TcpStream,
    opts: &ProbeOptions,
    with_notes: bool,
) -> TlsOutcome {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Clients compare the lowercase hex exactly (spec §3.1): a pin written in another case
    // is parsed here so that the failure can be explained, then reported after the handshake.
    let pin = node
        .cert_name
        .strip_prefix(PIN_PREFIX)
        .and_then(|hex| Pin::parse_hex(hex).ok());
    let fronting = !node.cert_name.is_empty() && pin.is_none();
    let verify_name = if fronting {
        node.cert_name.as_str()
    } else {
        node.host_name.as_str()
    };
    let mut unverified = false;
    let (inner, name): (Arc<dyn ServerCertVerifier>, _) = if node.insecure_for_tests {
        (Arc::new(PinnedVerifier::insecure(&provider)), None)
    } else if let Some(p) = pin {
        (Arc::new(PinnedVerifier::new(p, &provider)), None)
    } else if opts.roots.is_empty() {
        unverified = true;
        (Arc::new(PinnedVerifier::insecure(&provider)), None)
    } else {
        let mut store = rustls::RootCertStore::empty();
        for c in &opts.roots {
            let _ = store.add(c.clone());
        }
        match WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone()).build()
        {
            Ok(v) => match server_name_of(verify_name) {
                Ok(n) => (v, Some(n)),
                Err(e) => return tls_fail(e),
            },
            Err(e) => return tls_fail(format!("building the WebPKI verifier: {e}")),
        }
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = RecordingVerifier {
        inner,
        name,
        seen: seen.clone(),
    };
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
    {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
        Err(e) => return tls_fail(format!("TLS configuration: {e}")),
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
    let expected_pin = pin.is_some().then(|| node.cert_name.clone());
    let meta_der = chain.iter().find(|c| is_metacert(c));
    // Certificates after the end entity that are not metacerts (pinned clients refuse them).
    let extra = chain.iter().skip(1).filter(|c| !is_metacert(c)).count();
    let leaf = chain.first();
    let presented_pin = leaf.map(|l| Pin::of_der(l).to_string());
    let mut notes = Vec::new();
    let metacert = meta_der.map(|m| {
        let cn = common_name(m).unwrap_or_default();
        let breaks = if pin.is_some() {
            "Tailscale v1.82.0–v1.82.5 clients reject this pinned node: with a sha256-raw \
             CertName they refuse any chain of more than one certificate ('unexpected multiple \
             certs presented'; spec §2.4, §11 P1). v1.84+ skip the metacert and use fast start."
                .to_owned()
        } else {
            String::new()
        };
        MetacertInfo {
            common_name: cn,
            matches_server_key: None,
            breaks,
        }
    });
    if let Some(m) = &metacert
        && with_notes
    {
        if m.breaks.is_empty() {
            notes.push(format!(
                "metacert presented (CN {}…): TLS 1.3 clients use fast start; harmless for \
                 WebPKI verification",
                m.common_name.get(..15).unwrap_or(&m.common_name)
            ));
        } else {
            notes.push(format!(
                "metacert presented (CN {}…): {}",
                m.common_name.get(..15).unwrap_or(&m.common_name),
                m.breaks
            ));
        }
    }
    let mut leaf_not_after = None;
    let mut expired = None;
    if let Some(l) = leaf
        && let Ok((_, x)) = x509_parser::parse_x509_certificate(l)
    {
        let na = x.validity().not_after.to_datetime();
        leaf_not_after = na
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        if !x.validity().is_valid() {
            expired = Some(format!(
                "the leaf certificate is outside its validity period (NotBefore {}, NotAfter {}); \
                 clients of every version reject it",
                x.validity().not_before,
                x.validity().not_after
            ));
        } else if with_notes {
            let left = na - time::OffsetDateTime::now_utc();
            if left < time::Duration::days(14) {
                notes.push(format!(
                    "the leaf certificate expires in {} days",
                    left.whole_days()
                ));
            }
        }
        if with_notes
            && pin.is_some()
            && let Ok(ip) = node.host_name.parse::<IpAddr>()
        {
            let has_ip_san = x
                .subject_alternative_name()
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
                });
            if !has_ip_san {
                notes.push(format!(
                    "the leaf has no IP SAN for {ip}: Tailscale v1.82–v1.84.x pinned clients \
                     reject it (spec §11 P2)"
                ));
            }
        }
    }
    let metacert_key = meta_der.and_then(|m| parse_metacert(m)).map(|m| m.key);
    let info = (!chain.is_empty()).then(|| TlsInfo {
        version: String::new(),
        expected_pin: expected_pin.clone(),
        presented_pin: presented_pin.clone(),
        chain_len: chain.len(),
        leaf_not_after,
        metacert,
    });
    let stream = match res {
        Err(_) => {
            return TlsOutcome {
                check: Check::fail(format!(
                    "TLS handshake timed out after {}",
                    fmt_duration(opts.timeout)
                )),
                info,
                notes,
                stream: None,
                metacert_key: None,
            };
        }
        Ok(Err(e)) => {
            let msg = match (&expected_pin, &presented_pin) {
                (Some(exp), Some(got)) if exp != got => pin_mismatch(exp, got),
                (Some(_), _) if extra > 0 => format!(
                    "the node presented {extra} certificate(s) after the leaf that are not \
                     metacerts; with a sha256-raw pin clients accept exactly one (no \
                     intermediates, spec §2.4)"
                ),
                _ => format!("TLS handshake failed: {e}"),
            };
            return TlsOutcome {
                check: Check::fail(msg),
                info,
                notes,
                stream: None,
                metacert_key: None,
            };
        }
        Ok(Ok(s)) => s,
    };
    // The chain verified against the pin parsed in any letter case; clients would not.
    if let (Some(exp), Some(got)) = (&expected_pin, &presented_pin)
        && exp != got
    {
        return TlsOutcome {
            check: Check::fail(pin_mismatch(exp, got)),
            info,
            notes,
            stream: None,
            metacert_key: None,
        };
    }
    let version = tls_version_name(stream.get_ref().1.protocol_version());
    let info = info.map(|mut i| {
        i.version = version.clone();
        i
    });
    let check = if let Some(why) = expired {
        Check::fail(why)
    } else if let Some(p) = &presented_pin
        && pin.is_some()
    {
        Check::pass(format!("{version}, pin matches ({p})"), Some(latency))
    } else if node.insecure_for_tests {
        Check::pass(
            format!("{version}, not verified (InsecureForTests)"),
            Some(latency),
        )
    } else if unverified {
        Check::pass(
            format!(
                "{version}, certificate NOT verified: no sha256-raw pin and no trust anchors \
                 (pass --ca-file to verify WebPKI nodes)"
            ),
            Some(latency),
        )
    } else {
        Check::pass(
            format!("{version}, chain verified for {verify_name}"),
            Some(latency),
        )
    };
    TlsOutcome {
        check,
        info,
        notes,
        stream: Some(stream),
        metacert_key,
    }
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
