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
mod device;
pub mod error;
mod files;
mod messages;
pub mod precondition;
mod query;
mod registry;
mod twins;

use crate::hub::Hub;
use crate::transport::{websocket, ListenerOptions, StreamService};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use error::HttpError;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// What serves the byte streams of upgraded WebSockets: the MQTT and AMQP front ends, handed in
/// by [`crate::run`] so that this front end never calls the others.
#[derive(Clone)]
pub struct WebSocketServices {
    pub mqtt: StreamService,
    pub amqp: StreamService,
}

/// What this front end serves without owning it, handed in by [`crate::run`] so that it never
/// names the other front ends: the stream services behind its WebSocket endpoints, and the
/// portal's pages and JSON API (served beside the service API, with their own sign-in).
pub struct Mounts {
    pub websockets: WebSocketServices,
    pub portal: Router<Hub>,
}

/// The service API, the WebSocket endpoints and the mounted routes, as one router.
pub fn router(hub: Hub, mounts: Mounts) -> Router {
    let Mounts { websockets, portal } = mounts;
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
        .layer(axum::Extension(websockets))
        .merge(control::open_routes())
        // The device API authenticates the identity each path names, not a service policy.
        .merge(device::routes())
        .merge(files::routes())
        .merge(portal)
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
    axum::Extension(services): axum::Extension<WebSocketServices>,
    cert: Option<axum::Extension<ClientCert>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let cert = cert.and_then(|axum::Extension(ClientCert(c))| c);
    let upgrade = upgrade
        .protocols(["mqtt", AMQP_WS_PROTOCOL])
        .max_message_size(crate::transport::websocket::MAX_MESSAGE_BYTES);
    if upgrade
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == AMQP_WS_PROTOCOL.as_bytes())
    {
        return upgrade
            .on_upgrade(move |socket| websocket::bridge(socket, "amqp-ws", cert, services.amqp))
            .into_response();
    }
    upgrade
        .on_upgrade(move |socket| websocket::bridge(socket, "mqtt-ws", cert, services.mqtt))
        .into_response()
}

/// `GET /$servicebus/websocket`: AMQP over WebSockets as the Service Bus and Event Hubs SDKs
/// open it (uamqp, pyamqp).
async fn servicebus_websocket(
    axum::Extension(services): axum::Extension<WebSocketServices>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols([AMQP_WS_PROTOCOL])
        .max_message_size(crate::transport::websocket::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| websocket::bridge(socket, "amqp-ws", None, services.amqp))
        .into_response()
}

/// How long a client may take to send a request's headers, which is also how long a kept-alive
/// connection may sit idle between requests (hyper's header timer starts as soon as it waits
/// for the next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTPS listener's settings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: HEADER_TIMEOUT,
            body: BODY_TIMEOUT,
        }
    }
}

/// Serves HTTPS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    mounts: Mounts,
    (options, timeouts): (ListenerOptions, Timeouts),
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = router(hub, mounts);
    let handle = move |tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, peer| {
        // The client certificate of this connection, for X.509 devices on MQTT or AMQP over
        // WebSockets (each request of the connection carries it).
        let cert = ClientCert(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(crate::tls::ClientCertInfo::from_chain),
        );
        let app =
            app.clone()
                .map_request(move |request: axum::http::Request<hyper::body::Incoming>| {
                    let mut request = request
                        .map(|b| axum::body::Body::new(body::DeadlineBody::new(b, timeouts.body)));
                    request.extensions_mut().insert(cert.clone());
                    request
                });
        let service = TowerToHyperService::new(app);
        async move {
            // HTTP/1.1 only (what IoT Hub's service API speaks), and hyper's own HTTP/1 server
            // rather than the auto-detecting one, which reads the first bytes itself before
            // any header timer runs.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "https connection ended with an error");
            }
        }
    };
    crate::transport::accept_loop(listener, acceptor, options, shutdown, handle).await;
}

/// A status code and nothing else, for handlers with empty success bodies (DELETE → 204).
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
