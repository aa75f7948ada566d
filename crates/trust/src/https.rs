//! HTTPS clients with Ferry's verifiers: ureq's TCP transport wrapped in rustls with a
//! [`ClientConfig`](rustls::ClientConfig) of [`crate::api`] (the agents' API, etcd).

use rustls::pki_types::ServerName;
use std::sync::Arc;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

/// A ureq agent whose `https://` requests use `tls`, sending and checking `name` (`None`:
/// the URL's host).
pub fn agent(
    config: ureq::config::Config,
    tls: Arc<rustls::ClientConfig>,
    name: Option<ServerName<'static>>,
) -> ureq::Agent {
    ureq::Agent::with_parts(
        config,
        TcpConnector::default().chain(FerryTls { config: tls, name }),
        ureq::unversioned::resolver::DefaultResolver::default(),
    )
}

/// Wraps ureq's TCP transport in rustls with Ferry's verifiers.
#[derive(Debug)]
struct FerryTls {
    config: Arc<rustls::ClientConfig>,
    /// The name sent and checked (a node's `NAME.node.ferry`); `None`: the URL's host.
    name: Option<ServerName<'static>>,
}

impl<In: Transport> Connector<In> for FerryTls {
    type Out = Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Err(ureq::Error::ConnectionFailed);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let name = match &self.name {
            Some(n) => n.clone(),
            None => {
                let host = details.uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_string()).map_err(|_| {
                    ureq::Error::Io(std::io::Error::other(format!(
                        "{host:?} is not a host name or address a certificate can name"
                    )))
                })?
            }
        };
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|e| ureq::Error::Io(std::io::Error::other(crate::tls::describe(&e))))?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)
            .map_err(|e| ureq::Error::Io(crate::tls::explain_io(e)))?;
        Ok(Some(Either::B(TlsTransport {
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            stream: rustls::StreamOwned { conn, sock },
        })))
    }
}

struct TlsTransport {
    buffers: LazyBuffers,
    stream: rustls::StreamOwned<rustls::ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsTransport")
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        use std::io::Write;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream
            .write_all(output)
            .map_err(|e| ureq::Error::Io(crate::tls::explain_io(e)))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        use std::io::Read;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self
            .stream
            .read(input)
            .map_err(|e| ureq::Error::Io(crate::tls::explain_io(e)))?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}
