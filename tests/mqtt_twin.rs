//! Twins over MQTT, end to end: what a device or module sees on its own connection (GET,
//! reported patches, desired pushes from the REST side) and the session state that keeps desired
//! pushes flowing across reconnects (`shared/protocol.md` C.3, C.4, C.6).
//!
//! Every test starts its own hub on 127.0.0.1:0 and talks to it over real TLS with rumqttc and
//! reqwest. Isolation between identities, authentication and hostile bytes are in
//! `mqtt_protocol.rs`.

mod common;

use serde_json::{json, Value};

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";

/// The body of a twin-response or desired publish as JSON.
fn body(publish: &rumqttc::Publish) -> Value {
    serde_json::from_slice(&publish.payload).unwrap_or_else(|e| {
        panic!(
            "{}: body is not JSON ({e}): {:?}",
            publish.topic,
            String::from_utf8_lossy(&publish.payload)
        )
    })
}

/// Scenario:
/// - a module connects over TLS with its own SAS token (client id `dev/mod`);
/// - it publishes `$iothub/twin/GET/?$rid=1` with the SDKs' one-space body, never having
///   subscribed to `$iothub/twin/res/#` (the Python SDK after a reconnect, C.3);
/// - the hub still answers on `$iothub/twin/res/200/?$rid=1` with the device-side document:
///   desired and reported at version 1, no `properties` wrapper, no `$metadata`.
#[tokio::test]
async fn module_twin_get_is_answered_without_subscribing_to_twin_responses() {
    let hub = common::start().await;
    hub.device("dev").await;
    let key = hub.module("dev", "mod").await;
    let mut module = hub.mqtt_connect("dev", Some("mod"), &key).await;

    module.publish("$iothub/twin/GET/?$rid=1", " ").await;
    let response = module.next_publish().await;

    assert_eq!(response.topic, "$iothub/twin/res/200/?$rid=1");
    assert_eq!(
        body(&response),
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
}

/// Scenario:
/// - a module reports `{"temperature": 21.5}`;
/// - the hub answers `$iothub/twin/res/204/?$rid=r1&$version=2` with an empty body;
/// - the service's `GET /twins/dev/modules/mod` shows the value, its `$metadata.$lastUpdated`
///   and reported `$version` 2; the device's own GET shows the value too.
#[tokio::test]
async fn reported_patch_is_acknowledged_with_its_version_and_visible_over_rest() {
    let hub = common::start().await;
    hub.device("dev").await;
    let key = hub.module("dev", "mod").await;
    let mut module = hub.mqtt_connect("dev", Some("mod"), &key).await;
    module.subscribe_ok("$iothub/twin/res/#").await;

    module
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=r1",
            r#"{"temperature":21.5}"#,
        )
        .await;
    let response = module.next_publish().await;
    assert_eq!(response.topic, "$iothub/twin/res/204/?$rid=r1&$version=2");
    assert!(response.payload.is_empty(), "{:?}", response.payload);

    let twin = hub
        .http()
        .send("GET", "/twins/dev/modules/mod", None, &[])
        .await
        .expect_status(200);
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["temperature"], json!(21.5), "{twin}");
    assert_eq!(reported["$version"], json!(2), "{twin}");
    assert!(
        reported["$metadata"]["temperature"]["$lastUpdated"].is_string(),
        "{twin}"
    );

    let device_view = module.twin_get("r2").await;
    assert_eq!(
        device_view["reported"],
        json!({"temperature": 21.5, "$version": 2})
    );
}

/// Scenario:
/// - a module sends a reported patch with a key containing a space, then one that is not JSON;
/// - each gets `$iothub/twin/res/400/?$rid=…` (no `$version`) with a JSON body carrying a
///   numeric `errorCode`, which is all the Node SDK looks at (C.6);
/// - neither is applied: the reported side is still at version 1 with no properties.
#[tokio::test]
async fn invalid_reported_patch_gets_400_with_an_error_code_and_changes_nothing() {
    let hub = common::start().await;
    hub.device("dev").await;
    let key = hub.module("dev", "mod").await;
    let mut module = hub.mqtt_connect("dev", Some("mod"), &key).await;

    for (rid, payload) in [
        ("bad-key", r#"{"bad key":1,"good":2}"#),
        ("not-json", "this is not json"),
    ] {
        module
            .publish(
                &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                payload,
            )
            .await;
        let response = module.next_publish().await;
        assert_eq!(response.topic, format!("$iothub/twin/res/400/?$rid={rid}"));
        let error = body(&response);
        assert!(error["errorCode"].is_u64(), "{rid}: {error}");
        assert!(error["message"].is_string(), "{rid}: {error}");
    }

    let twin = hub
        .http()
        .send("GET", "/twins/dev/modules/mod", None, &[])
        .await
        .expect_status(200);
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["$version"], json!(1), "{twin}");
    assert!(reported.get("good").is_none(), "{twin}");
    assert!(reported.get("bad key").is_none(), "{twin}");
}

/// Scenario:
/// - a module subscribes to desired patches;
/// - the service PATCHes its twin's desired properties with `{"a":1}`, then `{"b":2}`;
/// - the module gets two publishes, in order, on `…/desired/?$version=2` and `?$version=3`,
///   each body being the patch with its `$version` (the Python SDK crashes without it).
#[tokio::test]
async fn desired_patches_reach_the_subscribed_module_in_version_order() {
    let hub = common::start().await;
    hub.device("dev").await;
    let key = hub.module("dev", "mod").await;
    let mut module = hub.mqtt_connect("dev", Some("mod"), &key).await;
    module.subscribe_ok(DESIRED).await;

    let http = hub.http();
    for patch in [json!({"a": 1}), json!({"b": 2})] {
        http.send(
            "PATCH",
            "/twins/dev/modules/mod",
            Some(json!({"properties": {"desired": patch}})),
            &[],
        )
        .await
        .expect_status(200);
    }

    let first = module.next_publish().await;
    assert_eq!(
        first.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    assert_eq!(body(&first), json!({"a": 1, "$version": 2}));
    let second = module.next_publish().await;
    assert_eq!(
        second.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    assert_eq!(body(&second), json!({"b": 2, "$version": 3}));
}

/// Scenario:
/// - a module subscribed to desired patches has desired `{"a":1}` (version 2);
/// - the service replaces the twin (PUT) with desired `{"c":3}`;
/// - the module receives the full new desired document, `{"c":3,"$version":3}`, not a patch:
///   `a` is gone (DOC-TWIN: the device gets the same form of update).
#[tokio::test]
async fn desired_replace_pushes_the_whole_desired_document() {
    let hub = common::start().await;
    hub.device("dev").await;
    let key = hub.module("dev", "mod").await;
    let http = hub.http();
    http.send(
        "PATCH",
        "/twins/dev/modules/mod",
        Some(json!({"properties": {"desired": {"a": 1}}})),
        &[],
    )
    .await
    .expect_status(200);
    let mut module = hub.mqtt_connect("dev", Some("mod"), &key).await;
    module.subscribe_ok(DESIRED).await;

    http.send(
        "PUT",
        "/twins/dev/modules/mod",
        Some(json!({"properties": {"desired": {"c": 3}}})),
        &[],
    )
    .await
    .expect_status(200);

    let pushed = module.next_publish().await;
    assert_eq!(
        pushed.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    assert_eq!(body(&pushed), json!({"c": 3, "$version": 3}));
    assert_eq!(
        module.twin_get("after-put").await["desired"],
        json!({"c": 3, "$version": 3})
    );
}

/// Scenario:
/// - a device connects with clean session 0 (as every SDK does), subscribes to desired
///   patches and disconnects;
/// - it reconnects with clean session 0 and does NOT subscribe again (the SDKs rely on the
///   session after a token-renewal reconnect, C.3); CONNACK says a session is present;
/// - a service desired PATCH still reaches it.
#[tokio::test]
async fn desired_subscription_survives_a_reconnect_without_clean_session() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let token = common::identity_token("dev", None, &key);
    let options = || {
        let mut options = hub.mqtt_options("dev", &token);
        options.set_clean_session(false);
        options
    };

    let (mut first, connack) = hub.mqtt_start(options()).await;
    assert!(!connack.unwrap().session_present);
    first.subscribe_ok(DESIRED).await;
    first.disconnect().await;

    let (mut second, connack) = hub.mqtt_start(options()).await;
    let connack = connack.unwrap();
    assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
    assert!(connack.session_present, "{connack:?}");

    hub.http()
        .send(
            "PATCH",
            "/twins/dev",
            Some(json!({"properties": {"desired": {"fan": true}}})),
            &[],
        )
        .await
        .expect_status(200);
    let pushed = second.next_publish().await;
    assert_eq!(
        pushed.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    assert_eq!(body(&pushed), json!({"fan": true, "$version": 2}));
}

/// Scenario (IoT Hub's rule: `null` removes a property, and a section set to `null` removes
/// every property in it):
/// - a subscribed device gets `{"a":null,"b":null,"$version":4}` when the service PATCHes
///   `{"properties":{"desired":null}}` after setting `a` and `b`; the service twin's desired
///   is then empty, and `"tags": null` empties the tags the same way
/// - a device that was offline while desired was set and cleared again sees, on its next twin
///   GET, exactly the resulting state: no properties, only `$version`
#[tokio::test]
async fn a_null_section_clears_it_online_and_offline() {
    let hub = common::start().await;
    let key = hub.device("dev").await;
    let http = hub.http();
    let mut device = hub.mqtt_connect("dev", None, &key).await;
    device.subscribe_ok(DESIRED).await;
    for patch in [
        json!({"tags": {"room": "a"}, "properties": {"desired": {"a": 1}}}),
        json!({"properties": {"desired": {"b": {"c": 2}}}}),
        json!({"tags": null, "properties": {"desired": null}}),
    ] {
        http.send("PATCH", "/twins/dev", Some(patch), &[])
            .await
            .expect_status(200);
    }
    assert_eq!(
        body(&device.next_publish().await),
        json!({"a": 1, "$version": 2})
    );
    assert_eq!(
        body(&device.next_publish().await),
        json!({"b": {"c": 2}, "$version": 3})
    );
    let cleared = device.next_publish().await;
    assert_eq!(
        cleared.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=4"
    );
    assert_eq!(body(&cleared), json!({"a": null, "b": null, "$version": 4}));
    let twin = http
        .send("GET", "/twins/dev", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin.get("tags"), None, "no tags left: {twin}");
    let desired = twin["properties"]["desired"].as_object().unwrap();
    let keys: Vec<&String> = desired.keys().filter(|k| !k.starts_with('$')).collect();
    assert!(keys.is_empty(), "{desired:?}");
    device.disconnect().await;

    for patch in [
        json!({"properties": {"desired": {"x": "y"}}}),
        json!({"properties": {"desired": null}}),
    ] {
        http.send("PATCH", "/twins/dev", Some(patch), &[])
            .await
            .expect_status(200);
    }
    let mut device = hub.mqtt_connect("dev", None, &key).await;
    device.subscribe_ok("$iothub/twin/res/#").await;
    let twin = device.twin_get("1").await;
    assert_eq!(twin["desired"], json!({"$version": 6}));
}
