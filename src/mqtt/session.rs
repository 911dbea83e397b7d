//! One device or module connection, from CONNECT to close.
//!
//! Data flows one way: bytes → packet (rumqttc's MQTT 3.1.1 codec) → [`Topic`] → hub operation →
//! response packet → bytes; hub events ([`Outbound`]) arrive on the connection's bounded queue and
//! leave as packets. The loop is a `select!` over the socket, the queue, a close signal (session
//! takeover or a stuck queue), the keep-alive deadline and the SAS token's expiry.
//!
//! IoT Hub reports MQTT-level errors by closing the connection (`shared/protocol.md` C.6), so
//! every protocol violation here ends this connection, and only this connection.

use super::topic::{self, Feature, Topic};
use super::MAX_PACKET_BYTES;
use crate::connections::{MethodRequest, Outbound, Registration};
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::metrics::{DeviceOp, Metrics};
use crate::registry::{identity::validate_id, IdentityKey};
use crate::telemetry::Incoming;
use crate::timestamp::unix_now;
use crate::tls::ClientCertInfo;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    self, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};

/// How long a client has, after the TLS handshake, to send CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much the read buffer grows by when it runs short.
const READ_CHUNK: usize = 1024;
/// A read buffer larger than this is released once empty.
const RETAINED_BUFFER: usize = 8 * 1024;
/// How long one write to the client may take before the client counts as not reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Hub caps the keep-alive it honours at 1767 s (DOC-MQTT); 0 means that cap too.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(1767);

/// Why a connection ended; logged once at the task boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0:?}")]
    Codec(CodecError),
    #[error("no CONNECT within the timeout")]
    ConnectTimeout,
    #[error("the first packet was not CONNECT")]
    NotConnect,
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("the SAS token expired")]
    TokenExpired,
    #[error("replaced by a newer connection of the same identity, or too slow to read")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the client stopped reading")]
    WriteTimeout,
}

/// Reads and writes MQTT packets on any byte stream (TLS socket or WebSocket pipe).
struct Framed<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Buffers start empty and are sized by use: an idle connection holds only a small read
    /// buffer, and no write buffer at all (memory per idle connection is what limits fleets).
    fn new(stream: S) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
        }
    }

    /// The next packet, or `None` when the peer closed cleanly. Cancel-safe: bytes already read
    /// stay in `read_buf`.
    async fn read(&mut self) -> Result<Option<Packet>, Error> {
        loop {
            // Reserved packet types (0 and 15) are refused by the codec's fixed-header check;
            // the flag rules it does not check are checked here, on the raw bytes.
            check_flags(&self.read_buf).map_err(Error::Protocol)?;
            match v4::read(&mut self.read_buf, MAX_PACKET_BYTES) {
                Ok(packet) => {
                    check_strings(&packet).map_err(Error::Protocol)?;
                    return Ok(Some(packet));
                }
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(Error::Codec(e)),
            }
            if self.read_buf.is_empty() && self.read_buf.capacity() > RETAINED_BUFFER {
                // A large packet grew the buffer; give the memory back.
                self.read_buf = BytesMut::new();
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 2 {
                self.read_buf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Codec(CodecError::InsufficientBytes(0)))
                };
            }
        }
    }

    async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        let written = match &packet {
            Packet::ConnAck(p) => p.write(&mut self.write_buf),
            Packet::Publish(p) => p.write(&mut self.write_buf),
            Packet::PubAck(p) => p.write(&mut self.write_buf),
            Packet::SubAck(p) => p.write(&mut self.write_buf),
            Packet::UnsubAck(p) => p.write(&mut self.write_buf),
            Packet::PingResp => v4::PingResp.write(&mut self.write_buf),
            other => unreachable!("the hub never sends {other:?}"),
        };
        written.map_err(Error::Codec)?;
        let flush = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        };
        let result = timeout(WRITE_TIMEOUT, flush).await;
        // Written: free the buffer rather than keep it for a connection that may stay idle.
        self.write_buf = BytesMut::new();
        match result {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::WriteTimeout),
        }
    }
}

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

/// The fixed-header flags MQTT 3.1.1 fixes, and CONNECT's reserved flag, on the bytes of the
/// next packet (as many of them as have arrived).
fn check_flags(buf: &[u8]) -> Result<(), String> {
    let Some(&first) = buf.first() else {
        return Ok(());
    };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let required = match kind {
        // PUBLISH carries DUP, QoS and RETAIN in its flags.
        3 => None,
        // [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1]: PUBREL, SUBSCRIBE, UNSUBSCRIBE.
        6 | 8 | 10 => Some(0b0010),
        // [MQTT-2.2.2-1]: every other packet's flags are reserved as 0.
        _ => Some(0),
    };
    if required.is_some_and(|r| r != flags) {
        return Err(format!(
            "packet type {kind} with fixed-header flags {flags:#06b} (MQTT-2.2.2-2)"
        ));
    }
    if kind == 1 {
        // CONNECT: remaining length (1-4 bytes), protocol name (2-byte length + name), level,
        // then the connect flags, whose bit 0 is reserved [MQTT-3.1.2-3].
        let mut at = 1;
        while buf.get(at).is_some_and(|b| b & 0x80 != 0) && at < 4 {
            at += 1;
        }
        at += 1;
        let name_len = match buf.get(at..at + 2) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Ok(()),
        };
        if buf.get(at + 2 + name_len + 1).is_some_and(|f| f & 1 != 0) {
            return Err("CONNECT with the reserved flag set (MQTT-3.1.2-3)".into());
        }
    }
    Ok(())
}

/// [MQTT-4.7.3-2]: topic names and filters must not contain U+0000.
fn check_strings(packet: &Packet) -> Result<(), String> {
    let nul = match packet {
        Packet::Publish(p) => p.topic.contains('\0'),
        Packet::Subscribe(s) => s.filters.iter().any(|f| f.path.contains('\0')),
        Packet::Unsubscribe(u) => u.topics.iter().any(|t| t.contains('\0')),
        _ => false,
    };
    if nul {
        Err("a topic containing U+0000 (MQTT-4.7.3-2)".into())
    } else {
        Ok(())
    }
}

/// Whether a CONNECT username names this hub and this client, as IoT Hub requires:
/// `{hostName}/{clientId}`, then optionally `/` and `?{query}` (any query: `shared/protocol.md`
/// C.2). The host is compared without case, against every name the hub answers to.
fn username_matches(hub: &Hub, username: &str, client_id: &str) -> bool {
    let path = username.split_once('?').map_or(username, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some((host, rest)) = path.split_once('/') else {
        return false;
    };
    rest == client_id && hub.answers_to(host)
}

/// What CONNECT established.
struct Accepted {
    key: IdentityKey,
    keep_alive: Duration,
    clean_session: bool,
    /// When the SAS token expires (unix seconds); `None` for X.509.
    token_expiry: Option<u64>,
    model_id: Option<String>,
}

async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    hub: &Hub,
    framed: &mut Framed<S>,
    client_cert: Option<&ClientCertInfo>,
) -> Result<Accepted, Error> {
    // [MQTT-3.1.0-1] The first packet from the client MUST be CONNECT.
    let packet = match timeout(CONNECT_TIMEOUT, framed.read()).await {
        Err(_) => return Err(Error::ConnectTimeout),
        Ok(r) => r?,
    };
    let Some(Packet::Connect(connect)) = packet else {
        return Err(Error::NotConnect);
    };
    if connect.protocol != Protocol::V4 {
        return refuse(
            framed,
            ConnectReturnCode::RefusedProtocolVersion,
            "only MQTT 3.1.1 is supported".into(),
        )
        .await;
    }
    let Some(key) = parse_client_id(&connect.client_id) else {
        return refuse(
            framed,
            ConnectReturnCode::BadClientId,
            format!(
                "client id {:?} is not deviceId or deviceId/moduleId",
                connect.client_id
            ),
        )
        .await;
    };
    let (username, password) = connect
        .login
        .as_ref()
        .map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
    if !username_matches(hub, username, &connect.client_id) {
        return refuse(
            framed,
            ConnectReturnCode::BadUserNamePassword,
            format!(
                "username {username:?} is not {{hostName}}/{}/?api-version=…",
                connect.client_id
            ),
        )
        .await;
    }
    let auth = if !password.is_empty() {
        hub.authenticate_device(&key, password).map(Some)
    } else if let Some(cert) = client_cert {
        hub.authenticate_x509(&key, cert).map(|()| None)
    } else {
        Err(HubError::unauthorized(
            "no SAS token and no client certificate",
        ))
    };
    let token_expiry = match auth {
        Ok(expiry) => expiry,
        Err(e) => {
            // CONNACK 5 (not authorized) for every credential or identity problem; the SDKs
            // treat it as final instead of retrying (C.2).
            let code = match e.code {
                ErrorCode::ServerError => ConnectReturnCode::ServiceUnavailable,
                _ => ConnectReturnCode::NotAuthorized,
            };
            return refuse(framed, code, format!("{key}: {e}")).await;
        }
    };
    let keep_alive = match connect.keep_alive {
        0 => MAX_KEEP_ALIVE,
        // The hub waits 1.5 × the client's keep-alive before giving up on it.
        k => (Duration::from_secs(u64::from(k)) * 3 / 2).min(MAX_KEEP_ALIVE),
    };
    if connect.clean_session {
        hub.set_session(&key, 0);
    }
    let session_present = hub.connections().session(&key) != 0;
    framed
        .write(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )))
        .await?;
    Ok(Accepted {
        key,
        keep_alive,
        clean_session: connect.clean_session,
        token_expiry,
        model_id: model_id_from_username(username),
    })
}

/// Sends CONNACK with a refusal code and ends the connection attempt.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    code: ConnectReturnCode,
    why: String,
) -> Result<Accepted, Error> {
    let _ = framed
        .write(Packet::ConnAck(ConnAck::new(code, false)))
        .await;
    Err(Error::Refused(why))
}

/// `{deviceId}` or `{deviceId}/{moduleId}`, each following IoT Hub's id rules.
fn parse_client_id(client_id: &str) -> Option<IdentityKey> {
    let key = match client_id.split_once('/') {
        Some((d, m)) => IdentityKey::module(d, m),
        None => IdentityKey::device(client_id),
    };
    validate_id(&key.device_id, "device id").ok()?;
    if let Some(m) = &key.module_id {
        validate_id(m, "module id").ok()?;
    }
    Some(key)
}

/// The `model-id` query parameter of a username `{host}/{clientId}/?{query}`. Parsed loosely:
/// any api-version, unknown parameters, and a raw (unencoded) dtmi are all accepted (C.2).
fn model_id_from_username(username: &str) -> Option<String> {
    let (_, query) = username.split_once("/?")?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "model-id")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
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
                    .telemetry()
                    .append(&self.key, self.auth_method, incoming)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert_eq!(parse_client_id("dev1"), Some(IdentityKey::device("dev1")));
        assert_eq!(
            parse_client_id("dev1/mod1"),
            Some(IdentityKey::module("dev1", "mod1"))
        );
        assert_eq!(parse_client_id(""), None);
        assert_eq!(parse_client_id("dev1/"), None);
        assert_eq!(parse_client_id("dev1/mod1/x"), None);
        assert_eq!(parse_client_id("dev 1"), None);
    }

    #[test]
    fn model_id_is_read_loosely() {
        let py = "h/dev1/?api-version=2020-09-30&DeviceClientType=x&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
        assert_eq!(
            model_id_from_username(py).as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        let node = "h/dev1/mod1/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=y";
        assert_eq!(
            model_id_from_username(node).as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        assert_eq!(model_id_from_username("h/dev1/?api-version=1"), None);
        assert_eq!(model_id_from_username(""), None);
    }
}
