//! Direct methods, device-to-cloud telemetry, cloud-to-device delivery and the `/_emulator/`
//! control API, over real sockets (rumqttc for the device, reqwest for the service).

mod common;

use common::{identity_token, start, TestHub, HOST};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::timeout;

/// A connected device client and its event loop.
struct Device {
    client: AsyncClient,
    events: EventLoop,
}

async fn connect(hub: &TestHub, device: &str, module: Option<&str>, key: &str) -> Device {
    let client_id = match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_owned(),
    };
    let mut options = MqttOptions::new(&client_id, "127.0.0.1", hub.mqtt.port());
    options.set_credentials(
        format!("{HOST}/{client_id}/?api-version=2021-04-12"),
        identity_token(device, module, key),
    );
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: hub.ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: None,
    }));
    let (client, mut events) = AsyncClient::new(options, 16);
    loop {
        match timeout(Duration::from_secs(5), events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    Device { client, events }
}

impl Device {
    /// The next incoming PUBLISH, driving the event loop meanwhile.
    async fn next_publish(&mut self) -> rumqttc::Publish {
        timeout(Duration::from_secs(5), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = self.events.poll().await.unwrap() {
                    return p;
                }
            }
        })
        .await
        .expect("no publish within 5 s")
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        timeout(Duration::from_secs(5), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = self.events.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
    }

    /// Drives the event loop until the client's outgoing queue is flushed and acknowledged.
    async fn until_puback(&mut self) {
        timeout(Duration::from_secs(5), async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) = self.events.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
    }
}

/// Scenario:
/// - a module subscribes to methods; the service invokes `reboot` on it over REST
/// - the module gets `$iothub/methods/POST/reboot/?$rid=…` and answers 201 with a JSON payload
/// - the service gets `{"status":201,"payload":…}`
#[tokio::test]
async fn method_round_trip_service_to_module_and_back() {
    let hub = start().await;
    hub.device("d").await;
    let key = hub.module("d", "m").await;
    let mut module = connect(&hub, "d", Some("m"), &key).await;
    module.subscribe("$iothub/methods/POST/#").await;
    let http = hub.http();
    let call = tokio::spawn(async move {
        http.send(
            "POST",
            "/twins/d/modules/m/methods",
            Some(
                json!({"methodName":"reboot","payload":{"delay":3},"responseTimeoutInSeconds":"10"}),
            ),
            &[],
        )
        .await
    });
    let request = module.next_publish().await;
    let topic = request.topic.clone();
    assert!(
        topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
        "{topic}"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&request.payload).unwrap(),
        json!({"delay":3})
    );
    let rid = topic.rsplit("$rid=").next().unwrap();
    module
        .client
        .publish(
            format!("$iothub/methods/res/201/?$rid={rid}"),
            QoS::AtMostOnce,
            false,
            r#"{"ok":true}"#,
        )
        .await
        .unwrap();
    // Keep the event loop turning so the response is written.
    let reply = loop {
        tokio::select! {
            r = module.events.poll() => { r.unwrap(); }
            done = async { while !call.is_finished() { tokio::task::yield_now().await; } } => {
                let () = done;
                break call.await.unwrap();
            }
        }
    };
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, json!({"status":201,"payload":{"ok":true}}));
}

/// Scenario: offline → 404103; connected but silent → 504101; unknown identity → 404001.
#[tokio::test]
async fn methods_to_offline_or_silent_devices_fail_as_iot_hub_fails_them() {
    let hub = start().await;
    let key = hub.device("quiet").await;
    let http = hub.http();
    let offline = http
        .send(
            "POST",
            "/twins/quiet/methods",
            Some(json!({"methodName":"x"})),
            &[],
        )
        .await;
    assert_eq!(
        (offline.status, offline.error_code()),
        (404, "DeviceNotOnline")
    );
    let unknown = http
        .send(
            "POST",
            "/twins/ghost/methods",
            Some(json!({"methodName":"x"})),
            &[],
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.error_code()),
        (404, "DeviceNotFound")
    );
    let bad = http
        .send(
            "POST",
            "/twins/quiet/methods",
            Some(json!({"methodName":"x","responseTimeoutInSeconds":1})),
            &[],
        )
        .await;
    assert_eq!(bad.status, 400);

    let mut device = connect(&hub, "quiet", None, &key).await;
    device.subscribe("$iothub/methods/POST/#").await;
    let call = tokio::spawn(async move {
        http.send(
            "POST",
            "/twins/quiet/methods",
            Some(json!({"methodName":"x","responseTimeoutInSeconds":5})),
            &[],
        )
        .await
    });
    let _request = device.next_publish().await;
    let reply = timeout(Duration::from_secs(8), call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((reply.status, reply.error_code()), (504, "GatewayTimeout"));
}

/// Scenario: a call waits for a device that comes online within `connectTimeoutInSeconds`.
#[tokio::test]
async fn method_waits_for_the_device_to_come_online() {
    let hub = start().await;
    let key = hub.device("late").await;
    let http = hub.http();
    let call = tokio::spawn(async move {
        http.send(
            "POST",
            "/twins/late/methods",
            Some(json!({"methodName":"wake","connectTimeoutInSeconds":10,"responseTimeoutInSeconds":10})),
            &[],
        )
        .await
    });
    let mut device = connect(&hub, "late", None, &key).await;
    device.subscribe("$iothub/methods/POST/#").await;
    let request = device.next_publish().await;
    let rid = request.topic.rsplit("$rid=").next().unwrap().to_owned();
    device
        .client
        .publish(
            format!("$iothub/methods/res/200/?$rid={rid}"),
            QoS::AtMostOnce,
            false,
            "",
        )
        .await
        .unwrap();
    let reply = loop {
        tokio::select! {
            r = device.events.poll() => { r.unwrap(); }
            () = async { while !call.is_finished() { tokio::task::yield_now().await; } } => break call.await.unwrap(),
        }
    };
    assert_eq!(reply.body, json!({"status":200,"payload":null}));
}

/// Scenario: telemetry with system and application properties is stamped and readable through
/// the control API; a module output message carries its output name.
#[tokio::test]
async fn telemetry_is_recorded_with_its_properties() {
    let hub = start().await;
    let key = hub.device("t").await;
    let mkey = hub.module("t", "m").await;
    let mut device = connect(&hub, "t", None, &key).await;
    device
        .client
        .publish(
            "devices/t/messages/events/%24.mid=id%201&%24.ct=application%2Fjson&%24.ce=utf-8&alert=a%26b%3Dc&plus=1%2B1&bare",
            QoS::AtLeastOnce,
            false,
            r#"{"temp":21}"#,
        )
        .await
        .unwrap();
    device.until_puback().await;
    let mut module = connect(&hub, "t", Some("m"), &mkey).await;
    module
        .client
        .publish(
            "devices/t/modules/m/messages/events/$.on=out1/",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    module.until_puback().await;

    let http = hub.http();
    let read = http
        .send("GET", "/_emulator/telemetry?deviceId=t", None, &[])
        .await
        .expect_status(200);
    let messages = read["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    let first = &messages[0];
    assert_eq!(first["body"], r#"{"temp":21}"#);
    let sys = &first["systemProperties"];
    assert_eq!(sys["message-id"], "id 1");
    assert_eq!(sys["content-type"], "application/json");
    assert_eq!(sys["content-encoding"], "utf-8");
    assert_eq!(sys["iothub-connection-device-id"], "t");
    assert_eq!(sys["iothub-connection-auth-method"], "SAS");
    assert!(sys["iothub-enqueuedtime"].is_string());
    assert_eq!(
        first["properties"],
        json!({"alert":"a&b=c","plus":"1+1","bare":null})
    );
    assert_eq!(messages[1]["outputName"], "out1");
    assert_eq!(
        messages[1]["systemProperties"]["iothub-connection-module-id"],
        "m"
    );

    // Paging by sequence number, and filtering by module.
    let after = first["sequenceNumber"].as_u64().unwrap();
    let rest = http
        .send(
            "GET",
            &format!("/_emulator/telemetry?after={after}&moduleId=m"),
            None,
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1);
    // The control API needs ServiceConnect.
    let read_only = hub.http().with_token(common::policy_token("registryRead"));
    assert_eq!(
        read_only
            .send("GET", "/_emulator/telemetry", None, &[])
            .await
            .status,
        401
    );
}

/// Scenario: a long-poll read returns as soon as a message arrives.
#[tokio::test]
async fn telemetry_long_poll_wakes_on_arrival() {
    let hub = start().await;
    let key = hub.device("lp").await;
    let http = hub.http();
    let poll = tokio::spawn(async move {
        http.send("GET", "/_emulator/telemetry?deviceId=lp&wait=10", None, &[])
            .await
    });
    let mut device = connect(&hub, "lp", None, &key).await;
    device
        .client
        .publish(
            "devices/lp/messages/events/",
            QoS::AtLeastOnce,
            false,
            "hello",
        )
        .await
        .unwrap();
    device.until_puback().await;
    let reply = timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.body["messages"][0]["body"], "hello");
}

/// Scenario: C2D messages queued through the control API reach the subscribed device with
/// their property bag, leave the queue on PUBACK, and the queue holds at most 50.
#[tokio::test]
async fn cloud_to_device_delivery_completion_and_queue_limit() {
    let hub = start().await;
    let key = hub.device("c").await;
    let http = hub.http();
    let sent = http
        .send(
            "POST",
            "/_emulator/devices/c/messages",
            Some(json!({"body":"hi","messageId":"m1","correlationId":"c1","properties":{"k":"v w"},"ack":"full"})),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(sent["messageId"], "m1");
    let device_json = http
        .send("GET", "/devices/c", None, &[])
        .await
        .expect_status(200);
    assert_eq!(device_json["cloudToDeviceMessageCount"], 1);

    let mut device = connect(&hub, "c", None, &key).await;
    device.subscribe("devices/c/messages/devicebound/#").await;
    let message = device.next_publish().await;
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert!(
        message
            .topic
            .starts_with("devices/c/messages/devicebound/%24.mid=m1&"),
        "{}",
        message.topic
    );
    assert!(message.topic.contains("&%24.cid=c1"), "{}", message.topic);
    assert!(
        message.topic.ends_with("&iothub-ack=full&k=v%20w"),
        "{}",
        message.topic
    );
    assert_eq!(&message.payload[..], b"hi");
    // rumqttc acknowledges on the next poll; wait until the count reaches 0.
    timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                r = device.events.poll() => { r.unwrap(); }
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            let d = http
                .send("GET", "/devices/c", None, &[])
                .await
                .expect_status(200);
            if d["cloudToDeviceMessageCount"] == 0 {
                return;
            }
        }
    })
    .await
    .expect("message never completed");

    // The completion's feedback (`ack: full`) over HTTPS: received under a lock token,
    // abandoned, received again, completed; then the queue is empty.
    let feedback = "/messages/serviceBound/feedback";
    let first = http.send("GET", feedback, None, &[]).await;
    assert_eq!(first.status, 200);
    let token = first.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(first.body[0]["originalMessageId"], "m1");
    assert_eq!(first.body[0]["statusCode"], "Success");
    assert_eq!(first.body[0]["deviceId"], "c");
    assert_eq!(
        http.send("GET", feedback, None, &[]).await.status,
        204,
        "a locked batch is not handed out twice"
    );
    let abandon = format!("{feedback}/{}/abandon", token.trim_matches('"'));
    assert_eq!(http.send("POST", &abandon, None, &[]).await.status, 204);
    let again = http.send("GET", feedback, None, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body[0]["originalMessageId"], "m1");
    let token = again.headers["etag"].to_str().unwrap().to_owned();
    let complete = format!("{feedback}/{}", token.trim_matches('"'));
    assert_eq!(http.send("DELETE", &complete, None, &[]).await.status, 204);
    assert_eq!(http.send("GET", feedback, None, &[]).await.status, 204);
    let stale = http.send("DELETE", &complete, None, &[]).await;
    assert_eq!(
        (stale.status, stale.error_code()),
        (412, "PreconditionFailed")
    );

    drop(device);
    for i in 0..50 {
        http.send(
            "POST",
            "/_emulator/devices/c/messages",
            Some(json!({"body": i.to_string()})),
            &[],
        )
        .await
        .expect_status(200);
    }
    let full = http
        .send(
            "POST",
            "/_emulator/devices/c/messages",
            Some(json!({"body":"51st"})),
            &[],
        )
        .await;
    assert_eq!(
        (full.status, full.error_code()),
        (403, "DeviceMaximumQueueDepthExceeded")
    );
    let unknown = http
        .send(
            "POST",
            "/_emulator/devices/ghost/messages",
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(unknown.status, 404);
}

/// Scenario: health and the CA need no credentials; reset wipes identities and messages.
#[tokio::test]
async fn control_api_health_ca_and_reset() {
    let hub = start().await;
    hub.hub.set_ca_pem(hub.ca_pem.clone());
    let http = hub.http();
    let health = http
        .client
        .get(format!("{}/_emulator/health", http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ca = http
        .client
        .get(format!("{}/_emulator/ca.pem", http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ca.text().await.unwrap(), hub.ca_pem);
    hub.device("gone-soon").await;
    let unauthenticated = http
        .client
        .post(format!("{}/_emulator/reset", http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(
        http.send("POST", "/_emulator/reset", None, &[])
            .await
            .status,
        204
    );
    assert_eq!(
        http.send("GET", "/devices/gone-soon", None, &[])
            .await
            .status,
        404
    );
}
