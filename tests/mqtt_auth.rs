//! MQTT authentication beyond SAS basics: X.509 client certificates and token expiry.
//! (Wrong keys, unknown and disabled identities are in `mqtt_protocol.rs`.)

mod common;

use common::{client_id, mqtt_username, self_signed, start, HOST};
use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::SymmetricKey;
use rumqttc::mqttbytes::v4 as mqtt;
use serde_json::json;
use sha1::Digest;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// DER: tag, length, content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(content);
    out
}

/// The DER Name `CN=<cn>`.
fn cn_name(cn: &str) -> Vec<u8> {
    let oid_cn = [0x06, 0x03, 0x55, 0x04, 0x03];
    let atv = der(0x30, &[&oid_cn[..], &der(0x0c, cn.as_bytes())].concat());
    der(0x30, &der(0x31, &atv))
}

/// An X.509 **v1** certificate, as OpenSSL's simplest commands (`openssl x509 -req`, the
/// Node SDK's `pem` package) make it: no version field, no extensions. Subject `CN=<cn>`,
/// the key of `subject`, signed (ECDSA P-256, SHA-256) by `issuer_key` in the name of the
/// DER Name `issuer`. Returns the certificate as PEM.
fn v1_certificate(
    cn: &str,
    serial: u8,
    subject: &rcgen::KeyPair,
    issuer: &[u8],
    issuer_key: &rcgen::KeyPair,
) -> String {
    use base64::Engine;
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let ecdsa_sha256 = der(
        0x30,
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],
    );
    let validity = der(
        0x30,
        &[der(0x17, b"250101000000Z"), der(0x17, b"491231235959Z")].concat(),
    );
    let tbs = der(
        0x30,
        &[
            der(0x02, &[serial]),
            ecdsa_sha256.clone(),
            issuer.to_vec(),
            validity,
            cn_name(cn),
            subject.public_key_der(),
        ]
        .concat(),
    );
    let rng = ring::rand::SystemRandom::new();
    let signer = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &issuer_key.serialize_der(),
        &rng,
    )
    .unwrap();
    let signature = signer.sign(&rng, &tbs).unwrap();
    let bits = [&[0u8][..], signature.as_ref()].concat();
    let cert = der(0x30, &[tbs, ecdsa_sha256, der(0x03, &bits)].concat());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&cert);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// The SHA-1 thumbprint (hex) of a PEM certificate.
fn thumbprint_of(pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    sha1::Sha1::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
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

/// Scenario (the Node SDK's e2e certificates, made with OpenSSL's defaults): X.509 **v1**
/// certificates, which have no extensions, authenticate like any other:
/// - a self-signed v1 certificate, by its thumbprint; a v1 certificate with another key is
///   still refused
/// - a v1 leaf issued by a trusted (v3) CA with CN = the device id, by chain and CN; the same
///   leaf signed by an untrusted key is refused
#[tokio::test]
async fn x509_v1_certificates_authenticate_by_thumbprint_and_by_chain() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let self_key = KeyPair::generate().unwrap();
    let self_cert = v1_certificate("v1dev", 1, &self_key, &cn_name("v1dev"), &self_key);
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "v1 test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = v1_certificate("v1ca", 2, &leaf_key, &cn_name("v1 test CA"), &ca_key);
    let forged = v1_certificate("v1ca", 3, &leaf_key, &cn_name("v1 test CA"), &leaf_key);

    let trusted = rustls::pki_types::CertificateDer::from(ca.der().to_vec());
    let hub = common::start_with(|c| c.trusted_cas = vec![trusted]).await;
    let http = hub.http();
    http.send(
        "PUT",
        "/devices/v1dev",
        Some(json!({"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint": thumbprint_of(&self_cert)}}})),
        &[],
    )
    .await
    .expect_status(200);
    http.send(
        "PUT",
        "/devices/v1ca",
        Some(json!({"authentication":{"type":"certificateAuthority"}})),
        &[],
    )
    .await
    .expect_status(200);

    let code = |connack: Result<mqtt::ConnAck, rumqttc::ConnectionError>| match connack {
        Ok(ack) => ack.code,
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("unexpected error: {e}"),
    };
    let self_pem = self_key.serialize_pem();
    let (mut client, connack) = hub
        .mqtt_start(x509_options(&hub, "v1dev", &self_cert, &self_pem))
        .await;
    assert_eq!(code(connack), mqtt::ConnectReturnCode::Success);
    assert_eq!(client.twin_get("v1").await["reported"]["$version"], 1);

    let other_key = KeyPair::generate().unwrap();
    let other = v1_certificate("v1dev", 4, &other_key, &cn_name("v1dev"), &other_key);
    let (_c, connack) = hub
        .mqtt_start(x509_options(
            &hub,
            "v1dev",
            &other,
            &other_key.serialize_pem(),
        ))
        .await;
    assert_eq!(code(connack), mqtt::ConnectReturnCode::NotAuthorized);

    let leaf_pem = leaf_key.serialize_pem();
    let (mut client, connack) = hub
        .mqtt_start(x509_options(&hub, "v1ca", &leaf, &leaf_pem))
        .await;
    assert_eq!(code(connack), mqtt::ConnectReturnCode::Success);
    assert_eq!(client.twin_get("v1ca").await["reported"]["$version"], 1);
    let (_c, connack) = hub
        .mqtt_start(x509_options(&hub, "v1ca", &forged, &leaf_pem))
        .await;
    assert_eq!(code(connack), mqtt::ConnectReturnCode::NotAuthorized);
}
