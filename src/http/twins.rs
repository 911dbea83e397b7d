//! Twin routes: `GET`, `PATCH` and `PUT` on `/twins/{id}` and `/twins/{id}/modules/{mid}`.

use super::body::{ok, JsonBody};
use super::error::HttpResult;
use super::registry::if_match;
use crate::hub::Hub;
use crate::registry::{IdentityKey, IfMatch};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

pub fn routes() -> Router<Hub> {
    Router::new()
        .route(
            "/twins/{id}",
            get(get_device_twin)
                .patch(patch_device_twin)
                .put(put_device_twin),
        )
        .route(
            "/twins/{id}/modules/{mid}",
            get(get_module_twin)
                .patch(patch_module_twin)
                .put(put_module_twin),
        )
        .route("/twins/{id}/methods", post(invoke_device_method))
        .route(
            "/twins/{id}/modules/{mid}/methods",
            post(invoke_module_method),
        )
}

/// `POST /twins/{id}/methods`: a direct method on a device.
async fn invoke_device_method(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    invoke(&hub, IdentityKey::device(id), body).await
}

/// `POST /twins/{id}/modules/{mid}/methods`: a direct method on a module.
async fn invoke_module_method(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
    body: JsonBody,
) -> HttpResult<Response> {
    invoke(&hub, IdentityKey::module(id, mid), body).await
}

async fn invoke(hub: &Hub, key: IdentityKey, body: JsonBody) -> HttpResult<Response> {
    let call = crate::methods::MethodCall::from_json(&body.object()?)?;
    let reply = hub.invoke_method(&key, call).await?;
    Ok(ok(
        &serde_json::json!({"status": reply.status, "payload": reply.payload}),
    ))
}

/// Twin writes without If-Match apply to any version, as IoT Hub's do.
fn twin_precondition(headers: &HeaderMap) -> IfMatch {
    match if_match(headers) {
        IfMatch::Absent => IfMatch::Any,
        other => other,
    }
}

async fn get_device_twin(State(hub): State<Hub>, Path(id): Path<String>) -> HttpResult<Response> {
    Ok(ok(&hub.registry().get_twin(&IdentityKey::device(id))?))
}

async fn get_module_twin(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
) -> HttpResult<Response> {
    Ok(ok(&hub
        .registry()
        .get_twin(&IdentityKey::module(id, mid))?))
}

async fn patch_device_twin(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let key = IdentityKey::device(id);
    Ok(ok(&hub.patch_twin(
        &key,
        &body,
        &twin_precondition(&headers),
    )?))
}

async fn patch_module_twin(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let key = IdentityKey::module(id, mid);
    Ok(ok(&hub.patch_twin(
        &key,
        &body,
        &twin_precondition(&headers),
    )?))
}

async fn put_device_twin(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let key = IdentityKey::device(id);
    Ok(ok(&hub.replace_twin(
        &key,
        &body,
        &twin_precondition(&headers),
    )?))
}

async fn put_module_twin(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let key = IdentityKey::module(id, mid);
    Ok(ok(&hub.replace_twin(
        &key,
        &body,
        &twin_precondition(&headers),
    )?))
}
