//! The device HTTPS API (issue 16): telemetry (single and batch) and cloud-to-device receive,
//! complete, reject and abandon, authenticated per identity, over real TLS with reqwest.

mod common;

use common::{identity_token, policy_token, self_signed, start, TestHub};
use serde_json::{json, Value};

/// A request as a device makes it: its own token, no service policy.
async fn device_request(
    hub: &TestHub,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, String) {
    request_over(&hub.http(), method, path, token, headers, body).await
}

/// [`device_request`] over a given client (one that presents a certificate, say).
async fn request_over(
    http: &common::Http,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let separator = if path.contains('?') { '&' } else { '?' };
    let url = format!("{}{path}{separator}api-version=2021-04-12", http.base);
    let mut request = http.client.request(method.parse().unwrap(), url);
    if !token.is_empty() {
        request = request.header("Authorization", token);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(b) = body {
        request = request.body(b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

async fn telemetry_of(hub: &TestHub, device: &str) -> Vec<Value> {
    let read = hub
        .http()
        .send(
            "GET",
            &format!("/_emulator/telemetry?deviceId={device}"),
            None,
            &[],
        )
        .await
        .expect_status(200);
    read["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn telemetry_single_and_batch_enter_the_log_with_their_properties() {
    let hub = start().await;
    let key = hub.device("h1").await;
    let token = identity_token("h1", None, &key);
    let (status, _, body) = device_request(
        &hub,
        "POST",
        "/devices/h1/messages/events",
        &token,
        &[
            ("iothub-to", "/devices/h1/messages/events"),
            ("IoTHub-MessageId", "m-1"),
            ("IoTHub-CorrelationId", "c-1"),
            ("iothub-contenttype", "application/json"),
            ("iothub-contentencoding", "utf-8"),
            ("iothub-app-alert", "high temp"),
        ],
        Some(br#"{"t":21}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 204, "{body}");

    let batch = json!([
        {"body": "b25l", "base64Encoded": true, "properties": {"iothub-app-n": "1", "iothub-messageid": "b-1"}},
        // The Node SDK's form: no base64Encoded, the body is base64 all the same.
        {"body": "dHdv"},
        {"body": "plain", "base64Encoded": false}
    ]);
    let (status, _, body) = device_request(
        &hub,
        "POST",
        "/devices/h1/messages/events",
        &token,
        &[("Content-Type", "application/vnd.microsoft.iothub.json")],
        Some(batch.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 204, "{body}");

    let messages = telemetry_of(&hub, "h1").await;
    assert_eq!(messages.len(), 4);
    let first = &messages[0];
    assert_eq!(first["body"], r#"{"t":21}"#);
    let sys = &first["systemProperties"];
    assert_eq!(sys["message-id"], "m-1");
    assert_eq!(sys["correlation-id"], "c-1");
    assert_eq!(sys["content-type"], "application/json");
    assert_eq!(sys["content-encoding"], "utf-8");
    assert_eq!(sys["iothub-connection-auth-method"], "SAS");
    assert_eq!(first["properties"], json!({"alert": "high temp"}));
    assert_eq!(messages[1]["body"], "one");
    assert_eq!(messages[1]["systemProperties"]["message-id"], "b-1");
    assert_eq!(messages[1]["properties"], json!({"n": "1"}));
    assert_eq!(messages[2]["body"], "two");
    assert_eq!(messages[3]["body"], "plain");

    // A module sends as itself.
    let mkey = hub.module("h1", "m").await;
    let mtoken = identity_token("h1", Some("m"), &mkey);
    let (status, _, _) = device_request(
        &hub,
        "POST",
        "/devices/h1/modules/m/messages/events",
        &mtoken,
        &[],
        Some(b"from module".to_vec()),
    )
    .await;
    assert_eq!(status, 204);
    let messages = telemetry_of(&hub, "h1").await;
    assert_eq!(messages[4]["moduleId"], "m");
}

#[tokio::test]
async fn bad_telemetry_is_refused_whole_and_stores_nothing() {
    let hub = start().await;
    let key = hub.device("h2").await;
    let token = identity_token("h2", None, &key);
    let big = vec![b'x'; 256 * 1024 + 1];
    let (status, headers, _) = device_request(
        &hub,
        "POST",
        "/devices/h2/messages/events",
        &token,
        &[],
        Some(big),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(headers["iothub-errorcode"], "MessageTooLarge");
    let batch_type = [("Content-Type", "application/vnd.microsoft.iothub.json")];
    for bad in [
        "not json".to_owned(),
        "[]".to_owned(),
        json!([{"body": "!!", "base64Encoded": true}]).to_string(),
        // One good message and one bad one: nothing of the batch is stored.
        json!([{"body": "b2s=", "base64Encoded": true}, {"body": 5, "base64Encoded": true}])
            .to_string(),
    ] {
        let (status, _, body) = device_request(
            &hub,
            "POST",
            "/devices/h2/messages/events",
            &token,
            &batch_type,
            Some(bad.clone().into_bytes()),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert!(telemetry_of(&hub, "h2").await.is_empty());
}

#[tokio::test]
async fn identities_cannot_reach_each_other() {
    let hub = start().await;
    let a = hub.device("ha").await;
    hub.device("hb").await;
    let mkey = hub.module("ha", "m").await;
    let a_token = identity_token("ha", None, &a);
    // Device A's token for device B's telemetry or queue.
    for (method, path) in [
        ("POST", "/devices/hb/messages/events"),
        ("GET", "/devices/hb/messages/deviceBound"),
        ("DELETE", "/devices/hb/messages/deviceBound/x"),
    ] {
        let (status, _, body) =
            device_request(&hub, method, path, &a_token, &[], Some(b"x".to_vec())).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
    }
    // A module's token does not read its device's queue.
    let m_token = identity_token("ha", Some("m"), &mkey);
    let (status, _, _) = device_request(
        &hub,
        "GET",
        "/devices/ha/messages/deviceBound",
        &m_token,
        &[],
        None,
    )
    .await;
    assert_eq!(status, 401);
    // No credentials at all.
    let (status, _, _) = device_request(
        &hub,
        "GET",
        "/devices/ha/messages/deviceBound",
        "",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 401);
    // A device token cannot call the service API, and a service policy without DeviceConnect
    // cannot act as a device.
    let (status, _, _) = device_request(&hub, "GET", "/devices/hb", &a_token, &[], None).await;
    assert_eq!(status, 401);
    let (status, _, _) = device_request(
        &hub,
        "GET",
        "/devices/ha/messages/deviceBound",
        &policy_token("registryRead"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 401);
    // A DeviceConnect policy token (as `az iot device c2d-message` sends) is accepted.
    let (status, _, body) = device_request(
        &hub,
        "GET",
        "/devices/ha/messages/deviceBound",
        &policy_token("device"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
}

async fn queue(hub: &TestHub, device: &str, message: Value) {
    hub.http()
        .send(
            "POST",
            &format!("/_emulator/devices/{device}/messages"),
            Some(message),
            &[],
        )
        .await
        .expect_status(200);
}

async fn c2d_count(hub: &TestHub, device: &str) -> u64 {
    hub.http()
        .send("GET", &format!("/devices/{device}"), None, &[])
        .await
        .expect_status(200)["cloudToDeviceMessageCount"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn cloud_to_device_receive_complete_reject_abandon() {
    let hub = start().await;
    let key = hub.device("hc").await;
    let token = identity_token("hc", None, &key);
    let receive = || {
        device_request(
            &hub,
            "GET",
            "/devices/hc/messages/devicebound",
            &token,
            &[],
            None,
        )
    };
    let (status, _, _) = receive().await;
    assert_eq!(status, 204, "nothing waits");

    queue(
        &hub,
        "hc",
        json!({"body": "one", "messageId": "m1", "correlationId": "c1", "contentType": "text/plain",
               "ack": "full", "properties": {"k": "v w"}}),
    )
    .await;
    queue(&hub, "hc", json!({"body": "two", "messageId": "m2"})).await;

    let (status, headers, body) = receive().await;
    assert_eq!(status, 200);
    assert_eq!(body, "one");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let lock = etag.trim_matches('"').to_owned();
    assert_eq!(headers["iothub-messageid"], "m1");
    assert_eq!(headers["iothub-correlationid"], "c1");
    assert_eq!(headers["iothub-ack"], "full");
    assert_eq!(headers["iothub-app-k"], "v w");
    assert_eq!(headers["iothub-to"], "/devices/hc/messages/devicebound");
    assert_eq!(headers["contenttype"], "text/plain");
    assert!(headers.contains_key("iothub-expiry"));

    // The locked message is not handed out again: the next receive gets the second one.
    let (status, headers, body) = receive().await;
    assert_eq!(status, 200);
    assert_eq!(body, "two");
    let lock2 = headers["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let (status, _, _) = receive().await;
    assert_eq!(status, 204, "both are locked");

    // Abandon the second: it comes back, with its delivery count up.
    let (status, _, _) = device_request(
        &hub,
        "POST",
        &format!("/devices/hc/messages/deviceBound/{lock2}/abandon"),
        &token,
        &[("If-Match", &lock2)],
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, headers, body) = receive().await;
    assert_eq!((status, body.as_str()), (200, "two"));
    assert_eq!(headers["iothub-deliverycount"], "1");
    let lock3 = headers["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_owned();

    // Complete the first; reject the second (as Node and the CLI write it).
    let (status, _, _) = device_request(
        &hub,
        "DELETE",
        &format!("/devices/hc/messages/devicebound/{lock}"),
        &token,
        &[],
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _, _) = device_request(
        &hub,
        "DELETE",
        &format!("/devices/hc/messages/devicebound/{lock3}?reject"),
        &token,
        &[],
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(c2d_count(&hub, "hc").await, 0);

    // A settled or unknown lock token: 412 DeviceMessageLockLost, nothing changes.
    for (method, path) in [
        ("DELETE", format!("/devices/hc/messages/devicebound/{lock}")),
        (
            "POST",
            format!("/devices/hc/messages/devicebound/{lock3}/abandon"),
        ),
        ("DELETE", "/devices/hc/messages/devicebound/nope".to_owned()),
    ] {
        let (status, headers, body) = device_request(&hub, method, &path, &token, &[], None).await;
        assert_eq!(status, 412, "{method} {path}: {body}");
        assert_eq!(headers["iothub-errorcode"], "DeviceMessageLockLost");
    }

    // The first message asked for full feedback: the service sees Success for m1.
    let feedback = hub
        .http()
        .send("GET", "/messages/serviceBound/feedback", None, &[])
        .await
        .expect_status(200);
    let records = feedback.as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["originalMessageId"] == "m1" && r["statusCode"] == "Success"),
        "{feedback}"
    );
}

#[tokio::test]
async fn the_device_chooses_the_lock_timeout_within_the_hubs_range() {
    let hub = start().await;
    let key = hub.device("hl").await;
    let token = identity_token("hl", None, &key);
    queue(&hub, "hl", json!({"body": "locked", "messageId": "m1"})).await;
    let (hub, token) = (&hub, token.as_str());
    let receive = |lock: &'static str| async move {
        let headers = [("IotHub-MessageLockTimeout", lock)];
        device_request(
            hub,
            "GET",
            "/devices/hl/messages/devicebound",
            token,
            &headers,
            None,
        )
        .await
    };

    // Malformed or out of range: 400 ArgumentInvalid, and the message is not locked.
    for bad in ["abc", "0", "4", "301", "-5", "2.5", ""] {
        let (status, headers, body) = receive(bad).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(headers["iothub-errorcode"], "ArgumentInvalid", "{bad:?}");
        assert!(body.contains("IotHub-MessageLockTimeout"), "{body}");
    }

    // Five seconds: locked for that long, then offered again as a lapsed (abandoned) delivery.
    let (status, headers, body) = receive("5").await;
    assert_eq!((status, body.as_str()), (200, "locked"));
    assert_eq!(headers["iothub-deliverycount"], "0");
    let (status, _, _) = receive("5").await;
    assert_eq!(status, 204, "still locked");
    tokio::time::sleep(std::time::Duration::from_millis(5_500)).await;
    let (status, headers, body) = receive("300").await;
    assert_eq!((status, body.as_str()), (200, "locked"), "the lock lapsed");
    assert_eq!(headers["iothub-deliverycount"], "1");
}

/// Scenario:
/// - a selfSigned device presents its certificate in the TLS handshake and no token: its
///   telemetry is accepted and stamped as X.509, and it reads its own queue
/// - another certificate with the same CN, or the right one on another device's path, is 401
/// - a SAS device presenting a certificate (and no token) is 401
#[tokio::test]
async fn an_x509_device_authenticates_with_its_tls_certificate() {
    let hub = start().await;
    let (cert, key, thumbprint) = self_signed("hx");
    hub.http()
        .send(
            "PUT",
            "/devices/hx",
            Some(
                json!({"deviceId": "hx", "authentication": {"type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": thumbprint}}}),
            ),
            &[],
        )
        .await
        .expect_status(200);
    hub.device("hs").await;
    let as_device = hub.http_as(&cert, &key);

    let (status, _, body) = request_over(
        &as_device,
        "POST",
        "/devices/hx/messages/events",
        "",
        &[("iothub-app-k", "v")],
        Some(b"from x509".to_vec()),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let log = telemetry_of(&hub, "hx").await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["body"], "from x509", "{log:?}");
    assert_eq!(
        log[0]["systemProperties"]["iothub-connection-auth-method"], "X509",
        "stamped as X.509: {log:?}"
    );
    queue(&hub, "hx", json!({"body": "to x509"})).await;
    let (status, _, body) = request_over(
        &as_device,
        "GET",
        "/devices/hx/messages/deviceBound",
        "",
        &[],
        None,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "to x509"));

    let (other_cert, other_key, _) = self_signed("hx");
    let impostor = hub.http_as(&other_cert, &other_key);
    let (status, _, _) = request_over(
        &impostor,
        "GET",
        "/devices/hx/messages/deviceBound",
        "",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 401, "another key with the same CN");
    for path in [
        "/devices/hs/messages/deviceBound",
        "/devices/hs/messages/events",
    ] {
        let (status, _, _) =
            request_over(&as_device, "POST", path, "", &[], Some(b"x".to_vec())).await;
        assert!(status == 401 || status == 405, "{path}: {status}");
    }
    let (status, _, _) = request_over(
        &as_device,
        "GET",
        "/devices/hs/messages/deviceBound",
        "",
        &[],
        None,
    )
    .await;
    assert_eq!(
        status, 401,
        "the certificate is not a SAS device's credential"
    );
    assert!(telemetry_of(&hub, "hs").await.is_empty());
}

/// Scenario: a device whose token expired gets 401 and nothing is stored; the same request
/// with a renewed token (as the SDKs send after renewal) is accepted.
#[tokio::test]
async fn an_expired_token_is_refused_and_a_renewed_one_accepted() {
    let hub = start().await;
    let key = hub.device("hr").await;
    let expired = iothub_emulator::auth::sas::make_token(
        &format!("{}/devices/hr", common::HOST),
        &iothub_emulator::auth::SymmetricKey::parse(&key).unwrap(),
        None,
        1_000_000,
    );
    let hub = &hub;
    let send = |token: String| async move {
        device_request(
            hub,
            "POST",
            "/devices/hr/messages/events",
            &token,
            &[],
            Some(b"tick".to_vec()),
        )
        .await
    };
    let (status, headers, _) = send(expired).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["iothub-errorcode"], "IotHubUnauthorized",
        "401003: the token expired"
    );
    assert!(telemetry_of(hub, "hr").await.is_empty());
    let (status, _, body) = send(identity_token("hr", None, &key)).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(telemetry_of(hub, "hr").await.len(), 1);
}
