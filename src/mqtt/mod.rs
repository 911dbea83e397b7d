//! The device-facing MQTT 3.1.1 front end: TLS on port 8883 and WebSockets at
//! `/$iothub/websocket` on the HTTPS port (`shared/protocol.md` C).
//!
//! This is a per-connection protocol, not a broker: each connection is bound to the identity it
//! authenticated as, its publishes are parsed for that identity only ([`topic`]), and what it
//! receives comes from the hub's queue for that identity ([`crate::connections`]).

mod connect;
mod framed;
pub mod session;
pub mod topic;

use crate::hub::Hub;
use crate::tls::ClientCertInfo;
use crate::transport::{ListenerOptions, StreamService};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Largest MQTT packet accepted (remaining length): IoT Hub's 256 KB message limit plus room for
/// the topic and property bag.
pub const MAX_PACKET_BYTES: usize = 256 * 1024 + 8 * 1024;

/// Accepts MQTT/TLS connections on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    options: ListenerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    crate::transport::accept_loop(listener, acceptor, options, shutdown, move |tls, peer| {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(ClientCertInfo::from_chain);
        session::run(hub.clone(), tls, cert, peer.to_string())
    })
    .await;
}

/// MQTT over an upgraded WebSocket, with the same session code the TLS listener uses.
pub fn websocket_service(hub: Hub) -> StreamService {
    std::sync::Arc::new(move |stream, cert| {
        Box::pin(session::run(
            hub.clone(),
            stream,
            cert,
            "websocket".to_owned(),
        ))
    })
}
