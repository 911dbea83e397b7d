//! iothub-emulator: a local emulator of Azure IoT Hub.
//!
//! # Layout
//! Layers, bottom up (`docs/architecture.md` has the rule and where a new feature goes; each
//! module uses only the layers below it):
//! - foundations: [`error`] (IoT Hub's error codes; each front end maps them to its wire in one
//!   place), [`timestamp`], [`auth`] (policies, symmetric keys, SAS tokens), [`tls`] (the
//!   local CA, the server certificate, client-certificate requests), [`store`] (`--data-dir`
//!   persistence), [`storage`] (the blob store file uploads go to: SAS signing and the hub's
//!   own calls to Azurite or Azure Storage), [`metrics`] (counters for `/_emulator/metrics`).
//! - documents and languages, pure logic: [`twin`] (merge, versions, `$metadata`, limits),
//!   [`query`] (the IoT Hub query language), [`c2d`] (cloud-to-device message shapes).
//! - [`registry`]: device and module identities, their twins (the twin store) and their
//!   cloud-to-device queues, sharded per device; one file per concern.
//! - hub operations: [`hub`] ([`Hub`], the one shared handle), [`connections`] (live device
//!   connections by identity, with bounded event queues, and the session state that outlives
//!   them), [`methods`] (direct-method calls in flight), [`telemetry`] (the device-to-cloud
//!   message log), [`routing`] (routes, endpoints and enrichments; the hub's own events, made
//!   from the registry's changes), [`outbox`] (the service-bound queues: delivery feedback, file upload
//!   notifications), [`uploads`] (file uploads in progress), [`config`] and [`seed`] (flags,
//!   the config file, the identities it declares).
//! - [`transport`]: below the front ends: the accept loop (TLS handshake, per-listener
//!   connection limits, a `connection` span per connection) and the WebSocket byte bridge.
//! - front ends, which never import each other: [`mqtt`] (device MQTT), [`amqp`] (device AMQP,
//!   the service side and the Event Hub-compatible endpoint), [`http`] (the HTTPS service API,
//!   the `/_emulator/` control API, the WebSocket endpoints) and [`portal`] (the web portal at
//!   `/`, built on `http`'s request helpers). [`run`] wires them: it hands `http` the MQTT and
//!   AMQP stream services its WebSocket endpoints serve and the portal's routes.
//!
//! The load tool is the workspace member `bench/` (`iothub-bench`), outside this crate.
//!
//! # Data flow
//! socket → TLS (in the connection's task) → front end parses into typed requests → [`Hub`] /
//! [`registry::Registry`] operation → response. Service writes that devices must see (desired
//! properties) go to [`connections::Connections::notify`] under the device's lock, so they leave
//! in version order; the device's own task turns them into packets. HTTP never writes MQTT
//! packets, and MQTT never calls HTTP. Device messages go through [`Hub::ingest`] (stamped,
//! routed, logged); registry changes reach the hub after the device's lock is released and
//! become events when a route selects them.

pub mod amqp;
pub mod auth;
pub mod c2d;
pub mod config;
pub mod connections;
pub mod error;
pub mod http;
pub mod hub;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod portal;
pub mod query;
pub mod registry;
pub mod routing;
pub mod seed;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod timestamp;
pub mod tls;
pub mod transport;
pub mod twin;
pub mod uploads;

pub use hub::Hub;

use std::future::Future;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Bound listeners for one hub, and how much each may take.
pub struct Listeners {
    pub https: TcpListener,
    pub mqtt: TcpListener,
    /// AMQP over TLS (5671); `None` serves AMQP over WebSockets only.
    pub amqp: Option<TcpListener>,
    pub limits: transport::ConnectionLimits,
    pub http_timeouts: http::Timeouts,
}

/// Runs a hub on bound listeners until `shutdown` resolves. Tests bind port 0 and pass the
/// listeners in; the binary binds the configured ports.
pub async fn run(
    hub: Hub,
    listeners: Listeners,
    tls: std::sync::Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let acceptor = TlsAcceptor::from(tls);
    let limits = listeners.limits;
    let options = |name, max_connections| transport::ListenerOptions {
        name,
        max_connections,
    };
    let mounts = http::Mounts {
        websockets: http::WebSocketServices {
            mqtt: mqtt::websocket_service(hub.clone()),
            amqp: amqp::websocket_service(hub.clone()),
        },
        portal: portal::routes(),
    };
    let https = tokio::spawn(http::serve(
        listeners.https,
        acceptor.clone(),
        hub.clone(),
        mounts,
        (options("https", limits.https), listeners.http_timeouts),
        stopped(stop_rx.clone()),
    ));
    let mqtt = tokio::spawn(mqtt::serve(
        listeners.mqtt,
        acceptor.clone(),
        hub.clone(),
        options("mqtt", limits.mqtt),
        stopped(stop_rx.clone()),
    ));
    let amqp = listeners.amqp.map(|listener| {
        tokio::spawn(amqp::serve(
            listener,
            acceptor,
            hub.clone(),
            options("amqp", limits.amqp),
            stopped(stop_rx),
        ))
    });
    shutdown.await;
    // Stop accepting, then close every device connection and give the connection tasks a
    // moment to record the disconnects before the process exits.
    let _ = stop_tx.send(true);
    let _ = tokio::join!(https, mqtt);
    if let Some(amqp) = amqp {
        let _ = amqp.await;
    }
    hub.connections().close_all();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while hub.connections().live_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How long shutdown waits for device connections to close.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
