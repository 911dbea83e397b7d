//! Identity registry routes: devices, modules, bulk operations and statistics
//! (`shared/protocol.md` E.2).

use super::body::{ok, query_string, JsonBody};
use super::error::HttpResult;
use super::no_content;
use super::precondition::{delete_precondition, if_match};
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::registry::{IdentityKey, IfMatch};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// IoT Hub returns at most 1000 devices from `GET /devices`.
const MAX_LIST: usize = 1000;
/// Most operations in one bulk request.
const MAX_BULK: usize = 100;

pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/devices", get(list_devices).post(bulk))
        .route("/devices/", get(list_devices).post(bulk))
        .route(
            "/devices/{id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        .route("/devices/keys/regenerate", post(regenerate_keys))
        .route("/devices/{id}/commands", delete(purge_c2d))
        .route("/devices/{id}/modules", get(list_modules))
        .route("/devices/{id}/modules/", get(list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(get_module).put(put_module).delete(delete_module),
        )
        .route("/statistics/devices", get(device_statistics))
        .route("/statistics/service", get(service_statistics))
}

#[derive(Deserialize)]
struct ListQuery {
    top: Option<String>,
}

async fn list_devices(
    State(hub): State<Hub>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> HttpResult<Response> {
    let q = query_string(query)?;
    let top = match q.top.as_deref() {
        None | Some("") => MAX_LIST,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| {
                HubError::invalid(format!("'top' must be a number from 1 to {MAX_LIST}"))
            })?,
    };
    Ok(ok(&Value::Array(hub.registry().list_devices(top))))
}

async fn get_device(State(hub): State<Hub>, Path(id): Path<String>) -> HttpResult<Response> {
    Ok(ok(&hub.registry().get_device(&id)?))
}

async fn put_device(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    Ok(ok(&hub.registry().put_device(
        &id,
        &body,
        &if_match(&headers),
    )?))
}

async fn delete_device(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    hub.registry()
        .delete_device(&id, &delete_precondition(&headers))?;
    Ok(no_content())
}

async fn list_modules(State(hub): State<Hub>, Path(id): Path<String>) -> HttpResult<Response> {
    Ok(ok(&Value::Array(hub.registry().list_modules(&id)?)))
}

async fn get_module(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
) -> HttpResult<Response> {
    Ok(ok(&hub.registry().get_module(&id, &mid)?))
}

async fn put_module(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    Ok(ok(&hub.registry().put_module(
        &id,
        &mid,
        &body,
        &if_match(&headers),
    )?))
}

async fn delete_module(
    State(hub): State<Hub>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    hub.delete_module(&id, &mid, &delete_precondition(&headers))?;
    Ok(no_content())
}

async fn device_statistics(State(hub): State<Hub>) -> Response {
    let s = hub.registry().device_stats();
    ok(&json!({
        "totalDeviceCount": s.total,
        "enabledDeviceCount": s.enabled,
        "disabledDeviceCount": s.disabled,
    }))
}

async fn service_statistics(State(hub): State<Hub>) -> Response {
    ok(&json!({"connectedDeviceCount": hub.connections().connected_devices()}))
}

/// One operation of a bulk request, validated before anything is applied.
struct BulkItem {
    device_id: String,
    module_id: Option<String>,
    mode: String,
    etag: Option<String>,
    body: Map<String, Value>,
}

/// 400 unless a bulk request names 1 to [`MAX_BULK`] items.
fn check_bulk_size(len: usize, request: &str, items: &str) -> Result<(), HubError> {
    if len == 0 || len > MAX_BULK {
        return Err(HubError::invalid(format!(
            "{request} 1 to {MAX_BULK} {items}, not {len}"
        )));
    }
    Ok(())
}

/// `POST /devices`: up to 100 create/update/delete operations. The request as a whole is
/// validated first (a malformed one changes nothing); then each operation is applied on its
/// own and failures are reported per item, with 400 if any failed.
async fn bulk(State(hub): State<Hub>, body: JsonBody) -> HttpResult<Response> {
    let Value::Array(items) = body.0 else {
        return Err(HubError::invalid("The request body must be a JSON array of devices").into());
    };
    check_bulk_size(items.len(), "A bulk request must hold", "devices")?;
    let parsed = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| parse_bulk_item(i, item))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = hub.registry();
    let mut errors = Vec::new();
    for item in &parsed {
        let matching = item.etag.clone().map_or(IfMatch::Any, IfMatch::Etag);
        let require_etag = item.mode.ends_with("ifmatchetag");
        if require_etag && item.etag.is_none() {
            errors.push(bulk_error(
                item,
                &HubError::invalid("this importMode needs an eTag"),
            ));
            continue;
        }
        let precondition = if require_etag { matching } else { IfMatch::Any };
        let key = IdentityKey {
            device_id: item.device_id.clone(),
            module_id: item.module_id.clone(),
        };
        let result = match (item.mode.as_str(), &item.module_id) {
            ("create", None) => registry
                .put_device(&item.device_id, &item.body, &IfMatch::Absent)
                .map(drop),
            ("create", Some(m)) => registry
                .put_module(&item.device_id, m, &item.body, &IfMatch::Absent)
                .map(drop),
            ("update" | "updateifmatchetag", None) => upsert_device(&hub, item, &precondition),
            ("update" | "updateifmatchetag", Some(m)) => registry
                .put_module(&item.device_id, m, &item.body, &precondition)
                .or_else(|e| match e.code {
                    ErrorCode::ModuleNotFound if !require_etag => {
                        registry.put_module(&item.device_id, m, &item.body, &IfMatch::Absent)
                    }
                    _ => Err(e),
                })
                .map(drop),
            ("delete" | "deleteifmatchetag", None) => {
                hub.delete_device(&item.device_id, &precondition)
            }
            ("delete" | "deleteifmatchetag", Some(m)) => {
                hub.delete_module(&item.device_id, m, &precondition)
            }
            ("updatetwin" | "updatetwinifmatchetag", _) => {
                hub.patch_twin(&key, &item.body, &precondition).map(drop)
            }
            _ => unreachable!("modes are checked in parse_bulk_item"),
        };
        if let Err(e) = result {
            errors.push(bulk_error(item, &e));
        }
    }
    let status = if errors.is_empty() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::BAD_REQUEST
    };
    Ok(super::body::json_response(
        status,
        &json!({"isSuccessful": errors.is_empty(), "errors": errors, "warnings": []}),
    ))
}

/// `update` creates the device when it does not exist (IoT Hub's import semantics).
fn upsert_device(hub: &Hub, item: &BulkItem, precondition: &IfMatch) -> Result<(), HubError> {
    let registry = hub.registry();
    match registry.put_device(&item.device_id, &item.body, precondition) {
        Err(e) if e.code == ErrorCode::DeviceNotFound && *precondition == IfMatch::Any => registry
            .put_device(&item.device_id, &item.body, &IfMatch::Absent)
            .map(drop),
        other => other.map(drop),
    }
}

fn parse_bulk_item(index: usize, item: Value) -> Result<BulkItem, HubError> {
    let Value::Object(mut body) = item else {
        return Err(HubError::invalid(format!(
            "Item {index} is not a JSON object"
        )));
    };
    let text = |body: &Map<String, Value>, field: &str| -> Result<Option<String>, HubError> {
        match body.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(HubError::invalid(format!(
                "Item {index}: '{field}' must be a string"
            ))),
        }
    };
    let device_id = text(&body, "id")?.ok_or_else(|| {
        HubError::new(ErrorCode::ArgumentNull, format!("Item {index} has no 'id'"))
    })?;
    let module_id = text(&body, "moduleId")?.filter(|m| !m.is_empty());
    let mode = text(&body, "importMode")?
        .unwrap_or_else(|| "create".to_owned())
        .to_ascii_lowercase();
    const MODES: [&str; 7] = [
        "create",
        "update",
        "updateifmatchetag",
        "delete",
        "deleteifmatchetag",
        "updatetwin",
        "updatetwinifmatchetag",
    ];
    if !MODES.contains(&mode.as_str()) {
        return Err(HubError::invalid(format!(
            "Item {index}: importMode {mode:?} is not one of {}",
            MODES.join(", ")
        )));
    }
    let etag = text(&body, "eTag")?
        .or(text(&body, "twinETag")?)
        .map(|e| e.trim_matches('"').to_owned());
    // The bulk body names the device `id`; the identity parsers expect `deviceId`.
    body.remove("id");
    body.insert("deviceId".into(), json!(device_id));
    Ok(BulkItem {
        device_id,
        module_id,
        mode,
        etag,
        body,
    })
}

fn bulk_error(item: &BulkItem, e: &HubError) -> Value {
    json!({
        "deviceId": item.device_id,
        "moduleId": item.module_id,
        "errorCode": e.code.name(),
        "errorStatus": e.message,
        "operation": item.mode,
    })
}

/// `DELETE /devices/{id}/commands`: purges the device's cloud-to-device queue
/// (`PurgeMessageQueueResult`, as `az iot device c2d-message purge` reads it).
async fn purge_c2d(State(hub): State<Hub>, Path(id): Path<String>) -> HttpResult<Response> {
    let purged = hub.registry().purge_c2d(&id)?;
    Ok(ok(
        &json!({"deviceId": id, "moduleId": null, "totalMessagesPurged": purged}),
    ))
}

/// `POST /devices/keys/regenerate`: new random keys for up to 100 devices or modules
/// (`{"policyKey": "primaryKey" | "secondaryKey" | "both", "devices": [{"id", "moduleId"}]}`,
/// as `az iot hub device-identity renew-key` sends it). The request is checked whole first;
/// then each identity is done on its own: 200 when all succeed, 207 when some fail, 400 when
/// all fail, each failure named in `errors`.
async fn regenerate_keys(State(hub): State<Hub>, body: JsonBody) -> HttpResult<Response> {
    let body = body.object()?;
    let policy = body.get("policyKey").and_then(Value::as_str).unwrap_or("");
    let (primary, secondary) = match policy.to_ascii_lowercase().as_str() {
        "primarykey" | "primary" => (true, false),
        "secondarykey" | "secondary" => (false, true),
        "both" => (true, true),
        _ => {
            return Err(HubError::invalid(format!(
                "'policyKey' must be primaryKey, secondaryKey or both, not {policy:?}"
            ))
            .into())
        }
    };
    let Some(Value::Array(items)) = body.get("devices") else {
        return Err(HubError::invalid("'devices' must be a JSON array of {id, moduleId}").into());
    };
    check_bulk_size(
        items.len(),
        "A key regeneration request must name",
        "identities",
    )?;
    let keys = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |name: &str| match item.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(HubError::invalid(format!(
                    "devices[{i}].{name} must be a string"
                ))),
            };
            let device_id = field("id")?.ok_or_else(|| {
                HubError::new(ErrorCode::ArgumentNull, format!("devices[{i}] has no 'id'"))
            })?;
            Ok(IdentityKey {
                device_id,
                module_id: field("moduleId")?,
            })
        })
        .collect::<Result<Vec<_>, HubError>>()?;
    let (mut rotated, mut errors) = (Vec::new(), Vec::new());
    for key in &keys {
        match hub.registry().regenerate_keys(key, primary, secondary) {
            Ok([p, s]) => rotated.push(json!({
                "id": key.device_id, "moduleId": key.module_id,
                "primaryKey": p, "secondaryKey": s,
            })),
            Err(e) => errors.push(json!({
                "id": key.device_id, "moduleId": key.module_id,
                "errorCode": e.code.name(), "errorStatus": e.message,
            })),
        }
    }
    let status = match (rotated.is_empty(), errors.is_empty()) {
        (_, true) => axum::http::StatusCode::OK,
        (false, false) => axum::http::StatusCode::MULTI_STATUS,
        (true, false) => axum::http::StatusCode::BAD_REQUEST,
    };
    Ok(super::body::json_response(
        status,
        &json!({"policyKey": policy, "rotatedKeys": rotated, "errors": errors}),
    ))
}
