//! Hostile and faulty clients (issue 14): HTTPS clients that never finish, listeners at their
//! connection limit, malformed preconditions and continuation tokens, integers no parser should
//! round into floats. Each case is bounded in time and checks that well-behaved clients are
//! still served.

mod common;

use common::{policy_token, start_custom, TestHub, WAIT};
use iothub_emulator::http::Timeouts;
use iothub_emulator::transport::ConnectionLimits;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A hub whose HTTPS header and body timeouts are one second, so the tests stay short.
async fn impatient_hub(limits: ConnectionLimits) -> TestHub {
    let timeouts = Timeouts {
        header: Duration::from_secs(1),
        body: Duration::from_secs(1),
    };
    start_custom(|_| {}, limits, timeouts).await
}

/// Reads until the server closes the connection and returns everything it sent; panics if it
/// is still open after [`WAIT`].
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), what: &str) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| panic!("{what}: the hub kept the connection open"));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn https_clients_that_never_finish_are_cut_off_and_others_are_served() {
    let t = impatient_hub(ConnectionLimits::for_this_process()).await;
    let owner = policy_token("iothubowner");

    // Silent after the TLS handshake.
    let mut silent = t.tls_stream(t.https).await;
    // Headers dribbled, never finished.
    let mut dribbler = t.tls_stream(t.https).await;
    dribbler
        .write_all(b"GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // One answered request, then idle on keep-alive.
    let mut idler = t.tls_stream(t.https).await;
    let request = format!(
        "GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {owner}\r\n\r\n"
    );
    idler.write_all(request.as_bytes()).await.unwrap();
    // A body announced as 100 bytes, of which 10 ever come.
    let mut slow_body = t.tls_stream(t.https).await;
    let request = format!(
        "PUT /devices/slow?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {owner}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"deviceI"
    );
    slow_body.write_all(request.as_bytes()).await.unwrap();

    // While they hang, a well-behaved client is served.
    t.http()
        .send("GET", "/devices", None, &[])
        .await
        .expect_status(200);

    assert_eq!(read_until_closed(&mut silent, "silent client").await, "");
    let dribbled = read_until_closed(&mut dribbler, "header dribbler").await;
    assert!(!dribbled.contains("200 OK"), "{dribbled}");
    let idled = read_until_closed(&mut idler, "keep-alive idler").await;
    assert!(
        idled.starts_with("HTTP/1.1 200"),
        "the request was answered first: {idled}"
    );
    let answered = read_until_closed(&mut slow_body, "unfinished body").await;
    assert!(answered.starts_with("HTTP/1.1 400"), "{answered}");
    assert!(answered.contains("did not arrive in time"), "{answered}");
    // Nothing of the half-sent body was applied.
    t.http()
        .send("GET", "/devices/slow", None, &[])
        .await
        .expect_status(404);
}

#[tokio::test]
async fn a_listener_at_its_connection_limit_waits_and_the_others_keep_serving() {
    let t = impatient_hub(ConnectionLimits {
        https: 64,
        mqtt: 2,
        amqp: 64,
    })
    .await;
    let key = t.device("limited").await;
    let first = t.raw_mqtt_connected("limited", None, &key, 60).await;
    let second = t.raw_mqtt().await;

    // The third MQTT client's TCP connect lands in the backlog; its TLS handshake waits.
    let tcp = tokio::net::TcpStream::connect(t.mqtt).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(common::HOST).unwrap();
    let mut handshake =
        Box::pin(tokio_rustls::TlsConnector::from(t.tls_client()).connect(server_name, tcp));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut handshake)
            .await
            .is_err(),
        "a third connection was served past the limit of 2"
    );
    // HTTPS has its own limit and is unaffected.
    t.http()
        .send("GET", "/devices/limited", None, &[])
        .await
        .expect_status(200);

    // A slot frees, and the waiting client is served.
    drop(second);
    tokio::time::timeout(WAIT, handshake)
        .await
        .expect("the waiting client was not accepted after a slot freed")
        .unwrap();
    drop(first);
}

/// `If-Match` with a byte no etag has: 412, and nothing is written or deleted.
#[tokio::test]
async fn a_non_ascii_if_match_fails_the_write_instead_of_meaning_any_version() {
    let t = impatient_hub(ConnectionLimits::for_this_process()).await;
    t.device("guarded").await;
    let http = t.http();
    let send = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let mut request = http
            .client
            .request(
                method.parse().unwrap(),
                format!("{}{path}?api-version=2021-04-12", http.base),
            )
            .header("Authorization", &http.token)
            .header(
                "If-Match",
                reqwest::header::HeaderValue::from_bytes(b"\"\xe9t\xe9\"").unwrap(),
            );
        if let Some(b) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        request.send()
    };
    let before = http
        .send("GET", "/twins/guarded", None, &[])
        .await
        .expect_status(200);

    let patch = send(
        "PATCH",
        "/twins/guarded",
        Some(json!({"properties": {"desired": {"x": 1}}})),
    )
    .await
    .unwrap();
    assert_eq!(patch.status(), 412);
    let put = send(
        "PUT",
        "/devices/guarded",
        Some(json!({"deviceId": "guarded", "status": "disabled"})),
    )
    .await
    .unwrap();
    assert_eq!(put.status(), 412);
    let delete = send("DELETE", "/devices/guarded", None).await.unwrap();
    assert_eq!(delete.status(), 412);

    let after = http
        .send("GET", "/twins/guarded", None, &[])
        .await
        .expect_status(200);
    assert_eq!(after["etag"], before["etag"]);
    assert_eq!(after["properties"]["desired"].get("x"), None);
    let device = http
        .send("GET", "/devices/guarded", None, &[])
        .await
        .expect_status(200);
    assert_eq!(device["status"], "enabled");
}

#[tokio::test]
async fn a_garbage_continuation_token_fails_instead_of_restarting_the_query() {
    let t = impatient_hub(ConnectionLimits::for_this_process()).await;
    for id in ["q1", "q2", "q3"] {
        t.device(id).await;
    }
    let http = t.http();
    let query = Some(json!({"query": "SELECT * FROM devices"}));
    let first = http
        .send(
            "POST",
            "/devices/query",
            query.clone(),
            &[("x-ms-max-item-count", "1")],
        )
        .await;
    assert_eq!(first.status, 200);
    assert!(first.headers.get("x-ms-continuation").is_some());

    for token in [&b"not a token!"[..], b"\xff\xfe"] {
        let reply = http
            .client
            .post(format!(
                "{}/devices/query?api-version=2021-04-12",
                http.base
            ))
            .header("Authorization", &http.token)
            .header("Content-Type", "application/json")
            .header("x-ms-max-item-count", "1")
            .header(
                "x-ms-continuation",
                reqwest::header::HeaderValue::from_bytes(token).unwrap(),
            )
            .body(query.clone().unwrap().to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 400, "{}", String::from_utf8_lossy(token));
    }
}

#[tokio::test]
async fn an_integer_beyond_64_bits_is_refused_like_two_to_the_52() {
    let t = impatient_hub(ConnectionLimits::for_this_process()).await;
    t.device("huge").await;
    let http = t.http();
    for number in ["4503599627370496", "123456789012345678901234567890"] {
        let body = format!(r#"{{"properties":{{"desired":{{"n":{number}}}}}}}"#);
        let reply = http.send_raw("PATCH", "/twins/huge", Some(body), &[]).await;
        assert_eq!(reply.status, 400, "{number}: {}", reply.body);
    }
    let twin = http
        .send("GET", "/twins/huge", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin["properties"]["desired"]["$version"], 1);
    assert_eq!(twin["properties"]["desired"].get("n"), None);
}
