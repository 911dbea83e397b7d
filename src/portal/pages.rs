//! The portal's server-rendered pages and the HTML fragments its live refresh swaps in.
//!
//! Pages read the registry with the same functions the REST API uses; every change is made by
//! `assets/app.js` through the JSON API ([`super::api`]).

use super::html::{
    auth_label, badge, device_url, esc, layout, module_url, page, seg, time_el, Crumb, Layout,
};
use super::{ApiViewer, PageViewer, Viewer};
use crate::error::HubError;
use crate::hub::{Access, Hub};
use crate::registry::IdentityKey;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::fmt::Write;

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    q: String,
    /// The id just created, for the confirmation message.
    #[serde(default)]
    created: String,
    #[serde(default)]
    next: String,
}

/// Renders a full page.
fn render(
    hub: &Hub,
    viewer: &Viewer,
    status: StatusCode,
    title: &str,
    page_kind: &str,
    crumbs: Vec<Crumb>,
    main: &str,
) -> Response {
    let html = layout(
        &Layout {
            title,
            page: page_kind,
            hostname: hub.hostname(),
            crumbs,
            signed_in: viewer.signed_in(),
        },
        main,
    );
    page(status, html)
}

/// An error page for a missing device or module (or any refused read).
fn error_page(hub: &Hub, viewer: &Viewer, e: &HubError) -> Response {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let main = format!(
        "<h1>{}</h1><p class=\"error-text\">{}</p><p><a class=\"button\" href=\"/\">Back to devices</a></p>",
        esc(if status == StatusCode::NOT_FOUND { "Not found" } else { "Cannot show this page" }),
        esc(&e.message)
    );
    render(
        hub,
        viewer,
        status,
        "Error",
        "error",
        vec![Crumb::link("Devices", "/")],
        &main,
    )
}

fn flash(created: &str, what: &str) -> String {
    if created.is_empty() {
        "<p id=\"flash\" class=\"flash\" role=\"status\" aria-live=\"polite\"></p>".to_owned()
    } else {
        format!(
            "<p id=\"flash\" class=\"flash shown\" role=\"status\" aria-live=\"polite\">{what} <strong>{}</strong> created.</p>",
            esc(created)
        )
    }
}

// ----- devices -----

/// `GET /`: the devices list.
pub async fn devices(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(e) = viewer.may(&hub, Access::RegistryRead) {
        return error_page(&hub, &viewer, &e);
    }
    let rows = device_rows_html(&super::api::device_summaries(&hub, &q.q), &q.q);
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
        &super::api::device_summaries(&hub, &q.q),
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

fn fragment(html: String) -> Response {
    page(StatusCode::OK, html)
}

fn device_rows_html(devices: &[Value], q: &str) -> String {
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
fn module_count(d: &Value) -> String {
    let total = d["moduleCount"].as_u64().unwrap_or(0);
    match d["connectedModuleCount"].as_u64().unwrap_or(0) {
        0 => total.to_string(),
        n => format!("{total} ({n} connected)"),
    }
}

/// "1 device", "2 devices".
fn plural(n: usize, one: &str, many: &str) -> String {
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

const ID_HELP: &str =
    "1 to 128 characters: ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '";

/// The authentication part of the create forms: symmetric keys (generated or given) or X.509
/// self-signed thumbprints.
fn auth_fields(what: &str) -> String {
    format!(
        r#"<fieldset class="field">
<legend>Authentication type</legend>
<div class="choices">
<label><input type="radio" name="authType" value="sas" checked> Symmetric key</label>
<label><input type="radio" name="authType" value="selfSigned"> X.509 self-signed</label>
</div>
</fieldset>
<div class="field" data-when-auth="sas">
<label class="check"><input type="checkbox" name="autoGenerate" checked> Auto-generate keys</label>
<div class="field" data-when-manual hidden>
<label for="primary-key-input">Primary key</label>
<input id="primary-key-input" name="primaryKey" autocomplete="off" spellcheck="false" aria-describedby="key-help">
<label for="secondary-key-input">Secondary key</label>
<input id="secondary-key-input" name="secondaryKey" autocomplete="off" spellcheck="false" aria-describedby="key-help">
<p id="key-help" class="help">Base64 keys of 16 to 64 bytes. A key left empty is generated.</p>
</div>
</div>
<div class="field" data-when-auth="selfSigned" hidden>
<label for="primary-thumbprint-input">Primary thumbprint</label>
<input id="primary-thumbprint-input" name="primaryThumbprint" autocomplete="off" spellcheck="false" aria-describedby="thumb-help">
<label for="secondary-thumbprint-input">Secondary thumbprint</label>
<input id="secondary-thumbprint-input" name="secondaryThumbprint" autocomplete="off" spellcheck="false" aria-describedby="thumb-help">
<p id="thumb-help" class="help">SHA-1 (40) or SHA-256 (64) hex thumbprint of the {what}'s self-signed certificate; at least one.</p>
</div>"#
    )
}

// ----- one device -----

#[derive(Deserialize)]
pub struct Created {
    #[serde(default)]
    created: String,
}

/// `GET /portal/devices/{id}`.
pub async fn device(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Path(id): Path<String>,
    Query(q): Query<Created>,
) -> Response {
    let read = viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().get_device(&id))
        .and_then(|d| {
            let modules = hub.registry().list_modules(&id)?;
            let twin = hub.registry().get_twin(&IdentityKey::device(&id))?;
            Ok((d, modules, twin))
        });
    let (device, modules, twin) = match read {
        Ok(r) => r,
        Err(e) => return error_page(&hub, &viewer, &e),
    };
    let api = format!("/portal/api/devices/{}", seg(&id));
    let status = device["status"].as_str().unwrap_or("");
    let (toggle_to, toggle_label) = if status == "enabled" {
        ("disabled", "Disable device")
    } else {
        ("enabled", "Enable device")
    };
    let main = format!(
        r#"<div data-poll="{api}">
<div class="title-row"><h1><span class="kind">Device</span> {eid}</h1></div>
{tabs}
{flash}
<div class="columns">
<section class="card" aria-labelledby="identity-h">
<h2 id="identity-h">Device identity</h2>
<dl class="props">
<dt>Device ID</dt><dd><code>{eid}</code></dd>
<dt>Status</dt><dd>{status_badge}</dd>
<dt>Connection state</dt><dd>{conn}</dd>
<dt>Connection state updated</dt><dd>{conn_updated}</dd>
<dt>Last activity</dt><dd>{last}</dd>
<dt>Authentication</dt><dd>{auth}</dd>
<dt>Cloud-to-device messages queued</dt><dd data-field="device.cloudToDeviceMessageCount">{c2d}</dd>
<dt>IoT Edge</dt><dd>{edge}</dd>
</dl>
<div class="actions">
<button type="button" data-action="set-status" data-api="{eapi}" data-status="{toggle_to}" data-reload>{toggle_label}</button>
<button type="button" class="danger" data-action="delete" data-api="{eapi}" data-then="/" data-confirm="Delete device {eid} and its module identities?">Delete device</button>
</div>
</section>
{creds}
</div>
<section class="card" aria-labelledby="modules-h">
<div class="title-row"><h2 id="modules-h">Module identities</h2>
<a class="button primary" href="{add_module}"><span aria-hidden="true">+</span> Add module identity</a></div>
<div class="table-wrap">
<table class="grid">
<caption class="sr-only">Module identities of {eid}</caption>
<thead><tr><th scope="col">Module ID</th><th scope="col">Connection state</th><th scope="col">Authentication</th><th scope="col">Last activity</th></tr></thead>
<tbody data-fragment="/portal/fragments/devices/{sid}/modules">
{module_rows}</tbody>
</table>
</div>
</section>
{twin}
</div>"#,
        api = esc(&api),
        eapi = esc(&api),
        eid = esc(&id),
        sid = esc(&seg(&id)),
        tabs = tabs(&device_url(&id), false),
        flash = flash(&q.created, "Module identity"),
        status_badge = badge(status, Some("device.status")),
        conn = badge(
            device["connectionState"].as_str().unwrap_or(""),
            Some("device.connectionState")
        ),
        conn_updated = time_el(
            &device["connectionStateUpdatedTime"],
            Some("device.connectionStateUpdatedTime")
        ),
        last = time_el(&device["lastActivityTime"], Some("device.lastActivityTime")),
        auth = auth_label(device["authentication"]["type"].as_str().unwrap_or("")),
        c2d = device["cloudToDeviceMessageCount"],
        edge = if device["capabilities"]["iotEdge"] == true {
            "Yes"
        } else {
            "No"
        },
        creds = credentials_section(&hub, &device, &id, None, &format!("{api}/keys")),
        add_module = esc(&format!("{}/add-module", device_url(&id))),
        module_rows = module_rows_html(&id, &modules),
        twin = twin_section(
            &twin,
            &format!("/portal/api/twins/{}", seg(&id)),
            "Device twin"
        ),
    );
    render(
        &hub,
        &viewer,
        StatusCode::OK,
        &format!("Device {id}"),
        "device",
        vec![Crumb::link("Devices", "/"), Crumb::here(id.clone())],
        &main,
    )
}

/// Details / Live tabs of a device or module page.
fn tabs(base: &str, live: bool) -> String {
    let (details_current, live_current) = if live {
        ("", " aria-current=\"page\"")
    } else {
        (" aria-current=\"page\"", "")
    };
    format!(
        r#"<nav class="tabs" aria-label="Views"><a href="{b}"{details_current}>Details</a><a href="{b}/live"{live_current}>Telemetry &amp; methods</a></nav>"#,
        b = esc(base)
    )
}

/// `GET /portal/fragments/devices/{id}/modules`: the module table's rows.
pub async fn module_rows(
    State(hub): State<Hub>,
    ApiViewer(viewer): ApiViewer,
    Path(id): Path<String>,
) -> Response {
    match viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().list_modules(&id))
    {
        Ok(modules) => fragment(module_rows_html(&id, &modules)),
        Err(e) => crate::http::error::HttpError(e).into_response(),
    }
}

fn module_rows_html(device_id: &str, modules: &[Value]) -> String {
    if modules.is_empty() {
        return "<tr class=\"empty\"><td colspan=\"4\">No module identities yet.</td></tr>\n"
            .to_owned();
    }
    let mut out = String::new();
    for m in modules {
        let mid = m["moduleId"].as_str().unwrap_or("");
        let _ = writeln!(
            out,
            r#"<tr data-id="{emid}"><th scope="row" data-label="Module ID"><a href="{href}">{emid}</a></th><td data-label="Connection state">{conn}</td><td data-label="Authentication">{auth}</td><td data-label="Last activity">{last}</td></tr>"#,
            emid = esc(mid),
            href = esc(&module_url(device_id, mid)),
            conn = badge(m["connectionState"].as_str().unwrap_or(""), None),
            auth = auth_label(m["authentication"]["type"].as_str().unwrap_or("")),
            last = time_el(&m["lastActivityTime"], None),
        );
    }
    out
}

/// `HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…`, never with a trailing `;`.
pub fn connection_string(hub: &Hub, device_id: &str, module_id: Option<&str>, key: &str) -> String {
    let mut s = format!("HostName={};DeviceId={device_id}", hub.hostname());
    if let Some(m) = module_id {
        let _ = write!(s, ";ModuleId={m}");
    }
    let _ = write!(s, ";SharedAccessKey={key}");
    s
}

/// Keys and connection strings (symmetric keys) or thumbprints (X.509).
fn credentials_section(
    hub: &Hub,
    identity: &Value,
    device_id: &str,
    module_id: Option<&str>,
    keys_api: &str,
) -> String {
    let auth = &identity["authentication"];
    let body = match auth["type"].as_str().unwrap_or("") {
        "sas" => {
            let primary = auth["symmetricKey"]["primaryKey"].as_str().unwrap_or("");
            let secondary = auth["symmetricKey"]["secondaryKey"].as_str().unwrap_or("");
            let mut out = String::new();
            for (id, label, value) in [
                ("primary-key", "Primary key", primary.to_owned()),
                ("secondary-key", "Secondary key", secondary.to_owned()),
                (
                    "primary-connection-string",
                    "Primary connection string",
                    connection_string(hub, device_id, module_id, primary),
                ),
                (
                    "secondary-connection-string",
                    "Secondary connection string",
                    connection_string(hub, device_id, module_id, secondary),
                ),
            ] {
                out.push_str(&secret(id, label, &value));
            }
            let _ = write!(
                out,
                r#"<div class="actions">
<button type="button" data-action="regenerate" data-api="{api}" data-which="primary" data-reload data-confirm="Regenerate the primary key? Connection strings that use it stop working.">Regenerate primary key</button>
<button type="button" data-action="regenerate" data-api="{api}" data-which="secondary" data-reload data-confirm="Regenerate the secondary key? Connection strings that use it stop working.">Regenerate secondary key</button>
</div>"#,
                api = esc(keys_api)
            );
            out
        }
        "selfSigned" => {
            let t = &auth["x509Thumbprint"];
            format!(
                r#"<dl class="props"><dt>Primary thumbprint</dt><dd><code>{}</code></dd><dt>Secondary thumbprint</dt><dd><code>{}</code></dd></dl>
<p class="help">Connect with a client certificate whose SHA-1 or SHA-256 thumbprint is one of these, and a connection string without a key: <code>{}</code>.</p>"#,
                esc(t["primaryThumbprint"].as_str().unwrap_or("—")),
                esc(t["secondaryThumbprint"].as_str().unwrap_or("—")),
                esc(&format!(
                    "HostName={};DeviceId={device_id}{}",
                    hub.hostname(),
                    module_id.map_or(String::new(), |m| format!(";ModuleId={m}"))
                )),
            )
        }
        "certificateAuthority" => "<p>Authenticates with a certificate signed by a CA registered with the hub. The emulator cannot register CAs, so this identity cannot connect.</p>".to_owned(),
        _ => "<p>This identity has no credentials of its own.</p>".to_owned(),
    };
    format!(
        r#"<section class="card" aria-labelledby="creds-h"><h2 id="creds-h">Keys and connection strings</h2>
{body}
</section>"#
    )
}

/// A secret value: masked, with Show and Copy buttons.
fn secret(id: &str, label: &str, value: &str) -> String {
    format!(
        r#"<div class="secret">
<label for="{id}">{label}</label>
<div class="secret-row">
<input id="{id}" type="password" readonly value="{v}" spellcheck="false" autocomplete="off" data-secret>
<button type="button" data-show="{id}" aria-pressed="false" aria-label="Show {label}">Show</button>
<button type="button" data-copy="{id}" aria-label="Copy {label}">Copy</button>
</div>
</div>
"#,
        v = esc(value),
        label = esc(label),
    )
}

/// The editable part of a twin: tags and desired properties without `$metadata`/`$version`.
fn editable_twin(twin: &Value) -> String {
    let desired: Map<String, Value> = twin["properties"]["desired"]
        .as_object()
        .map(|d| {
            d.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let tags = twin
        .get("tags")
        .filter(|t| t.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    serde_json::to_string_pretty(&json!({"tags": tags, "properties": {"desired": desired}}))
        .unwrap_or_default()
}

/// The twin viewer (whole twin, live) and the editor for tags and desired properties.
fn twin_section(twin: &Value, api: &str, heading: &str) -> String {
    let etag = twin["etag"].as_str().unwrap_or("");
    format!(
        r#"<section class="card twin" aria-labelledby="twin-h" data-twin="{api}">
<h2 id="twin-h">{heading}</h2>
<div class="twin-grid">
<div class="twin-edit">
<h3 id="twin-edit-h">Edit tags and desired properties</h3>
<p class="help" id="twin-edit-help">Change <code>tags</code> and <code>properties.desired</code> and save: the hub applies the differences as one twin update, so a removed key is deleted. The save is refused if the twin changed after it was loaded (etag <code data-twin-etag>{etag}</code>). Reported properties are written by the device only.</p>
<label for="twin-editor">Tags and desired properties (JSON)</label>
<textarea id="twin-editor" rows="14" spellcheck="false" autocomplete="off" data-twin-editor data-etag="{etag}" aria-describedby="twin-edit-help">{doc}</textarea>
<p class="notice" data-twin-notice hidden></p>
<p class="form-error" role="alert" data-twin-error></p>
<div class="actions"><button type="button" class="primary" data-twin-save>Save</button> <button type="button" data-twin-discard>Discard changes</button></div>
</div>
<div class="twin-view">
<h3 id="twin-view-h">Twin JSON <span class="muted">(read-only, live)</span></h3>
<pre tabindex="0" aria-labelledby="twin-view-h" data-twin-view>{full}</pre>
</div>
</div>
</section>"#,
        api = esc(api),
        heading = esc(heading),
        etag = esc(etag),
        doc = esc(&editable_twin(twin)),
        full = esc(&serde_json::to_string_pretty(twin).unwrap_or_default()),
    )
}

// ----- modules -----

/// `GET /portal/devices/{id}/add-module`.
pub async fn add_module(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().get_device(&id))
    {
        return error_page(&hub, &viewer, &e);
    }
    let main = format!(
        r#"<h1>Add module identity <span class="muted">to {eid}</span></h1>
<form class="card form" data-create="module" data-api="/portal/api/devices/{sid}/modules" data-then="{then}?created=" novalidate>
<div class="field">
<label for="identity-id">Module identity name <span class="req" aria-hidden="true">*</span></label>
<input id="identity-id" name="id" required maxlength="128" autocomplete="off" spellcheck="false" aria-describedby="identity-id-help">
<p id="identity-id-help" class="help">{id_help}</p>
</div>
{auth}
<p class="form-error" role="alert" data-form-error></p>
<div class="actions"><button type="submit" class="primary">Save</button> <a class="button" href="{then}">Cancel</a></div>
</form>"#,
        eid = esc(&id),
        sid = esc(&seg(&id)),
        then = esc(&device_url(&id)),
        id_help = ID_HELP,
        auth = auth_fields("module"),
    );
    render(
        &hub,
        &viewer,
        StatusCode::OK,
        "Add module identity",
        "form",
        vec![
            Crumb::link("Devices", "/"),
            Crumb::link(id.clone(), device_url(&id)),
            Crumb::here("Add module identity"),
        ],
        &main,
    )
}

/// `GET /portal/devices/{id}/modules/{mid}`: the module identity details.
pub async fn module(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Path((id, mid)): Path<(String, String)>,
) -> Response {
    let key = IdentityKey::module(&id, &mid);
    let read = viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().get_module(&id, &mid))
        .and_then(|m| Ok((m, hub.registry().get_twin(&key)?)));
    let (module, twin) = match read {
        Ok(r) => r,
        Err(e) => return error_page(&hub, &viewer, &e),
    };
    let api = format!("/portal/api/devices/{}/modules/{}", seg(&id), seg(&mid));
    let main = format!(
        r#"<div data-poll="{eapi}">
<div class="title-row"><h1><span class="kind">Module identity</span> {emid}</h1></div>
{tabs}
{flash}
<div class="columns">
<section class="card" aria-labelledby="identity-h">
<h2 id="identity-h">Module identity details</h2>
<dl class="props">
<dt>Module ID</dt><dd><code>{emid}</code></dd>
<dt>Device ID</dt><dd><a href="{dhref}"><code>{eid}</code></a></dd>
<dt>Connection state</dt><dd>{conn}</dd>
<dt>Connection state updated</dt><dd>{conn_updated}</dd>
<dt>Last activity</dt><dd>{last}</dd>
<dt>Authentication</dt><dd>{auth}</dd>
<dt>Managed by</dt><dd>{managed}</dd>
</dl>
<div class="actions">
<button type="button" class="danger" data-action="delete" data-api="{eapi}" data-then="{dhref}" data-confirm="Delete module identity {emid}?">Delete module identity</button>
</div>
</section>
{creds}
</div>
{twin}
</div>"#,
        eapi = esc(&api),
        emid = esc(&mid),
        eid = esc(&id),
        dhref = esc(&device_url(&id)),
        tabs = tabs(&module_url(&id, &mid), false),
        flash = flash("", ""),
        conn = badge(
            module["connectionState"].as_str().unwrap_or(""),
            Some("module.connectionState")
        ),
        conn_updated = time_el(
            &module["connectionStateUpdatedTime"],
            Some("module.connectionStateUpdatedTime")
        ),
        last = time_el(&module["lastActivityTime"], Some("module.lastActivityTime")),
        auth = auth_label(module["authentication"]["type"].as_str().unwrap_or("")),
        managed = esc(module["managedBy"].as_str().unwrap_or("—")),
        creds = credentials_section(&hub, &module, &id, Some(&mid), &format!("{api}/keys")),
        twin = twin_section(
            &twin,
            &format!("/portal/api/twins/{}/modules/{}", seg(&id), seg(&mid)),
            "Module identity twin"
        ),
    );
    render(
        &hub,
        &viewer,
        StatusCode::OK,
        &format!("Module {mid}"),
        "module",
        vec![
            Crumb::link("Devices", "/"),
            Crumb::link(id.clone(), device_url(&id)),
            Crumb::here(mid.clone()),
        ],
        &main,
    )
}

// ----- live view -----

/// `GET /portal/devices/{id}/live`.
pub async fn device_live(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().get_device(&id))
    {
        return error_page(&hub, &viewer, &e);
    }
    live_page(&hub, &viewer, &id, None)
}

/// `GET /portal/devices/{id}/modules/{mid}/live`.
pub async fn module_live(
    State(hub): State<Hub>,
    PageViewer(viewer): PageViewer,
    Path((id, mid)): Path<(String, String)>,
) -> Response {
    if let Err(e) = viewer
        .may(&hub, Access::RegistryRead)
        .and_then(|()| hub.registry().get_module(&id, &mid))
    {
        return error_page(&hub, &viewer, &e);
    }
    live_page(&hub, &viewer, &id, Some(&mid))
}

fn live_page(hub: &Hub, viewer: &Viewer, id: &str, mid: Option<&str>) -> Response {
    let (base, name, telemetry, methods, scope) = match mid {
        Some(m) => (
            module_url(id, m),
            format!("{id}/{m}"),
            format!(
                "/portal/api/telemetry?deviceId={}&moduleId={}",
                seg(id),
                seg(m)
            ),
            format!("/portal/api/methods/{}/modules/{}", seg(id), seg(m)),
            "this module",
        ),
        None => (
            device_url(id),
            id.to_owned(),
            format!("/portal/api/telemetry?deviceId={}", seg(id)),
            format!("/portal/api/methods/{}", seg(id)),
            "this device and its modules",
        ),
    };
    let main = format!(
        r#"<div class="title-row"><h1><span class="kind">{kind}</span> {ename}</h1></div>
{tabs}
{flash}
<div class="columns live-columns">
<section class="card" aria-labelledby="telemetry-h">
<div class="title-row"><h2 id="telemetry-h">Telemetry</h2>
<div class="toolbar compact">
<button type="button" data-live-pause aria-pressed="false">Pause</button>
<button type="button" data-live-clear>Clear</button>
</div></div>
<p class="help">Device-to-cloud messages from {scope}, newest first, as the hub receives them.</p>
<p class="live-status" role="status" data-live-status>Connecting…</p>
<ol class="messages" data-telemetry="{telemetry}" aria-labelledby="telemetry-h"></ol>
</section>
<section class="card" aria-labelledby="method-h">
<h2 id="method-h">Direct method</h2>
<form class="form" data-method="{methods}" novalidate>
<div class="field"><label for="method-name">Method name</label>
<input id="method-name" name="methodName" required maxlength="128" autocomplete="off" spellcheck="false"></div>
<div class="field"><label for="method-payload">Payload (JSON)</label>
<textarea id="method-payload" name="payload" rows="5" spellcheck="false">{{}}</textarea></div>
<div class="field-row">
<div class="field"><label for="method-timeout">Response timeout (s)</label>
<input id="method-timeout" name="responseTimeoutInSeconds" type="number" min="5" max="300" value="30"></div>
<div class="field"><label for="method-connect-timeout">Connect timeout (s)</label>
<input id="method-connect-timeout" name="connectTimeoutInSeconds" type="number" min="0" max="300" value="0"></div>
</div>
<p class="form-error" role="alert" data-form-error></p>
<div class="actions"><button type="submit" class="primary">Invoke method</button></div>
</form>
<h3 id="method-result-h">Result</h3>
<output class="method-result" aria-labelledby="method-result-h" data-method-result><span class="muted">No call yet.</span></output>
</section>
</div>"#,
        kind = if mid.is_some() {
            "Module identity"
        } else {
            "Device"
        },
        ename = esc(&name),
        tabs = tabs(&base, true),
        flash = flash("", ""),
        telemetry = esc(&telemetry),
        methods = esc(&methods),
    );
    let mut crumbs = vec![Crumb::link("Devices", "/"), Crumb::link(id, device_url(id))];
    if let Some(m) = mid {
        crumbs.push(Crumb::link(m, module_url(id, m)));
    }
    crumbs.push(Crumb::here("Telemetry & methods"));
    render(
        hub,
        viewer,
        StatusCode::OK,
        &format!("Live: {name}"),
        "live",
        crumbs,
        &main,
    )
}

// ----- sign-in -----

/// `GET /portal/login?next=`.
pub async fn sign_in_page(State(hub): State<Hub>, Query(q): Query<PageQuery>) -> Response {
    if hub.loopback_only() {
        return Redirect::to(super::safe_next(&q.next)).into_response();
    }
    sign_in_form(&hub, super::safe_next(&q.next), None, StatusCode::OK)
}

/// The sign-in form, with an error after a refused key.
pub fn sign_in_form(hub: &Hub, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let error = error.map_or(String::new(), |e| {
        format!(
            "<p class=\"form-error shown\" role=\"alert\">{}</p>",
            esc(e)
        )
    });
    let main = format!(
        r#"<h1>Sign in</h1>
<p>This emulator listens beyond this machine, so its portal asks who you are. Paste the key, or the connection string, of a shared access policy with <strong>RegistryWrite</strong>, such as <code>iothubowner</code> (the owner connection string is printed at start-up).</p>
<form class="card form narrow" method="post" action="/portal/login">
<input type="hidden" name="next" value="{next}">
<div class="field"><label for="key">Policy key or connection string</label>
<input id="key" name="key" type="password" required autocomplete="current-password" spellcheck="false" autofocus></div>
{error}
<div class="actions"><button type="submit" class="primary">Sign in</button></div>
</form>"#,
        next = esc(next),
    );
    let viewer = Viewer { policy: None };
    render(hub, &viewer, status, "Sign in", "signin", vec![], &main)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editable_twin_drops_metadata_and_keeps_tags() {
        let twin = json!({
            "tags": {"site": "a"},
            "properties": {"desired": {"x": 1, "$metadata": {}, "$version": 2}, "reported": {"y": 1}}
        });
        let doc: Value = serde_json::from_str(&editable_twin(&twin)).unwrap();
        assert_eq!(
            doc,
            json!({"tags": {"site": "a"}, "properties": {"desired": {"x": 1}}})
        );
        let bare: Value = serde_json::from_str(&editable_twin(&json!({"properties": {}}))).unwrap();
        assert_eq!(bare, json!({"tags": {}, "properties": {"desired": {}}}));
    }

    #[test]
    fn rows_escape_ids() {
        let rows = device_rows_html(
            &[
                json!({"deviceId": "a'<b", "status": "enabled", "connectionState": "Connected",
                      "authentication": {"type": "sas"}, "moduleCount": 0,
                      "cloudToDeviceMessageCount": 0, "lastActivityTime": "0001-01-01T00:00:00Z"}),
            ],
            "",
        );
        assert!(rows.contains("a&#39;&lt;b"));
        assert!(!rows.contains("a'<b"));
        assert!(rows.contains("/portal/devices/a%27%3Cb"));
    }
}
