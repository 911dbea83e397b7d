//! HTML building blocks: escaping, URL path segments, the page layout and the security headers
//! every portal page carries.
//!
//! Pages are plain strings built with `format!`. Every value that comes from the registry or the
//! request goes through [`esc`] (text and attributes) or [`seg`] (URL path segments); nothing
//! else is ever interpolated.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::fmt::Write;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Characters left as they are in a path segment: RFC 3986 unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes an id for one URL path segment (ids may hold `%`, `?`, `$`, `'`, …).
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The portal URL of a device (`/portal/devices/{id}`), already encoded.
pub fn device_url(device_id: &str) -> String {
    format!("/portal/devices/{}", seg(device_id))
}

/// The portal URL of a module, already encoded.
pub fn module_url(device_id: &str, module_id: &str) -> String {
    format!(
        "/portal/devices/{}/modules/{}",
        seg(device_id),
        seg(module_id)
    )
}

/// A registry timestamp as the portal shows it: `2024-05-01 12:00:03 UTC`, or `Never`.
pub fn time_text(v: &Value) -> String {
    match v.as_str() {
        None => "Never".to_owned(),
        Some(s) if s.starts_with("0001-") => "Never".to_owned(),
        Some(s) if s.len() >= 19 => format!("{} UTC", s[..19].replace('T', " ")),
        Some(s) => s.to_owned(),
    }
}

/// A `<time>` element for a registry timestamp, refreshed by the live binder when `field` is
/// given.
pub fn time_el(v: &Value, field: Option<&str>) -> String {
    let iso = v.as_str().unwrap_or("");
    let bind = field.map_or(String::new(), |f| {
        format!(" data-field=\"{}\" data-format=\"time\"", esc(f))
    });
    format!(
        "<time datetime=\"{}\"{bind}>{}</time>",
        esc(iso),
        esc(&time_text(v))
    )
}

/// A status badge (`enabled`, `Connected`, …), coloured by CSS through `data-value`.
pub fn badge(value: &str, field: Option<&str>) -> String {
    let bind = field.map_or(String::new(), |f| format!(" data-field=\"{}\"", esc(f)));
    format!(
        "<span class=\"badge\" data-value=\"{v}\"{bind}>{t}</span>",
        v = esc(value),
        t = esc(&capitalise(value)),
    )
}

pub fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The authentication type as people read it.
pub fn auth_label(kind: &str) -> &'static str {
    match kind {
        "sas" => "Symmetric key",
        "selfSigned" => "X.509 self-signed",
        "certificateAuthority" => "X.509 CA signed",
        "none" => "None",
        _ => "Unknown",
    }
}

/// One breadcrumb: its label and, except for the current page, its (encoded) URL.
pub struct Crumb {
    pub label: String,
    pub href: Option<String>,
}

impl Crumb {
    pub fn link(label: impl Into<String>, href: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            href: Some(href.into()),
        }
    }

    pub fn here(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            href: None,
        }
    }
}

/// What the layout needs besides the page's own content.
pub struct Layout<'a> {
    pub title: &'a str,
    /// `data-page` of `<body>`: which script behaviour the page wants.
    pub page: &'a str,
    pub hostname: &'a str,
    pub crumbs: Vec<Crumb>,
    /// Show the sign-out button (the hub is reachable beyond loopback).
    pub signed_in: bool,
}

/// The whole document around `main`.
pub fn layout(l: &Layout<'_>, main: &str) -> String {
    let mut crumbs = String::new();
    if !l.crumbs.is_empty() {
        crumbs.push_str("<nav class=\"crumbs\" aria-label=\"Breadcrumb\"><ol>");
        for c in &l.crumbs {
            match &c.href {
                Some(h) => {
                    let _ = write!(
                        crumbs,
                        "<li><a href=\"{}\">{}</a></li>",
                        esc(h),
                        esc(&c.label)
                    );
                }
                None => {
                    let _ = write!(
                        crumbs,
                        "<li><span aria-current=\"page\">{}</span></li>",
                        esc(&c.label)
                    );
                }
            }
        }
        crumbs.push_str("</ol></nav>");
    }
    let sign_out = if l.signed_in {
        "<form method=\"post\" action=\"/portal/logout\" class=\"signout\"><button type=\"submit\">Sign out</button></form>"
    } else {
        ""
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<title>{title} · IoT Hub emulator</title>\n\
<link rel=\"stylesheet\" href=\"/portal/assets/style.css\">\n\
<link rel=\"icon\" href=\"/portal/assets/favicon.svg\" type=\"image/svg+xml\">\n\
<script src=\"/portal/assets/app.js\" defer></script>\n\
</head>\n<body data-page=\"{page}\">\n\
<a class=\"skip\" href=\"#main\">Skip to content</a>\n\
<header class=\"top\"><a class=\"brand\" href=\"/\"><img src=\"/portal/assets/favicon.svg\" alt=\"\" width=\"24\" height=\"24\"> IoT Hub emulator</a>\
<span class=\"hub\" title=\"Host name in connection strings\">{host}</span>{sign_out}</header>\n\
{crumbs}\n<main id=\"main\" tabindex=\"-1\">\n{main}\n</main>\n\
<footer class=\"foot\">iothub-emulator {version} · local emulator, well-known keys: never use it in production</footer>\n\
</body>\n</html>\n",
        title = esc(l.title),
        page = esc(l.page),
        host = esc(l.hostname),
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// The headers every portal page carries: no inline script or style, no framing, no caching,
/// no referrer.
pub fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; \
             object-src 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An HTML response with the portal's headers.
pub fn page(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn ids_become_single_path_segments() {
        assert_eq!(seg("a%b?c/d e$'()"), "a%25b%3Fc%2Fd%20e%24%27%28%29");
        assert_eq!(seg("device-01.x_y"), "device-01.x_y");
        assert_eq!(module_url("d?", "m#"), "/portal/devices/d%3F/modules/m%23");
    }

    #[test]
    fn times_read_as_utc_or_never() {
        assert_eq!(time_text(&Value::from("0001-01-01T00:00:00Z")), "Never");
        assert_eq!(
            time_text(&Value::from("2024-05-01T12:00:03.1234567Z")),
            "2024-05-01 12:00:03 UTC"
        );
        assert_eq!(time_text(&Value::Null), "Never");
    }
}
