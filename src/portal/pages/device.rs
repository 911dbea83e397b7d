//! A device's or module's page (identity, credentials, twin, modules) and the add-module form.

use super::{auth_fields, error_page, flash, fragment, render, tabs, ID_HELP};
use crate::hub::{Access, Hub};
use crate::portal::html::{auth_label, badge, device_url, esc, module_url, seg, time_el, Crumb};
use crate::portal::{ApiViewer, PageViewer};
use crate::registry::IdentityKey;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::fmt::Write;

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

pub(super) fn module_rows_html(device_id: &str, modules: &[Value]) -> String {
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
pub(super) fn credentials_section(
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
pub(super) fn secret(id: &str, label: &str, value: &str) -> String {
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
pub(super) fn editable_twin(twin: &Value) -> String {
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
pub(super) fn twin_section(twin: &Value, api: &str, heading: &str) -> String {
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
