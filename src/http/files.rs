//! File upload, the device's half (Microsoft's "Upload files with IoT Hub"):
//!
//! - `POST /devices/{id}/files` with `{"blobName": …}`: the SAS URI parts for one blob of the
//!   configured container (`correlationId`, `hostName`, `containerName`, `blobName`,
//!   `sasToken`). The device uploads to `https://{hostName}/{containerName}/{blobName}{sasToken}`.
//! - `POST /devices/{id}/files/notifications` with `{correlationId, isSuccess, statusCode,
//!   statusDescription}` (the Python SDK and the CLI), or
//!   `POST /devices/{id}/files/notifications/{correlationId}` with the rest (the Node SDK):
//!   the upload is done; on success the service gets a file upload notification. 204.
//!
//! Authenticated as every device route is ([`super::device::authenticate`]); a device can
//! only finish its own uploads.

use super::body::JsonBody;
use super::device::authenticate;
use super::error::HttpResult;
use super::ClientCert;
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::registry::IdentityKey;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::Value;

pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/devices/{id}/files", post(start))
        .route("/devices/{id}/files/notifications", post(notify))
        .route(
            "/devices/{id}/files/notifications/{correlation}",
            post(notify_for),
        )
}

async fn start(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    cert: Option<Extension<ClientCert>>,
    JsonBody(body): JsonBody,
) -> HttpResult<Response> {
    let key = IdentityKey::device(&id);
    authenticate(&hub, &headers, cert.as_deref(), &key)?;
    let blob_name = match body.get("blobName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(HubError::invalid("'blobName' must be a string").into()),
        None => {
            return Err(HubError::new(
                ErrorCode::ArgumentNull,
                "The request must name the blob ('blobName')",
            )
            .into())
        }
    };
    let info = hub.file_uploads().start(&id, &blob_name).await?;
    hub.registry().touch(&key);
    Ok((StatusCode::OK, Json(info)).into_response())
}

async fn notify(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    cert: Option<Extension<ClientCert>>,
    JsonBody(body): JsonBody,
) -> HttpResult<Response> {
    let correlation = match body.get("correlationId") {
        Some(Value::String(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(HubError::new(
                ErrorCode::ArgumentNull,
                "The notification must carry the upload's 'correlationId'",
            )
            .into())
        }
    };
    finish(&hub, &id, &correlation, &headers, cert.as_deref(), &body).await
}

#[derive(serde::Deserialize)]
struct NotifyPath {
    id: String,
    correlation: String,
}

async fn notify_for(
    State(hub): State<Hub>,
    Path(path): Path<NotifyPath>,
    headers: HeaderMap,
    cert: Option<Extension<ClientCert>>,
    JsonBody(body): JsonBody,
) -> HttpResult<Response> {
    finish(
        &hub,
        &path.id,
        &path.correlation,
        &headers,
        cert.as_deref(),
        &body,
    )
    .await
}

async fn finish(
    hub: &Hub,
    id: &str,
    correlation: &str,
    headers: &HeaderMap,
    cert: Option<&ClientCert>,
    body: &Value,
) -> HttpResult<Response> {
    let key = IdentityKey::device(id);
    authenticate(hub, headers, cert, &key)?;
    let Some(succeeded) = body.get("isSuccess").and_then(Value::as_bool) else {
        return Err(HubError::invalid(
            "The notification must say whether the upload succeeded ('isSuccess': true or false)",
        )
        .into());
    };
    if body.get("statusCode").is_some_and(|c| !c.is_i64()) {
        return Err(HubError::invalid("'statusCode' must be an integer").into());
    }
    if body
        .get("statusDescription")
        .is_some_and(|d| !(d.is_string() || d.is_null()))
    {
        return Err(HubError::invalid("'statusDescription' must be a string").into());
    }
    hub.file_uploads()
        .finish(id, correlation, succeeded)
        .await?;
    hub.registry().touch(&key);
    Ok(StatusCode::NO_CONTENT.into_response())
}
