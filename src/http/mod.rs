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

/// The service API and the WebSocket endpoint, as one router.
pub fn router(hub: Hub) -> Router {
    let service = Router::new()
        .merge(registry::routes())
        .merge(twins::routes())
        .merge(query::routes())
        .merge(control::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            auth::require_sas,
        ));
    Router::new()
        .route("/$iothub/websocket", get(websocket))
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

/// `GET /$iothub/websocket` with `Sec-WebSocket-Protocol: mqtt`: MQTT over WebSockets.
async fn websocket(State(hub): State<Hub>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols(["mqtt"])
        .max_message_size(crate::mqtt::MAX_PACKET_BYTES + 16)
        .on_upgrade(move |socket| crate::mqtt::serve_websocket(hub, socket))
        .into_response()
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
        let service = TowerToHyperService::new(app.clone());
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
