//! The system's trust anchors: the CA bundle for dialers that verify CA-issued certificates
//! (`--mesh-with` peers, the admission webhook). A leaf: it depends on no other module.

use rustls::pki_types::CertificateDer;

/// Loads the system CA bundle (for `--mesh-with` peers with CA-issued certificates).
pub(crate) fn system_roots() -> Vec<CertificateDer<'static>> {
    const PATHS: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];
    let env = std::env::var("SSL_CERT_FILE").ok();
    for p in env.as_deref().into_iter().chain(PATHS.iter().copied()) {
        if let Ok(data) = std::fs::read(p) {
            let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
                .filter_map(Result::ok)
                .collect();
            if !certs.is_empty() {
                return certs;
            }
        }
    }
    Vec::new()
}
