//! The device-facing MQTT 3.1.1 front end: TLS on port 8883 and WebSockets at
//! `/$iothub/websocket` on the HTTPS port (`shared/protocol.md` C).
//!
//! This is a per-connection protocol, not a broker: each connection is bound to the identity it
//! authenticated as, its publishes are parsed for that identity only ([`topic`]), and what it
//! receives comes from the hub's queue for that identity ([`crate::connections`]).

pub mod session;
pub mod topic;

use crate::hub::Hub;
use crate::tls::ClientCertInfo;
use axum::extract::ws::{Message, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    shutdown: impl std::future::Future<Output = ()>,
) {
    crate::tls::accept_loop(listener, acceptor, "mqtt", shutdown, move |tls, peer| {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(ClientCertInfo::from_chain);
        session::run(hub.clone(), tls, cert, peer.to_string())
    })
    .await;
}

/// Serves MQTT over an upgraded WebSocket: binary frames carry the MQTT byte stream. A pipe
/// bridges frames to the same session code the TLS listener uses.
pub async fn serve_websocket(hub: Hub, mut socket: WebSocket) {
    let (session_end, bridge_end) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(session::run(hub, session_end, None, "websocket".to_owned()));
    let (mut from_session, mut to_session) = tokio::io::split(bridge_end);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(Message::Binary(data))) => {
                    if to_session.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Text frames are not MQTT; anything else ends the connection.
                Some(Ok(Message::Text(_) | Message::Close(_)) | Err(_)) | None => break,
            },
            n = from_session.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    // Closing the pipe's write side gives the session end-of-stream, so it ends too.
    let _ = to_session.shutdown().await;
    drop((to_session, from_session));
    let _ = socket.send(Message::Close(None)).await;
    let _ = session.await;
}
