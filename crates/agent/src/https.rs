//! The REST API over HTTPS (`ferry agent --pki-dir`): every connection's TLS handshake runs
//! with the node certificate (`trust::api::server_config`, a client certificate of the cluster
//! CA asked for, not required), within [`HANDSHAKE`]; the identity a client certificate names
//! goes with each of the connection's requests as a [`Peer`] extension, which
//! `api::authorize` reads. Idle connections are dropped ([`IDLE`]), so a client that connects
//! and sends nothing holds nothing for long.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Time a client has for its TLS handshake.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// Time a kept-alive connection may wait for its next request's headers.
pub const IDLE: Duration = Duration::from_secs(30);

/// Who the connection's TLS handshake authenticated: `Some` for a verified client
/// certificate that names one Ferry identity, `None` for a client without one.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<trust::Identity>);

/// Serves `app` on `listener` over HTTPS until `stop` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(stop);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!("HTTPS accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(
                        "HTTPS connection from {remote} refused: {}",
                        trust::tls::explain_io(e)
                    );
                    return;
                }
                Err(_) => {
                    tracing::info!(
                        "HTTPS connection from {remote} dropped: no TLS handshake within {HANDSHAKE:?}"
                    );
                    return;
                }
            };
            let peer = Peer(trust::api::client_identity(
                stream.get_ref().1.peer_certificates(),
            ));
            let svc = tower::ServiceExt::map_request(
                app,
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(IDLE)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("HTTPS connection from {remote}: {e}");
            }
        });
    }
}
