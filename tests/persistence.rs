//! `--data-dir`: state survives restarts, and survives SIGKILL during a write load with every
//! acknowledged write intact. These tests run the real binary as a child process.

mod common;

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One emulator process on ephemeral ports.
struct Emulator {
    child: Child,
    https: u16,
    ca: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Emulator {
    fn start(data: &Path, certs: &Path) -> Self {
        let (https, mqtt) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_iothub-emulator"))
            .args(["--bind", "127.0.0.1", "--https-port", &https.to_string()])
            .args(["--mqtt-port", &mqtt.to_string()])
            .args(["--amqp-port", &free_port().to_string()])
            .arg("--certs-dir")
            .arg(certs)
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("iothub-emulator ready") => break,
                Some(Ok(_)) => {}
                other => panic!("emulator ended before it was ready: {other:?}"),
            }
        }
        let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
        Self { child, https, ca }
    }

    fn http(&self) -> common::Http {
        let ca = reqwest::Certificate::from_pem(self.ca.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(common::HOST, ([127, 0, 0, 1], self.https).into())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        common::Http {
            client,
            base: format!("https://{}:{}", common::HOST, self.https),
            token: common::policy_token("iothubowner"),
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

/// Scenario: identities, twins (versions, etags, metadata) and queued C2D messages written
/// through the API are all there after a SIGTERM and a restart, which exits 0.
#[tokio::test]
async fn state_survives_a_restart() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let emulator = Emulator::start(data.path(), certs.path());
    let http = emulator.http();
    let device = http
        .send(
            "PUT",
            "/devices/keep",
            Some(json!({"deviceId":"keep"})),
            &[],
        )
        .await
        .expect_status(200);
    let module = http
        .send("PUT", "/devices/keep/modules/m", Some(json!({})), &[])
        .await
        .expect_status(200);
    http.send(
        "PATCH",
        "/twins/keep/modules/m",
        Some(json!({"tags":{"t":1},"properties":{"desired":{"a":{"b":2}}}})),
        &[],
    )
    .await
    .expect_status(200);
    http.send(
        "POST",
        "/_emulator/devices/keep/messages",
        Some(json!({"body":"queued"})),
        &[],
    )
    .await
    .expect_status(200);
    let twin_before = http
        .send("GET", "/twins/keep/modules/m", None, &[])
        .await
        .expect_status(200);
    assert_eq!(emulator.terminate(), 0, "SIGTERM must exit 0");

    let emulator = Emulator::start(data.path(), certs.path());
    let http = emulator.http();
    let device_after = http
        .send("GET", "/devices/keep", None, &[])
        .await
        .expect_status(200);
    assert_eq!(device_after["authentication"], device["authentication"]);
    assert_eq!(device_after["etag"], device["etag"]);
    assert_eq!(device_after["cloudToDeviceMessageCount"], 1);
    let module_after = http
        .send("GET", "/devices/keep/modules/m", None, &[])
        .await
        .expect_status(200);
    assert_eq!(module_after["authentication"], module["authentication"]);
    let twin_after = http
        .send("GET", "/twins/keep/modules/m", None, &[])
        .await
        .expect_status(200);
    assert_eq!(twin_after, twin_before);
    // New etags continue after the stored ones instead of repeating them.
    let another = http
        .send("PUT", "/devices/new", Some(json!({})), &[])
        .await
        .expect_status(200);
    assert_ne!(another["etag"], device["etag"]);
    emulator.kill();
}

/// Scenario, repeated: writers create devices and patch their twins; the emulator is killed
/// with SIGKILL at a random moment; after a restart every acknowledged write is present and
/// the store opens cleanly.
#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // device id → the last desired value whose PATCH was acknowledged.
    let acknowledged: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    for round in 0..4 {
        let emulator = Emulator::start(data.path(), certs.path());
        let http = Arc::new(emulator.http());
        // Everything acknowledged in earlier rounds is there.
        let earlier = acknowledged.lock().unwrap().clone();
        for (id, n) in earlier {
            let twin = http
                .send("GET", &format!("/twins/{id}"), None, &[])
                .await
                .expect_status(200);
            let got = twin["properties"]["desired"]["n"].as_u64().unwrap_or(0);
            assert!(
                got >= n,
                "round {round}: {id}: acknowledged n={n}, found {got}"
            );
        }
        let writers: Vec<_> = (0..6)
            .map(|w| {
                let (http, acknowledged) = (Arc::clone(&http), Arc::clone(&acknowledged));
                tokio::spawn(async move {
                    for i in 0..10_000u64 {
                        let id = format!("r{round}-w{w}-{i}");
                        let path = format!("/devices/{id}");
                        let created = http.try_send_raw("PUT", &path, Some("{}".into()), &[]);
                        match tokio::time::timeout(Duration::from_secs(5), created).await {
                            Ok(Ok(reply)) if reply.status == 200 => {}
                            _ => return,
                        }
                        acknowledged.lock().unwrap().push((id.clone(), 0));
                        let path = format!("/twins/{id}");
                        let body = json!({"properties":{"desired":{"n": i + 1}}}).to_string();
                        let patch = http.try_send_raw("PATCH", &path, Some(body), &[]);
                        match tokio::time::timeout(Duration::from_secs(5), patch).await {
                            Ok(Ok(reply)) if reply.status == 200 => {
                                acknowledged.lock().unwrap().push((id, i + 1));
                            }
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 600)).await;
        emulator.kill();
        for w in writers {
            let _ = w.await;
        }
    }
    let emulator = Emulator::start(data.path(), certs.path());
    let http = emulator.http();
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load made too few writes to mean anything: {}",
        acked.len()
    );
    for (id, n) in acked {
        let twin = http.send("GET", &format!("/twins/{id}"), None, &[]).await;
        assert_eq!(twin.status, 200, "{id} was acknowledged but is gone");
        let got = twin.body["properties"]["desired"]["n"]
            .as_u64()
            .unwrap_or(0);
        assert!(got >= n, "{id}: acknowledged n={n}, found {got}");
    }
    emulator.kill();
}
