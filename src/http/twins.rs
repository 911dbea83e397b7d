//! Twin routes: `GET`, `PATCH` and `PUT` on `/twins/{id}` and `/twins/{id}/modules/{mid}`, and
//! direct methods on `POST …/methods`. Device and module routes share their handlers: the
//! path names the identity.

use super::body::{ok, JsonBody};
use super::error::HttpResult;
use super::precondition::if_match;
use crate::hub::Hub;
use crate::methods::MethodCall;
use crate::registry::{IdentityKey, IfMatch};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

pub fn routes() -> Router<Hub> {
    let twin = || get(get_twin).patch(patch_twin).put(replace_twin);
    Router::new()
        .route("/twins/{id}", twin())
        .route("/twins/{id}/modules/{mid}", twin())
        .route("/twins/{id}/methods", post(invoke_method))
        .route("/twins/{id}/modules/{mid}/methods", post(invoke_method))
}

/// The identity a twin route names: `{id}`, or `{id}` and `{mid}`.
#[derive(Deserialize)]
struct Target {
    id: String,
    mid: Option<String>,
}

impl From<Target> for IdentityKey {
    fn from(t: Target) -> Self {
        Self {
            device_id: t.id,
            module_id: t.mid,
        }
    }
}

/// Twin writes without If-Match apply to any version, as IoT Hub's do.
fn twin_precondition(headers: &HeaderMap) -> IfMatch {
    match if_match(headers) {
        IfMatch::Absent => IfMatch::Any,
        other => other,
    }
}

async fn get_twin(State(hub): State<Hub>, Path(target): Path<Target>) -> HttpResult<Response> {
    Ok(ok(&hub.registry().get_twin(&target.into())?))
}

async fn patch_twin(
    State(hub): State<Hub>,
    Path(target): Path<Target>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let twin = hub.patch_twin(&target.into(), &body, &twin_precondition(&headers))?;
    Ok(ok(&twin))
}

async fn replace_twin(
    State(hub): State<Hub>,
    Path(target): Path<Target>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let twin = hub.replace_twin(&target.into(), &body, &twin_precondition(&headers))?;
    Ok(ok(&twin))
}

/// `POST /twins/{id}[/modules/{mid}]/methods`: a direct method, answered with the device's
/// `{"status", "payload"}`.
async fn invoke_method(
    State(hub): State<Hub>,
    Path(target): Path<Target>,
    body: JsonBody,
) -> HttpResult<Response> {
    let call = MethodCall::from_json(&body.object()?)?;
    let reply = hub.invoke_method(&target.into(), call).await?;
    Ok(ok(
        &serde_json::json!({"status": reply.status, "payload": reply.payload}),
    ))
}
