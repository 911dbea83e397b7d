//! The service REST API over real HTTPS: identities, twins, errors, auth and limits.
//!
//! Protocol-level MQTT behaviour belongs in `tests/mqtt*.rs`; SDK-driven flows in `e2e/`.

mod common;

use common::{policy_token, start, HOST};
use serde_json::{json, Value};

/// Scenario:
/// - create a device without keys, a module on it; both come back with generated keys
/// - a second create of either is 409 with the right IoT Hub code
/// - list, get, delete; a deleted module is 404 ModuleNotFound
#[tokio::test]
async fn device_and_module_lifecycle() {
    let hub = start().await;
    let http = hub.http();
    let device = http
        .send(
            "PUT",
            "/devices/dev1",
            Some(json!({"deviceId":"dev1","authentication":{"symmetricKey":{},"type":"sas"}})),
            &[],
        )
        .await;
    assert_eq!(
        device.headers["content-type"],
        "application/json; charset=utf-8"
    );
    let device = device.expect_status(200);
    assert!(
        device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .len()
            >= 24
    );
    assert_eq!(device["connectionState"], "Disconnected");

    let again = http
        .send(
            "PUT",
            "/devices/dev1",
            Some(json!({"deviceId":"dev1"})),
            &[],
        )
        .await;
    assert_eq!(
        (again.status, again.error_code()),
        (409, "DeviceAlreadyExists")
    );
    assert!(again.body["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:DeviceAlreadyExists;"));

    let module = http
        .send("PUT", "/devices/dev1/modules/mod1", Some(json!({"moduleId":"mod1","deviceId":"dev1","authentication":{"symmetricKey":{"primaryKey":"","secondaryKey":""},"type":"sas"}})), &[])
        .await
        .expect_status(200);
    assert_eq!(module["moduleId"], "mod1");
    let again = http
        .send("PUT", "/devices/dev1/modules/mod1", Some(json!({})), &[])
        .await;
    assert_eq!(
        (again.status, again.error_code()),
        (409, "ModuleAlreadyExistsOnDevice")
    );

    let modules = http
        .send("GET", "/devices/dev1/modules", None, &[])
        .await
        .expect_status(200);
    assert_eq!(modules.as_array().unwrap().len(), 1);
    // Node lists devices with a trailing slash.
    let devices = http
        .send("GET", "/devices/", None, &[])
        .await
        .expect_status(200);
    assert_eq!(devices[0]["deviceId"], "dev1");

    let deleted = http
        .send(
            "DELETE",
            "/devices/dev1/modules/mod1",
            None,
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(deleted.status, 204);
    let gone = http
        .send("GET", "/devices/dev1/modules/mod1", None, &[])
        .await;
    assert_eq!((gone.status, gone.error_code()), (404, "ModuleNotFound"));
    let gone = http.send("GET", "/devices/nobody", None, &[]).await;
    assert_eq!((gone.status, gone.error_code()), (404, "DeviceNotFound"));
}

/// Scenario: updates need the current etag; a stale one is 412 and changes nothing.
#[tokio::test]
async fn stale_etags_are_refused() {
    let hub = start().await;
    let http = hub.http();
    let created = http
        .send("PUT", "/devices/d", Some(json!({"deviceId":"d"})), &[])
        .await
        .expect_status(200);
    let etag = format!("\"{}\"", created["etag"].as_str().unwrap());
    let updated = http
        .send(
            "PUT",
            "/devices/d",
            Some(json!({"deviceId":"d","status":"disabled"})),
            &[("If-Match", &etag)],
        )
        .await
        .expect_status(200);
    assert_eq!(updated["status"], "disabled");
    let stale = http
        .send(
            "PUT",
            "/devices/d",
            Some(json!({"deviceId":"d","status":"enabled"})),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(
        (stale.status, stale.error_code()),
        (412, "PreconditionFailed")
    );
    let now = http
        .send("GET", "/devices/d", None, &[])
        .await
        .expect_status(200);
    assert_eq!(now["status"], "disabled");

    // Twin etags work the same way.
    let twin = http
        .send("GET", "/twins/d", None, &[])
        .await
        .expect_status(200);
    let twin_etag = format!("\"{}\"", twin["etag"].as_str().unwrap());
    let patch = json!({"properties":{"desired":{"x":1}}});
    http.send(
        "PATCH",
        "/twins/d",
        Some(patch.clone()),
        &[("If-Match", &twin_etag)],
    )
    .await
    .expect_status(200);
    let stale = http
        .send(
            "PATCH",
            "/twins/d",
            Some(json!({"properties":{"desired":{"x":2}}})),
            &[("If-Match", &twin_etag)],
        )
        .await;
    assert_eq!(stale.status, 412);
    let twin = http
        .send("GET", "/twins/d", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin["properties"]["desired"]["x"], 1);
}

/// Scenario: the seed CLI article's desired update gives a module twin with every field and the
/// `$metadata` shape shown there.
#[tokio::test]
async fn module_twin_matches_the_cli_article() {
    let hub = start().await;
    hub.device("SampleDevice").await;
    hub.module("SampleDevice", "SampleModule").await;
    let http = hub.http();
    let twin = http
        .send(
            "PATCH",
            "/twins/SampleDevice/modules/SampleModule",
            Some(json!({"properties":{"desired":{"conditions":{"temperature":{"warning":75,"critical":100}}}}})),
            &[("If-Match", "\"*\"")],
        )
        .await
        .expect_status(200);
    for field in [
        "authenticationType",
        "cloudToDeviceMessageCount",
        "connectionState",
        "deviceEtag",
        "deviceId",
        "etag",
        "lastActivityTime",
        "modelId",
        "moduleId",
        "properties",
        "status",
        "statusReason",
        "statusUpdateTime",
        "version",
        "x509Thumbprint",
    ] {
        assert!(twin.get(field).is_some(), "missing {field} in {twin}");
    }
    let desired = &twin["properties"]["desired"];
    assert_eq!(
        desired["conditions"],
        json!({"temperature":{"warning":75,"critical":100}})
    );
    assert_eq!(desired["$version"], 2);
    let meta = &desired["$metadata"];
    for node in [
        meta,
        &meta["conditions"],
        &meta["conditions"]["temperature"],
        &meta["conditions"]["temperature"]["warning"],
    ] {
        assert!(node["$lastUpdated"].is_string(), "{node}");
        assert_eq!(node["$lastUpdatedVersion"], 2);
    }
    assert_eq!(
        twin["properties"]["reported"],
        json!({"$metadata":{"$lastUpdated":"0001-01-01T00:00:00Z"},"$version":1})
    );
    assert_eq!(twin["authenticationType"], "sas");
    assert_eq!(
        twin["x509Thumbprint"],
        json!({"primaryThumbprint":null,"secondaryThumbprint":null})
    );
}

/// Scenario: the CLI PATCHes the whole twin it fetched; read-only fields are ignored, not
/// rejected. PUT replaces tags and desired.
#[tokio::test]
async fn whole_twin_echo_and_replace() {
    let hub = start().await;
    hub.device("d").await;
    let http = hub.http();
    let mut twin = http
        .send("GET", "/twins/d", None, &[])
        .await
        .expect_status(200);
    twin["tags"] = json!({"site":"lab"});
    twin["properties"]["desired"]["fan"] = json!(true);
    let patched = http
        .send("PATCH", "/twins/d", Some(twin), &[])
        .await
        .expect_status(200);
    assert_eq!(patched["tags"], json!({"site":"lab"}));
    assert_eq!(patched["properties"]["desired"]["fan"], true);
    let replaced = http
        .send(
            "PUT",
            "/twins/d",
            Some(json!({"properties":{"desired":{"mode":"eco"}}})),
            &[("If-Match", "\"*\"")],
        )
        .await
        .expect_status(200);
    assert!(replaced.get("tags").is_none());
    assert_eq!(replaced["properties"]["desired"]["mode"], "eco");
    assert!(replaced["properties"]["desired"].get("fan").is_none());
}

/// Scenario: malformed, oversized and invalid input is a clear 4xx and changes nothing.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let hub = start().await;
    hub.device("d").await;
    let http = hub.http();
    let before = http
        .send("GET", "/twins/d", None, &[])
        .await
        .expect_status(200);

    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("PATCH", "/twins/d", "{not json".into(), 400),
        ("PATCH", "/twins/d", "[1,2]".into(), 400),
        (
            "PATCH",
            "/twins/d",
            json!({"properties":{"desired":{"bad key":1}}}).to_string(),
            400,
        ),
        (
            "PATCH",
            "/twins/d",
            json!({"tags":{"ok":1},"properties":{"desired":{"s":"x".repeat(5000)}}}).to_string(),
            400,
        ),
        (
            "PATCH",
            "/twins/d",
            format!("{{\"tags\":{{\"t\":\"{}\"}}}}", "x".repeat(300_000)),
            413,
        ),
        ("PUT", "/devices/bad%20id", json!({}).to_string(), 400),
        (
            "PUT",
            "/devices/d2",
            json!({"deviceId":"other"}).to_string(),
            400,
        ),
        (
            "PUT",
            "/devices/d2",
            json!({"authentication":{"type":"sas","symmetricKey":{"primaryKey":"!!"}}}).to_string(),
            400,
        ),
        ("PUT", "/devices/d2", String::new(), 400),
    ];
    for (method, path, body, status) in cases {
        let reply = http.send_raw(method, path, Some(body.clone()), &[]).await;
        assert_eq!(
            reply.status,
            status,
            "{method} {path} {}: {}",
            &body[..body.len().min(80)],
            reply.body
        );
        assert!(
            reply.body["Message"]
                .as_str()
                .unwrap()
                .starts_with("ErrorCode:"),
            "{}",
            reply.body
        );
    }
    let after = http
        .send("GET", "/twins/d", None, &[])
        .await
        .expect_status(200);
    assert_eq!(before, after);
    let missing = http.send("GET", "/devices/d2", None, &[]).await;
    assert_eq!(missing.status, 404);
}

/// Scenario: missing, forged or insufficient credentials are 401; registryRead cannot write.
#[tokio::test]
async fn sas_tokens_and_permissions_are_enforced() {
    let hub = start().await;
    let base = hub.http();
    let none = base
        .client
        .get(format!("{}/devices/x", base.base))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let forged = iothub_emulator::auth::sas::make_token(
        HOST,
        &iothub_emulator::auth::SymmetricKey::generate(),
        Some("iothubowner"),
        common::in_an_hour(),
    );
    let reply = hub
        .http()
        .with_token(forged)
        .send("GET", "/devices", None, &[])
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (401, "IotHubUnauthorizedAccess")
    );

    let read = hub.http().with_token(policy_token("registryRead"));
    read.send("GET", "/devices", None, &[])
        .await
        .expect_status(200);
    let write = read.send("PUT", "/devices/x", Some(json!({})), &[]).await;
    assert_eq!(write.status, 401);
    assert_eq!(
        hub.http().send("GET", "/devices/x", None, &[]).await.status,
        404
    );

    let service = hub.http().with_token(policy_token("service"));
    assert_eq!(
        service
            .send("PUT", "/devices/x", Some(json!({})), &[])
            .await
            .status,
        401
    );
    hub.device("y").await;
    service
        .send("GET", "/twins/y", None, &[])
        .await
        .expect_status(200);
    service
        .send("GET", "/statistics/service", None, &[])
        .await
        .expect_status(200);

    // A device's own token cannot call the service API.
    let key = hub.device("z").await;
    let device_token = common::identity_token("z", None, &key);
    let reply = hub
        .http()
        .with_token(device_token)
        .send("GET", "/devices/z", None, &[])
        .await;
    assert_eq!(reply.status, 401);
}

/// Scenario: bulk create with one duplicate reports a per-item error with 400; statistics count.
#[tokio::test]
async fn bulk_operations_report_per_item_errors() {
    let hub = start().await;
    hub.device("dup").await;
    let http = hub.http();
    let reply = http
        .send(
            "POST",
            "/devices",
            Some(json!([
                {"id":"b1","importMode":"create"},
                {"id":"dup","importMode":"create"},
                {"id":"b2","importMode":"Create","status":"disabled"}
            ])),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["isSuccessful"], false);
    assert_eq!(reply.body["errors"][0]["deviceId"], "dup");
    assert_eq!(reply.body["errors"][0]["errorCode"], "DeviceAlreadyExists");
    let stats = http
        .send("GET", "/statistics/devices", None, &[])
        .await
        .expect_status(200);
    assert_eq!(
        stats,
        json!({"totalDeviceCount":3,"enabledDeviceCount":2,"disabledDeviceCount":1})
    );

    let ok = http
        .send(
            "POST",
            "/devices",
            Some(json!([{"id":"b1","importMode":"delete"},{"id":"b3","importMode":"update"}])),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(ok["isSuccessful"], true);
    assert_eq!(http.send("GET", "/devices/b1", None, &[]).await.status, 404);
    http.send("GET", "/devices/b3", None, &[])
        .await
        .expect_status(200);

    let bad_mode = http
        .send(
            "POST",
            "/devices",
            Some(json!([{"id":"b4","importMode":"explode"}])),
            &[],
        )
        .await;
    assert_eq!(bad_mode.status, 400);
    assert_eq!(http.send("GET", "/devices/b4", None, &[]).await.status, 404);
    let too_many: Vec<Value> = (0..101).map(|i| json!({"id": format!("m{i}")})).collect();
    assert_eq!(
        http.send("POST", "/devices", Some(Value::Array(too_many)), &[])
            .await
            .status,
        400
    );
}

/// Scenario: concurrent desired patches from many writers are all applied: no lost update.
#[tokio::test]
async fn concurrent_twin_writers_lose_no_update() {
    let hub = start().await;
    hub.device("busy").await;
    let http = std::sync::Arc::new(hub.http());
    let writers: Vec<_> = (0..40)
        .map(|i| {
            let http = http.clone();
            tokio::spawn(async move {
                http.send(
                    "PATCH",
                    "/twins/busy",
                    Some(json!({"properties":{"desired":{format!("k{i}"): i}}})),
                    &[],
                )
                .await
                .expect_status(200);
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let twin = http
        .send("GET", "/twins/busy", None, &[])
        .await
        .expect_status(200);
    let desired = twin["properties"]["desired"].as_object().unwrap();
    assert_eq!(desired.keys().filter(|k| !k.starts_with('$')).count(), 40);
    assert_eq!(twin["properties"]["desired"]["$version"], 41);
}

/// Scenario (the `az iot hub device-identity children` flow and the Node SDK's registry tests):
/// - an edge device gets `ms-azure-iot-edge://{id}-{generationId}` and the `$edgeAgent` and
///   `$edgeHub` modules, each with a twin
/// - a leaf device created with that scope lists it in `parentScopes`, and the query the CLI
///   runs for `children list` finds it
/// - moving the leaf to a scope no edge device has is 400 and leaves it where it was
/// - a nested edge device names its parent in `parentScopes` and keeps its own scope
#[tokio::test]
async fn edge_devices_have_scopes_system_modules_and_children() {
    let hub = start().await;
    let http = hub.http();
    let edge = http
        .send(
            "PUT",
            "/devices/gw",
            Some(json!({"deviceId":"gw","capabilities":{"iotEdge":true}})),
            &[],
        )
        .await
        .expect_status(200);
    let scope = edge["deviceScope"].as_str().unwrap().to_owned();
    assert_eq!(
        scope,
        format!(
            "ms-azure-iot-edge://gw-{}",
            edge["generationId"].as_str().unwrap()
        )
    );
    let modules = http
        .send("GET", "/devices/gw/modules", None, &[])
        .await
        .expect_status(200);
    let ids: Vec<&str> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["$edgeAgent", "$edgeHub"]);
    http.send("GET", "/twins/gw/modules/$edgeAgent", None, &[])
        .await
        .expect_status(200);

    let leaf = http
        .send(
            "PUT",
            "/devices/leaf",
            Some(json!({"deviceId":"leaf","deviceScope": scope})),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(leaf["parentScopes"], json!([scope]));
    let twin = http
        .send("GET", "/twins/leaf", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin["deviceScope"], json!(scope));
    let children = http
        .send(
            "POST",
            "/devices/query",
            Some(json!({"query": format!(
                "select deviceId from devices where array_contains(parentScopes, '{scope}')"
            )})),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(children, json!([{"deviceId": "leaf"}]));

    let mut moved = leaf.clone();
    moved["deviceScope"] = json!("6b6f0a52-5d1e-4c43-9a43-1b1a3d3e2f10");
    let reply = http
        .send("PUT", "/devices/leaf", Some(moved), &[("If-Match", "*")])
        .await;
    assert_eq!((reply.status, reply.error_code()), (400, "ArgumentInvalid"));
    let leaf_now = http
        .send("GET", "/devices/leaf", None, &[])
        .await
        .expect_status(200);
    assert_eq!(leaf_now["deviceScope"], json!(scope));

    let nested = http
        .send(
            "PUT",
            "/devices/gw2",
            Some(json!({"deviceId":"gw2","capabilities":{"iotEdge":true},"parentScopes":[scope]})),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(nested["parentScopes"], json!([scope]));
    assert!(nested["deviceScope"]
        .as_str()
        .unwrap()
        .starts_with("ms-azure-iot-edge://gw2-"));
}

/// Scenario: `POST /devices/keys/regenerate` renews only the key asked for, reports an unknown
/// device per item (207); `DELETE /devices/{id}/commands` empties the cloud-to-device queue.
#[tokio::test]
async fn keys_regenerate_and_the_c2d_queue_purges() {
    let hub = start().await;
    let http = hub.http();
    let before = http
        .send("PUT", "/devices/k1", Some(json!({"deviceId":"k1"})), &[])
        .await
        .expect_status(200);
    let reply = http
        .send(
            "POST",
            "/devices/keys/regenerate",
            Some(json!({"policyKey":"primaryKey","devices":[{"id":"k1"},{"id":"ghost"}]})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 207);
    assert_eq!(reply.body["rotatedKeys"][0]["id"], "k1");
    assert_eq!(reply.body["errors"][0]["id"], "ghost");
    assert_eq!(reply.body["errors"][0]["errorCode"], "DeviceNotFound");
    let after = http
        .send("GET", "/devices/k1", None, &[])
        .await
        .expect_status(200);
    let keys = |d: &Value, k: &str| d["authentication"]["symmetricKey"][k].clone();
    assert_ne!(keys(&after, "primaryKey"), keys(&before, "primaryKey"));
    assert_eq!(keys(&after, "secondaryKey"), keys(&before, "secondaryKey"));
    assert_eq!(
        reply.body["rotatedKeys"][0]["primaryKey"],
        keys(&after, "primaryKey")
    );
    let bad = http
        .send(
            "POST",
            "/devices/keys/regenerate",
            Some(json!({"policyKey":"tertiary","devices":[{"id":"k1"}]})),
            &[],
        )
        .await;
    assert_eq!(bad.status, 400);
    let unchanged = http
        .send("GET", "/devices/k1", None, &[])
        .await
        .expect_status(200);
    assert_eq!(unchanged["etag"], after["etag"]);

    for i in 0..3 {
        http.send(
            "POST",
            "/_emulator/devices/k1/messages",
            Some(json!({"body": format!("m{i}")})),
            &[],
        )
        .await
        .expect_status(200);
    }
    let purged = http
        .send("DELETE", "/devices/k1/commands", None, &[])
        .await
        .expect_status(200);
    assert_eq!(
        purged,
        json!({"deviceId":"k1","moduleId":null,"totalMessagesPurged":3})
    );
    let device = http
        .send("GET", "/devices/k1", None, &[])
        .await
        .expect_status(200);
    assert_eq!(device["cloudToDeviceMessageCount"], 0);
    assert_eq!(
        http.send("DELETE", "/devices/ghost/commands", None, &[])
            .await
            .status,
        404
    );
}
