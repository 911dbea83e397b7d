//! File upload (issue 16) where no blob store answers: without file-upload settings the hub
//! answers as IoT Hub does when file upload is not configured (400022), and with a store that
//! cannot be reached it says so, without handing out a SAS or counting an upload. The flows
//! with a real store (Azurite) are in the SDK suites: e2e/node/file_upload.test.js and
//! e2e/python/test_file_upload.py.

mod common;

use common::{identity_token, start, Http, Reply};
use iothub_emulator::storage::{Account, BlobStore};
use serde_json::json;

/// `POST /devices/{device}/files` for `a.txt`, with `http`'s token.
async fn start_upload(http: &Http, device: &str) -> Reply {
    http.send(
        "POST",
        &format!("/devices/{device}/files"),
        Some(json!({"blobName": "a.txt"})),
        &[],
    )
    .await
}

#[tokio::test]
async fn without_a_store_file_upload_is_not_configured() {
    let hub = start().await;
    let key = hub.device("fu1").await;
    let http = hub.http().with_token(identity_token("fu1", None, &key));
    let reply = start_upload(&http, "fu1").await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.error_code(), "BlobContainerValidationError");
    let reply = http
        .send(
            "POST",
            "/devices/fu1/files/notifications",
            Some(json!({"correlationId": "x", "isSuccess": true})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    // Another device's token gets 401 before anything else.
    let other = hub.device("fu2").await;
    let foreign = hub.http().with_token(identity_token("fu2", None, &other));
    let reply = start_upload(&foreign, "fu1").await;
    assert_eq!(reply.status, 401, "{}", reply.body);
}

#[tokio::test]
async fn an_unreachable_store_is_reported_and_counts_no_upload() {
    let hub = start().await;
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let account = Account::parse(&format!(
        "AccountName=devstoreaccount1;AccountKey=AAAA;BlobEndpoint=https://127.0.0.1:{port}/devstoreaccount1"
    ))
    .unwrap();
    hub.hub
        .set_file_uploads(iothub_emulator::uploads::Settings {
            store: BlobStore::new(account, hub.ca_pem.as_bytes()).unwrap(),
            container: "fileuploads".to_owned(),
        });
    let key = hub.device("fu3").await;
    let http = hub.http().with_token(identity_token("fu3", None, &key));
    for _ in 0..11 {
        let reply = start_upload(&http, "fu3").await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(reply.error_code(), "BlobContainerValidationError");
        let message = reply.body["Message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("cannot be reached"), "{message}");
    }
}
