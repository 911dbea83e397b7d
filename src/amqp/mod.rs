//! The AMQP 1.0 front end: TLS on port 5671 and WebSockets (`AMQPWSB10`) on the HTTPS port,
//! for devices and modules (telemetry, cloud-to-device, twin, methods), for the service side
//! (cloud-to-device send and feedback), and for the Event Hub-compatible endpoint
//! (`shared/protocol-amqp.md`; `docs/amqp.md`).
//!
//! The protocol engine is `fe2o3-amqp`'s listener. This module decides what it may do:
//! - [`connection`]: one task per connection: protocol header, SASL, sessions, and each
//!   attach handed to the handler of its node;
//! - [`link`]: what one connection's links share (its authorisation state, the CBS grants,
//!   reply queues, each device identity's presence), below every handler;
//! - [`address`]: link addresses parsed into the node they attach to;
//! - [`cbs`]: SASL mechanisms and token verification;
//! - [`device`], [`service`], [`eventhub`]: the links of each side, each a task that turns
//!   AMQP messages into [`Hub`] operations and back;
//! - [`message`]: conversions between AMQP messages and the hub's message types;
//! - [`frames`]: a byte-level shim for interop traps of real clients.
//!
//! Imports go one way: `connection` → handlers → `link` → `message`, `cbs`, `address`.

pub mod address;
pub mod cbs;
mod connection;
mod device;
mod eventhub;
mod frames;
mod link;
mod message;
mod service;

use crate::hub::Hub;
use crate::transport::{ListenerOptions, StreamService};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Accepts AMQP/TLS connections on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    options: ListenerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    if let Ok(addr) = listener.local_addr() {
        hub.set_amqp_port(addr.port());
    }
    crate::transport::accept_loop(listener, acceptor, options, shutdown, move |tls, peer| {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(crate::tls::ClientCertInfo::from_chain);
        connection::run(hub.clone(), tls, peer.to_string(), cert)
    })
    .await;
}

/// AMQP over an upgraded WebSocket (subprotocol `AMQPWSB10`).
pub fn websocket_service(hub: Hub) -> StreamService {
    std::sync::Arc::new(move |stream, cert| {
        Box::pin(connection::run(
            hub.clone(),
            stream,
            "websocket".to_owned(),
            cert,
        ))
    })
}
