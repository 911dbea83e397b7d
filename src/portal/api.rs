//! The portal's JSON API under `/portal/api/`, called by `assets/app.js`.
//!
//! Every handler checks the viewer's permission the way the REST API checks a SAS token, then
//! calls the same hub or registry function the REST route calls, so the validation, the etag
//! rules and the error codes (400 for a bad id, 404, 409, 412, …) are the REST API's own.
//! Errors come back in the hub's error shape (`{"Message":"ErrorCode:<Name>;…"}`).

use super::ApiViewer;
use crate::error::{ErrorCode, HubError};
use crate::http::body::{ok, query_string, JsonBody};
use crate::http::error::HttpResult;
use crate::http::precondition::delete_precondition;
use crate::hub::{Access, Hub};
use crate::methods::MethodCall;
use crate::registry::{IdentityKey, IfMatch};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Most messages one telemetry read returns.
const TELEMETRY_LIMIT: usize = 200;
/// Messages the live view starts with.
const TELEMETRY_BACKLOG: usize = 50;
/// Longest a telemetry long poll waits.
const TELEMETRY_MAX_WAIT: Duration = Duration::from_secs(25);

pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/portal/api/devices", get(list_devices).post(create_device))
        .route(
            "/portal/api/devices/{id}",
            get(get_device).patch(update_device).delete(delete_device),
        )
        .route(
            "/portal/api/devices/{id}/keys",
            post(regenerate_device_keys),
        )
        .route("/portal/api/devices/{id}/modules", post(create_module))
        .route(
            "/portal/api/devices/{id}/modules/{mid}",
            get(get_module).delete(delete_module),
        )
        .route(
            "/portal/api/devices/{id}/modules/{mid}/keys",
            post(regenerate_module_keys),
        )
        .route(
            "/portal/api/twins/{id}",
            get(get_device_twin).put(save_device_twin),
        )
        .route(
            "/portal/api/twins/{id}/modules/{mid}",
            get(get_module_twin).put(save_module_twin),
        )
        .route("/portal/api/methods/{id}", post(invoke_device_method))
        .route(
            "/portal/api/methods/{id}/modules/{mid}",
            post(invoke_module_method),
        )
        .route("/portal/api/telemetry", get(telemetry))
}

// ----- devices -----

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    q: String,
}

/// The devices whose id contains `q` (case-insensitive), each with its number of modules
/// (`moduleCount`) and of connected modules (`connectedModuleCount`).
pub fn device_summaries(hub: &Hub, q: &str) -> Vec<Value> {
    let needle = q.trim().to_lowercase();
    hub.registry()
        .list_devices(usize::MAX)
        .into_iter()
        .filter(|d| {
            needle.is_empty()
                || d["deviceId"]
                    .as_str()
                    .is_some_and(|id| id.to_lowercase().contains(&needle))
        })
        .map(|mut d| {
            let id = d["deviceId"].as_str().unwrap_or("").to_owned();
            let modules = hub.registry().list_modules(&id).unwrap_or_default();
            let connected = modules
                .iter()
                .filter(|m| m["connectionState"] == "Connected")
                .count();
            d["moduleCount"] = json!(modules.len());
            d["connectedModuleCount"] = json!(connected);
            d
        })
        .collect()
}

async fn list_devices(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryRead)?;
    let q = query_string(query)?;
    Ok(ok(&Value::Array(device_summaries(&hub, &q.q))))
}

/// A required id field of a create body.
fn id_field(body: &Map<String, Value>, field: &str) -> Result<String, HubError> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(HubError::new(
            ErrorCode::ArgumentNull,
            format!("'{field}' is required"),
        )),
        Some(_) => Err(HubError::invalid(format!("'{field}' must be a string"))),
    }
}

/// `POST /portal/api/devices`: the body is the REST API's device body (`deviceId`, `status`,
/// `authentication`), created exactly as `PUT /devices/{id}` without If-Match creates it.
async fn create_device(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    let body = body.object()?;
    let id = id_field(&body, "deviceId")?;
    let device = hub.registry().put_device(&id, &body, &IfMatch::Absent)?;
    Ok(ok(&device))
}

/// `GET /portal/api/devices/{id}`: the device, its modules and its twin (the device page's
/// live refresh).
async fn get_device(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryRead)?;
    let registry = hub.registry();
    let device = registry.get_device(&id)?;
    let modules = registry.list_modules(&id)?;
    let twin = registry.get_twin(&IdentityKey::device(&id))?;
    Ok(ok(
        &json!({"device": device, "modules": modules, "twin": twin}),
    ))
}

/// `PATCH /portal/api/devices/{id}` with `{"status":"enabled"|"disabled"}` (and optionally
/// `statusReason`, `etag`): the stored device with those fields changed, written back with
/// its etag as an SDK's `update_device` would.
async fn update_device(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    let body = body.object()?;
    if let Some(k) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "status" | "statusReason" | "etag"))
    {
        return Err(HubError::invalid(format!(
            "'{k}' cannot be changed here; send status, statusReason and etag"
        ))
        .into());
    }
    let registry = hub.registry();
    let mut device = registry.get_device(&id)?;
    let etag = match body.get("etag") {
        Some(Value::String(e)) => IfMatch::parse(Some(e)),
        _ => IfMatch::Etag(device["etag"].as_str().unwrap_or("").to_owned()),
    };
    for field in ["status", "statusReason"] {
        if let Some(v) = body.get(field) {
            device[field] = v.clone();
        }
    }
    let object = device.as_object().cloned().unwrap_or_default();
    Ok(ok(&registry.put_device(&id, &object, &etag)?))
}

async fn delete_device(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    hub.delete_device(&id, &delete_precondition(&headers))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Regenerate {
    regenerate: String,
}

/// Puts fresh keys into an identity's JSON: `primary`, `secondary` or `both`.
fn regenerate(identity: &mut Value, which: &str) -> Result<(), HubError> {
    if identity["authentication"]["type"] != "sas" {
        return Err(HubError::invalid(
            "Only identities that authenticate with symmetric keys have keys to regenerate",
        ));
    }
    let fields: &[&str] = match which {
        "primary" => &["primaryKey"],
        "secondary" => &["secondaryKey"],
        "both" => &["primaryKey", "secondaryKey"],
        other => {
            return Err(HubError::invalid(format!(
                "'regenerate' must be primary, secondary or both, not {other:?}"
            )))
        }
    };
    for f in fields {
        identity["authentication"]["symmetricKey"][*f] =
            json!(crate::auth::SymmetricKey::generate().to_base64());
    }
    Ok(())
}

fn regenerate_body(body: JsonBody) -> Result<String, HubError> {
    serde_json::from_value::<Regenerate>(body.0)
        .map(|r| r.regenerate)
        .map_err(|e| {
            HubError::invalid(format!(
                "Expected {{\"regenerate\":\"primary|secondary|both\"}}: {e}"
            ))
        })
}

fn etag_of(identity: &Value) -> IfMatch {
    IfMatch::Etag(identity["etag"].as_str().unwrap_or("").to_owned())
}

/// `POST /portal/api/devices/{id}/keys` with `{"regenerate":"primary"|"secondary"|"both"}`.
async fn regenerate_device_keys(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    let which = regenerate_body(body)?;
    let registry = hub.registry();
    let mut device = registry.get_device(&id)?;
    regenerate(&mut device, &which)?;
    let object = device.as_object().cloned().unwrap_or_default();
    Ok(ok(&registry.put_device(&id, &object, &etag_of(&device))?))
}

// ----- modules -----

/// `POST /portal/api/devices/{id}/modules`: the REST API's module body (`moduleId`,
/// `authentication`), created as `PUT /devices/{id}/modules/{mid}` without If-Match creates it.
async fn create_module(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    let body = body.object()?;
    let mid = id_field(&body, "moduleId")?;
    Ok(ok(&hub.registry().put_module(
        &id,
        &mid,
        &body,
        &IfMatch::Absent,
    )?))
}

async fn get_module(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryRead)?;
    let registry = hub.registry();
    let module = registry.get_module(&id, &mid)?;
    let twin = registry.get_twin(&IdentityKey::module(&id, &mid))?;
    Ok(ok(&json!({"module": module, "twin": twin})))
}

async fn delete_module(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    hub.delete_module(&id, &mid, &delete_precondition(&headers))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn regenerate_module_keys(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::RegistryWrite)?;
    let which = regenerate_body(body)?;
    let registry = hub.registry();
    let mut module = registry.get_module(&id, &mid)?;
    regenerate(&mut module, &which)?;
    let object = module.as_object().cloned().unwrap_or_default();
    Ok(ok(&registry.put_module(
        &id,
        &mid,
        &object,
        &etag_of(&module),
    )?))
}

// ----- twins -----

async fn get_device_twin(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::TwinRead)?;
    Ok(ok(&hub.registry().get_twin(&IdentityKey::device(id))?))
}

async fn get_module_twin(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::TwinRead)?;
    Ok(ok(&hub
        .registry()
        .get_twin(&IdentityKey::module(id, mid))?))
}

async fn save_device_twin(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::TwinWrite)?;
    save_twin(&hub, &IdentityKey::device(id), body)
}

async fn save_module_twin(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::TwinWrite)?;
    save_twin(&hub, &IdentityKey::module(id, mid), body)
}

/// `PUT /portal/api/twins/…` with `{"etag":…, "tags":{…}, "properties":{"desired":{…}}}`: the
/// editor's whole new tags and desired documents, saved only over the twin version `etag`
/// names. The difference from the stored twin is sent as one service PATCH (changed and new
/// keys, `null` for removed ones) through [`Hub::patch_twin`] with `If-Match: etag`, so devices
/// get exactly the changes, and the twin rules (key names, depth, sizes) are the REST API's.
fn save_twin(hub: &Hub, key: &IdentityKey, body: JsonBody) -> HttpResult<Response> {
    let body = body.object()?;
    let etag = match body.get("etag") {
        Some(Value::String(e)) if !e.trim().is_empty() => IfMatch::parse(Some(e)),
        None | Some(Value::Null) => {
            return Err(HubError::new(
                ErrorCode::ArgumentNull,
                "'etag' is required: the portal saves a twin only over the version it showed",
            )
            .into())
        }
        Some(_) => return Err(HubError::invalid("'etag' must be a non-empty string").into()),
    };
    let tags = optional_object(body.get("tags"), "tags")?;
    let desired = match body.get("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => optional_object(p.get("desired"), "properties.desired")?,
        Some(_) => return Err(HubError::invalid("'properties' must be a JSON object").into()),
    };
    let current = hub.registry().get_twin(key)?;
    if let IfMatch::Etag(e) = &etag {
        if current["etag"].as_str() != Some(e.as_str()) {
            return Err(HubError::precondition_failed().into());
        }
    }
    let empty = Map::new();
    let mut patch = Map::new();
    if let Some(tags) = tags {
        let old = current["tags"].as_object().unwrap_or(&empty);
        let d = diff(old, tags);
        if !d.is_empty() {
            patch.insert("tags".into(), Value::Object(d));
        }
    }
    if let Some(desired) = desired {
        let old = without_meta(
            current["properties"]["desired"]
                .as_object()
                .unwrap_or(&empty),
        );
        let d = diff(&old, &without_meta(desired));
        if !d.is_empty() {
            patch.insert("properties".into(), json!({"desired": d}));
        }
    }
    if patch.is_empty() {
        return Ok(ok(&current));
    }
    Ok(ok(&hub.patch_twin(key, &patch, &etag)?))
}

fn optional_object<'a>(
    v: Option<&'a Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, HubError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(HubError::invalid(format!("'{name}' must be a JSON object"))),
    }
}

/// A twin section without its root `$metadata` and `$version`.
fn without_meta(section: &Map<String, Value>) -> Map<String, Value> {
    section
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The JSON merge patch that turns `old` into `new`: changed and added keys, nested objects
/// diffed key by key, `null` for removed keys.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(o), n) if o == n => {}
            (Some(Value::Object(o)), Value::Object(n)) => {
                let d = diff(o, n);
                if !d.is_empty() {
                    out.insert(k.clone(), Value::Object(d));
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.insert(k.clone(), Value::Null);
        }
    }
    out
}

// ----- direct methods -----

async fn invoke_device_method(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::Service)?;
    invoke(&hub, IdentityKey::device(id), body).await
}

async fn invoke_module_method(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path((id, mid)): Path<(String, String)>,
    body: JsonBody,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::Service)?;
    invoke(&hub, IdentityKey::module(id, mid), body).await
}

/// The REST API's method body (`methodName`, `payload`, `responseTimeoutInSeconds`,
/// `connectTimeoutInSeconds`), validated and invoked as `POST /twins/{id}/methods` does.
async fn invoke(hub: &Hub, key: IdentityKey, body: JsonBody) -> HttpResult<Response> {
    let call = MethodCall::from_json(&body.object()?)?;
    let reply = hub.invoke_method(&key, call).await?;
    Ok(ok(
        &json!({"status": reply.status, "payload": reply.payload}),
    ))
}

// ----- telemetry -----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TelemetryQuery {
    device_id: String,
    module_id: Option<String>,
    /// Messages after this sequence number (long poll); absent for the latest few and the
    /// position to poll from.
    after: Option<u64>,
    /// Seconds to wait for a first message (long poll).
    #[serde(default)]
    wait: u64,
}

/// `GET /portal/api/telemetry?deviceId=&moduleId=&after=&wait=`: device-to-cloud messages of
/// one device (with its modules') or of one module, and the hub events routes selected for
/// it, each with its routes and endpoints. Without `after` it returns the latest
/// messages and a `next` to poll from; then it long-polls for newer ones.
async fn telemetry(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    query: Result<Query<TelemetryQuery>, QueryRejection>,
) -> HttpResult<Response> {
    viewer.may(&hub, Access::Control)?;
    let q = query_string(query)?;
    let filter = |m: &crate::telemetry::Message| {
        m.identity.device_id == q.device_id
            && q.module_id
                .as_ref()
                .is_none_or(|mid| Some(mid) == m.identity.module_id.as_ref())
    };
    let log = hub.telemetry();
    let (messages, next) = if let Some(after) = q.after {
        let wait = Duration::from_secs(q.wait).min(TELEMETRY_MAX_WAIT);
        let found = log.read_or_wait(after, TELEMETRY_LIMIT, wait, filter).await;
        let next = found.last().map_or(after, |m| m.sequence);
        (found, next)
    } else {
        let upto = log.last_sequence();
        let mut all = log.read(0, usize::MAX, filter);
        let from = all.len().saturating_sub(TELEMETRY_BACKLOG);
        let latest: Vec<_> = all.drain(from..).collect();
        let next = latest.last().map_or(upto, |m| m.sequence.max(upto));
        (latest, next)
    };
    let endpoints = hub.routing().endpoint_names();
    Ok(ok(&json!({
        "messages": messages.iter().map(|m| m.to_json_routed(endpoints)).collect::<Vec<Value>>(),
        "next": next,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn diff_is_the_merge_patch_between_two_documents() {
        let old = obj(json!({"a": 1, "b": {"x": 1, "y": 2}, "c": [1], "gone": true}));
        let new = obj(json!({"a": 1, "b": {"x": 1, "y": 3, "z": {}}, "c": [1, 2], "new": "v"}));
        assert_eq!(
            Value::Object(diff(&old, &new)),
            json!({"b": {"y": 3, "z": {}}, "c": [1, 2], "new": "v", "gone": null})
        );
        assert!(diff(&old, &old).is_empty());
        // An object replacing a leaf, and a leaf replacing an object.
        assert_eq!(
            Value::Object(diff(
                &obj(json!({"a": 1, "b": {"x": 1}})),
                &obj(json!({"a": {"x": 1}, "b": 2}))
            )),
            json!({"a": {"x": 1}, "b": 2})
        );
    }

    #[test]
    fn regenerating_needs_symmetric_keys() {
        let mut sas = json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "a", "secondaryKey": "b"}}});
        regenerate(&mut sas, "primary").unwrap();
        assert_ne!(sas["authentication"]["symmetricKey"]["primaryKey"], "a");
        assert_eq!(sas["authentication"]["symmetricKey"]["secondaryKey"], "b");
        assert!(regenerate(&mut sas, "tertiary").is_err());
        let mut x509 = json!({"authentication": {"type": "selfSigned"}});
        assert!(regenerate(&mut x509, "both").is_err());
    }
}
