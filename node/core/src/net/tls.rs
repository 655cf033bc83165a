//! libp2p's TLS 1.3 handshake (`/tls/1.0.0`, the libp2p TLS spec) with the
//! cipher suite this CPU runs fastest offered first.
//!
//! Why not `libp2p::tls`: it fixes ChaCha20-Poly1305 first in its suite
//! list, and a server follows the client's order, so two libp2p-tls peers
//! always pick ChaCha. On a CPU with AES instructions AES-128-GCM decrypts
//! about 1.5-3x faster, and decryption was a quarter of a receiver's CPU
//! time on a 64 MiB payload (scripts/bench_transfer.py). Everything else
//! follows the spec as libp2p-tls does: a self-signed certificate per node
//! carrying the libp2p public-key extension (`libp2p_tls::certificate`),
//! exactly one certificate each way (client authentication is mandatory),
//! TLS 1.3 only, no SNI, ALPN `libp2p`. Peers running stock libp2p-tls
//! interoperate: they offer AES-GCM too, and this server picks by its own
//! order.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p_tls::certificate;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    SupportedCipherSuite,
};

/// The protocol name multistream-select negotiates.
pub const PROTOCOL: &str = "/tls/1.0.0";

const ALPN: &[u8] = b"libp2p";

/// A TLS stream over `C`.
pub type TlsStream<C> = futures_rustls::TlsStream<C>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the TLS certificate: {0}")]
    Certificate(String),
    #[error("TLS set-up failed: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("the peer's certificate is not a libp2p certificate: {0}")]
    PeerCertificate(String),
}

/// The TLS security upgrade for one node's identity.
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tls::Config").field("suites", &suite_names()).finish()
    }
}

impl Config {
    pub fn new(key: &Keypair) -> Result<Config, TlsError> {
        let (cert, private) =
            certificate::generate(key).map_err(|e| TlsError::Certificate(e.to_string()))?;
        let provider = Arc::new(provider());
        let signing = provider.key_provider.load_private_key(private)?;
        let own = Arc::new(OwnCertificate(Arc::new(CertifiedKey::new(vec![cert], signing))));
        let verifier = Arc::new(Libp2pVerifier);
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(own.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];
        // The spec: clients MUST NOT send a server name.
        client.enable_sni = false;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(own);
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Our order, not the client's: a stock libp2p-tls client puts
        // ChaCha first even where AES-GCM is faster.
        server.ignore_client_order = true;
        Ok(Config { server: Arc::new(server), client: Arc::new(client) })
    }
}

/// TLS 1.3 suites, fastest first for this CPU: AES-GCM where the CPU has
/// AES and carry-less multiply instructions, ChaCha20-Poly1305 where not.
fn cipher_suites() -> Vec<SupportedCipherSuite> {
    let aes = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
    let chacha = TLS13_CHACHA20_POLY1305_SHA256;
    if has_aes_instructions() { vec![aes[0], aes[1], chacha] } else { vec![chacha, aes[0], aes[1]] }
}

fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: cipher_suites(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// The suites in the order this node offers and picks them.
pub fn suite_names() -> Vec<String> {
    cipher_suites().iter().map(|s| format!("{:?}", s.suite())).collect()
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, TlsError>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, TlsError>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // With SNI off this name is never sent; rustls needs one.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            // The swarm checks this against the peer id it dialled.
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The peer id in the one certificate the handshake verified.
fn peer_of(state: &rustls::CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| TlsError::PeerCertificate(e.to_string())),
        other => Err(TlsError::PeerCertificate(format!(
            "{} certificates presented, need exactly one",
            other.map_or(0, |c| c.len())
        ))),
    }
}

/// This node's certificate, both as client and as server. rustls's own
/// single-certificate set-up parses the certificate with webpki, which
/// rejects the libp2p extension (it is marked critical), so the key is
/// served from here as libp2p-tls does.
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OwnCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Checks a peer's certificate as the libp2p TLS spec says: exactly one,
/// self-signed, with a valid libp2p extension binding it to the host key;
/// and the handshake signed by that certificate's key. There is no CA:
/// the identity is the host key inside the certificate.
#[derive(Debug)]
struct Libp2pVerifier;

fn check_chain(
    end_entity: &CertificateDer,
    intermediates: &[CertificateDer],
) -> Result<(), rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(format!(
            "libp2p TLS takes exactly one certificate, got {}",
            1 + intermediates.len()
        )));
    }
    certificate::parse(end_entity).map(|_| ()).map_err(bad_certificate)
}

fn check_signature(
    cert: &CertificateDer,
    dss: &DigitallySignedStruct,
    message: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    certificate::parse(cert)
        .map_err(bad_certificate)?
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Never reached: both configs allow TLS 1.3 only.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("libp2p TLS is TLS 1.3 only".into()))
}

fn bad_certificate(e: certificate::ParseError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The schemes a libp2p certificate may be signed with, preferred first
/// (the spec: RSA only where no elliptic curve is supported).
fn schemes() -> Vec<SignatureScheme> {
    use SignatureScheme::*;
    vec![
        ECDSA_NISTP384_SHA384,
        ECDSA_NISTP256_SHA256,
        ED25519,
        RSA_PSS_SHA512,
        RSA_PSS_SHA384,
        RSA_PSS_SHA256,
        RSA_PKCS1_SHA512,
        RSA_PKCS1_SHA384,
        RSA_PKCS1_SHA256,
    ]
}

impl ServerCertVerifier for Libp2pVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _server_name: &ServerName,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(cert, dss, message)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

impl ClientCertVerifier for Libp2pVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(cert, dss, message)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    fn pipe() -> (Compat<tokio::io::DuplexStream>, Compat<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (a.compat(), b.compat())
    }

    #[tokio::test]
    async fn both_sides_learn_the_others_peer_id_and_use_the_fastest_suite() {
        let (server_key, client_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (server, client) =
            (Config::new(&server_key).unwrap(), Config::new(&client_key).unwrap());
        let (a, b) = pipe();
        let (accepted, dialled) = futures::join!(
            server.upgrade_inbound(a, PROTOCOL),
            client.upgrade_outbound(b, PROTOCOL)
        );
        let ((client_seen, mut s), (server_seen, mut c)) = (accepted.unwrap(), dialled.unwrap());
        assert_eq!(client_seen, client_key.public().to_peer_id());
        assert_eq!(server_seen, server_key.public().to_peer_id());
        let suite = c.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(format!("{suite:?}"), suite_names()[0]);
        if has_aes_instructions() {
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
        c.write_all(b"params").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"params");
    }

    #[tokio::test]
    async fn stock_libp2p_tls_peers_connect_and_get_this_servers_suite() {
        let (server_key, client_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let server = Config::new(&server_key).unwrap();
        let stock = libp2p_tls::Config::new(&client_key).unwrap();
        let (a, b) = pipe();
        let (accepted, dialled) = futures::join!(
            server.upgrade_inbound(a, PROTOCOL),
            stock.upgrade_outbound(b, PROTOCOL)
        );
        let ((client_seen, _), (server_seen, c)) = (accepted.unwrap(), dialled.unwrap());
        assert_eq!(client_seen, client_key.public().to_peer_id());
        assert_eq!(server_seen, server_key.public().to_peer_id());
        // libp2p-tls asks for ChaCha20-Poly1305 first; this server picks by its own order.
        let suite = c.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(format!("{suite:?}"), suite_names()[0]);
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let server = Config::new(&Keypair::generate_ed25519()).unwrap();
        // A TLS 1.3 client that trusts anything but presents no certificate.
        let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libp2pVerifier))
            .with_no_client_auth();
        let (a, b) = pipe();
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
        let dial = async {
            let mut s =
                futures_rustls::TlsConnector::from(Arc::new(anonymous)).connect(name, b).await?;
            // TLS 1.3 clients finish first; the refusal arrives on the next read.
            s.write_all(b"x").await?;
            s.flush().await?;
            s.read(&mut [0u8; 1]).await
        };
        let (accepted, dialled) = futures::join!(server.upgrade_inbound(a, PROTOCOL), dial);
        let Err(err) = accepted else { panic!("the server accepted an anonymous client") };
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
        assert!(!matches!(dialled, Ok(n) if n > 0));
    }

    #[test]
    fn certificates_must_be_one_libp2p_certificate() {
        let (cert, _) = certificate::generate(&Keypair::generate_ed25519()).unwrap();
        assert!(check_chain(&cert, &[]).is_ok());
        let two = check_chain(&cert, std::slice::from_ref(&cert)).unwrap_err();
        assert!(two.to_string().contains("exactly one certificate, got 2"), "{two}");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(check_chain(&garbage, &[]).is_err());
    }
}
