//! The web portal over HTTPS: pages render, the portal API validates exactly like the REST API
//! (same hub functions, same error codes), state changes need the CSRF header, and a hub that
//! listens beyond loopback asks for a policy key first.

mod common;

use common::{TestHub, HOST};
use serde_json::{json, Value};

/// A browser-like client: trusts the hub's CA, follows no redirects, sends no SAS token.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Page {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    fn error_code(&self) -> &str {
        self.headers
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

fn browser(hub: &TestHub) -> Browser {
    let ca = reqwest::Certificate::from_pem(hub.ca_pem.as_bytes()).unwrap();
    Browser {
        client: reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(HOST, hub.https)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: format!("https://{HOST}:{}", hub.https.port()),
        cookie: None,
    }
}

impl Browser {
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Page {
        let mut request = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            request = request.header("Cookie", c);
        }
        if let Some(b) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        Page {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Page {
        self.request("GET", path, None, &[]).await
    }

    /// A portal API call the way app.js makes it (with the CSRF header).
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Page {
        self.request(method, path, body, &[("X-Portal", "1")]).await
    }
}

#[tokio::test]
async fn pages_render_with_connection_strings_and_security_headers() {
    let hub = common::start().await;
    let b = browser(&hub);

    let home = b.get("/").await;
    assert_eq!(home.status, 200);
    assert!(home.header("content-type").starts_with("text/html"));
    assert!(home
        .header("content-security-policy")
        .contains("script-src 'self'"));
    assert_eq!(home.header("x-frame-options"), "DENY");
    assert!(home.text.contains("<h1>Devices</h1>"));
    assert!(home.text.contains("No devices yet"));

    let device_key = hub.device("dev-1").await;
    let module_key = hub.module("dev-1", "myFirstModule").await;

    let list = b.get("/").await;
    assert!(list.text.contains("href=\"/portal/devices/dev-1\""));
    let rows = b.get("/portal/fragments/devices?q=DEV").await;
    assert_eq!(rows.status, 200);
    assert!(rows.text.contains("dev-1"));
    assert_eq!(rows.header("x-portal-counts"), "1,1,0");
    assert!(b
        .get("/portal/fragments/devices?q=zzz")
        .await
        .text
        .contains("No device ID contains"));

    let device = b.get("/portal/devices/dev-1").await;
    assert_eq!(device.status, 200);
    assert!(device.text.contains(&format!(
        "value=\"HostName=localhost;DeviceId=dev-1;SharedAccessKey={device_key}\""
    )));
    assert!(device.text.contains("Add module identity"));
    assert!(device
        .text
        .contains("href=\"/portal/devices/dev-1/modules/myFirstModule\""));

    let module = b.get("/portal/devices/dev-1/modules/myFirstModule").await;
    assert_eq!(module.status, 200);
    // Never a trailing ';'.
    assert!(module.text.contains(&format!(
        "value=\"HostName=localhost;DeviceId=dev-1;ModuleId=myFirstModule;SharedAccessKey={module_key}\""
    )));
    assert!(module
        .text
        .contains("data-field=\"module.connectionState\""));
    assert!(module.text.contains("data-twin-editor"));

    for path in [
        "/portal/devices/dev-1/live",
        "/portal/devices/dev-1/modules/myFirstModule/live",
        "/portal/add-device",
        "/portal/devices/dev-1/add-module",
    ] {
        assert_eq!(b.get(path).await.status, 200, "{path}");
    }
    let missing = b.get("/portal/devices/nope").await;
    assert_eq!(missing.status, 404);
    assert!(missing.text.contains("nope"));
    assert_eq!(
        b.get("/portal/devices/dev-1/modules/nope").await.status,
        404
    );

    let js = b.get("/portal/assets/app.js").await;
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").starts_with("text/javascript"));
    assert_eq!(b.get("/portal/assets/style.css").await.status, 200);
    assert_eq!(b.get("/portal/assets/nope.js").await.status, 404);
    // On loopback there is no sign-in page.
    assert_eq!(b.get("/portal/login").await.status, 303);
}

#[tokio::test]
async fn ids_are_escaped_and_encoded() {
    let hub = common::start().await;
    let b = browser(&hub);
    let id = "a'b$(c)%:=@!";
    let created = b
        .api("POST", "/portal/api/devices", Some(json!({"deviceId": id})))
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let list = b.get("/").await;
    assert!(list.text.contains("a&#39;b$(c)%:=@!"));
    assert!(list
        .text
        .contains("/portal/devices/a%27b%24%28c%29%25%3A%3D%40%21"));
    let page = b
        .get("/portal/devices/a%27b%24%28c%29%25%3A%3D%40%21")
        .await;
    assert_eq!(page.status, 200);
}

#[tokio::test]
async fn the_api_validates_like_the_rest_api() {
    let hub = common::start().await;
    let b = browser(&hub);
    let rest = hub.http();

    // Bad ids: 400 ArgumentInvalid from both.
    let portal = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "bad id"})),
        )
        .await;
    let via_rest = rest
        .send(
            "PUT",
            "/devices/bad%20id",
            Some(json!({"deviceId": "bad id"})),
            &[],
        )
        .await;
    assert_eq!(portal.status, 400);
    assert_eq!(via_rest.status, 400);
    assert_eq!(portal.error_code(), via_rest.error_code());
    assert_eq!(portal.error_code(), "ArgumentInvalid");
    for body in [
        json!({"deviceId": ""}),
        json!({"deviceId": "x".repeat(129)}),
        json!({"deviceId": "d", "status": "maybe"}),
        json!({"deviceId": "d", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "short"}}}),
        json!({"deviceId": "d", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "xyz"}}}),
        json!({"deviceId": "d", "authentication": {"type": "selfSigned", "x509Thumbprint": {}}}),
        json!({"deviceId": 7}),
    ] {
        let r = b
            .api("POST", "/portal/api/devices", Some(body.clone()))
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
    }
    let missing = b.api("POST", "/portal/api/devices", Some(json!({}))).await;
    assert_eq!(
        (missing.status, missing.error_code()),
        (400, "ArgumentNull")
    );
    assert_eq!(
        hub.hub.registry().device_stats().total,
        0,
        "nothing refused was created"
    );

    // Given keys and X.509 thumbprints are kept as given.
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let d = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "d1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": ""}}})),
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.text);
    assert_eq!(
        d.json()["authentication"]["symmetricKey"]["primaryKey"],
        key
    );
    let x = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "x509", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "ab".repeat(20)}}})),
        )
        .await;
    assert_eq!(x.status, 200, "{}", x.text);
    let dup = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "d1"})),
        )
        .await;
    assert_eq!((dup.status, dup.error_code()), (409, "DeviceAlreadyExists"));

    // Modules.
    let bad_module = b
        .api(
            "POST",
            "/portal/api/devices/d1/modules",
            Some(json!({"moduleId": "no/slash"})),
        )
        .await;
    assert_eq!(
        (bad_module.status, bad_module.error_code()),
        (400, "ArgumentInvalid")
    );
    let no_device = b
        .api(
            "POST",
            "/portal/api/devices/ghost/modules",
            Some(json!({"moduleId": "m"})),
        )
        .await;
    assert_eq!(no_device.status, 404);
    let m = b
        .api(
            "POST",
            "/portal/api/devices/d1/modules",
            Some(json!({"moduleId": "m1"})),
        )
        .await;
    assert_eq!(m.status, 200, "{}", m.text);
    let via_rest = rest
        .send("GET", "/devices/d1/modules/m1", None, &[])
        .await
        .expect_status(200);
    assert_eq!(via_rest["authentication"], m.json()["authentication"]);

    // Enable/disable.
    let off = b
        .api(
            "PATCH",
            "/portal/api/devices/d1",
            Some(json!({"status": "disabled"})),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.text);
    let now = rest
        .send("GET", "/devices/d1", None, &[])
        .await
        .expect_status(200);
    assert_eq!(now["status"], "disabled");
    assert_eq!(
        now["authentication"]["symmetricKey"]["primaryKey"], key,
        "keys kept"
    );
    for body in [
        json!({"status": "maybe"}),
        json!({"deviceId": "other"}),
        json!({"status": "enabled", "etag": "stale"}),
    ] {
        let r = b
            .api("PATCH", "/portal/api/devices/d1", Some(body.clone()))
            .await;
        assert!(matches!(r.status, 400 | 412), "{body}: {}", r.text);
    }
    let x509_off = b
        .api(
            "PATCH",
            "/portal/api/devices/x509",
            Some(json!({"status": "disabled"})),
        )
        .await;
    assert_eq!(x509_off.json()["authentication"]["type"], "selfSigned");

    // Regenerate keys.
    let regenerated = b
        .api(
            "POST",
            "/portal/api/devices/d1/modules/m1/keys",
            Some(json!({"regenerate": "primary"})),
        )
        .await;
    assert_eq!(regenerated.status, 200, "{}", regenerated.text);
    let before = m.json();
    let after = regenerated.json();
    let keys = |v: &Value, k: &str| v["authentication"]["symmetricKey"][k].clone();
    assert_ne!(keys(&before, "primaryKey"), keys(&after, "primaryKey"));
    assert_eq!(keys(&before, "secondaryKey"), keys(&after, "secondaryKey"));
    let x509_keys = b
        .api(
            "POST",
            "/portal/api/devices/x509/keys",
            Some(json!({"regenerate": "both"})),
        )
        .await;
    assert_eq!(x509_keys.status, 400);
    let bad_which = b
        .api(
            "POST",
            "/portal/api/devices/d1/keys",
            Some(json!({"regenerate": "third"})),
        )
        .await;
    assert_eq!(bad_which.status, 400);

    // Delete.
    let deleted = b.api("DELETE", "/portal/api/devices/x509", None).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(
        rest.send("GET", "/devices/x509", None, &[]).await.status,
        404
    );
    assert_eq!(
        b.api("DELETE", "/portal/api/devices/d1/modules/m1", None)
            .await
            .status,
        204
    );
    assert_eq!(
        b.api("DELETE", "/portal/api/devices/d1/modules/m1", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn twin_saves_check_the_etag_and_apply_the_difference() {
    let hub = common::start().await;
    let b = browser(&hub);
    hub.device("d").await;
    hub.module("d", "m").await;
    let path = "/portal/api/twins/d/modules/m";

    let twin = b.get(path).await.json();
    let etag = twin["etag"].as_str().unwrap().to_owned();
    let saved = b
        .api(
            "PUT",
            path,
            Some(json!({"etag": etag, "tags": {"site": "a"}, "properties": {"desired": {"x": 1, "y": {"z": 2}}, "reported": {"ignored": true}}})),
        )
        .await;
    assert_eq!(saved.status, 200, "{}", saved.text);
    let saved = saved.json();
    assert_eq!(saved["properties"]["desired"]["x"], 1);
    assert_eq!(saved["properties"]["desired"]["$version"], 2);
    assert_eq!(saved["tags"]["site"], "a");
    assert!(saved["properties"]["reported"].get("ignored").is_none());

    // The old etag is stale now.
    let stale = b
        .api(
            "PUT",
            path,
            Some(json!({"etag": etag, "properties": {"desired": {"x": 2}}})),
        )
        .await;
    assert_eq!(
        (stale.status, stale.error_code()),
        (412, "PreconditionFailed")
    );

    // Removing a key deletes it; an unchanged document changes nothing.
    let etag = saved["etag"].as_str().unwrap();
    let removed = b
        .api(
            "PUT",
            path,
            Some(json!({"etag": etag, "tags": {"site": "a"}, "properties": {"desired": {"y": {"z": 2}}}})),
        )
        .await
        .json();
    assert!(removed["properties"]["desired"].get("x").is_none());
    assert_eq!(removed["properties"]["desired"]["$version"], 3);
    let same = b
        .api(
            "PUT",
            path,
            Some(json!({"etag": removed["etag"], "tags": {"site": "a"}, "properties": {"desired": {"y": {"z": 2}}}})),
        )
        .await
        .json();
    assert_eq!(same["etag"], removed["etag"]);

    // The twin rules are the REST API's: a key with '.' is refused by both.
    let etag = same["etag"].as_str().unwrap();
    let bad = b
        .api(
            "PUT",
            path,
            Some(json!({"etag": etag, "properties": {"desired": {"a.b": 1}}})),
        )
        .await;
    let rest_bad = hub
        .http()
        .send(
            "PATCH",
            "/twins/d/modules/m",
            Some(json!({"properties": {"desired": {"a.b": 1}}})),
            &[],
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert_eq!(rest_bad.status, 400);
    for body in [
        json!({"properties": {"desired": {}}}),
        json!({"etag": 5}),
        json!({"etag": etag, "tags": []}),
        json!({"etag": etag, "properties": {"desired": 1}}),
    ] {
        let r = b.api("PUT", path, Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
    }
    assert_eq!(
        b.api(
            "PUT",
            "/portal/api/twins/d/modules/ghost",
            Some(json!({"etag": "x"}))
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn state_changes_need_the_csrf_header_and_this_origin() {
    let hub = common::start().await;
    let b = browser(&hub);
    let body = Some(json!({"deviceId": "csrf"}));

    let bare = b
        .request("POST", "/portal/api/devices", body.clone(), &[])
        .await;
    assert_eq!((bare.status, bare.error_code()), (403, "Forbidden"));
    let cross = b
        .request(
            "POST",
            "/portal/api/devices",
            body.clone(),
            &[("X-Portal", "1"), ("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(cross.status, 403);
    assert_eq!(hub.hub.registry().device_stats().total, 0);

    let origin = format!("https://{HOST}:{}", hub.https.port());
    let same = b
        .request(
            "POST",
            "/portal/api/devices",
            body,
            &[("X-Portal", "1"), ("Origin", origin.as_str())],
        )
        .await;
    assert_eq!(same.status, 200, "{}", same.text);
    for (method, path) in [
        ("DELETE", "/portal/api/devices/csrf"),
        ("PATCH", "/portal/api/devices/csrf"),
        ("PUT", "/portal/api/twins/csrf"),
        ("POST", "/portal/api/methods/csrf"),
    ] {
        let r = b
            .request(method, path, Some(json!({"status": "disabled"})), &[])
            .await;
        assert_eq!(r.status, 403, "{method} {path}");
    }
    assert_eq!(hub.hub.registry().device_stats().enabled, 1);
    // Reads need no header.
    assert_eq!(b.get("/portal/api/devices").await.status, 200);
}

#[tokio::test]
async fn methods_and_telemetry_go_through_the_hub() {
    let hub = common::start().await;
    let b = browser(&hub);
    hub.device("d").await;
    let offline = b
        .api(
            "POST",
            "/portal/api/methods/d",
            Some(json!({"methodName": "reboot", "payload": {}})),
        )
        .await;
    assert_eq!(
        (offline.status, offline.error_code()),
        (404, "DeviceNotOnline")
    );
    let bad = b
        .api(
            "POST",
            "/portal/api/methods/d",
            Some(json!({"methodName": "a/b"})),
        )
        .await;
    assert_eq!(bad.status, 400);
    let slow = b
        .api(
            "POST",
            "/portal/api/methods/d",
            Some(json!({"methodName": "m", "responseTimeoutInSeconds": 1})),
        )
        .await;
    assert_eq!(slow.status, 400);

    let first = b.get("/portal/api/telemetry?deviceId=d").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["messages"], json!([]));
    let next = first.json()["next"].as_u64().unwrap();
    let polled = b
        .get(&format!(
            "/portal/api/telemetry?deviceId=d&after={next}&wait=0"
        ))
        .await;
    assert_eq!(polled.status, 200);
    assert_eq!(b.get("/portal/api/telemetry").await.status, 400);
}

// ----- beyond loopback: sign-in -----

fn session_cookie(page: &Page) -> String {
    let set = page.header("set-cookie");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("Secure"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn beyond_loopback_the_portal_needs_a_policy_with_registry_write() {
    let hub = common::start_with(|c| c.bind = "0.0.0.0".parse().unwrap()).await;
    let mut b = browser(&hub);

    let home = b.get("/portal/devices/x?y=1").await;
    assert_eq!(home.status, 303);
    assert_eq!(
        home.header("location"),
        "/portal/login?next=%2Fportal%2Fdevices%2Fx%3Fy%3D1"
    );
    let api = b.get("/portal/api/devices").await;
    assert_eq!(api.status, 401);
    let fragment = b.get("/portal/fragments/devices").await;
    assert_eq!(fragment.status, 401);
    let create = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "x"})),
        )
        .await;
    assert_eq!(create.status, 401);
    // A SAS token is not a portal session.
    let with_sas = b
        .request(
            "GET",
            "/portal/api/devices",
            None,
            &[("Authorization", &common::policy_token("iothubowner"))],
        )
        .await;
    assert_eq!(with_sas.status, 401);

    let form = b.get("/portal/login?next=/portal/add-device").await;
    assert_eq!(form.status, 200);
    assert!(form.text.contains("name=\"key\""));
    assert!(form.text.contains("value=\"/portal/add-device\""));

    let sign_in = |key: &str, next: &str| {
        let client = b.client.clone();
        let url = format!("{}/portal/login", b.base);
        let form = [("key", key.to_owned()), ("next", next.to_owned())];
        async move {
            let r = client.post(url).form(&form).send().await.unwrap();
            Page {
                status: r.status().as_u16(),
                headers: r.headers().clone(),
                text: r.text().await.unwrap(),
            }
        }
    };
    let policy_key = |name: &str| {
        iothub_emulator::auth::default_policies()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap()
            .primary_key
            .to_base64()
    };

    for refused in [
        "wrong".to_owned(),
        policy_key("registryRead"),
        policy_key("service"),
        format!(
            "HostName=localhost;SharedAccessKeyName=service;SharedAccessKey={}",
            iothub_emulator::auth::OWNER_KEY
        ),
    ] {
        let r = sign_in(&refused, "/").await;
        assert_eq!(r.status, 401, "{refused}");
        assert!(r.header("set-cookie").is_empty());
        assert!(r.text.contains("RegistryWrite"));
    }

    let owner = sign_in(
        &format!(
            "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            iothub_emulator::auth::OWNER_KEY
        ),
        "//evil.example/",
    )
    .await;
    assert_eq!(owner.status, 303);
    assert_eq!(owner.header("location"), "/", "no open redirect");
    b.cookie = Some(session_cookie(&owner));
    let home = b.get("/").await;
    assert_eq!(home.status, 200);
    assert!(home.text.contains("Sign out"));
    let created = b
        .api(
            "POST",
            "/portal/api/devices",
            Some(json!({"deviceId": "signed"})),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    assert_eq!(
        b.get("/portal/api/telemetry?deviceId=signed").await.status,
        200
    );

    // A tampered cookie is no session.
    let good = b.cookie.clone().unwrap();
    b.cookie = Some(good.replace("iothubowner", "registryReadWrite"));
    assert_eq!(b.get("/").await.status, 303);

    // registryReadWrite may sign in and manage identities, but its session gets only its own
    // permissions: no telemetry (ServiceConnect).
    let rw = sign_in(&policy_key("registryReadWrite"), "/portal/add-device").await;
    assert_eq!(rw.status, 303);
    assert_eq!(rw.header("location"), "/portal/add-device");
    b.cookie = Some(session_cookie(&rw));
    assert_eq!(b.get("/portal/devices/signed").await.status, 200);
    let telemetry = b.get("/portal/api/telemetry?deviceId=signed").await;
    assert_eq!(telemetry.status, 401);
    assert!(telemetry.text.contains("does not grant"));

    let out = b.request("POST", "/portal/logout", None, &[]).await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
}
