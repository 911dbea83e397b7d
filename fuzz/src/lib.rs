//! What the fuzz targets share: one hub with a known device and module, a runtime to drive
//! async front ends, and helpers to feed bytes to a stream service.

use iothub_emulator::auth::sas::make_token;
use iothub_emulator::auth::{default_policies, SymmetricKey, OWNER_KEY};
use iothub_emulator::config::Config;
use iothub_emulator::registry::IfMatch;
use iothub_emulator::transport::StreamService;
use iothub_emulator::Hub;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const HOST: &str = "fuzz.azure-devices.net";
pub const DEVICE: &str = "fuzz-device";
pub const MODULE: &str = "fuzz-module";
/// The device's primary key (base64 of 32 bytes).
pub const DEVICE_KEY: &str = "ZnV6ei1kZXZpY2Uta2V5LWZvci10aGUtZnV6emVycyE=";

/// Far enough in the future for any run.
const EXPIRY: u64 = 4_102_444_800;

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// One hub for the whole run, with `fuzz-device` (SAS) and its module `fuzz-module`.
pub fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| {
        let hub = Hub::new(&config());
        seed(&hub);
        hub
    })
}

/// Forgets what an input created and puts the known identities back, so that a long run
/// neither grows without bound nor depends on the order of its inputs.
pub fn reset() {
    hub().registry().clear();
    seed(hub());
}

fn seed(hub: &Hub) {
    let sas = json!({"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": DEVICE_KEY, "secondaryKey": DEVICE_KEY}}});
    let body = sas.as_object().unwrap();
    hub.registry()
        .put_device(DEVICE, body, &IfMatch::Absent)
        .expect("the fuzz device");
    hub.registry()
        .put_module(DEVICE, MODULE, body, &IfMatch::Absent)
        .expect("the fuzz module");
}

fn config() -> Config {
    Config {
        hostname: HOST.to_owned(),
        bind: "127.0.0.1".parse().unwrap(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        certs_dir: std::env::temp_dir(),
        extra_sans: vec![],
        policies: default_policies(),
        max_modules_per_device: 50,
        telemetry_capacity: 100,
        seeds: Default::default(),
        trusted_cas: Vec::new(),
        routing: Default::default(),
    }
}

/// A device SAS token for `fuzz-device`.
pub fn device_token() -> String {
    let key = SymmetricKey::parse(DEVICE_KEY).unwrap();
    make_token(&format!("{HOST}/devices/{DEVICE}"), &key, None, EXPIRY)
}

/// A service token of the `iothubowner` policy.
pub fn owner_token() -> String {
    let key = SymmetricKey::parse(OWNER_KEY).unwrap();
    make_token(HOST, &key, Some("iothubowner"), EXPIRY)
}

/// Runs `service` on an in-memory stream: writes `input`, closes the write side, reads and
/// drops whatever comes back, and gives the connection a bounded time to end.
pub fn feed(service: &StreamService, input: &[u8]) {
    let service = service.clone();
    let input = input.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(service(server, None));
        let drive = async {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = [0u8; 4096];
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drive).await;
        drop(client);
        // A panic in the connection task is the crash the fuzzer is looking for.
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), task).await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    });
}

/// `value` as a JSON object, if it is one.
pub fn object(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m),
        _ => None,
    }
}
