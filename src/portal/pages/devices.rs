//! The device list, its live rows, and the add-device form.

use super::{auth_fields, error_page, flash, fragment, render, PageQuery, ID_HELP};
use crate::hub::{Access, Hub};
use crate::portal::html::{auth_label, badge, device_url, esc, seg, time_el, Crumb};
use crate::portal::{ApiViewer, PageViewer};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::fmt::Write;

/// `GET /`: the devices list.
pub async fn devices(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(e) = viewer.may(&hub, Access::RegistryRead) {
        return error_page(&hub, &viewer, &e);
    }
    let rows = device_rows_html(&crate::portal::api::device_summaries(&hub, &q.q), &q.q);
    let stats = hub.registry().device_stats();
    let main = format!(
        r#"<div class="title-row"><h1>Devices</h1>
<p class="counts" data-poll-counts>{total} · {enabled} enabled · {disabled} disabled</p></div>
{flash}
<div class="toolbar">
<a class="button primary" href="/portal/add-device"><span aria-hidden="true">+</span> Add device</a>
<form class="search" role="search" method="get" action="/">
<label for="q">Search by device ID</label>
<input type="search" id="q" name="q" value="{qv}" autocomplete="off" placeholder="device ID contains…">
<button type="submit">Search</button>
</form>
<span class="live" title="This list refreshes every two seconds"><span class="dot" aria-hidden="true"></span> Live</span>
</div>
<div class="table-wrap">
<table class="grid" id="devices">
<caption class="sr-only">Devices of this hub, refreshed every two seconds</caption>
<thead><tr><th scope="col">Device ID</th><th scope="col">Status</th><th scope="col">Connection state</th><th scope="col">Authentication</th><th scope="col">Modules</th><th scope="col">C2D queued</th><th scope="col">Last activity</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
<tbody data-fragment="/portal/fragments/devices" data-fragment-query="q">
{rows}</tbody>
</table>
</div>"#,
        total = plural(stats.total, "device", "devices"),
        enabled = stats.enabled,
        disabled = stats.disabled,
        flash = flash(&q.created, "Device"),
        qv = esc(&q.q),
    );
    render(
        &hub,
        &viewer,
        StatusCode::OK,
        "Devices",
        "devices",
        vec![],
        &main,
    )
}

/// `GET /portal/fragments/devices?q=`: the devices table's rows.
pub async fn device_rows(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(e) = viewer.may(&hub, Access::RegistryRead) {
        return crate::http::error::HttpError(e).into_response();
    }
    let mut response = fragment(device_rows_html(
        &crate::portal::api::device_summaries(&hub, &q.q),
        &q.q,
    ));
    let s = hub.registry().device_stats();
    if let Ok(v) =
        axum::http::HeaderValue::from_str(&format!("{},{},{}", s.total, s.enabled, s.disabled))
    {
        response.headers_mut().insert("x-portal-counts", v);
    }
    response
}

pub(super) fn device_rows_html(devices: &[Value], q: &str) -> String {
    if devices.is_empty() {
        let text = if q.trim().is_empty() {
            "No devices yet. <a href=\"/portal/add-device\">Add a device</a>, or create one with an SDK or the REST API.".to_owned()
        } else {
            format!("No device ID contains “{}”.", esc(q.trim()))
        };
        return format!("<tr class=\"empty\"><td colspan=\"8\">{text}</td></tr>\n");
    }
    let mut out = String::new();
    for d in devices {
        let id = d["deviceId"].as_str().unwrap_or("");
        let status = d["status"].as_str().unwrap_or("");
        let api = format!("/portal/api/devices/{}", seg(id));
        let (toggle_to, toggle_label) = if status == "enabled" {
            ("disabled", "Disable")
        } else {
            ("enabled", "Enable")
        };
        let is_sas = d["authentication"]["type"] == "sas";
        let regenerate = if is_sas {
            format!(
                r#"<button type="button" data-action="regenerate" data-api="{api}/keys" data-which="both" data-confirm="Regenerate both keys of {eid}? Connection strings that use the old keys stop working." aria-label="Regenerate keys of {eid}">Regenerate keys</button>"#,
                eid = esc(id)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            r#"<tr data-id="{eid}"><th scope="row" data-label="Device ID"><a href="{href}">{eid}</a></th><td data-label="Status">{status}</td><td data-label="Connection state">{conn}</td><td data-label="Authentication">{auth}</td><td data-label="Modules">{modules}</td><td data-label="C2D queued">{c2d}</td><td data-label="Last activity">{last}</td><td class="cell-actions"><div class="row-actions"><button type="button" data-action="set-status" data-api="{api}" data-status="{toggle_to}" aria-label="{toggle_label} {eid}">{toggle_label}</button>{regenerate}<button type="button" class="danger" data-action="delete" data-api="{api}" data-confirm="Delete device {eid} and its module identities?" aria-label="Delete {eid}">Delete</button></div></td></tr>"#,
            eid = esc(id),
            href = esc(&device_url(id)),
            api = esc(&api),
            status = badge(status, None),
            conn = badge(d["connectionState"].as_str().unwrap_or(""), None),
            auth = auth_label(d["authentication"]["type"].as_str().unwrap_or("")),
            modules = module_count(d),
            c2d = d["cloudToDeviceMessageCount"],
            last = time_el(&d["lastActivityTime"], None),
        );
    }
    out
}

/// "2", or "2 (1 connected)".
pub(super) fn module_count(d: &Value) -> String {
    let total = d["moduleCount"].as_u64().unwrap_or(0);
    match d["connectedModuleCount"].as_u64().unwrap_or(0) {
        0 => total.to_string(),
        n => format!("{total} ({n} connected)"),
    }
}

/// "1 device", "2 devices".
pub(super) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `GET /portal/add-device`.
pub async fn add_device(State(hub): State<Hub>, PageViewer(viewer): PageViewer) -> Response {
    let main = format!(
        r#"<h1>Add a device</h1>
<form class="card form" data-create="device" data-api="/portal/api/devices" data-then="/?created=" novalidate>
<div class="field">
<label for="identity-id">Device ID <span class="req" aria-hidden="true">*</span></label>
<input id="identity-id" name="id" required maxlength="128" autocomplete="off" spellcheck="false" aria-describedby="identity-id-help">
<p id="identity-id-help" class="help">{id_help}</p>
</div>
{auth}
<fieldset class="field">
<legend>Connect this device to IoT Hub</legend>
<div class="choices">
<label><input type="radio" name="status" value="enabled" checked> Enable</label>
<label><input type="radio" name="status" value="disabled"> Disable</label>
</div>
</fieldset>
<p class="form-error" role="alert" data-form-error></p>
<div class="actions"><button type="submit" class="primary">Save</button> <a class="button" href="/">Cancel</a></div>
</form>"#,
        id_help = ID_HELP,
        auth = auth_fields("device"),
    );
    render(
        &hub,
        &viewer,
        StatusCode::OK,
        "Add a device",
        "form",
        vec![Crumb::link("Devices", "/"), Crumb::here("Add a device")],
        &main,
    )
}
