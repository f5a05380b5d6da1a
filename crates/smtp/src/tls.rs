//! rustls plumbing for the outbound client. The crypto provider is always
//! ring, passed explicitly (never the process default), so this crate works
//! whatever else is linked and never pulls aws-lc-rs.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why TLS could not be set up or negotiated; the outbound client turns it
/// into its own error, so this module needs nothing from it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TlsError(String);

/// The ring provider, built once.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// What a TLS handshake towards one upstream needs: the client config and
/// the name to send as SNI and to verify the certificate against.
pub(crate) struct TlsSetup {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl TlsSetup {
    /// `verify`: check the chain against Mozilla's roots plus the
    /// certificates of `ca_file`, and the name; otherwise accept any
    /// certificate (handshake signatures are still checked). An empty
    /// `server_name` means the peer's IP address.
    pub(crate) fn new(
        verify: bool,
        ca_file: Option<&Path>,
        server_name: &str,
        peer: SocketAddr,
    ) -> Result<TlsSetup, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS setup: {e}")))?;
        let config = if verify {
            let mut roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            if let Some(path) = ca_file {
                add_pem_roots(&mut roots, path)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        };
        Ok(TlsSetup {
            connector: TlsConnector::from(Arc::new(config)),
            name: server_name_for(server_name, peer)?,
        })
    }

    /// Runs the client handshake over `stream` within `limit`.
    pub(crate) async fn wrap<S>(&self, stream: S, limit: Duration) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match timeout(limit, self.connector.connect(self.name.clone(), stream)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(TlsError(format!("TLS handshake failed: {e}"))),
            Err(_) => Err(TlsError(format!("TLS handshake timed out after {limit:?}"))),
        }
    }
}

/// The SNI / verification name: a DNS name or an IP literal (brackets, a
/// trailing dot and a `:port` suffix tolerated), the peer's address when
/// empty.
fn server_name_for(name: &str, peer: SocketAddr) -> Result<ServerName<'static>, TlsError> {
    let mut trimmed = name.trim();
    if let Ok(addr) = trimmed.parse::<SocketAddr>() {
        return Ok(ServerName::IpAddress(addr.ip().into()));
    }
    if let Some((host, port)) = trimmed.rsplit_once(':')
        && !host.contains(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        trimmed = host;
    }
    let trimmed = trimmed.trim_end_matches('.');
    let trimmed = trimmed
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Ok(ServerName::IpAddress(peer.ip().into()));
    }
    ServerName::try_from(trimmed.to_string())
        .map_err(|e| TlsError(format!("invalid TLS server name {name:?}: {e}")))
}

/// Adds every CERTIFICATE block of a PEM file to `roots`.
fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let bad = |what: String| TlsError(format!("ca_file {}: {what}", path.display()));
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
    let mut added = 0;
    for cert in certs {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no CERTIFICATE in it".into()));
    }
    Ok(())
}

/// For upstreams configured without verification: any certificate chain
/// and name are accepted, but the handshake signatures must still be
/// valid for the certificate presented (ring's algorithms), so the peer
/// holds the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        let peer: SocketAddr = "192.0.2.7:25".parse().unwrap();
        let name = |n: &str| server_name_for(n, peer).map(|s| s.to_str().into_owned());
        assert_eq!(name("up.test").unwrap(), "up.test");
        assert_eq!(name("up.test.").unwrap(), "up.test");
        assert_eq!(name("up.test:587").unwrap(), "up.test");
        assert_eq!(name("").unwrap(), "192.0.2.7");
        assert_eq!(name("[2001:db8::1]").unwrap(), "2001:db8::1");
        assert_eq!(name("[2001:db8::1]:465").unwrap(), "2001:db8::1");
        assert_eq!(name("198.51.100.1").unwrap(), "198.51.100.1");
        assert!(name("bad name").is_err());
    }
}
