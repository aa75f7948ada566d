//! rustls configurations for node-to-node channels (TLS 1.3 only, ring provider).
//!
//! Both ends authenticate: the server requires a client certificate, and each side's verifier
//! first checks the chain to the cluster CA (webpki, with the right extended key usage) and
//! then that the certificate names exactly the node the caller expects (`NAME.node.ferry`).
//! A valid certificate of another node, a user certificate or one from another CA is refused
//! during the handshake, before any application byte is read.

use crate::identity::Identity;
use crate::TrustError;
use contract::trust::TlsFiles;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DistinguishedName};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;

/// The signature checks of a verifier that wraps webpki's (`self.inner`): the same for the
/// client- and server-certificate verifiers, which add only identity checks.
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}
pub(crate) use delegate_signatures;

pub use rustls::{ClientConfig, ServerConfig};

/// The crypto provider every Ferry TLS configuration uses: ring, TLS 1.3 suites only,
/// AES-128-GCM first (the cheapest per byte with AES-NI; a migration moves gigabytes).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A loaded TLS identity: certificate chain, key and the CA peers must chain to.
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TrustError {
    TrustError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TrustError> {
    std::fs::read(path).map_err(|err| TrustError::File {
        what: "read",
        path: path.to_path_buf(),
        err,
    })
}

impl Credentials {
    /// Loads the PEM files of `files`.
    pub fn load(files: &TlsFiles) -> Result<Credentials, TrustError> {
        Credentials::from_pem(
            (&files.cert, &read(&files.cert)?),
            (&files.key, &read(&files.key)?),
            (&files.ca, &read(&files.ca)?),
        )
    }

    /// From PEM bytes (each with the path it came from, for errors).
    pub fn from_pem(
        cert: (&Path, &[u8]),
        key: (&Path, &[u8]),
        ca: (&Path, &[u8]),
    ) -> Result<Credentials, TrustError> {
        let chain = CertificateDer::pem_slice_iter(cert.1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert.0, e))?;
        if chain.is_empty() {
            return Err(pem_err(cert.0, "no certificate in the file"));
        }
        let key_der = PrivateKeyDer::from_pem_slice(key.1).map_err(|e| pem_err(key.0, e))?;
        let mut roots = rustls::RootCertStore::empty();
        let anchors = CertificateDer::pem_slice_iter(ca.1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(ca.0, e))?;
        if anchors.is_empty() {
            return Err(pem_err(ca.0, "no CA certificate in the file"));
        }
        for a in anchors {
            roots.add(a).map_err(|err| TrustError::Anchor {
                path: ca.0.to_path_buf(),
                err,
            })?;
        }
        Ok(Credentials {
            chain,
            key: key_der,
            roots: Arc::new(roots),
        })
    }

    /// The CA peers must chain to.
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.roots.clone()
    }

    /// This side's certificate chain.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// This side's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The Ferry identity this side's certificate names.
    pub fn identity(&self) -> Option<Identity> {
        Identity::of_cert(&self.chain[0])
    }
}

/// The name a node's certificate must carry.
pub fn node_server_name(node: &str) -> Result<ServerName<'static>, TrustError> {
    let id = Identity::node(node)?;
    ServerName::try_from(id.dns_name()).map_err(|_| TrustError::BadName {
        what: "node",
        name: node.to_string(),
        why: "not a DNS name",
    })
}

/// A peer certificate that chains to the CA but names someone else.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub expected: String,
    pub found: Vec<Identity>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let found = if self.found.is_empty() {
            "no Ferry identity".to_string()
        } else {
            self.found
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "the peer's certificate names {found}, not the expected node {}",
            self.expected
        )
    }
}

impl std::error::Error for IdentityMismatch {}

fn check_node(
    end_entity: &CertificateDer<'_>,
    expected: &ServerName<'static>,
    node: &str,
) -> Result<(), rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    ee.verify_is_valid_for_subject_name(expected).map_err(|_| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            IdentityMismatch {
                expected: node.to_string(),
                found: Identity::all_in_cert(end_entity),
            },
        ))))
    })
}

/// Server-side: a client certificate of the CA naming `node`.
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
    node: String,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_node(end_entity, &self.name, &self.node)?;
        Ok(ok)
    }

    delegate_signatures!();
}

/// Client-side: a server certificate of the CA naming `node` (whatever address was dialled).
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
    node: String,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain, validity and usage first; then the identity, with a message that names it.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                check_node(end_entity, &self.name, &self.node)?;
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ))
            }
            r => r,
        }
    }

    delegate_signatures!();
}

/// A server verifier: a certificate of the CA in `roots` that names node `peer_node`,
/// whatever address was dialled.
pub(crate) fn node_server_verifier(
    roots: Arc<rustls::RootCertStore>,
    peer_node: &str,
) -> Result<Arc<dyn ServerCertVerifier>, TrustError> {
    Ok(Arc::new(NodeServerVerifier {
        inner: WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(TrustError::Verifier)?,
        name: node_server_name(peer_node)?,
        node: peer_node.to_string(),
    }))
}

/// A client configuration that presents `creds` and accepts only a server certificate of the
/// CA that names node `peer_node`. Connect with [`node_server_name`]`(peer_node)`.
pub fn node_client_config(
    creds: &Credentials,
    peer_node: &str,
) -> Result<Arc<ClientConfig>, TrustError> {
    let verifier = node_server_verifier(creds.roots.clone(), peer_node)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    Ok(Arc::new(cfg))
}

/// A server configuration that presents `creds` and requires a client certificate of the CA
/// that names node `peer_node`.
pub fn node_server_config(
    creds: &Credentials,
    peer_node: &str,
) -> Result<Arc<ServerConfig>, TrustError> {
    let name = node_server_name(peer_node)?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(creds.roots.clone(), provider()).build()?;
    let verifier = NodeClientVerifier {
        inner,
        name,
        node: peer_node.to_string(),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    // One connection per session: no resumption tickets to send or keep.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A TLS failure in words: which check refused the peer, or what the peer said.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not signed by this cluster's CA (unknown issuer)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "the peer's certificate is not signed by this cluster's CA (bad signature)".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("the peer's certificate is invalid: {c:?}"),
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::DecryptError),
        ) => {
            format!("the peer refused this side's certificate (TLS alert {a:?})")
        }
        rustls::Error::AlertReceived(a) => {
            format!("the peer ended the handshake (TLS alert {a:?})")
        }
        rustls::Error::InvalidMessage(m) => format!("the peer does not speak TLS ({m:?})"),
        e => e.to_string(),
    }
}

/// A TLS failure carried in an `io::Error` (kind `InvalidData`), described in words.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {text}")]
pub struct TlsFailure {
    pub text: String,
    #[source]
    pub err: rustls::Error,
}

/// The `io::Error` for a TLS failure.
pub fn tls_io_error(err: rustls::Error) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        TlsFailure {
            text: describe(&err),
            err,
        },
    )
}

/// Whether an I/O error is a TLS failure (a peer refused or not authenticated).
pub fn is_tls_failure(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<TlsFailure>())
}

/// An I/O error from a TLS connection, with its TLS cause in words ([`describe`]).
pub fn explain_io(e: std::io::Error) -> std::io::Error {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
            Some(Ok(t)) => tls_io_error(*t),
            Some(Err(other)) => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
            None => std::io::Error::from(std::io::ErrorKind::InvalidData),
        }
    } else {
        e
    }
}

/// A client side of node-to-node TLS: the configuration and the name the peer must carry.
#[derive(Clone)]
pub struct NodeClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    pub peer_node: String,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeClient(peer node {})", self.peer_node)
    }
}

impl NodeClient {
    /// Presents `creds`, accepts only node `peer_node`.
    pub fn new(creds: &Credentials, peer_node: &str) -> Result<NodeClient, TrustError> {
        Ok(NodeClient {
            config: node_client_config(creds, peer_node)?,
            name: node_server_name(peer_node)?,
            peer_node: peer_node.to_string(),
        })
    }
}
