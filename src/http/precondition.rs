//! The `If-Match` header of the requests that write, as the registry's [`IfMatch`]: used by
//! the service API and the portal's JSON API alike.

use crate::registry::IfMatch;
use axum::http::{header, HeaderMap};

/// The `If-Match` precondition of a write ([`IfMatch::from_header`]).
pub fn if_match(headers: &HeaderMap) -> IfMatch {
    IfMatch::from_header(headers.get(header::IF_MATCH).map(|v| v.as_bytes()))
}

/// DELETE without If-Match means "any version", as the SDKs' default `"*"` does.
pub fn delete_precondition(headers: &HeaderMap) -> IfMatch {
    match if_match(headers) {
        IfMatch::Absent => IfMatch::Any,
        other => other,
    }
}
