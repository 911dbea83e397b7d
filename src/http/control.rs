//! The emulator's own control API under `/_emulator/`, a prefix IoT Hub never uses: health,
//! the CA certificate, the telemetry log, cloud-to-device injection, and reset. Tests and tools
//! use it the way LocalStack users use `/_localstack/…`.
//!
//! `health`, `ready`, `metrics` and `ca.pem` need no credentials; everything else needs a SAS token of a
//! policy with ServiceConnect (the owner or `service` policy).

use super::body::{json_response, ok, query_string, JsonBody};
use super::error::HttpResult;
use crate::c2d::CloudMessage;
use crate::error::HubError;
use crate::hub::Hub;
use crate::telemetry::Source;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Most messages one telemetry read returns.
const MAX_READ: usize = 1000;
/// Longest a telemetry read may wait for a first message.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Routes that need no credentials.
pub fn open_routes() -> Router<Hub> {
    Router::new()
        .route("/_emulator/health", get(health))
        .route("/_emulator/ready", get(health))
        .route("/_emulator/ca.pem", get(ca_pem))
        .route("/_emulator/metrics", get(metrics))
}

/// Routes behind the SAS check (`Access::Control`).
pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/_emulator/telemetry", get(telemetry))
        .route("/_emulator/devices/{id}/messages", post(send_c2d))
        .route("/_emulator/reset", post(reset))
}

async fn health() -> Response {
    ok(&json!({"status": "healthy"}))
}

/// `GET /_emulator/metrics`: Prometheus text exposition.
async fn metrics(State(hub): State<Hub>) -> Response {
    let mut response = hub.render_metrics().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn ca_pem(State(hub): State<Hub>) -> Response {
    match hub.ca_pem() {
        Some(pem) => {
            let mut response = pem.to_owned().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            response
        }
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"Message": "ErrorCode:NotFound;This emulator serves a user-supplied certificate"}),
        ),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TelemetryQuery {
    device_id: Option<String>,
    module_id: Option<String>,
    /// Only messages with a larger sequence number.
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    /// Seconds to wait for a first message (long poll).
    #[serde(default)]
    wait: u64,
    /// `DeviceMessages` (the default), an event source (`TwinChangeEvents`, …) or `all`.
    source: Option<String>,
}

/// `GET /_emulator/telemetry?deviceId=&moduleId=&after=&limit=&wait=&source=`: device messages
/// (or routed hub events), each with the routes that selected it and the endpoints it went to.
async fn telemetry(
    State(hub): State<Hub>,
    query: Result<Query<TelemetryQuery>, QueryRejection>,
) -> HttpResult<Response> {
    let q = query_string(query)?;
    let source = match q.source.as_deref() {
        None => Some(Source::DeviceMessages),
        Some(s) if s.eq_ignore_ascii_case("all") => None,
        Some(s) => Some(Source::parse(s).ok_or_else(|| {
            HubError::invalid(format!(
                "source must be all or one of {}",
                Source::ALL.map(Source::name).join(", ")
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(MAX_READ).clamp(1, MAX_READ);
    let wait = Duration::from_secs(q.wait).min(MAX_WAIT);
    let filter = |m: &crate::telemetry::Message| {
        q.device_id
            .as_ref()
            .is_none_or(|d| *d == m.identity.device_id)
            && q.module_id
                .as_ref()
                .is_none_or(|mid| Some(mid) == m.identity.module_id.as_ref())
            && source.is_none_or(|s| s == m.source)
    };
    let endpoints = hub.routing().endpoint_names();
    let log = hub.telemetry();
    let messages = log.read_or_wait(q.after, limit, wait, filter).await;
    let next = messages.last().map_or(q.after, |m| m.sequence);
    Ok(ok(&json!({
        "messages": messages.iter().map(|m| m.to_json_routed(endpoints)).collect::<Vec<Value>>(),
        "next": next,
        "lastSequenceNumber": log.last_sequence(),
        "dropped": log.dropped(),
    })))
}

/// `POST /_emulator/devices/{id}/messages`: queue a cloud-to-device message.
async fn send_c2d(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    let message = CloudMessage::from_json(&body.object()?)?;
    let message_id = message.message_id.clone();
    hub.send_c2d(&id, message)?;
    Ok(ok(&json!({"messageId": message_id})))
}

/// `POST /_emulator/reset`: back to the start-up state.
async fn reset(State(hub): State<Hub>) -> Response {
    hub.reset();
    StatusCode::NO_CONTENT.into_response()
}
