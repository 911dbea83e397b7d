//! The web portal: a small UI for the hub, served by the emulator itself on the HTTPS port at `/`.
//!
//! # Screens
//! - `/`: devices (status, connection state, live refresh, search, enable/disable, regenerate
//!   keys, delete) and `/portal/add-device` (symmetric keys, generated or given, or X.509
//!   thumbprints).
//! - `/portal/devices/{id}`: a device, its keys and connection strings, its module identities
//!   ("Add module identity" at `/portal/devices/{id}/add-module`), its twin.
//! - `/portal/devices/{id}/modules/{mid}`: a module identity, its connection strings, connection
//!   state and last activity, its twin (viewer, and an editor for tags and desired properties
//!   that saves only over the version it showed).
//! - `…/live`: telemetry from the device or module as it arrives, and a direct-method form.
//!
//! Pages are rendered on the server ([`pages`]); `assets/app.js` adds live refresh, the forms
//! and the copy buttons, through the portal's own JSON API under `/portal/api/` ([`api`]).
//!
//! # The same rules as the REST API
//! Every change goes through the hub and registry functions the REST API calls
//! (`Registry::put_device`, `Hub::patch_twin`, `Hub::delete_device`, `Hub::invoke_method`, …),
//! with the same validation and the same error codes, so the portal cannot make an identity or
//! a twin the REST API would refuse.
//!
//! # Access
//! - When the hub listens on loopback only ([`Hub::loopback_only`]), the portal opens without
//!   sign-in: only this machine can reach it.
//! - Otherwise every page and API call needs a session, got by signing in with the key (or the
//!   connection string) of a shared access policy that has RegistryWrite, such as
//!   `iothubowner`. The session is a cookie (`HttpOnly; Secure; SameSite=Strict`) holding an
//!   expiry and the policy's name, signed with the policy's key, so nothing is stored on the
//!   server and changing the key ends every session. Each API call is then checked against the
//!   permissions of that policy, as the REST API checks a SAS token.
//! - CSRF: a state-changing API call must carry `X-Portal: 1`, a header a cross-site form cannot
//!   send (and a cross-site script cannot send without a CORS preflight that the hub never
//!   grants), and, when the browser sends `Origin`, it must be this host.

mod api;
mod html;
mod pages;

use crate::auth::Policy;
use crate::error::HubError;
use crate::http::error::HttpError;
use crate::hub::{Access, Hub};
use crate::timestamp::unix_now;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

/// The header a state-changing portal API call must carry.
pub const CSRF_HEADER: &str = "x-portal";
/// The session cookie.
pub const COOKIE: &str = "iothub_portal";
/// How long a sign-in lasts.
const SESSION_SECS: u64 = 12 * 3600;

/// The portal's pages, assets and API. Merged into the HTTPS router outside the SAS layer: the
/// portal does its own access check.
pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/", get(pages::devices))
        .route("/portal", get(|| async { Redirect::to("/") }))
        .route("/portal/", get(|| async { Redirect::to("/") }))
        .route("/portal/add-device", get(pages::add_device))
        .route("/portal/devices/{id}", get(pages::device))
        .route("/portal/devices/{id}/live", get(pages::device_live))
        .route("/portal/devices/{id}/add-module", get(pages::add_module))
        .route("/portal/devices/{id}/modules/{mid}", get(pages::module))
        .route(
            "/portal/devices/{id}/modules/{mid}/live",
            get(pages::module_live),
        )
        .route("/portal/fragments/devices", get(pages::device_rows))
        .route(
            "/portal/fragments/devices/{id}/modules",
            get(pages::module_rows),
        )
        .route("/portal/login", get(pages::sign_in_page).post(sign_in))
        .route("/portal/logout", post(sign_out))
        .route("/portal/assets/{name}", get(asset))
        .merge(api::routes())
}

// ----- assets -----

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "favicon.svg" => (FAVICON_SVG, "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Revalidate every time: the emulator may have been rebuilt with new assets.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

// ----- who is looking -----

/// Someone allowed into the portal.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The policy they signed in with; `None` when the hub is loopback-only and the portal is
    /// open.
    policy: Option<String>,
}

impl Viewer {
    /// Who the request comes from, if they may use the portal at all.
    fn of(hub: &Hub, headers: &HeaderMap) -> Option<Self> {
        if hub.loopback_only() {
            return Some(Self { policy: None });
        }
        let value = cookie(headers, COOKIE)?;
        let policy = verify_session(hub, value, unix_now())?;
        Some(Self {
            policy: Some(policy),
        })
    }

    /// Whether the viewer may perform `access`: anyone on a loopback-only hub, else the
    /// permissions of the policy they signed in with.
    pub fn may(&self, hub: &Hub, access: Access) -> Result<(), HubError> {
        let Some(name) = &self.policy else {
            return Ok(());
        };
        match hub.find_policy(name) {
            Some(p) if access.granted_by(p.permissions) => Ok(()),
            _ => Err(HubError::unauthorized(format!(
                "Policy '{name}' does not grant the permission this operation needs"
            ))),
        }
    }

    fn signed_in(&self) -> bool {
        self.policy.is_some()
    }
}

/// A page request: redirects to the sign-in page when the viewer may not see the portal.
pub struct PageViewer(pub Viewer);

impl FromRequestParts<Hub> for PageViewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, hub: &Hub) -> Result<Self, Self::Rejection> {
        match Viewer::of(hub, &parts.headers) {
            Some(v) => Ok(Self(v)),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let target = format!("/portal/login?next={}", html::seg(&next));
                Err(Redirect::to(&target).into_response())
            }
        }
    }
}

/// An API (or fragment) request: 401 when the viewer may not use the portal, 403 when a
/// state-changing call lacks the CSRF header or comes from another origin.
pub struct ApiViewer(pub Viewer);

impl FromRequestParts<Hub> for ApiViewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, hub: &Hub) -> Result<Self, Self::Rejection> {
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            csrf_check(parts).map_err(|why| forbidden(&why))?;
        }
        match Viewer::of(hub, &parts.headers) {
            Some(v) => Ok(Self(v)),
            None => Err(HttpError(HubError::unauthorized(
                "Sign in to the portal first (/portal/login) with the key of a policy that has RegistryWrite",
            ))
            .into_response()),
        }
    }
}

/// A state-changing call must say `X-Portal: 1`, and come from this origin when the browser
/// names one.
fn csrf_check(parts: &Parts) -> Result<(), String> {
    let marked = parts
        .headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "1");
    if !marked {
        return Err(format!(
            "Portal API calls that change state must carry the header '{CSRF_HEADER}: 1'"
        ));
    }
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let origin_host = origin.strip_prefix("https://").unwrap_or("");
        if host.is_empty() || !origin_host.eq_ignore_ascii_case(&host) {
            return Err(format!(
                "Cross-origin portal call refused (Origin {origin:?}, host {host:?})"
            ));
        }
    }
    Ok(())
}

/// 403 in the hub's error shape (there is no IoT Hub error code for it).
fn forbidden(message: &str) -> Response {
    let mut response = crate::http::body::json_response(
        StatusCode::FORBIDDEN,
        &serde_json::json!({"Message": format!("ErrorCode:Forbidden;{message}")}),
    );
    response
        .headers_mut()
        .insert("iothub-errorcode", HeaderValue::from_static("Forbidden"));
    response
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

// ----- sessions -----

fn session_message(policy: &str, expiry: u64) -> String {
    format!("iothub-emulator portal session\n{policy}\n{expiry}")
}

/// `{expiry}:{policy}:{signature}`, signed with the policy's primary key.
fn make_session(policy: &Policy, now: u64) -> String {
    let expiry = now + SESSION_SECS;
    let signature = policy
        .primary_key
        .sign(&session_message(&policy.name, expiry));
    format!("{expiry}:{}:{signature}", policy.name)
}

/// The policy a session cookie was signed for, if it is genuine, unexpired, and the policy
/// still has RegistryWrite.
fn verify_session(hub: &Hub, value: &str, now: u64) -> Option<String> {
    use subtle::ConstantTimeEq;
    let (expiry, rest) = value.split_once(':')?;
    let (name, signature) = rest.rsplit_once(':')?;
    let expiry: u64 = expiry.parse().ok()?;
    if expiry <= now || expiry > now + SESSION_SECS {
        return None;
    }
    let policy = hub.find_policy(name)?;
    if !Access::RegistryWrite.granted_by(policy.permissions) {
        return None;
    }
    let message = session_message(name, expiry);
    let genuine = [&policy.primary_key, &policy.secondary_key]
        .iter()
        .any(|k| bool::from(k.sign(&message).as_bytes().ct_eq(signature.as_bytes())));
    genuine.then(|| name.to_owned())
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    next: String,
}

/// Only a path on this site, never `//elsewhere` or a full URL.
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

/// `POST /portal/login`: a policy key, or a service connection string, of a policy with
/// RegistryWrite.
async fn sign_in(State(hub): State<Hub>, Form(form): Form<SignInForm>) -> Response {
    let next = safe_next(&form.next).to_owned();
    if hub.loopback_only() {
        return Redirect::to(&next).into_response();
    }
    let input = form.key.trim();
    let (name, key) = if input.contains("SharedAccessKey=") {
        let field = |k: &str| {
            input
                .split(';')
                .filter_map(|p| p.split_once('='))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(k))
                .map(|(_, v)| v.trim())
        };
        (
            field("SharedAccessKeyName"),
            field("SharedAccessKey").unwrap_or(""),
        )
    } else {
        (None, input)
    };
    let policy = hub
        .policy_with_key(name, key)
        .filter(|p| Access::RegistryWrite.granted_by(p.permissions));
    let Some(policy) = policy else {
        tracing::info!("portal sign-in refused");
        return pages::sign_in_form(
            &hub,
            &next,
            Some("That is not the key of a shared access policy with RegistryWrite."),
            StatusCode::UNAUTHORIZED,
        );
    };
    tracing::info!(policy = %policy.name, "portal sign-in");
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={SESSION_SECS}",
        make_session(policy, unix_now())
    );
    let mut response = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `POST /portal/logout`: forgets the session cookie.
async fn sign_out() -> Response {
    let mut response = Redirect::to("/portal/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "iothub_portal=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next("/portal/devices/x"), "/portal/devices/x");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/\\evil"), "/");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; iothub_portal=123:iothubowner:c2ln=; b=2"),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("123:iothubowner:c2ln="));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
