//! One device or module connection, from CONNECT to close.
//!
//! Data flows one way: bytes → packet (rumqttc's MQTT 3.1.1 codec) → [`Topic`] → hub operation →
//! response packet → bytes; hub events ([`Outbound`]) arrive on the connection's bounded queue and
//! leave as packets. The loop is a `select!` over the socket, the queue, a close signal (session
//! takeover or a stuck queue), the keep-alive deadline and the SAS token's expiry.
//!
//! IoT Hub reports MQTT-level errors by closing the connection (`shared/protocol.md` C.6), so
//! every protocol violation here ends this connection, and only this connection.

use super::connect::{connect, Accepted};
use super::framed::{Error, Framed};
use super::topic::{self, Feature, Topic};
use crate::connections::{MethodRequest, Outbound, Registration};
use crate::error::HubError;
use crate::hub::Hub;
use crate::metrics::{DeviceOp, Metrics};
use crate::registry::IdentityKey;
use crate::telemetry::Incoming;
use crate::timestamp::unix_now;
use crate::tls::ClientCertInfo;
use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Serves one connection until it ends. `client_cert` is the TLS client certificate, if any.
pub async fn run<S>(hub: Hub, stream: S, client_cert: Option<ClientCertInfo>, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream);
    let accepted = match connect(&hub, &mut framed, client_cert.as_ref()).await {
        Ok(accepted) => accepted,
        Err(e) => {
            Metrics::count(&hub.metrics().mqtt_connections_refused);
            tracing::info!(%peer, reason = %e, "mqtt connection refused");
            return;
        }
    };
    let key = accepted.key.clone();
    let registration = hub.connections().register(&key);
    let id = registration.id;
    hub.registry()
        .set_connected(&key, true, accepted.model_id.as_deref());
    Metrics::count(&hub.metrics().mqtt_connections_accepted);
    crate::transport::record_identity(&key);
    tracing::info!(%peer, identity = %key, "mqtt connected");
    let clean_session = accepted.clean_session;
    let result = Session::new(&hub, accepted, registration)
        .serve(&mut framed)
        .await;
    // Only the current connection of an identity may change its state: a connection that was
    // taken over must not mark the identity offline or wipe its successor's session.
    if hub.connections().unregister(&key, id) {
        hub.registry().set_connected(&key, false, None);
        if clean_session {
            // [MQTT-3.1.2-6] A clean session ends with the connection.
            hub.set_session(&key, 0);
        }
    }
    match result {
        Ok(()) => tracing::info!(%peer, identity = %key, "mqtt disconnected"),
        Err(e) => tracing::info!(%peer, identity = %key, reason = %e, "mqtt connection closed"),
    }
    let _ = framed.stream.shutdown().await;
}

/// A connected session.
struct Session<'h> {
    hub: &'h Hub,
    key: IdentityKey,
    keep_alive: Duration,
    token_expiry: Option<u64>,
    registration: Registration,
    /// Enabled features (bits of [`Feature`]), mirrored into the hub's session store.
    features: u8,
    /// `SAS` or `X509`, stamped on telemetry as `iothub-connection-auth-method`.
    auth_method: &'static str,
    /// Cloud-to-device messages sent and not yet acknowledged: packet id → lock token.
    in_flight: HashMap<u16, u64>,
    last_packet_id: u16,
}

impl<'h> Session<'h> {
    fn new(hub: &'h Hub, accepted: Accepted, registration: Registration) -> Self {
        let features = hub.connections().session(&accepted.key);
        Self {
            hub,
            key: accepted.key,
            keep_alive: accepted.keep_alive,
            auth_method: if accepted.token_expiry.is_some() {
                "SAS"
            } else {
                "X509"
            },
            token_expiry: accepted.token_expiry,
            registration,
            features,
            in_flight: HashMap::new(),
            last_packet_id: 0,
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S>,
    ) -> Result<(), Error> {
        let token_deadline = self
            .token_expiry
            .map(|se| Instant::now() + Duration::from_secs(se.saturating_sub(unix_now())));
        let mut keep_alive_deadline = Instant::now() + self.keep_alive;
        let close = std::sync::Arc::clone(&self.registration.close);
        // Messages queued while the device was away (the session kept its subscription).
        self.deliver_c2d(framed).await?;
        loop {
            tokio::select! {
                packet = framed.read() => {
                    let Some(packet) = packet? else { return Ok(()) };
                    keep_alive_deadline = Instant::now() + self.keep_alive;
                    if !self.handle(packet, framed).await? {
                        return Ok(());
                    }
                }
                event = self.registration.events.recv() => match event {
                    Some(event) => self.deliver(event, framed).await?,
                    None => return Err(Error::Closed),
                },
                () = close.notified() => return Err(Error::Closed),
                () = tokio::time::sleep_until(keep_alive_deadline) => return Err(Error::KeepAlive),
                () = sleep_until_opt(token_deadline) => return Err(Error::TokenExpired),
            }
        }
    }

    /// Handles one client packet; returns `false` when the client disconnected.
    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        packet: Packet,
        framed: &mut Framed<S>,
    ) -> Result<bool, Error> {
        match packet {
            Packet::Publish(publish) => self.publish(publish, framed).await?,
            Packet::Subscribe(subscribe) => {
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|f| self.subscribe(&f.path, f.qos))
                    .collect();
                self.hub.set_session(&self.key, self.features);
                framed
                    .write(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                    .await?;
                self.deliver_c2d(framed).await?;
            }
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    if let Some(feature) = topic::parse_filter(filter, &self.key) {
                        self.features &= !feature.bit();
                    }
                }
                self.hub.set_session(&self.key, self.features);
                framed
                    .write(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
                    .await?;
            }
            Packet::PingReq => framed.write(Packet::PingResp).await?,
            // The device completed a cloud-to-device message.
            Packet::PubAck(ack) => {
                if let Some(token) = self.in_flight.remove(&ack.pkid) {
                    self.hub.settle_c2d(
                        &self.key.device_id,
                        token,
                        crate::c2d::Settlement::Completed,
                    );
                }
            }
            Packet::Disconnect => return Ok(false),
            Packet::Connect(_) => {
                // [MQTT-3.1.0-2] A second CONNECT is a protocol violation.
                return Err(Error::Protocol("second CONNECT".into()));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected packet {:?}",
                    std::mem::discriminant(&other)
                )))
            }
        }
        Ok(true)
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        let Some(feature) = topic::parse_filter(filter, &self.key) else {
            tracing::debug!(identity = %self.key, filter, "subscription refused");
            return SubscribeReasonCode::Failure;
        };
        // IoT Hub allows at most 5 subscriptions per client (DOC-MQTT); an identity has exactly
        // five subscribable topics (`Feature::ALL`), so the limit holds by construction.
        self.features |= feature.bit();
        // IoT Hub grants QoS 2 requests as QoS 1 (C.6).
        SubscribeReasonCode::Success(match qos {
            QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        })
    }

    async fn publish<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        publish: Publish,
        framed: &mut Framed<S>,
    ) -> Result<(), Error> {
        if publish.qos == QoS::ExactlyOnce {
            // IoT Hub does not support QoS 2 and closes the connection (C.6).
            return Err(Error::Protocol("QoS 2 publish".into()));
        }
        let topic =
            Topic::parse(&publish.topic, &self.key).map_err(|e| Error::Protocol(e.to_string()))?;
        let started = std::time::Instant::now();
        let op = match &topic {
            Topic::TwinGet { .. } => DeviceOp::TwinGet,
            Topic::TwinPatchReported { .. } => DeviceOp::ReportedPatch,
            Topic::Telemetry { .. } => DeviceOp::Telemetry,
            Topic::MethodResponse { .. } => DeviceOp::MethodResponse,
        };
        match topic {
            Topic::TwinGet { rid } => {
                let (status, body, version) = match self.hub.registry().device_twin(&self.key) {
                    Ok(twin) => (200, twin, None),
                    Err(e) => (e.code.status(), e.device_body(), None),
                };
                self.twin_response(framed, status, &rid, version, &body)
                    .await?;
            }
            Topic::TwinPatchReported { rid } => {
                let result = match crate::twin::parse_json(&publish.payload) {
                    Ok(Value::Object(patch)) => {
                        self.hub.registry().patch_reported(&self.key, &patch)
                    }
                    Ok(_) => Err(HubError::invalid(
                        "The reported-properties patch must be a JSON object",
                    )),
                    Err(e) => Err(HubError::invalid(format!(
                        "The reported-properties patch {e}"
                    ))),
                };
                match result {
                    Ok(version) => {
                        self.twin_response(framed, 204, &rid, Some(version), &Value::Null)
                            .await?;
                    }
                    Err(e) => {
                        self.twin_response(framed, e.code.status(), &rid, None, &e.device_body())
                            .await?;
                    }
                }
            }
            Topic::MethodResponse { status, rid } => {
                self.hub
                    .methods()
                    .complete(&self.key, &rid, status, &publish.payload);
                self.hub.registry().touch(&self.key);
            }
            Topic::Telemetry { properties } => {
                let incoming = Incoming {
                    properties,
                    body: publish.payload.clone(),
                };
                // MQTT has no way to refuse one message, so IoT Hub closes the connection.
                self.hub
                    .ingest(&self.key, self.auth_method, incoming)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.hub.registry().touch(&self.key);
            }
        }
        self.hub.metrics().device_op(op, started.elapsed());
        if publish.qos == QoS::AtLeastOnce {
            framed
                .write(Packet::PubAck(PubAck::new(publish.pkid)))
                .await?;
        }
        Ok(())
    }

    /// Twin responses go out whether or not `$iothub/twin/res/#` was subscribed: the Python SDK
    /// may never subscribe it after a reconnect (C.3).
    async fn twin_response<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut Framed<S>,
        status: u16,
        rid: &str,
        version: Option<u64>,
        body: &Value,
    ) -> Result<(), Error> {
        let payload = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let topic = topic::format_twin_response(status, rid, version);
        framed.write(Packet::Publish(qos0(topic, payload))).await
    }

    async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        event: Outbound,
        framed: &mut Framed<S>,
    ) -> Result<(), Error> {
        match event {
            Outbound::MethodRequest(request) => {
                let MethodRequest { rid, name, payload } = *request;
                // The hub checked the subscription before sending; it may have been dropped
                // since, and then the call times out as on IoT Hub.
                if self.features & Feature::Methods.bit() == 0 {
                    return Ok(());
                }
                let topic = topic::format_method_request(&name, rid);
                framed
                    .write(Packet::Publish(qos0(
                        topic,
                        Bytes::from(payload.to_string()),
                    )))
                    .await
            }
            Outbound::CloudToDevice => self.deliver_c2d(framed).await,
            Outbound::DesiredPatch(patch) => {
                // Pushes go only to subscribed connections; the hub does not queue them (C.6).
                if self.features & Feature::DesiredPatches.bit() == 0 {
                    return Ok(());
                }
                Metrics::count(&self.hub.metrics().desired_pushes);
                let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
                let topic = topic::format_desired(version);
                framed
                    .write(Packet::Publish(qos0(topic, Bytes::from(patch.to_string()))))
                    .await
            }
        }
    }
}

impl Session<'_> {
    /// Sends every queued cloud-to-device message not already in flight on this connection,
    /// at QoS 1; the device's PUBACK completes it. Unacknowledged messages are sent again on
    /// the next connection.
    async fn deliver_c2d<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S>,
    ) -> Result<(), Error> {
        if self.features & Feature::CloudToDevice.bit() == 0 {
            return Ok(());
        }
        let device = self.key.device_id.clone();
        let in_flight: HashSet<u64> = self.in_flight.values().copied().collect();
        for message in self.hub.registry().pending_c2d(&device, &in_flight) {
            let pkid = self.next_packet_id();
            self.in_flight.insert(pkid, message.lock_token);
            Metrics::count(&self.hub.metrics().c2d_delivered);
            let publish = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                // Always the `/` after `devicebound`: Node dispatches on it (C.4).
                topic: format!(
                    "devices/{device}/messages/devicebound/{}",
                    message.property_bag(&device)
                ),
                pkid,
                payload: message.body,
            };
            framed.write(Packet::Publish(publish)).await?;
        }
        Ok(())
    }

    /// A packet id not in use by an unacknowledged message (never 0).
    fn next_packet_id(&mut self) -> u16 {
        loop {
            self.last_packet_id = self.last_packet_id.wrapping_add(1).max(1);
            if !self.in_flight.contains_key(&self.last_packet_id) {
                return self.last_packet_id;
            }
        }
    }
}

fn qos0(topic: String, payload: Bytes) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic,
        pkid: 0,
        payload,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
