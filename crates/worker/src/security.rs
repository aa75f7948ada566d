//! The migration channel's security options of `ferry-vmm receive` and `ctl migrate`.

use anyhow::{bail, Context, Result};
use contract::trust::{MigrationSecret, TlsFiles, Transport};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Mutual TLS (this node's certificate, key, the cluster CA and the peer node it must be), or
/// `--insecure`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This node's certificate (PEM), e.g. from `ferry pki issue --node NAME`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM) the peer's certificate must be signed by.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The node the peer must be: its certificate must name it (`NAME.node.ferry`).
    #[arg(long)]
    pub peer_node: Option<String>,
    /// Plaintext and unauthenticated: anyone who reaches the port can talk to this side.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "peer_node"])]
    pub insecure: bool,
}

/// The warning `--insecure` prints.
pub const INSECURE_WARNING: &str = "ferry-vmm: WARNING: --insecure: this migration channel is plaintext and unauthenticated (anyone on the network can read it, and connect to a receiver)";

impl TlsArgs {
    /// The transport these options ask for. (The worker that runs the channel prints
    /// [`INSECURE_WARNING`] for `--insecure`; a `ctl` client keeps its error output to one
    /// line.)
    pub fn transport(&self) -> Result<Transport> {
        if self.insecure {
            return Ok(Transport::Insecure);
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca, &self.peer_node) {
            (Some(cert), Some(key), Some(ca), Some(peer)) => {
                trust::identity::check_name("node", peer)?;
                Ok(Transport::Tls {
                    files: TlsFiles {
                        cert: absolute(cert)?,
                        key: absolute(key)?,
                        ca: absolute(ca)?,
                    },
                    peer_node: peer.clone(),
                })
            }
            _ => bail!(
                "the migration channel needs mutual TLS: --tls-cert, --tls-key, --tls-ca and --peer-node (or --insecure for plaintext)"
            ),
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// Reads a secret file (64 hex digits).
pub fn read_secret(path: &Path) -> Result<MigrationSecret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secret file {}", path.display()))?;
    MigrationSecret::from_hex(&text).with_context(|| format!("secret file {}", path.display()))
}

/// This node's TLS identity, given to a `run` worker so that it can migrate after it dropped
/// its privileges (it could not read the node's key then).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeTlsArgs {
    /// This node's certificate (PEM), read at start for later outgoing migrations.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM), read at start.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM), read at start.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl NodeTlsArgs {
    /// The files, if given (all three or none: clap checks that).
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: absolute(cert)?,
                key: absolute(key)?,
                ca: absolute(ca)?,
            })),
            _ => Ok(None),
        }
    }
}

/// Credentials read at start ([`preload_tls`]), by the files they came from.
static PRELOADED: std::sync::OnceLock<(TlsFiles, trust::tls::Credentials)> =
    std::sync::OnceLock::new();

/// Reads `files` now; a later migration naming the same files uses what was read.
pub fn preload_tls(files: &TlsFiles) -> Result<()> {
    let creds = trust::tls::Credentials::load(files)?;
    let _ = PRELOADED.set((files.clone(), creds));
    Ok(())
}

/// The receiver's TLS configuration for `t`.
pub fn server_tls(t: &Transport) -> Result<Option<Arc<trust::tls::ServerConfig>>> {
    match t {
        Transport::Insecure => Ok(None),
        Transport::Tls { files, peer_node } => {
            let creds = trust::tls::Credentials::load(files)?;
            Ok(Some(trust::tls::node_server_config(&creds, peer_node)?))
        }
    }
}

/// The source's TLS configuration for `t`.
pub fn client_tls(t: &Transport) -> Result<Option<trust::tls::NodeClient>> {
    match t {
        Transport::Insecure => Ok(None),
        Transport::Tls { files, peer_node } => {
            let client = match PRELOADED.get() {
                Some((f, creds)) if f == files => trust::tls::NodeClient::new(creds, peer_node)?,
                _ => {
                    let creds = trust::tls::Credentials::load(files)?;
                    trust::tls::NodeClient::new(&creds, peer_node)?
                }
            };
            Ok(Some(client))
        }
    }
}
