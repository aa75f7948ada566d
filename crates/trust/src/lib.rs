//! Ferry's trust: the cluster PKI and the mutual-TLS transport.
//!
//! * [`identity`] — who a certificate names: a node (`NAME.node.ferry`) or a user with a role
//!   (`USER.ROLE.user.ferry`), and the naming rules.
//! * [`pki`] — the cluster CA and the node and user certificates it issues (rcgen, ECDSA
//!   P-256), written as PEM files, keys 0600.
//! * [`tls`] — rustls client and server configurations (TLS 1.3, ring) whose verifiers check
//!   that the peer's certificate is signed by the cluster CA *and* names the node the caller
//!   expects.
//! * [`api`] — HTTPS for the agents' REST API: node certificate on the server, an optional
//!   client certificate (a node's or a user's) checked against the CA, clients that check the
//!   agent is the node they expect (or any node named for the address dialled).
//! * [`https`] — ureq agents whose HTTPS runs through rustls with those verifiers.
//! * [`conn`] — a blocking TCP connection, TLS or plaintext, that can be cloned into a reading
//!   and a writing half used from different threads.
//! * [`secret`] — one-time migration secrets: generation and constant-time comparison.

pub mod api;
pub mod conn;
pub mod https;
pub mod identity;
pub mod pki;
pub mod secret;
pub mod tls;
pub mod token;

pub use conn::Conn;
pub use identity::Identity;

/// Errors of the PKI and the TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("invalid {what} name {name:?}: {why}")]
    BadName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("invalid address {0:?} (an IP address or a DNS name)")]
    BadAddress(String),
    #[error("cannot {what} {path}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{path} already exists (pass --force to replace the CA: every certificate it issued becomes invalid)")]
    Exists { path: std::path::PathBuf },
    #[error("{path}: {what}")]
    Pem {
        path: std::path::PathBuf,
        what: String,
    },
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("the CA certificate in {path} is not usable as a trust anchor")]
    Anchor {
        path: std::path::PathBuf,
        #[source]
        err: rustls::Error,
    },
    #[error("TLS verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot read randomness")]
    Random,
}
