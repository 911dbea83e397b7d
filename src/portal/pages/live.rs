//! The live view of a device or module: its connection, messages and twin as they change.

use super::{error_page, flash, render, tabs};
use crate::hub::{Access, Hub};
use crate::portal::html::{device_url, esc, module_url, seg, Crumb};
use crate::portal::{PageViewer, Viewer};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

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

pub(super) fn live_page(hub: &Hub, viewer: &Viewer, id: &str, mid: Option<&str>) -> Response {
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
<p class="help">Device-to-cloud messages from {scope}, newest first, as the hub receives them, with the routes that selected each one and the endpoints it went to; and the hub's events (twin changes, lifecycle, connection state) when a route selects them.</p>
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
