//! TLS trust for LND: the server must present a certificate from `tls.cert`, or one that chains
//! to a CA in that file. Verification is never turned off.
//!
//! Why not simply add `tls.cert` as a root: LND's own certificate is self-signed with
//! `CA:TRUE` (so it can sign itself), and webpki refuses a CA certificate used as the server's
//! certificate (`CaUsedAsEndEntity`). So a presented certificate that is byte-for-byte one of
//! the file's certificates is accepted as pinned (its handshake signature is still checked
//! against its key); any other certificate goes through full webpki verification against the
//! file's certificates as roots, host name included. The pin ignores host names and dates, as
//! an SSH known-hosts entry does: LND lists the names it wants in its certificate, and renews it
//! with a new key, which then no longer matches the pin.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// Reads every certificate of a PEM file's contents.
pub(crate) fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("tls certificate: not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config("tls certificate: no CERTIFICATE block in the PEM".into()));
    }
    Ok(certs)
}

/// A rustls client configuration that trusts what `pem` holds, as described in the module.
pub(crate) fn client_config(pem: &[u8]) -> Result<rustls::ClientConfig> {
    let pinned = parse_pem_certs(pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in &pinned {
        roots.add(cert.clone()).map_err(|e| Error::Config(format!("tls certificate: unusable as a root: {e}")))?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(format!("tls certificate: {e}")))?;
    let verifier = Arc::new(PinnedOrChained { pinned, webpki, provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Why a certificate was refused; shown as is (rustls prints certificate errors with `Debug`).
struct NotTrusted(String);

impl std::fmt::Debug for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotTrusted {}

#[derive(Debug)]
struct PinnedOrChained {
    pinned: Vec<CertificateDer<'static>>,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedOrChained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if self.pinned.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).map_err(|e| {
            // webpki alone would only say e.g. `CaUsedAsEndEntity` for another LND's certificate.
            let why =
                NotTrusted(format!("the server's certificate is not the one in tls_cert_file, nor issued by it ({e})"));
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(why))))
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_without_certificates() {
        let err = client_config(b"not a pem").unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE block"), "{err}");
        let err = client_config(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}
