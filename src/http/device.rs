//! The device HTTPS API: what a device (or module) without MQTT or AMQP calls on port 443
//! (the Node SDK's `azure-iot-device-http` transport, the C and .NET SDKs' HTTP transports,
//! `az iot device c2d-message …`):
//!
//! - `POST /devices/{id}/messages/events` (and `/devices/{id}/modules/{mid}/messages/events`):
//!   one telemetry message, system properties from `iothub-*` headers and application
//!   properties from `iothub-app-*` headers; or a batch (`Content-Type:
//!   application/vnd.microsoft.iothub.json`, a JSON array of `{body, base64Encoded,
//!   properties}`). It enters the same telemetry log as MQTT and AMQP telemetry. 204.
//! - `GET /devices/{id}/messages/deviceBound`: the oldest waiting cloud-to-device message, locked
//!   for the device under the lock token in `ETag` (204 when none waits);
//!   `DELETE …/deviceBound/{lockToken}` completes it, `DELETE …?reject` rejects it,
//!   `POST …/{lockToken}/abandon` gives it back. The queue is the one MQTT and AMQP read.
//!
//! Every route authenticates the identity its path names, as the device front ends do: a
//! device or module SAS token, or a `DeviceConnect` policy token, in `Authorization`; or the
//! X.509 client certificate of the TLS connection. One identity can never reach another's
//! messages.

use super::error::HttpResult;
use super::ClientCert;
use crate::c2d::{CloudMessage, Settlement};
use crate::error::{ErrorCode, HubError, HubResult};
use crate::hub::Hub;
use crate::registry::IdentityKey;
use crate::registry::{HTTP_LOCK, HTTP_LOCK_RANGE};
use crate::telemetry::{Incoming, MAX_MESSAGE_BYTES};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// The content type of a batch of telemetry messages.
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";
/// Most messages in one batch.
const MAX_BATCH: usize = 500;

pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/devices/{id}/messages/events", post(send_event))
        .route(
            "/devices/{id}/modules/{mid}/messages/events",
            post(send_event),
        )
        .route("/devices/{id}/messages/deviceBound", get(receive))
        .route("/devices/{id}/messages/devicebound", get(receive))
        .route(
            "/devices/{id}/messages/deviceBound/{etag}",
            delete(complete),
        )
        .route(
            "/devices/{id}/messages/devicebound/{etag}",
            delete(complete),
        )
        .route(
            "/devices/{id}/messages/deviceBound/{etag}/abandon",
            post(abandon),
        )
        .route(
            "/devices/{id}/messages/devicebound/{etag}/abandon",
            post(abandon),
        )
}

/// The identity a device route names.
#[derive(Deserialize)]
struct Target {
    id: String,
    mid: Option<String>,
}

impl Target {
    fn key(&self) -> IdentityKey {
        IdentityKey {
            device_id: self.id.clone(),
            module_id: self.mid.clone(),
        }
    }
}

/// Authenticates the caller as `key`: the SAS token of `Authorization`, else the client
/// certificate of the connection. Returns the method `iothub-connection-auth-method` reports.
pub(super) fn authenticate(
    hub: &Hub,
    headers: &HeaderMap,
    cert: Option<&ClientCert>,
    key: &IdentityKey,
) -> HubResult<&'static str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value.to_str().map_err(|_| {
            HubError::new(
                ErrorCode::IotHubUnauthorized,
                "The Authorization header is not a valid SAS token",
            )
        })?;
        hub.authenticate_device(key, token)?;
        return Ok("SAS");
    }
    match cert.and_then(|c| c.0.as_ref()) {
        Some(cert) => {
            hub.authenticate_x509(key, cert)?;
            Ok("X509")
        }
        None => Err(HubError::new(
            ErrorCode::IotHubUnauthorizedAccess,
            "The request has no Authorization header and the connection no client certificate",
        )),
    }
}

/// The client certificate extension of a request, if the connection had one.
fn cert_of(request: &Request) -> Option<ClientCert> {
    request.extensions().get::<ClientCert>().cloned()
}

async fn send_event(
    State(hub): State<Hub>,
    Path(target): Path<Target>,
    request: Request,
) -> HttpResult<Response> {
    let key = target.key();
    let cert = cert_of(&request);
    let headers = request.headers().clone();
    let auth_method = authenticate(&hub, &headers, cert.as_ref(), &key)?;
    // A batch may hold up to 256 KB of messages; its JSON and base64 make it larger on the wire.
    let limit = MAX_MESSAGE_BYTES * 2;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            HubError::new(
                ErrorCode::MessageTooLarge,
                format!("The request body is larger than {MAX_MESSAGE_BYTES} bytes"),
            )
        })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let messages = if content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
    {
        parse_batch(&body)?
    } else {
        vec![Incoming {
            properties: header_properties(&headers)?,
            body,
        }]
    };
    let total: usize = messages.iter().map(Incoming::size).sum();
    if total > MAX_MESSAGE_BYTES {
        return Err(HubError::new(
            ErrorCode::MessageTooLarge,
            format!("The messages are {total} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"),
        )
        .into());
    }
    // Checked whole before anything is stored: a batch is accepted or refused as one.
    for message in messages {
        hub.ingest(&key, auth_method, message)
            .map_err(|e| HubError::new(ErrorCode::MessageTooLarge, e.to_string()))?;
    }
    hub.registry().touch(&key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The message's properties from its headers: `iothub-app-{name}` are application properties,
/// the `iothub-*` system headers map to the property-bag keys the telemetry log understands.
fn header_properties(headers: &HeaderMap) -> HubResult<Vec<(String, Option<String>)>> {
    let mut properties = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        let value = || {
            value.to_str().map_err(|_| {
                HubError::invalid(format!("The value of header '{name}' is not ASCII text"))
            })
        };
        if name == "dt-subject" {
            properties.push(("$.sub".to_owned(), Some(value()?.to_owned())));
            continue;
        }
        let Some(rest) = name.strip_prefix("iothub-") else {
            continue;
        };
        let value = value()?;
        if let Some(app) = rest.strip_prefix("app-") {
            if app.is_empty() {
                return Err(HubError::invalid(
                    "An 'iothub-app-' header names no property",
                ));
            }
            properties.push((app.to_owned(), Some(value.to_owned())));
        } else if let Some(key) = system_key(rest) {
            properties.push((key.to_owned(), Some(value.to_owned())));
        }
    }
    Ok(properties)
}

/// The property-bag key of a system header (`iothub-` stripped), as MQTT devices send them.
fn system_key(name: &str) -> Option<&'static str> {
    Some(match name {
        "messageid" => "$.mid",
        "correlationid" => "$.cid",
        "userid" => "$.uid",
        "contenttype" => "$.ct",
        "contentencoding" => "$.ce",
        "expiry" => "$.exp",
        "interfaceid" | "interface-id" => "$.ifid",
        _ => return None,
    })
}

/// One message of a batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchMessage {
    #[serde(default)]
    body: Value,
    /// The Node SDK leaves it out and sends base64: a body is base64 unless it says otherwise.
    #[serde(default = "base64_by_default", rename = "base64Encoded")]
    base64_encoded: bool,
    #[serde(default)]
    properties: HashMap<String, Value>,
}

fn base64_by_default() -> bool {
    true
}

/// A batch body: a JSON array of messages. Each property is an application property, except
/// the `iothub-*` system names.
fn parse_batch(body: &[u8]) -> HubResult<Vec<Incoming>> {
    let batch: Vec<BatchMessage> = serde_json::from_slice(body).map_err(|e| {
        HubError::invalid(format!(
            "A batch must be a JSON array of {{body, base64Encoded, properties}}: {e}"
        ))
    })?;
    if batch.is_empty() {
        return Err(HubError::new(ErrorCode::ArgumentNull, "The batch is empty"));
    }
    if batch.len() > MAX_BATCH {
        return Err(HubError::new(
            ErrorCode::MessageTooLarge,
            format!("A batch holds at most {MAX_BATCH} messages"),
        ));
    }
    batch
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let body = match (&m.body, m.base64_encoded) {
                (Value::String(s), true) => base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(Bytes::from)
                    .map_err(|_| {
                        HubError::invalid(format!("Message {i} of the batch: body is not base64"))
                    })?,
                (Value::String(s), false) => Bytes::from(s.clone()),
                (Value::Null, _) => Bytes::new(),
                (other, false) => Bytes::from(other.to_string()),
                (_, true) => {
                    return Err(HubError::invalid(format!(
                        "Message {i} of the batch: a base64 body must be a string"
                    )))
                }
            };
            let mut properties = Vec::with_capacity(m.properties.len());
            for (name, value) in m.properties {
                let value = match value {
                    Value::String(s) => s,
                    Value::Null => {
                        properties.push((name, None));
                        continue;
                    }
                    other => other.to_string(),
                };
                // The Node SDK names application properties `iothub-app-{name}` here too.
                let lower = name.to_ascii_lowercase();
                if lower.starts_with("iothub-app-") {
                    properties.push((name["iothub-app-".len()..].to_owned(), Some(value)));
                    continue;
                }
                match lower.strip_prefix("iothub-").and_then(system_key) {
                    Some(key) => properties.push((key.to_owned(), Some(value))),
                    None => properties.push((name, Some(value))),
                }
            }
            Ok(Incoming { properties, body })
        })
        .collect()
}

/// Only devices have a cloud-to-device queue; the routes name no module.
fn device_key(id: &str) -> IdentityKey {
    IdentityKey::device(id)
}

async fn receive(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    request: Request,
) -> HttpResult<Response> {
    let key = device_key(&id);
    authenticate(&hub, request.headers(), cert_of(&request).as_ref(), &key)?;
    let lock = lock_timeout(request.headers())?;
    hub.lapse_c2d_locks(&id);
    let locked = hub
        .registry()
        .lock_c2d(&id, &std::collections::HashSet::new(), lock)?;
    hub.registry().touch(&key);
    let Some((message, etag)) = locked else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    Ok(c2d_response(&id, &message, &etag))
}

/// `IotHub-MessageLockTimeout`: how many seconds the received message stays locked for the
/// device (the Java SDK sends 180, `az iot device c2d-message receive --lt` what it is given).
/// Absent means [`HTTP_LOCK`]; anything but a whole number of seconds within
/// [`HTTP_LOCK_RANGE`] is 400 and locks nothing.
fn lock_timeout(headers: &HeaderMap) -> HubResult<Duration> {
    let Some(value) = headers.get("iothub-messagelocktimeout") else {
        return Ok(HTTP_LOCK);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|secs| HTTP_LOCK_RANGE.contains(secs))
        .map(Duration::from_secs)
        .ok_or_else(|| {
            HubError::new(
                ErrorCode::ArgumentInvalid,
                format!(
                    "IotHub-MessageLockTimeout must be a whole number of seconds from {} to {}",
                    HTTP_LOCK_RANGE.start(),
                    HTTP_LOCK_RANGE.end()
                ),
            )
        })
}

/// A received message: its body, and its properties as the SDKs' HTTP transports read them.
fn c2d_response(device_id: &str, m: &CloudMessage, etag: &str) -> Response {
    let mut response = (StatusCode::OK, Body::from(m.body.clone())).into_response();
    let headers = response.headers_mut();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    };
    let expiry = crate::timestamp::Timestamp::from(m.expires).to_string();
    put("etag", &format!("\"{etag}\""));
    put("iothub-messageid", &m.message_id);
    put(
        "iothub-to",
        &format!("/devices/{device_id}/messages/devicebound"),
    );
    put("iothub-expiry", &expiry);
    put(
        "iothub-enqueuedtime",
        &crate::timestamp::Timestamp::from(m.enqueued).to_string(),
    );
    put("iothub-deliverycount", &m.delivery_count.to_string());
    put("iothub-sequencenumber", &m.lock_token.to_string());
    if let Some(v) = &m.correlation_id {
        put("iothub-correlationid", v);
    }
    if let Some(v) = &m.user_id {
        put("iothub-userid", v);
    }
    put("iothub-ack", m.ack.as_deref().unwrap_or("none"));
    // `ContentType` / `ContentEncoding` are the names the hub answers with (the CLI reads them).
    if let Some(v) = &m.content_type {
        put("contenttype", v);
        put("content-type", v);
    }
    if let Some(v) = &m.content_encoding {
        put("contentencoding", v);
    }
    for (k, v) in &m.properties {
        put(&format!("iothub-app-{k}"), v.as_deref().unwrap_or(""));
    }
    response
}

#[derive(Deserialize)]
struct SettlePath {
    id: String,
    etag: String,
}

async fn complete(
    State(hub): State<Hub>,
    Path(path): Path<SettlePath>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> HttpResult<Response> {
    let how = if query.contains_key("reject") {
        Settlement::Rejected
    } else {
        Settlement::Completed
    };
    settle(&hub, &path, &request, how)
}

async fn abandon(
    State(hub): State<Hub>,
    Path(path): Path<SettlePath>,
    request: Request,
) -> HttpResult<Response> {
    settle(&hub, &path, &request, Settlement::Abandoned)
}

fn settle(
    hub: &Hub,
    path: &SettlePath,
    request: &Request,
    how: Settlement,
) -> HttpResult<Response> {
    let key = device_key(&path.id);
    authenticate(hub, request.headers(), cert_of(request).as_ref(), &key)?;
    hub.lapse_c2d_locks(&path.id);
    let token = hub
        .registry()
        .unlock_c2d(&path.id, path.etag.trim_matches('"'))?;
    hub.settle_c2d(&path.id, token, how);
    Ok(StatusCode::NO_CONTENT.into_response())
}
