//! Shared setup for the integration tests: a real hub on ephemeral loopback ports with a fresh
//! CA, an HTTPS client that trusts it, SAS token helpers, and MQTT clients (rumqttc for
//! well-behaved traffic, a raw TLS stream for hostile bytes).

#![allow(dead_code)]

use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::{default_policies, SymmetricKey, OWNER_KEY};
use iothub_emulator::config::Config;
use iothub_emulator::{tls, Hub, Listeners};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The host name test hubs use in connection strings and tokens.
pub const HOST: &str = "localhost";

/// A running hub; stops when dropped.
pub struct TestHub {
    pub hub: Hub,
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    pub amqp: SocketAddr,
    pub ca_pem: String,
    pub ca_path: PathBuf,
    _certs: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn config(certs_dir: PathBuf) -> Config {
    Config {
        hostname: HOST.to_owned(),
        bind: "127.0.0.1".parse().unwrap(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        certs_dir,
        extra_sans: vec![],
        policies: default_policies(),
        max_modules_per_device: 50,
        telemetry_capacity: 1000,
        seeds: Default::default(),
        trusted_cas: Vec::new(),
        routing: Default::default(),
    }
}

/// Starts a hub on 127.0.0.1 with ephemeral ports.
pub async fn start() -> TestHub {
    start_with(|_| {}).await
}

pub async fn start_with(customise: impl FnOnce(&mut Config)) -> TestHub {
    start_custom(
        customise,
        iothub_emulator::transport::ConnectionLimits::for_this_process(),
        Default::default(),
    )
    .await
}

/// A hub with its own connection limits and HTTPS timeouts (the hostile-client tests).
pub async fn start_custom(
    customise: impl FnOnce(&mut Config),
    limits: iothub_emulator::transport::ConnectionLimits,
    http_timeouts: iothub_emulator::http::Timeouts,
) -> TestHub {
    let certs = tempfile::tempdir().unwrap();
    let mut config = config(certs.path().to_owned());
    customise(&mut config);
    let tls = tls::setup(&config.certs_dir, &config.host_names(), None).unwrap();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mqtt = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let amqp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (https_addr, mqtt_addr) = (https.local_addr().unwrap(), mqtt.local_addr().unwrap());
    let amqp_addr = amqp.local_addr().unwrap();
    let hub = Hub::new(&config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(iothub_emulator::run(
        hub.clone(),
        Listeners {
            https,
            mqtt,
            amqp: Some(amqp),
            limits,
            http_timeouts,
        },
        tls.server_config,
        async move {
            let _ = stopped.await;
        },
    ));
    TestHub {
        hub,
        https: https_addr,
        mqtt: mqtt_addr,
        amqp: amqp_addr,
        ca_pem: std::fs::read_to_string(&tls.ca_path).unwrap(),
        ca_path: tls.ca_path,
        _certs: certs,
        stop: Some(stop),
    }
}

pub fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

pub fn owner_key() -> SymmetricKey {
    SymmetricKey::parse(OWNER_KEY).unwrap()
}

/// A service token for a built-in policy.
pub fn policy_token(policy: &str) -> String {
    let key = default_policies()
        .into_iter()
        .find(|p| p.name == policy)
        .unwrap()
        .primary_key;
    make_token(HOST, &key, Some(policy), in_an_hour())
}

/// A device or module token signed with its own key.
pub fn identity_token(device: &str, module: Option<&str>, key: &str) -> String {
    let resource = match module {
        Some(m) => format!("{HOST}/devices/{device}/modules/{m}"),
        None => format!("{HOST}/devices/{device}"),
    };
    make_token(
        &resource,
        &SymmetricKey::parse(key).unwrap(),
        None,
        in_an_hour(),
    )
}

impl TestHub {
    /// An HTTPS client that trusts this hub's CA and resolves `localhost` to it.
    pub fn http(&self) -> Http {
        self.http_client(None)
    }

    /// [`Self::http`] presenting a client certificate (PEM certificate and key) in the TLS
    /// handshake, as an X.509 device does.
    #[allow(dead_code)] // not every test binary presents certificates
    pub fn http_as(&self, cert_pem: &str, key_pem: &str) -> Http {
        let identity = reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes());
        self.http_client(Some(identity.unwrap()))
    }

    fn http_client(&self, identity: Option<reqwest::Identity>) -> Http {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(HOST, self.https);
        if let Some(identity) = identity {
            builder = builder.identity(identity);
        }
        let client = builder.build().unwrap();
        Http {
            client,
            base: format!("https://{HOST}:{}", self.https.port()),
            token: policy_token("iothubowner"),
        }
    }

    /// Creates a device and returns its primary key.
    pub async fn device(&self, id: &str) -> String {
        let body = self
            .http()
            .send(
                "PUT",
                &format!("/devices/{id}"),
                Some(serde_json::json!({"deviceId": id})),
                &[],
            )
            .await
            .expect_status(200);
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Creates a module (its device must exist) and returns its primary key.
    pub async fn module(&self, device: &str, module: &str) -> String {
        let body = self
            .http()
            .send(
                "PUT",
                &format!("/devices/{device}/modules/{module}"),
                Some(serde_json::json!({"deviceId": device, "moduleId": module})),
                &[],
            )
            .await
            .expect_status(200);
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A rustls client config trusting this hub's CA (for raw MQTT sockets).
    pub fn tls_client(&self) -> Arc<rustls::ClientConfig> {
        self.tls_client_with_cert(None)
    }

    /// Like [`tls_client`](Self::tls_client), presenting a client certificate (PEM chain and
    /// key) when given one.
    pub fn tls_client_with_cert(&self, cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match cert {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = rustls_pemfile::certs(&mut chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = rustls_pemfile::private_key(&mut key.as_bytes())
                    .unwrap()
                    .unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Arc::new(config)
    }
}

/// A service-side HTTPS client with a token.
pub struct Http {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
}

/// A response: status, headers and parsed body.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn expect_status(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        self.body
    }

    /// The IoT Hub error code name from `iothub-errorcode`.
    pub fn error_code(&self) -> &str {
        self.headers
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Http {
    pub fn with_token(mut self, token: String) -> Self {
        self.token = token;
        self
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.send_raw(method, path, body.map(|b| b.to_string()), headers)
            .await
    }

    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_send_raw(method, path, body, headers)
            .await
            .unwrap()
    }

    /// Like [`send_raw`](Self::send_raw), but a transport failure (the server went away) is an
    /// error instead of a panic.
    pub async fn try_send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{separator}api-version=2021-04-12", self.base);
        let mut request = self
            .client
            .request(method.parse().unwrap(), url)
            .header("Authorization", &self.token);
        if let Some(b) = body {
            request = request
                .header("Content-Type", "application/json; charset=utf-8")
                .body(b);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

// ----- MQTT clients (appended for tests/mqtt_*.rs) -----

use bytes::BytesMut;
use rumqttc::mqttbytes::v4 as mqtt;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single expectation on a socket may wait, so a failing test never hangs.
pub const WAIT: Duration = Duration::from_secs(5);

/// The Node SDK's username: `{HostName}/{clientId}/?api-version=…` (`shared/protocol.md` C.2).
pub fn mqtt_username(client_id: &str) -> String {
    format!("{HOST}/{client_id}/?api-version=2021-04-12")
}

/// `{deviceId}` or `{deviceId}/{moduleId}`.
pub fn client_id(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_owned(),
    }
}

/// What a [`MqttClient`] saw from the hub, in arrival order.
#[derive(Debug)]
pub enum Seen {
    Packet(rumqttc::Packet),
    /// The connection ended: refused, closed by the hub, or after our DISCONNECT.
    Closed(rumqttc::ConnectionError),
}

/// A well-behaved MQTT client (rumqttc over TLS). A task drives its event loop and forwards
/// every incoming packet; it stops at the first connection error, so the client never
/// reconnects behind a test's back.
pub struct MqttClient {
    pub id: String,
    pub client: rumqttc::AsyncClient,
    seen: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    /// Publishes that arrived while waiting for something else, in order.
    backlog: VecDeque<rumqttc::Publish>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl TestHub {
    /// rumqttc options for `client_id` with a SAS token as password, trusting the hub's CA.
    pub fn mqtt_options(&self, client_id: &str, password: &str) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(client_id, HOST, self.mqtt.port());
        options.set_credentials(mqtt_username(client_id), password);
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca: self.ca_pem.clone().into_bytes(),
                alpn: None,
                client_auth: None,
            },
        ));
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// Starts a client and returns it with its CONNACK (or why the connection ended).
    pub async fn mqtt_start(
        &self,
        options: rumqttc::MqttOptions,
    ) -> (MqttClient, Result<mqtt::ConnAck, rumqttc::ConnectionError>) {
        let id = options.client_id();
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 16);
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(rumqttc::Event::Incoming(packet)) => {
                        if tx.send(Seen::Packet(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(e));
                        return;
                    }
                }
            }
        });
        let mut client = MqttClient {
            id,
            client,
            seen,
            backlog: VecDeque::new(),
            pump,
        };
        let connack = match client.recv("CONNACK").await {
            Seen::Packet(rumqttc::Packet::ConnAck(ack)) => Ok(ack),
            Seen::Closed(e) => Err(e),
            Seen::Packet(other) => panic!("{}: expected CONNACK, got {other:?}", client.id),
        };
        (client, connack)
    }

    /// Connects `device` (or its `module`) with a SAS token signed by `key`; panics unless the
    /// hub accepts.
    pub async fn mqtt_connect(&self, device: &str, module: Option<&str>, key: &str) -> MqttClient {
        let id = client_id(device, module);
        let token = identity_token(device, module, key);
        let (client, connack) = self.mqtt_start(self.mqtt_options(&id, &token)).await;
        match connack {
            Ok(ack) => assert_eq!(ack.code, mqtt::ConnectReturnCode::Success, "{id}"),
            Err(e) => panic!("{id}: the hub refused the connection: {e}"),
        }
        client
    }

    /// A TLS connection to the MQTT port on which the test writes raw bytes.
    pub async fn raw_mqtt(&self) -> RawMqtt {
        self.raw_tls(self.mqtt).await
    }

    /// A TLS stream to `addr`, trusting the hub's CA.
    pub async fn tls_stream(&self, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
        self.tls_stream_with_cert(addr, None).await
    }

    /// A TLS stream to `addr` that presents a client certificate (PEM chain, PEM key).
    pub async fn tls_stream_with_cert(
        &self,
        addr: SocketAddr,
        cert: Option<(&str, &str)>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let server_name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
            tokio_rustls::TlsConnector::from(self.tls_client_with_cert(cert))
                .connect(server_name, tcp)
                .await
                .unwrap()
        };
        tokio::time::timeout(WAIT, connect)
            .await
            .expect("TLS handshake timed out")
    }

    /// A raw TLS connection to `addr` (the MQTT or the HTTPS port), trusting the hub's CA.
    pub async fn raw_tls(&self, addr: SocketAddr) -> RawMqtt {
        self.raw_tls_with_cert(addr, None).await
    }

    /// Like [`raw_tls`](Self::raw_tls), presenting a client certificate (PEM chain, PEM key).
    pub async fn raw_tls_with_cert(&self, addr: SocketAddr, cert: Option<(&str, &str)>) -> RawMqtt {
        let stream = self.tls_stream_with_cert(addr, cert).await;
        RawMqtt {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A raw connection that has sent CONNECT for `device`/`module` and received CONNACK 0.
    pub async fn raw_mqtt_connected(
        &self,
        device: &str,
        module: Option<&str>,
        key: &str,
        keep_alive: u16,
    ) -> RawMqtt {
        let mut raw = self.raw_mqtt().await;
        let id = client_id(device, module);
        raw.send(&connect_packet(
            &id,
            &identity_token(device, module, key),
            keep_alive,
            true,
        ))
        .await;
        match raw.read_packet().await {
            mqtt::Packet::ConnAck(ack) => {
                assert_eq!(ack.code, mqtt::ConnectReturnCode::Success, "{id}");
            }
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
        raw
    }
}

impl MqttClient {
    /// The next thing the client saw; panics after [`WAIT`].
    async fn recv(&mut self, waiting_for: &str) -> Seen {
        match tokio::time::timeout(WAIT, self.seen.recv()).await {
            Ok(Some(seen)) => seen,
            Ok(None) => panic!(
                "{}: the connection had already ended while waiting for {waiting_for}",
                self.id
            ),
            Err(_) => panic!("{}: no {waiting_for} within {WAIT:?}", self.id),
        }
    }

    /// Publishes at QoS 0.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
            .await
            .unwrap_or_else(|e| panic!("{}: publish {topic}: {e}", self.id));
    }

    /// Subscribes (QoS 1, as the Python SDK does) and returns the SUBACK code.
    pub async fn subscribe(&mut self, filter: &str) -> mqtt::SubscribeReasonCode {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap_or_else(|e| panic!("{}: subscribe {filter}: {e}", self.id));
        loop {
            match self.recv("SUBACK").await {
                Seen::Packet(rumqttc::Packet::SubAck(ack)) => {
                    assert_eq!(ack.return_codes.len(), 1, "{}", self.id);
                    return ack.return_codes[0];
                }
                Seen::Packet(rumqttc::Packet::Publish(p)) => self.backlog.push_back(p),
                Seen::Packet(_) => {}
                Seen::Closed(e) => panic!("{}: closed while waiting for SUBACK: {e}", self.id),
            }
        }
    }

    /// Subscribes and asserts the hub granted it.
    pub async fn subscribe_ok(&mut self, filter: &str) {
        let code = self.subscribe(filter).await;
        assert!(
            matches!(code, mqtt::SubscribeReasonCode::Success(_)),
            "{}: SUBACK {code:?} for {filter}",
            self.id
        );
    }

    /// The next PUBLISH from the hub; panics if the connection ends first or after [`WAIT`].
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        if let Some(p) = self.backlog.pop_front() {
            return p;
        }
        loop {
            match self.recv("PUBLISH").await {
                Seen::Packet(rumqttc::Packet::Publish(p)) => return p,
                Seen::Packet(_) => {}
                Seen::Closed(e) => panic!("{}: closed while waiting for a PUBLISH: {e}", self.id),
            }
        }
    }

    /// Waits for the connection to end and returns why.
    pub async fn expect_closed(&mut self) -> rumqttc::ConnectionError {
        loop {
            if let Seen::Closed(e) = self.recv("the connection to close").await {
                return e;
            }
        }
    }

    /// Asserts that no PUBLISH arrives (and the connection stays up) for `quiet`.
    pub async fn expect_no_publish(&mut self, quiet: Duration) {
        if let Some(p) = self.backlog.front() {
            panic!("{}: unexpected PUBLISH on {}", self.id, p.topic);
        }
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Err(_) => return,
                Ok(Some(Seen::Packet(rumqttc::Packet::Publish(p)))) => panic!(
                    "{}: unexpected PUBLISH on {}: {}",
                    self.id,
                    p.topic,
                    String::from_utf8_lossy(&p.payload)
                ),
                Ok(Some(Seen::Packet(_))) => {}
                Ok(Some(Seen::Closed(e))) => panic!("{}: connection closed: {e}", self.id),
                Ok(None) => panic!("{}: the connection had already ended", self.id),
            }
        }
    }

    /// `$iothub/twin/GET` with the SDKs' one-space body; returns the 200 response body.
    pub async fn twin_get(&mut self, rid: &str) -> Value {
        self.publish(&format!("$iothub/twin/GET/?$rid={rid}"), " ")
            .await;
        let response = self.next_publish().await;
        assert_eq!(
            response.topic,
            format!("$iothub/twin/res/200/?$rid={rid}"),
            "{}: body {}",
            self.id,
            String::from_utf8_lossy(&response.payload)
        );
        serde_json::from_slice(&response.payload).unwrap()
    }

    /// Sends DISCONNECT and waits until the connection has ended.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.expect_closed().await;
    }
}

/// The CONNECT packet the SDKs send (MQTT 3.1.1, username per C.2, SAS token as password).
pub fn connect_packet(client_id: &str, password: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
    let mut connect = mqtt::Connect::new(client_id);
    connect.keep_alive = keep_alive;
    connect.clean_session = clean;
    connect.set_login(mqtt_username(client_id), password);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).unwrap();
    buf.to_vec()
}

/// A raw MQTT byte stream over TLS, for input no well-behaved client would send.
pub struct RawMqtt {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawMqtt {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next packet from the hub; panics on end of stream or after [`WAIT`].
    pub async fn read_packet(&mut self) -> mqtt::Packet {
        let read = async {
            loop {
                match mqtt::read(&mut self.buf, 1024 * 1024) {
                    Ok(packet) => return packet,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the hub sent a malformed packet: {e:?}"),
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "the hub closed the connection");
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("no packet from the hub in time")
    }

    /// Waits for the hub to close the connection (end of stream or a reset) and returns how
    /// long that took; panics after [`WAIT`].
    pub async fn expect_closed(&mut self) -> Duration {
        let started = tokio::time::Instant::now();
        let closed = async {
            let mut scratch = [0u8; 4096];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, closed)
            .await
            .expect("the hub did not close the connection in time");
        started.elapsed()
    }
}

/// A self-signed client certificate: (certificate PEM, key PEM, SHA-1 thumbprint in hex).
#[allow(dead_code)] // not every test binary presents certificates
pub fn self_signed(cn: &str) -> (String, String, String) {
    use sha1::Digest;
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
