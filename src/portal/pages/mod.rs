//! The portal's server-rendered pages and the HTML fragments its live refresh swaps in.
//!
//! Pages read the registry with the same functions the REST API uses; every change is made by
//! `assets/app.js` through the JSON API ([`super::api`]).

use super::html::{esc, layout, page, Crumb, Layout};
use super::Viewer;
use crate::error::HubError;
use crate::hub::Hub;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

mod device;
mod devices;
mod live;

pub use device::{add_module, device, module, module_rows};
pub use devices::{add_device, device_rows, devices};
pub use live::{device_live, module_live};
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

fn fragment(html: String) -> Response {
    page(StatusCode::OK, html)
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
    use super::device::editable_twin;
    use super::devices::device_rows_html;
    use serde_json::{json, Value};

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
