//! The MQTT front end as a protocol: who may connect (CONNACK codes), what one identity can
//! never see or do to another, session takeover and presence, what the hub does with hostile or
//! broken bytes (it closes that one connection and nothing else), and MQTT over WebSockets
//! (`shared/protocol.md` C.1, C.2, C.6).
//!
//! Every test starts its own hub on 127.0.0.1:0. Well-behaved traffic uses rumqttc over TLS;
//! hostile bytes go through [`common::RawMqtt`], a TLS stream the test writes by hand. Twin
//! semantics over MQTT are in `mqtt_twin.rs`.

mod common;

use bytes::BytesMut;
use common::{TestHub, WAIT};
use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::SymmetricKey;
use iothub_emulator::mqtt::MAX_PACKET_BYTES;
use rumqttc::mqttbytes::v4 as mqtt;
use rumqttc::{ConnectReturnCode, ConnectionError, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ----- helpers -----

/// Creates `id` and connects it; the connection every hostile test checks at its end.
async fn healthy_device(hub: &TestHub, id: &str) -> common::MqttClient {
    let key = hub.device(id).await;
    hub.mqtt_connect(id, None, &key).await
}

/// Connects `client_id` with `password` and returns the CONNACK refusal code; panics if the
/// hub accepts or ends the connection without a CONNACK.
async fn refusal(hub: &TestHub, client_id: &str, password: &str) -> ConnectReturnCode {
    let (_client, connack) = hub.mqtt_start(hub.mqtt_options(client_id, password)).await;
    match connack {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(other) => panic!("{client_id}: no CONNACK refusal, the connection ended: {other}"),
        Ok(ack) => panic!("{client_id}: the hub accepted the connection: {ack:?}"),
    }
}

/// Polls `GET path` until `done` holds for the body; panics after [`WAIT`].
async fn poll_until(hub: &TestHub, path: &str, what: &str, done: impl Fn(&Value) -> bool) {
    let http = hub.http();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = http.send("GET", path, None, &[]).await.expect_status(200);
        if done(&body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: {what} never became true; last body {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An MQTT fixed header: `first` byte and the variable-length remaining length.
fn fixed_header(first: u8, mut remaining: usize) -> Vec<u8> {
    let mut out = vec![first];
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if remaining == 0 {
            return out;
        }
    }
}

// ----- isolation between identities -----

/// Scenario:
/// - devices A and B are connected; both subscribe to desired patches and twin responses;
/// - the service PATCHes A's desired properties and A asks for its twin;
/// - A receives both; B, watched for a further 500 ms after A had both, receives nothing.
#[tokio::test]
async fn a_device_never_sees_another_devices_twin_traffic() {
    let hub = common::start().await;
    let mut a = healthy_device(&hub, "device-a").await;
    let mut b = healthy_device(&hub, "device-b").await;
    for client in [&mut a, &mut b] {
        client
            .subscribe_ok("$iothub/twin/PATCH/properties/desired/#")
            .await;
        client.subscribe_ok("$iothub/twin/res/#").await;
    }

    hub.http()
        .send(
            "PATCH",
            "/twins/device-a",
            Some(json!({"properties": {"desired": {"secret": "for-a"}}})),
            &[],
        )
        .await
        .expect_status(200);
    let pushed = a.next_publish().await;
    assert_eq!(
        pushed.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    let twin = a.twin_get("a-1").await;
    assert_eq!(twin["desired"]["secret"], json!("for-a"));

    b.expect_no_publish(Duration::from_millis(500)).await;
    // B's own twin is untouched and its connection still works.
    assert_eq!(b.twin_get("b-1").await["desired"], json!({"$version": 1}));
}

/// Scenario:
/// - device A subscribes to device B's cloud-to-device topic;
/// - the hub answers SUBACK 0x80 (failure); A's connection stays usable.
#[tokio::test]
async fn subscribing_to_another_devices_cloud_to_device_topic_is_refused() {
    let hub = common::start().await;
    let mut a = healthy_device(&hub, "device-a").await;
    hub.device("device-b").await;

    let code = a.subscribe("devices/device-b/messages/devicebound/#").await;
    assert_eq!(code, SubscribeReasonCode::Failure);
    // Its own topic is granted.
    a.subscribe_ok("devices/device-a/messages/devicebound/#")
        .await;
    a.twin_get("still-up").await;
}

/// Scenario:
/// - device A publishes telemetry on device B's events topic;
/// - the hub closes A's connection (MQTT errors are connection closes, C.6);
/// - B, connected meanwhile, keeps working.
#[tokio::test]
async fn publishing_telemetry_as_another_device_closes_the_connection() {
    let hub = common::start().await;
    let mut a = healthy_device(&hub, "device-a").await;
    let mut b = healthy_device(&hub, "device-b").await;

    a.client
        .publish(
            "devices/device-b/messages/events/",
            QoS::AtLeastOnce,
            false,
            "spoofed",
        )
        .await
        .unwrap();
    a.expect_closed().await;
    b.twin_get("b-1").await;
}

// ----- credentials -----

/// Scenario: a token for the right device and resource, signed with a key that is not the
/// device's, gets CONNACK 5; the device's real token still connects.
#[tokio::test]
async fn a_token_signed_with_the_wrong_key_is_not_authorized() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let forged = make_token(
        "localhost/devices/dev",
        &SymmetricKey::generate(),
        None,
        common::in_an_hour(),
    );
    assert_eq!(
        refusal(&hub, "dev", &forged).await,
        ConnectReturnCode::NotAuthorized
    );
    hub.mqtt_connect("dev", None, &key)
        .await
        .twin_get("1")
        .await;
}

/// Scenario: a correctly signed token whose expiry (`se`) is in the past gets CONNACK 5.
#[tokio::test]
async fn an_expired_token_is_not_authorized() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let expired = make_token(
        "localhost/devices/dev",
        &SymmetricKey::parse(&key).unwrap(),
        None,
        now() - 60,
    );
    assert_eq!(
        refusal(&hub, "dev", &expired).await,
        ConnectReturnCode::NotAuthorized
    );
}

/// Scenario: device B's valid token, presented by a client claiming to be device A, gets
/// CONNACK 5.
#[tokio::test]
async fn another_devices_token_is_not_authorized() {
    let hub = common::start().await;
    hub.device("device-a").await;
    let b_key = hub.device("device-b").await;
    let b_token = common::identity_token("device-b", None, &b_key);
    assert_eq!(
        refusal(&hub, "device-a", &b_token).await,
        ConnectReturnCode::NotAuthorized
    );
}

/// Scenario: a client id naming a device that was never registered gets CONNACK 5.
#[tokio::test]
async fn an_unknown_device_is_not_authorized() {
    let hub = common::start().await;
    let token = make_token(
        "localhost/devices/ghost",
        &SymmetricKey::generate(),
        None,
        common::in_an_hour(),
    );
    assert_eq!(
        refusal(&hub, "ghost", &token).await,
        ConnectReturnCode::NotAuthorized
    );
}

/// Scenario:
/// - a device connects fine, disconnects, and is then disabled by the service
///   (`PUT /devices/{id}` with `status: disabled`, `If-Match: "*"`, keys unchanged);
/// - its (still validly signed) token now gets CONNACK 5.
#[tokio::test]
async fn a_disabled_device_is_not_authorized() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    hub.mqtt_connect("dev", None, &key).await.disconnect().await;

    let http = hub.http();
    let mut device = http
        .send("GET", "/devices/dev", None, &[])
        .await
        .expect_status(200);
    device["status"] = json!("disabled");
    let updated = http
        .send(
            "PUT",
            "/devices/dev",
            Some(device),
            &[("If-Match", "\"*\"")],
        )
        .await
        .expect_status(200);
    assert_eq!(updated["status"], json!("disabled"));
    assert_eq!(
        updated["authentication"]["symmetricKey"]["primaryKey"],
        json!(key)
    );

    let token = common::identity_token("dev", None, &key);
    assert_eq!(
        refusal(&hub, "dev", &token).await,
        ConnectReturnCode::NotAuthorized
    );
}

// ----- takeover and presence -----

/// Scenario:
/// - client 1 connects as `dev`; client 2 then connects as `dev` too;
/// - the hub closes client 1 (IoT Hub 400027, ConnectionForcefullyClosedOnNewConnection);
/// - client 2 works: its twin GET is answered.
#[tokio::test]
async fn a_second_connection_of_the_same_identity_closes_the_first() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let mut first = hub.mqtt_connect("dev", None, &key).await;
    let mut second = hub.mqtt_connect("dev", None, &key).await;

    first.expect_closed().await;
    second.twin_get("2").await;
    poll_until(&hub, "/devices/dev", "connected", |d| {
        d["connectionState"] == "Connected"
    })
    .await;
}

/// Scenario:
/// - before connecting, `GET /devices/dev` says Disconnected and `/statistics/service` counts
///   0 connected devices;
/// - while connected: Connected, and 1;
/// - after DISCONNECT: Disconnected, and 0 again.
#[tokio::test]
async fn connection_state_and_connected_device_count_follow_the_connection() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let state = |want: &'static str| move |d: &Value| d["connectionState"] == want;
    let count = |want: u64| move |s: &Value| s["connectedDeviceCount"] == json!(want);

    poll_until(&hub, "/devices/dev", "Disconnected", state("Disconnected")).await;
    poll_until(&hub, "/statistics/service", "count 0", count(0)).await;

    let client = hub.mqtt_connect("dev", None, &key).await;
    poll_until(&hub, "/devices/dev", "Connected", state("Connected")).await;
    poll_until(&hub, "/statistics/service", "count 1", count(1)).await;

    client.disconnect().await;
    poll_until(&hub, "/devices/dev", "Disconnected", state("Disconnected")).await;
    poll_until(&hub, "/statistics/service", "count 0", count(0)).await;
}

// ----- hostile bytes: each closes one connection and leaves the others working -----

/// Scenario: a TLS client whose first packet is PINGREQ (`C0 00`) instead of CONNECT is
/// disconnected [MQTT-3.1.0-1]; a connected device is unaffected.
#[tokio::test]
async fn a_first_packet_other_than_connect_closes_the_connection() {
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;

    let mut raw = hub.raw_mqtt().await;
    raw.send(&[0xC0, 0x00]).await;
    raw.expect_closed().await;

    healthy.twin_get("ok").await;
}

/// Scenario: a connected device publishes at QoS 2, which IoT Hub does not support; its
/// connection is closed (C.6); another device is unaffected.
#[tokio::test]
async fn a_qos2_publish_closes_the_connection() {
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;
    let key = hub.device("dev").await;
    let mut raw = hub.raw_mqtt_connected("dev", None, &key, 60).await;

    let mut publish = mqtt::Publish::new("devices/dev/messages/events/", QoS::ExactlyOnce, "x");
    publish.pkid = 1;
    let mut bytes = BytesMut::new();
    publish.write(&mut bytes).unwrap();
    raw.send(&bytes).await;
    raw.expect_closed().await;

    healthy.twin_get("ok").await;
}

/// Scenario: after CONNECT, a PUBLISH header whose remaining length runs past the 4 bytes MQTT
/// allows (`30 FF FF FF FF FF`) closes that connection; another device is unaffected.
#[tokio::test]
async fn a_malformed_remaining_length_closes_the_connection() {
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;
    let key = hub.device("dev").await;
    let mut raw = hub.raw_mqtt_connected("dev", None, &key, 60).await;

    raw.send(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).await;
    raw.expect_closed().await;

    healthy.twin_get("ok").await;
}

/// Scenario:
/// - after CONNECT, a client declares a PUBLISH one byte larger than 256 KiB + 8 KiB and sends
///   only the header and a few bytes of it;
/// - the hub closes the connection from the header alone, without waiting for (or buffering)
///   the rest; another device is unaffected.
#[tokio::test]
async fn an_oversized_packet_is_refused_before_it_is_read() {
    assert_eq!(MAX_PACKET_BYTES, 256 * 1024 + 8 * 1024);
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;
    let key = hub.device("dev").await;
    let mut raw = hub.raw_mqtt_connected("dev", None, &key, 60).await;

    let mut bytes = fixed_header(0x30, MAX_PACKET_BYTES + 1);
    bytes.extend_from_slice(&[0u8; 64]);
    raw.send(&bytes).await;
    raw.expect_closed().await;

    healthy.twin_get("ok").await;
}

/// Scenario:
/// - a client connects with keep-alive 1 s and then sends nothing;
/// - the hub closes it after 1.5 × keep-alive (DOC-MQTT), not before 1.5 s and well within 3 s;
/// - another device, which pings on its own schedule, is unaffected.
#[tokio::test]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;
    let key = hub.device("dev").await;
    let mut raw = hub.raw_mqtt().await;

    // Timed from before CONNECT leaves, so a slow test task can only make the wait look longer.
    let started = tokio::time::Instant::now();
    let token = common::identity_token("dev", None, &key);
    raw.send(&common::connect_packet("dev", &token, 1, true))
        .await;
    assert!(matches!(raw.read_packet().await, mqtt::Packet::ConnAck(_)));
    raw.expect_closed().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(3),
        "closed after {waited:?}"
    );

    healthy.twin_get("ok").await;
}

/// Scenario:
/// - a client opens a TCP connection to the MQTT port and never sends a TLS ClientHello;
/// - meanwhile another device connects over TLS and gets its twin: the stalled handshake holds
///   up nobody (handshakes run in each connection's own task).
#[tokio::test]
async fn a_client_stalled_before_the_tls_handshake_does_not_block_others() {
    let hub = common::start().await;
    let stalled = tokio::net::TcpStream::connect(hub.mqtt).await.unwrap();

    let mut healthy = healthy_device(&hub, "healthy").await;
    healthy.twin_get("ok").await;
    drop(stalled);
}

// ----- MQTT over WebSockets -----

/// A minimal WebSocket client over the raw TLS stream: masked binary frames out, MQTT packets
/// reassembled from the binary frames that come back.
struct WsMqtt {
    raw: common::RawMqtt,
    /// Bytes read from the socket but not yet parsed as frames.
    wire: BytesMut,
    /// The MQTT byte stream carried by the binary frames.
    mqtt: BytesMut,
}

impl WsMqtt {
    /// Sends `payload` as one masked binary frame (RFC 6455 5.3: clients must mask).
    async fn send(&mut self, payload: &[u8]) {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![0x82];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.raw.send(&frame).await;
    }

    /// One complete frame from `wire`, if there is one: (opcode, payload).
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let w = &self.wire;
        if w.len() < 2 {
            return None;
        }
        assert_eq!(w[1] & 0x80, 0, "server frames must not be masked");
        let (len, header) = match w[1] & 0x7F {
            126 if w.len() >= 4 => (usize::from(u16::from_be_bytes([w[2], w[3]])), 4),
            127 if w.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(w[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if w.len() < header + len {
            return None;
        }
        let opcode = w[0] & 0x0F;
        let frame = self.wire.split_to(header + len);
        Some((opcode, frame[header..].to_vec()))
    }

    /// The next MQTT packet carried in binary (or continuation) frames.
    async fn read_packet(&mut self) -> mqtt::Packet {
        let read = async {
            loop {
                match mqtt::read(&mut self.mqtt, 1024 * 1024) {
                    Ok(packet) => return packet,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("malformed MQTT inside WebSocket frames: {e:?}"),
                }
                let mut framed_any = false;
                while let Some((opcode, payload)) = self.take_frame() {
                    framed_any = true;
                    match opcode {
                        0x0 | 0x2 => self.mqtt.extend_from_slice(&payload),
                        // A close after the last packet (CONNACK 5, say): that packet first.
                        0x8 => match mqtt::read(&mut self.mqtt, 1024 * 1024) {
                            Ok(packet) => return packet,
                            Err(_) => panic!("the hub closed the WebSocket"),
                        },
                        _ => {}
                    }
                }
                if framed_any {
                    continue;
                }
                let n = self.raw.stream.read_buf(&mut self.wire).await.unwrap();
                assert!(n > 0, "the hub closed the connection");
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("no MQTT packet over the WebSocket in time")
    }
}

/// Scenario:
/// - a client upgrades `GET /$iothub/websocket` on the HTTPS port with subprotocol `mqtt`
///   (C.1) and gets 101 with `Sec-WebSocket-Protocol: mqtt`;
/// - it sends a device's CONNECT in a masked binary frame and gets CONNACK 0 back;
/// - a twin GET over the same socket is answered on `$iothub/twin/res/200/?$rid=ws-1`.
#[tokio::test]
async fn mqtt_over_websockets_connects_and_answers_a_twin_get() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let mut ws = websocket(&hub, None).await;
    let token = common::identity_token("dev", None, &key);
    ws.send(&common::connect_packet("dev", &token, 60, true))
        .await;
    match ws.read_packet().await {
        mqtt::Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let mut get = BytesMut::new();
    mqtt::Publish::new("$iothub/twin/GET/?$rid=ws-1", QoS::AtMostOnce, " ")
        .write(&mut get)
        .unwrap();
    ws.send(&get).await;
    match ws.read_packet().await {
        mqtt::Packet::Publish(p) => {
            assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=ws-1");
            let body: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(body["desired"]["$version"], json!(1));
        }
        other => panic!("expected the twin response, got {other:?}"),
    }
}

/// Scenario (Node `MqttWs` with an X.509 device): the client certificate of the HTTPS
/// connection authenticates the MQTT session carried over its WebSocket; the same CONNECT
/// without a certificate is refused with CONNACK 5.
#[tokio::test]
async fn a_client_certificate_authenticates_mqtt_over_websockets() {
    let hub = common::start().await;
    let (cert, key, thumbprint) = common::self_signed("wsx509");
    hub.http()
        .send(
            "PUT",
            "/devices/wsx509",
            Some(json!({"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint": thumbprint}}})),
            &[],
        )
        .await
        .expect_status(200);
    for (client_cert, want) in [
        (
            Some((cert.as_str(), key.as_str())),
            ConnectReturnCode::Success,
        ),
        (None, ConnectReturnCode::NotAuthorized),
    ] {
        let mut ws = websocket(&hub, client_cert).await;
        ws.send(&common::connect_packet("wsx509", "", 60, true))
            .await;
        match ws.read_packet().await {
            mqtt::Packet::ConnAck(ack) => assert_eq!(ack.code, want),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

/// Opens `GET /$iothub/websocket` with subprotocol `mqtt` on the HTTPS port (optionally
/// presenting a client certificate) and checks the 101 answer.
async fn websocket(hub: &TestHub, cert: Option<(&str, &str)>) -> WsMqtt {
    let mut raw = hub.raw_tls_with_cert(hub.https, cert).await;

    // RFC 6455's sample key, whose accept value is known.
    let upgrade = format!(
        "GET /$iothub/websocket HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        common::HOST,
        hub.https.port()
    );
    raw.stream.write_all(upgrade.as_bytes()).await.unwrap();
    let mut wire = BytesMut::new();
    let head_end = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(i) = wire.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
            assert!(raw.stream.read_buf(&mut wire).await.unwrap() > 0);
        }
    })
    .await
    .expect("no upgrade response in time");
    let head = String::from_utf8(wire.split_to(head_end).to_vec())
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt\r\n"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );

    WsMqtt {
        raw,
        wire,
        mqtt: BytesMut::new(),
    }
}

/// Scenario: IoT Hub requires the CONNECT username `{hostName}/{clientId}/?api-version=…`; one
/// that names another hub, another client, or nothing is refused with CONNACK 4 (bad username
/// or password) even with a valid token. Any of the hub's names, in any case, and any query
/// are accepted.
#[tokio::test]
async fn the_connect_username_must_name_this_hub_and_this_client() {
    let hub = common::start().await;
    let key = hub.device("named").await;
    let token = common::identity_token("named", None, &key);
    for username in [
        "otherhub.azure-devices.net/named/?api-version=2021-04-12",
        "localhost/someone-else/?api-version=2021-04-12",
        "localhost/named/extra/?api-version=2021-04-12",
        "named",
        "",
    ] {
        let mut options = hub.mqtt_options("named", &token);
        options.set_credentials(username, &token);
        let (_client, connack) = hub.mqtt_start(options).await;
        match connack {
            Err(ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword, "{username:?}")
            }
            other => panic!("{username:?}: expected CONNACK 4, got {other:?}"),
        }
    }
    for username in [
        "LocalHost/named/?api-version=2021-04-12&DeviceClientType=x",
        "127.0.0.1/named/",
        "localhost/named",
    ] {
        let mut options = hub.mqtt_options("named", &token);
        options.set_credentials(username, &token);
        let (_client, connack) = hub.mqtt_start(options).await;
        assert_eq!(
            connack.unwrap().code,
            ConnectReturnCode::Success,
            "{username:?}"
        );
    }
}

/// Scenario: bytes MQTT 3.1.1 forbids close the connection: CONNECT's reserved flag
/// [MQTT-3.1.2-3], SUBSCRIBE without its fixed flags 0010 [MQTT-3.8.1-1], a topic with U+0000
/// [MQTT-4.7.3-2]; another device is unaffected.
#[tokio::test]
async fn reserved_flags_and_nul_in_topics_close_the_connection() {
    let hub = common::start().await;
    let mut healthy = healthy_device(&hub, "healthy").await;
    let key = hub.device("dev").await;

    let mut connect =
        common::connect_packet("dev", &common::identity_token("dev", None, &key), 60, true);
    // Fixed header, "\0\x04MQTT", the level byte, then the connect flags.
    let name = connect
        .windows(6)
        .position(|w| w == b"\x00\x04MQTT")
        .unwrap();
    connect[name + 7] |= 1;
    let mut raw = hub.raw_mqtt().await;
    raw.send(&connect).await;
    raw.expect_closed().await;

    let mut raw = hub.raw_mqtt_connected("dev", None, &key, 60).await;
    let mut subscribe = BytesMut::new();
    mqtt::Subscribe::new("devices/dev/messages/devicebound/#", QoS::AtLeastOnce)
        .write(&mut subscribe)
        .unwrap();
    subscribe[0] = 0x80; // flags 0000 instead of 0010
    raw.send(&subscribe).await;
    raw.expect_closed().await;

    let mut raw = hub.raw_mqtt_connected("dev", None, &key, 60).await;
    let mut publish = BytesMut::new();
    mqtt::Publish::new("devices/dev/messages/events/a\0b", QoS::AtMostOnce, "x")
        .write(&mut publish)
        .unwrap();
    raw.send(&publish).await;
    raw.expect_closed().await;

    healthy.twin_get("ok").await;
}
