//! A byte-stream protocol (MQTT, AMQP) carried over an upgraded WebSocket: binary frames in both
//! directions, bridged through an in-memory pipe to the same connection code the TLS listeners
//! run.

use super::StreamService;
use crate::tls::ClientCertInfo;
use axum::extract::ws::{Message, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

/// Largest WebSocket message accepted on any endpoint: the largest unit either protocol sends
/// in one message (an AMQP frame of the 272 KiB we offer as max-frame-size; an MQTT packet is
/// at most 264 KiB, IoT Hub's 256 KB message plus its topic and property bag) and a little
/// room. The protocol's own decoder still applies its own limit to what arrives.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 + 16 * 1024 + 16;

/// Serves `socket` with `service` until either side ends. The session runs in its own task, in a
/// `connection` span like a TLS listener's connections.
pub async fn bridge(
    mut socket: WebSocket,
    listener: &'static str,
    cert: Option<ClientCertInfo>,
    service: StreamService,
) {
    let (session_end, bridge_end) = tokio::io::duplex(64 * 1024);
    let span = tracing::info_span!(
        "connection",
        listener,
        peer = "websocket",
        identity = tracing::field::Empty
    );
    let session = tokio::spawn(service(session_end, cert).instrument(span));
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
                // Text frames carry neither protocol; anything else ends the connection.
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
