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
        certs_dir,
        extra_sans: vec![],
        policies: default_policies(),
        max_modules_per_device: 50,
    }
}

/// Starts a hub on 127.0.0.1 with ephemeral ports.
pub async fn start() -> TestHub {
    start_with(|_| {}).await
}

pub async fn start_with(customise: impl FnOnce(&mut Config)) -> TestHub {
    let certs = tempfile::tempdir().unwrap();
    let mut config = config(certs.path().to_owned());
    customise(&mut config);
    let tls = tls::setup(&config.certs_dir, &config.host_names(), None).unwrap();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mqtt = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (https_addr, mqtt_addr) = (https.local_addr().unwrap(), mqtt.local_addr().unwrap());
    let hub = Hub::new(&config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(iothub_emulator::run(
        hub.clone(),
        Listeners { https, mqtt },
        tls.server_config,
        async move {
            let _ = stopped.await;
        },
    ));
    TestHub {
        hub,
        https: https_addr,
        mqtt: mqtt_addr,
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
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(HOST, self.https)
            .build()
            .unwrap();
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
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
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
        let url = format!("{}{path}?api-version=2021-04-12", self.base);
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
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }
}
