//! rustls plumbing for the outbound client and the listeners. The crypto
//! provider is always ring, passed explicitly (never the process default),
//! so this crate works whatever else is linked and never pulls aws-lc-rs.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

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

/// A listener's certificate chain and key, loaded once per config
/// generation: a reload reads the files again, and sessions already open
/// keep the one they started with. TLS 1.2 and 1.3 only (rustls offers
/// nothing older).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    /// The chain as loaded, to tell two loads apart.
    chain: Arc<Vec<CertificateDer<'static>>>,
}

impl ServerTls {
    /// Reads a PEM certificate chain (leaf first) and its PEM private key;
    /// the error says which file is wrong and why.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, String> {
        let bad = |path: &Path, what: String| format!("\"{}\": {what}", path.display());
        std::fs::File::open(cert).map_err(|e| bad(cert, format!("cannot be read: {e}")))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, format!("not a PEM certificate file: {e}")))?;
        if chain.is_empty() {
            return Err(bad(cert, "holds no CERTIFICATE block".into()));
        }
        std::fs::File::open(key).map_err(|e| bad(key, format!("cannot be read: {e}")))?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            bad(
                key,
                format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), private)
            .map_err(|e| {
                format!(
                    "the key \"{}\" does not fit the certificate \"{}\": {e}",
                    key.display(),
                    cert.display()
                )
            })?;
        Ok(ServerTls {
            config: Arc::new(config),
            chain: Arc::new(chain),
        })
    }

    /// Runs the server handshake over `stream` within `limit`; on success,
    /// also returns the negotiated version and cipher suite.
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
        limit: Duration,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<S>, crate::inbound::TlsInfo)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.config.clone());
        let stream = match timeout(limit, acceptor.accept(stream)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
        };
        let (_, connection) = stream.get_ref();
        let version = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        let cipher = connection
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown");
        let info = crate::inbound::TlsInfo {
            version,
            cipher: cipher.to_string(),
        };
        Ok((stream, info))
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        self.chain == other.chain
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({} certificates)", self.chain.len())
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
