//! AMQP front end edge cases the SDKs cannot reach: links without or with someone else's
//! token, wrong SASL credentials, malformed frames, floods. The SDK flows themselves are in the
//! end-to-end suites (e2e/node/amqp.test.js, e2e/python/test_amqp.py).
//!
//! The client side is `fe2o3-amqp`'s own client, over a TLS stream that trusts the test hub.

mod common;

use common::{identity_token, policy_token, TestHub, WAIT};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Client {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
}

async fn open(
    t: &TestHub,
    sasl: Option<fe2o3_amqp::sasl_profile::SaslProfile>,
) -> Result<Client, String> {
    open_with_cert(t, sasl, None).await
}

async fn open_with_cert(
    t: &TestHub,
    sasl: Option<fe2o3_amqp::sasl_profile::SaslProfile>,
    cert: Option<(&str, &str)>,
) -> Result<Client, String> {
    let stream = t.tls_stream_with_cert(t.amqp, cert).await;
    let mut builder = Connection::builder()
        .container_id("test")
        .hostname("localhost");
    if let Some(profile) = sasl {
        builder = builder.sasl_profile(profile);
    }
    let mut connection = tokio::time::timeout(WAIT, builder.open_with_stream(stream))
        .await
        .map_err(|_| "open timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let session = Session::begin(&mut connection)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Client {
        connection,
        session,
    })
}

impl Client {
    /// Puts `token` on `$cbs` and returns the reply's status code.
    async fn put_token(&mut self, audience: &str, token: &str) -> i32 {
        let mut sender = Sender::attach(&mut self.session, "cbs-out", "$cbs")
            .await
            .unwrap();
        let mut receiver = Receiver::attach(&mut self.session, "cbs-in", "$cbs")
            .await
            .unwrap();
        let request = Message::builder()
            .properties(
                fe2o3_amqp::types::messaging::Properties::builder()
                    .message_id(String::from("put-1"))
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("operation", "put-token")
                    .insert("type", "servicebus.windows.net:sastoken")
                    .insert("name", audience)
                    .build(),
            )
            .value(token.to_owned())
            .build();
        sender.send(request).await.unwrap();
        let reply = tokio::time::timeout(WAIT, receiver.recv::<Body<Value>>())
            .await
            .expect("no put-token reply")
            .unwrap();
        receiver.accept(&reply).await.unwrap();
        let status = reply
            .message()
            .application_properties
            .as_ref()
            .and_then(|p| p.0.get("status-code").cloned());
        let _ = sender.close().await;
        let _ = receiver.close().await;
        match status {
            Some(fe2o3_amqp::types::primitives::SimpleValue::Int(code)) => code,
            other => panic!("status-code must be an int, got {other:?}"),
        }
    }

    /// Attaches a receiver on `address` and returns the error condition the hub detaches it
    /// with, if it does within a moment.
    async fn refused_receiver(&mut self, address: &str) -> Option<String> {
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "probe-{}",
            PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let condition = |e: String| e.to_ascii_lowercase().replace(['-', '_'], "");
        match Receiver::attach(&mut self.session, name, address).await {
            Err(e) => Some(condition(format!("{e:?}"))),
            Ok(mut receiver) => {
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    receiver.recv::<Body<Value>>(),
                )
                .await
                {
                    Ok(Err(e)) => Some(condition(format!("{e:?}"))),
                    _ => None,
                }
            }
        }
    }

    async fn close(mut self) {
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

#[tokio::test]
async fn a_link_without_a_token_is_detached_unauthorized() {
    let t = common::start().await;
    t.device("amqp-d1").await;
    let mut client = open(&t, None).await.unwrap();
    let error = client.refused_receiver("/devices/amqp-d1/twin").await;
    let error = error.expect("the hub must refuse the link");
    assert!(error.contains("unauthorizedaccess"), "{error}");
    client.close().await;
}

#[tokio::test]
async fn a_token_for_one_device_does_not_open_another() {
    let t = common::start().await;
    let key1 = t.device("amqp-a").await;
    t.device("amqp-b").await;
    let mut client = open(&t, None).await.unwrap();
    let status = client
        .put_token(
            "localhost/devices/amqp-a",
            &identity_token("amqp-a", None, &key1),
        )
        .await;
    assert_eq!(status, 200);
    // Its own twin works …
    assert!(client
        .refused_receiver("/devices/amqp-a/twin")
        .await
        .is_none());
    // … another device's twin, methods and cloud-to-device queue do not, nor the service side.
    for address in [
        "/devices/amqp-b/twin",
        "/devices/amqp-b/methods/devicebound",
        "/devices/amqp-b/messages/devicebound",
        "/messages/serviceBound/feedback",
    ] {
        let error = client.refused_receiver(address).await;
        let error = error.unwrap_or_else(|| panic!("{address} must be refused"));
        assert!(error.contains("unauthorizedaccess"), "{address}: {error}");
    }
    client.close().await;
}

#[tokio::test]
async fn bad_tokens_get_401_and_unknown_addresses_not_found() {
    let t = common::start().await;
    t.device("amqp-c").await;
    let mut client = open(&t, None).await.unwrap();
    let wrong_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    assert_eq!(
        client
            .put_token(
                "localhost/devices/amqp-c",
                &identity_token("amqp-c", None, wrong_key)
            )
            .await,
        401
    );
    assert_eq!(client.put_token("localhost", "not a token").await, 401);
    let error = client
        .refused_receiver("/no/such/node")
        .await
        .expect("refused");
    assert!(error.contains("notfound"), "{error}");
    // The connection still works after all that.
    assert_eq!(
        client
            .put_token("localhost", &policy_token("iothubowner"))
            .await,
        200
    );
    client.close().await;
}

#[tokio::test]
async fn sasl_plain_with_a_bad_password_is_refused_and_a_good_one_authenticates() {
    use fe2o3_amqp::sasl_profile::SaslProfile;
    let t = common::start().await;
    let key = t.device("amqp-plain").await;
    let bad = open(
        &t,
        Some(SaslProfile::Plain {
            username: "amqp-plain@sas.localhost".into(),
            password: "SharedAccessSignature sr=x&sig=y&se=1".into(),
        }),
    )
    .await;
    assert!(
        bad.is_err(),
        "a bad PLAIN password must fail the SASL exchange"
    );

    let mut good = open(
        &t,
        Some(SaslProfile::Plain {
            username: "amqp-plain@sas.localhost".into(),
            password: identity_token("amqp-plain", None, &key),
        }),
    )
    .await
    .unwrap();
    assert!(good
        .refused_receiver("/devices/amqp-plain/twin")
        .await
        .is_none());
    good.close().await;
}

#[tokio::test]
async fn malformed_frames_end_only_that_connection() {
    let t = common::start().await;
    let key = t.device("amqp-m").await;
    let mut good = open(&t, None).await.unwrap();
    assert_eq!(
        good.put_token(
            "localhost/devices/amqp-m",
            &identity_token("amqp-m", None, &key)
        )
        .await,
        200
    );

    // A bad protocol header gets the supported one back, then the end.
    let mut raw = t.tls_stream(t.amqp).await;
    raw.write_all(b"HTTP/1.1").await.unwrap();
    let mut header = [0u8; 8];
    raw.read_exact(&mut header).await.unwrap();
    assert_eq!(&header, b"AMQP\x03\x01\x00\x00");
    assert_eq!(
        tokio::time::timeout(WAIT, raw.read(&mut header))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );

    // After a valid header and Open, a frame of garbage ends that connection.
    let garbage = [0, 0, 0, 16, 2, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4];
    let open_frame = [
        0, 0, 0, 17, 2, 0, 0, 0, 0x00, 0x53, 0x10, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'x',
    ];
    let mut raw = t.tls_stream(t.amqp).await;
    raw.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    raw.write_all(&open_frame).await.unwrap();
    raw.write_all(&garbage).await.unwrap();
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;
    assert!(
        ended.is_ok(),
        "the hub must close a connection that sent garbage"
    );
    assert!(
        sink.starts_with(b"AMQP\x00\x01\x00\x00"),
        "the hub answered the header"
    );

    // Garbage instead of Open: the connection ends at the latest when the open time-out
    // (10 s) passes.
    let mut raw = t.tls_stream(t.amqp).await;
    raw.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    raw.write_all(&garbage).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), raw.read_to_end(&mut sink)).await;
    assert!(
        ended.is_ok(),
        "the hub must close a connection that never opens"
    );

    // A frame claiming 2 GB ends its connection without the hub allocating it.
    let mut raw = t.tls_stream(t.amqp).await;
    raw.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    raw.write_all(&[0x7f, 0xff, 0xff, 0xff, 2, 0, 0, 0])
        .await
        .unwrap();
    let ended = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;
    assert!(
        ended.is_ok(),
        "the hub must close a connection with an oversized frame"
    );

    // The well-behaved connection is unaffected.
    assert!(good
        .refused_receiver("/devices/amqp-m/twin")
        .await
        .is_none());
    good.close().await;
}

#[tokio::test]
async fn a_telemetry_flood_is_accepted_in_order_and_a_twin_flood_without_reader_does_not_block() {
    let t = common::start().await;
    let key = t.device("amqp-f").await;
    let mut client = open(&t, None).await.unwrap();
    assert_eq!(
        client
            .put_token(
                "localhost/devices/amqp-f",
                &identity_token("amqp-f", None, &key)
            )
            .await,
        200
    );
    let mut events = Sender::attach(
        &mut client.session,
        "events",
        "/devices/amqp-f/messages/events",
    )
    .await
    .unwrap();
    let mut pending = Vec::new();
    for i in 0..500 {
        let fut = events.send_batchable(format!("m{i}")).await.unwrap();
        pending.push(fut);
    }
    for fut in pending {
        assert!(matches!(fut.await.unwrap(), Outcome::Accepted(_)));
    }
    // Every one was recorded (the log keeps only the newest per shard, so count sequence numbers).
    assert_eq!(t.hub.telemetry().last_sequence(), 500);

    // Twin requests whose responses nobody reads (no receiver on the twin node): the requests
    // are still settled, and the connection stays usable.
    let mut twin = Sender::attach(&mut client.session, "twin-out", "/devices/amqp-f/twin")
        .await
        .unwrap();
    for _ in 0..300 {
        let mut annotations = fe2o3_amqp::types::primitives::OrderedMap::new();
        annotations.insert(
            fe2o3_amqp::types::primitives::Symbol::from("operation").into(),
            Value::String("GET".into()),
        );
        let message = Message::builder()
            .message_annotations(fe2o3_amqp::types::messaging::MessageAnnotations(
                annotations,
            ))
            .data(fe2o3_amqp::types::primitives::Binary::from(Vec::new()))
            .build();
        let outcome = tokio::time::timeout(WAIT, twin.send(message))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)));
    }
    let _ = twin.close().await;
    let _ = events.close().await;
    client.close().await;
}

#[tokio::test]
async fn a_token_that_expires_without_renewal_closes_the_connection() {
    use iothub_emulator::auth::{sas::make_token, SymmetricKey};
    let t = common::start().await;
    let key = t.device("amqp-exp").await;
    let mut client = open(&t, None).await.unwrap();
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = make_token(
        "localhost/devices/amqp-exp",
        &SymmetricKey::parse(&key).unwrap(),
        None,
        expiry,
    );
    assert_eq!(
        client.put_token("localhost/devices/amqp-exp", &token).await,
        200
    );
    let mut twin = Receiver::attach(&mut client.session, "twin-in", "/devices/amqp-exp/twin")
        .await
        .unwrap();
    // The hub closes the connection when the token expires (within about 3 s), so the link
    // ends with an error rather than waiting forever.
    let ended = tokio::time::timeout(Duration::from_secs(6), twin.recv::<Body<Value>>()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "the link must end when the connection's only token expires"
    );
    let key = iothub_emulator::registry::IdentityKey::device("amqp-exp");
    let deadline = std::time::Instant::now() + WAIT;
    while t.hub.connections().is_connected(&key) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !t.hub.connections().is_connected(&key),
        "the identity must be offline"
    );
}

/// Scenario (`az iot hub monitor-events` with the IoT Hub connection string): a client that
/// authenticated with SASL PLAIN as `iothubowner@sas.root.{hub}` and attaches a receiver on
/// `messages/events/$management` is detached with `amqp:link:redirect`, naming the Event
/// Hub-compatible address and this hub's AMQP port; it can then attach there. Without a
/// token with ServiceConnect the same link is refused as unauthorized.
#[tokio::test]
async fn messages_events_redirects_to_the_event_hub_compatible_endpoint() {
    use fe2o3_amqp::sasl_profile::SaslProfile;
    let t = common::start().await;
    let mut owner = open(
        &t,
        Some(SaslProfile::Plain {
            username: "iothubowner@sas.root.localhost".into(),
            password: policy_token("iothubowner"),
        }),
    )
    .await
    .unwrap();
    let refused = owner
        .refused_receiver("amqps://localhost/messages/events/$management")
        .await
        .expect("the link must be detached");
    assert!(refused.contains("redirect"), "{refused}");
    let entity = t.hub.event_hub_name().to_ascii_lowercase();
    assert!(
        refused.contains(&format!("amqps://localhost/{entity}/$management")),
        "{refused}"
    );
    assert!(refused.contains(&t.amqp.port().to_string()), "{refused}");
    // The redirected address is served.
    assert!(owner
        .refused_receiver(&format!("amqps://localhost/{entity}/$management"))
        .await
        .is_none());
    owner.close().await;

    let key = t.device("amqp-redirect").await;
    let mut device = open(
        &t,
        Some(SaslProfile::Plain {
            username: "amqp-redirect@sas.localhost".into(),
            password: identity_token("amqp-redirect", None, &key),
        }),
    )
    .await
    .unwrap();
    let refused = device
        .refused_receiver("/messages/events/ConsumerGroups/$Default/Partitions/0")
        .await
        .expect("the link must be detached");
    assert!(refused.contains("unauthorized"), "{refused}");
    device.close().await;
}

/// Scenario (the Node SDK's AMQP transport with X.509: TLS client certificate, no SASL, no
/// `$cbs`): a selfSigned device's links attach on the strength of its certificate alone; the
/// same connection cannot attach another device's links, and a connection without a
/// certificate cannot attach the device's.
#[tokio::test]
async fn a_client_certificate_authenticates_amqp_links_without_a_token() {
    let t = common::start().await;
    let (cert, key, thumbprint) = common::self_signed("amqp-x509");
    t.http()
        .send(
            "PUT",
            "/devices/amqp-x509",
            Some(serde_json::json!({"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint": thumbprint}}})),
            &[],
        )
        .await
        .expect_status(200);
    t.device("amqp-sas").await;

    let mut client = open_with_cert(&t, None, Some((&cert, &key))).await.unwrap();
    assert!(client
        .refused_receiver("/devices/amqp-x509/twin")
        .await
        .is_none());
    let mut events = Sender::attach(
        &mut client.session,
        "x509-events",
        "/devices/amqp-x509/messages/events",
    )
    .await
    .unwrap();
    let outcome = tokio::time::timeout(WAIT, events.send("over x509".to_owned()))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    let refused = client
        .refused_receiver("/devices/amqp-sas/twin")
        .await
        .expect("another device's link must be refused");
    assert!(refused.contains("unauthorized"), "{refused}");
    let _ = events.close().await;
    client.close().await;

    let mut anonymous = open(&t, None).await.unwrap();
    assert!(anonymous
        .refused_receiver("/devices/amqp-x509/twin")
        .await
        .is_some());
    anonymous.close().await;
}

// ----- raw frames, for attaches fe2o3-amqp's own client cannot send -----

fn raw_frame(channel: u16, performative: &[u8]) -> Vec<u8> {
    let mut f = ((8 + performative.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(performative);
    f
}

fn list8(descriptor: u8, elements: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = elements.concat();
    let mut out = vec![
        0x00,
        0x53,
        descriptor,
        0xc0,
        (body.len() + 1) as u8,
        elements.len() as u8,
    ];
    out.extend_from_slice(&body);
    out
}

fn str8(s: &str) -> Vec<u8> {
    let mut out = vec![0xa1, s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// An attach: `sender` is the client's role; `None` leaves the terminus out.
fn raw_attach(
    name: &str,
    handle: u8,
    sender: bool,
    source: Option<&str>,
    target: Option<&str>,
) -> Vec<u8> {
    let terminus = |code: u8, address: Option<&str>| match address {
        Some(a) => list8(code, &[&str8(a)]),
        None => vec![0x40],
    };
    let role = if sender { 0x42 } else { 0x41 };
    raw_frame(
        0,
        &list8(
            0x12,
            &[
                &str8(name),
                &[0x52, handle],
                &[role],
                &[0x40],
                &[0x40],
                &terminus(0x28, source),
                &terminus(0x29, target),
                &[0x40],
                &[0x40],
                &[0x43],
            ],
        ),
    )
}

/// Reads frames until one with performative `code` whose bytes contain `needle`; panics after
/// [`WAIT`].
async fn expect_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    buf: &mut Vec<u8>,
    code: u8,
    needle: &[u8],
) {
    let found = async {
        loop {
            while buf.len() >= 8 && buf[..4] != *b"AMQP" {
                let size = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                if buf.len() < size {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..size).collect();
                let doff = usize::from(frame[4]) * 4;
                let body = &frame[doff..];
                if body.starts_with(&[0x00, 0x53, code])
                    && (needle.is_empty() || body.windows(needle.len()).any(|w| w == needle))
                {
                    return;
                }
            }
            if buf.starts_with(b"AMQP") {
                buf.drain(..8);
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the hub closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, found).await.unwrap_or_else(|_| {
        panic!(
            "no performative {code:#x} containing {:?}",
            String::from_utf8_lossy(needle)
        )
    });
}

/// Scenario: attaches the AMQP engine cannot take as they are get an answer instead of
/// silence: a sender without a target is attached and detached with `amqp:invalid-field`, and
/// later attaches of the session are still served; a second link of a name already attached in
/// the session ends the session with `amqp:invalid-field`.
#[tokio::test]
async fn attaches_the_engine_refuses_are_answered_not_left_waiting() {
    let t = common::start().await;
    let mut raw = t.tls_stream(t.amqp).await;
    let open = raw_frame(0, &list8(0x10, &[&str8("raw")]));
    let begin = raw_frame(
        0,
        &list8(
            0x11,
            &[
                &[0x40],
                &[0x43],
                &[0x70, 0, 0, 0, 100],
                &[0x70, 0, 0, 0, 100],
            ],
        ),
    );
    raw.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    raw.write_all(&open).await.unwrap();
    raw.write_all(&begin).await.unwrap();
    let mut buf = Vec::new();
    expect_frame(&mut raw, &mut buf, 0x11, b"").await;

    raw.write_all(&raw_attach("no-target", 0, true, Some("raw"), None))
        .await
        .unwrap();
    expect_frame(&mut raw, &mut buf, 0x16, b"amqp:invalid-field").await;
    raw.write_all(&raw_attach("after", 1, true, Some("raw"), Some("$cbs")))
        .await
        .unwrap();
    expect_frame(&mut raw, &mut buf, 0x12, b"after").await;

    raw.write_all(&raw_attach("twice", 2, true, Some("raw"), Some("$cbs")))
        .await
        .unwrap();
    expect_frame(&mut raw, &mut buf, 0x12, b"twice").await;
    raw.write_all(&raw_attach("twice", 3, false, Some("$cbs"), Some("raw")))
        .await
        .unwrap();
    expect_frame(&mut raw, &mut buf, 0x17, b"amqp:invalid-field").await;
}
