//! The HTTPS front end's request path: method, path, headers and body into the router (service
//! API with a valid owner token or the fuzzer's own `Authorization`, control API, portal).
#![no_main]

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::Request;
use iothub_emulator_fuzz::{hub, owner_token, reset, runtime};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tower::ServiceExt;

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    path: String,
    authorized: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD"];
const PREFIXES: [&str; 8] = [
    "/devices/fuzz-device",
    "/twins/fuzz-device",
    "/devices/query",
    "/devices/fuzz-device/modules/fuzz-module",
    "/twins/fuzz-device/modules/fuzz-module/methods",
    "/_emulator/",
    "/portal/",
    "",
];

fn router() -> &'static axum::Router {
    static R: OnceLock<axum::Router> = OnceLock::new();
    R.get_or_init(|| {
        let hub = hub().clone();
        let mounts = iothub_emulator::http::Mounts {
            websockets: iothub_emulator::http::WebSocketServices {
                mqtt: iothub_emulator::mqtt::websocket_service(hub.clone()),
                amqp: iothub_emulator::amqp::websocket_service(hub.clone()),
            },
            portal: iothub_emulator::portal::routes(),
        };
        iothub_emulator::http::router(hub, mounts)
    })
}

fuzz_target!(|input: Input| {
    let prefix = PREFIXES[usize::from(input.method >> 4) % PREFIXES.len()];
    let uri = format!("{prefix}{}", input.path);
    let mut builder = Request::builder()
        .method(METHODS[usize::from(input.method) % METHODS.len()])
        .uri(uri);
    if input.authorized {
        builder = builder.header("authorization", owner_token());
    }
    for (name, value) in &input.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let Ok(request) = builder.body(Body::from(input.body)) else {
        return;
    };
    let writes = request.method() != "GET";
    runtime().block_on(async {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            router().clone().oneshot(request),
        )
        .await;
    });
    if writes {
        reset();
    }
});
