//! The HTTPS front end: IoT Hub's service REST API, and the MQTT-over-WebSockets endpoint that
//! shares its port (`shared/protocol.md` C.1, E).
//!
//! Flow: the listener accepts, runs the TLS handshake inside the connection's own task (under a
//! timeout), and hands the stream to hyper with the axum [`router`]. Every service route passes
//! the [`auth`] middleware, which checks the SAS token against the permission the route needs,
//! then a handler calls the hub and serialises its answer. Errors are turned into IoT Hub's
//! error shape in one place, [`error`].

mod auth;
pub mod body;
mod control;
pub mod error;
mod messages;
mod query;
mod registry;
mod twins;

use crate::hub::Hub;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use error::HttpError;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// The service API and the WebSocket endpoint, as one router.
pub fn router(hub: Hub) -> Router {
    let service = Router::new()
        .merge(registry::routes())
        .merge(twins::routes())
        .merge(query::routes())
        .merge(control::routes())
        .merge(messages::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            auth::require_sas,
        ));
    Router::new()
        .route("/$iothub/websocket", get(websocket))
        .route("/$servicebus/websocket", get(servicebus_websocket))
        .route("/$servicebus/websocket/", get(servicebus_websocket))
        .merge(control::open_routes())
        .merge(crate::portal::routes())
        .merge(service)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            log_request,
        ))
        .with_state(hub)
}

async fn not_found() -> HttpError {
    HttpError(crate::error::HubError::new(
        crate::error::ErrorCode::NotFound,
        "The requested resource does not exist on this hub",
    ))
}

async fn method_not_allowed() -> HttpError {
    HttpError(crate::error::HubError::new(
        crate::error::ErrorCode::MethodNotAllowed,
        "This resource does not support the HTTP method used",
    ))
}

/// One log line and one metrics sample per request.
async fn log_request(
    State(hub): State<Hub>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    hub.metrics().http_request(status, elapsed);
    tracing::info!(%method, %path, status, micros = elapsed.as_micros() as u64, "https request");
    response
}

/// The client certificate of the TLS connection a request came on, if any.
#[derive(Clone)]
pub struct ClientCert(pub Option<crate::tls::ClientCertInfo>);

/// The WebSocket subprotocol of AMQP over WebSockets.
const AMQP_WS_PROTOCOL: &str = "AMQPWSB10";

/// `GET /$iothub/websocket`: MQTT (`Sec-WebSocket-Protocol: mqtt`) or AMQP (`AMQPWSB10`) over
/// WebSockets. A client that names no known subprotocol gets MQTT.
async fn websocket(
    State(hub): State<Hub>,
    cert: Option<axum::Extension<ClientCert>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let cert = cert.and_then(|axum::Extension(ClientCert(c))| c);
    let upgrade = upgrade
        .protocols(["mqtt", AMQP_WS_PROTOCOL])
        .max_message_size(crate::mqtt::MAX_PACKET_BYTES + 16);
    if upgrade
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == AMQP_WS_PROTOCOL.as_bytes())
    {
        return upgrade
            .on_upgrade(move |socket| crate::amqp::serve_websocket(hub, socket, cert))
            .into_response();
    }
    upgrade
        .on_upgrade(move |socket| crate::mqtt::serve_websocket(hub, socket, cert))
        .into_response()
}

/// `GET /$servicebus/websocket`: AMQP over WebSockets as the Service Bus and Event Hubs SDKs
/// open it (uamqp, pyamqp).
async fn servicebus_websocket(State(hub): State<Hub>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols([AMQP_WS_PROTOCOL])
        .max_message_size(crate::mqtt::MAX_PACKET_BYTES + 16)
        .on_upgrade(move |socket| crate::amqp::serve_websocket(hub, socket, None))
        .into_response()
}

/// Carries a byte-stream protocol over an upgraded WebSocket: binary frames in both directions,
/// bridged through a pipe to `run`, the same connection code the TLS listeners use.
pub async fn bridge_websocket<F, Fut>(mut socket: axum::extract::ws::WebSocket, run: F)
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use axum::extract::ws::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (session_end, bridge_end) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(run(session_end));
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

/// Serves HTTPS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = router(hub);
    crate::tls::accept_loop(listener, acceptor, "https", shutdown, move |tls, peer| {
        // The client certificate of this connection, for X.509 devices on MQTT or AMQP over
        // WebSockets (each request of the connection carries it).
        let cert = ClientCert(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(crate::tls::ClientCertInfo::from_chain),
        );
        let app = app.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(cert.clone());
                request
            },
        );
        let service = TowerToHyperService::new(app);
        async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "https connection ended with an error");
            }
        }
    })
    .await;
}

/// A status code and nothing else, for handlers with empty success bodies (DELETE → 204).
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
