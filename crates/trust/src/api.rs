//! TLS for the agents' REST API (HTTPS): the agent presents its node certificate and *asks*
//! for a client certificate (a node's or a user's, of the cluster CA); a client without one
//! may still present a bearer token, which the agent checks after the handshake. A client
//! checks that the agent it reached is a node of the cluster: the node it expects by name (an
//! agent calling a peer), or any node whose certificate names the address dialled (the CLI).

use crate::identity::Identity;
use crate::tls::{provider, Credentials};
use crate::TrustError;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;

pub use rustls::{ClientConfig, ServerConfig};

/// The cluster CA's certificates from a PEM file, as trust anchors.
pub fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TrustError> {
    let pem = std::fs::read(ca).map_err(|err| TrustError::File {
        what: "read",
        path: ca.to_path_buf(),
        err,
    })?;
    let mut roots = RootCertStore::empty();
    let anchors = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Pem {
            path: ca.to_path_buf(),
            what: e.to_string(),
        })?;
    if anchors.is_empty() {
        return Err(TrustError::Pem {
            path: ca.to_path_buf(),
            what: "no CA certificate in the file".into(),
        });
    }
    for a in anchors {
        roots.add(a).map_err(|err| TrustError::Anchor {
            path: ca.to_path_buf(),
            err,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The agent's HTTPS configuration: presents `creds` (its node certificate); verifies a
/// client certificate against the CA when one is offered, and lets clients without one
/// through to the bearer-token check. HTTP/1.1, TLS 1.3.
pub fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>, TrustError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(creds.roots(), provider())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain().to_vec(), creds.key().clone_key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The Ferry identity of a verified client certificate chain (`None`: no certificate, or
/// one that names no single Ferry identity).
pub fn client_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    Identity::of_cert(certs?.first()?)
}

/// Which agent a client accepts.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// Exactly this node (an agent calling a peer it looked up in the store).
    Node(&'a str),
    /// Any node of the cluster whose certificate names the host dialled (an IP or DNS SAN).
    AnyNodeAt,
    /// Any server certificate of the CA that names the host dialled (a service of the
    /// cluster that is not a node, e.g. etcd).
    Address,
}

/// A client configuration for the HTTPS API: trusts `roots`, presents `client` (a user's
/// or this node's certificate) if given, and accepts the server `expect` says.
pub fn client_config(
    roots: Arc<RootCertStore>,
    client: Option<&Credentials>,
    expect: Expect<'_>,
) -> Result<Arc<ClientConfig>, TrustError> {
    let webpki = |roots| {
        WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(TrustError::Verifier)
    };
    let verifier: Arc<dyn ServerCertVerifier> = match expect {
        Expect::Address => webpki(roots)?,
        Expect::AnyNodeAt => Arc::new(AnyNodeAt {
            inner: webpki(roots)?,
        }),
        Expect::Node(node) => crate::tls::node_server_verifier(roots, node)?,
    };
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some(c) => b.with_client_auth_cert(c.chain().to_vec(), c.key().clone_key())?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A server certificate refused because it is not a node's.
#[derive(Debug)]
struct NotANode(Vec<Identity>);

impl std::fmt::Display for NotANode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [] => write!(f, "the agent's certificate names no Ferry node"),
            ids => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(
                    f,
                    "the agent's certificate names {}, not a node",
                    ids.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for NotANode {}

fn not_a_node(ids: Vec<Identity>) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        NotANode(ids),
    ))))
}

/// The chain, the host dialled (standard name check), and a node identity in the certificate.
#[derive(Debug)]
struct AnyNodeAt {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNodeAt {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let ids = Identity::all_in_cert(end_entity);
        if !ids.iter().any(|i| matches!(i, Identity::Node(_))) {
            return Err(not_a_node(ids));
        }
        Ok(ok)
    }
    crate::tls::delegate_signatures!();
}
