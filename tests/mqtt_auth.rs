//! MQTT authentication beyond SAS basics: X.509 client certificates and token expiry.
//! (Wrong keys, unknown and disabled identities are in `mqtt_protocol.rs`.)

mod common;

use common::{client_id, mqtt_username, start, HOST};
use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::SymmetricKey;
use rumqttc::mqttbytes::v4 as mqtt;
use serde_json::json;
use sha1::Digest;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A self-signed client certificate: (certificate PEM, key PEM, SHA-1 thumbprint in hex).
fn self_signed(cn: &str) -> (String, String, String) {
    let certified = rcgen::generate_simple_self_signed(vec![cn.to_owned()]).unwrap();
    let thumbprint: String = sha1::Sha1::digest(certified.cert.der())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    (
        certified.cert.pem(),
        certified.key_pair.serialize_pem(),
        thumbprint,
    )
}

fn x509_options(hub: &common::TestHub, id: &str, cert: &str, key: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(id, HOST, hub.mqtt.port());
    options.set_credentials(mqtt_username(id), "");
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: hub.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: Some((cert.as_bytes().to_vec(), key.as_bytes().to_vec())),
        },
    ));
    options
}

/// Scenario:
/// - a device registered as selfSigned with the SHA-1 thumbprint of its certificate connects
///   with that certificate and no password, and its twin GET is answered
/// - another certificate (the right CN, another key) is refused with CONNACK 5
#[tokio::test]
async fn self_signed_certificate_authenticates_by_thumbprint() {
    let hub = start().await;
    let (cert, key, thumbprint) = self_signed("x509dev");
    let http = hub.http();
    let created = http
        .send(
            "PUT",
            "/devices/x509dev",
            Some(json!({"deviceId":"x509dev","authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint": thumbprint}}})),
            &[],
        )
        .await
        .expect_status(200);
    assert_eq!(created["authentication"]["type"], "selfSigned");

    let (mut client, connack) = hub
        .mqtt_start(x509_options(&hub, "x509dev", &cert, &key))
        .await;
    assert_eq!(connack.unwrap().code, mqtt::ConnectReturnCode::Success);
    let twin = client.twin_get("r1").await;
    assert_eq!(twin["desired"]["$version"], 1);
    let device = http
        .send("GET", "/devices/x509dev", None, &[])
        .await
        .expect_status(200);
    assert_eq!(device["connectionState"], "Connected");

    let (other_cert, other_key, _) = self_signed("x509dev");
    let (_other, connack) = hub
        .mqtt_start(x509_options(&hub, "x509dev", &other_cert, &other_key))
        .await;
    let refused = match connack {
        Ok(ack) => ack.code,
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("unexpected error: {e}"),
    };
    assert_eq!(refused, mqtt::ConnectReturnCode::NotAuthorized);
}

/// Scenario: a SAS device cannot connect with only a certificate, and a certificateAuthority
/// device is refused when the hub trusts no CA (none in the config file).
#[tokio::test]
async fn certificates_do_not_authenticate_sas_or_unverifiable_ca_identities() {
    let hub = start().await;
    hub.device("sasdev").await;
    hub.http()
        .send(
            "PUT",
            "/devices/cadev",
            Some(json!({"deviceId":"cadev","authentication":{"type":"certificateAuthority"}})),
            &[],
        )
        .await
        .expect_status(200);
    for id in ["sasdev", "cadev"] {
        let (cert, key, _) = self_signed(id);
        let (_client, connack) = hub.mqtt_start(x509_options(&hub, id, &cert, &key)).await;
        let code = match connack {
            Ok(ack) => ack.code,
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
            Err(e) => panic!("unexpected error: {e}"),
        };
        assert_eq!(code, mqtt::ConnectReturnCode::NotAuthorized, "{id}");
    }
}

/// Scenario: a connection whose SAS token expires is closed by the hub when it does, and the
/// identity shows as disconnected (IoT Hub error 401003 / 404104 sections of DOC-ERR).
#[tokio::test]
async fn connection_closes_when_its_token_expires() {
    let hub = start().await;
    let key = hub.device("shortlived").await;
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = make_token(
        &format!("{HOST}/devices/shortlived"),
        &SymmetricKey::parse(&key).unwrap(),
        None,
        expiry,
    );
    let id = client_id("shortlived", None);
    let started = Instant::now();
    let (mut client, connack) = hub.mqtt_start(hub.mqtt_options(&id, &token)).await;
    assert_eq!(connack.unwrap().code, mqtt::ConnectReturnCode::Success);
    client.expect_closed().await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(900),
        "closed too early: {lived:?}"
    );
    assert!(
        lived <= Duration::from_secs(4),
        "closed too late: {lived:?}"
    );
}

/// A CA and certificates it issues for each of `cns`: (CA DER, [(leaf PEM, leaf key PEM)]).
fn ca_and_leaves(cns: &[&str]) -> (Vec<u8>, Vec<(String, String)>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Test device CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaves = cns
        .iter()
        .map(|cn| {
            let leaf_key = KeyPair::generate().unwrap();
            let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            leaf_params.distinguished_name.push(DnType::CommonName, *cn);
            let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
            (leaf.pem(), leaf_key.serialize_pem())
        })
        .collect();
    (ca.der().to_vec(), leaves)
}

/// Scenario (the seeds' `-subj "/CN=device01\/module01"`):
/// - with the CA trusted through the config, a certificateAuthority module connects with a
///   certificate whose CN is `device01/module01`
/// - a certificate from that CA for another CN, the right certificate presented for another
///   identity, and one from an untrusted CA with the right CN are refused with CONNACK 5
#[tokio::test]
async fn ca_signed_certificate_authenticates_by_chain_and_common_name() {
    let (ca_der, leaves) = ca_and_leaves(&["device01/module01", "device01/stranger"]);
    let [(leaf, leaf_key), (wrong_cn, wrong_cn_key)] = [leaves[0].clone(), leaves[1].clone()];
    let (_, untrusted) = ca_and_leaves(&["device01/module01"]);
    let (untrusted, untrusted_key) = untrusted[0].clone();
    let trusted = rustls::pki_types::CertificateDer::from(ca_der);
    let hub = common::start_with(|c| c.trusted_cas = vec![trusted]).await;
    let http = hub.http();
    http.send(
        "PUT",
        "/devices/device01",
        Some(json!({"authentication":{"type":"certificateAuthority"}})),
        &[],
    )
    .await
    .expect_status(200);
    for m in ["module01", "other"] {
        http.send(
            "PUT",
            &format!("/devices/device01/modules/{m}"),
            Some(json!({"authentication":{"type":"certificateAuthority"}})),
            &[],
        )
        .await
        .expect_status(200);
    }
    let (mut client, connack) = hub
        .mqtt_start(x509_options(&hub, "device01/module01", &leaf, &leaf_key))
        .await;
    assert_eq!(connack.unwrap().code, mqtt::ConnectReturnCode::Success);
    assert_eq!(client.twin_get("ca1").await["reported"]["$version"], 1);
    for (id, cert, key) in [
        // Trusted CA, but the CN names another module.
        ("device01/other", &wrong_cn, &wrong_cn_key),
        // The right CN, from a CA the hub does not trust.
        ("device01/module01", &untrusted, &untrusted_key),
        // A valid certificate presented for another identity.
        ("device01/other", &leaf, &leaf_key),
    ] {
        let (_c, connack) = hub.mqtt_start(x509_options(&hub, id, cert, key)).await;
        let code = match connack {
            Ok(ack) => ack.code,
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
            Err(e) => panic!("unexpected error: {e}"),
        };
        assert_eq!(code, mqtt::ConnectReturnCode::NotAuthorized, "{id}");
    }
}

/// Scenario: the `model-id` a device announces in its username (IoT Plug and Play) shows up as
/// the twin's `modelId`, and activity moves `lastActivityTime`.
#[tokio::test]
async fn model_id_from_the_username_reaches_the_twin() {
    let hub = start().await;
    let key = hub.device("pnp").await;
    let id = client_id("pnp", None);
    let token = common::identity_token("pnp", None, &key);
    let mut options = hub.mqtt_options(&id, &token);
    // As the Node SDK sends it: the dtmi is not URL-encoded.
    options.set_credentials(
        format!("{HOST}/pnp/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=x"),
        token,
    );
    let (mut client, connack) = hub.mqtt_start(options).await;
    assert_eq!(connack.unwrap().code, mqtt::ConnectReturnCode::Success);
    client.twin_get("r1").await;
    let twin = hub
        .http()
        .send("GET", "/twins/pnp", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin["modelId"], "dtmi:com:example:Thermostat;1");
    assert_ne!(twin["lastActivityTime"], "0001-01-01T00:00:00Z");
}
