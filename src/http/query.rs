//! `POST /devices/query`: the IoT Hub query language over device and module twins, with paging
//! (`shared/protocol.md` E.2).
//!
//! Results are produced in identity order (device id, then module id). The continuation token
//! records the last identity served, so the next page resumes right after it: twins written
//! between pages are seen as they are then, none is served twice and none that existed
//! throughout is skipped. Aggregate queries (`COUNT()`, `GROUP BY`) need every row and come
//! back as one page.

use super::body::JsonBody;
use super::error::HttpResult;
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::query::{self, Source};
use crate::registry::IdentityKey;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Page size when the client sends no `x-ms-max-item-count`, and the largest allowed.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn routes() -> Router<Hub> {
    Router::new().route("/devices/query", post(run_query))
}

/// The opaque `x-ms-continuation` token: where the previous page stopped.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Continuation {
    /// Device id of the last row served.
    d: String,
    /// Module id of the last row served (module queries).
    m: Option<String>,
    /// Rows served so far, for `TOP`.
    n: usize,
}

impl Continuation {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(token: &str) -> Result<Self, HubError> {
        URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| HubError::invalid("The x-ms-continuation token is not valid"))
    }
}

async fn run_query(
    State(hub): State<Hub>,
    headers: HeaderMap,
    body: JsonBody,
) -> HttpResult<Response> {
    let body = body.object()?;
    let text = match body.get("query") {
        Some(Value::String(q)) => q,
        None | Some(Value::Null) => {
            return Err(HubError::new(ErrorCode::ArgumentNull, "The body has no 'query'").into())
        }
        Some(_) => return Err(HubError::invalid("'query' must be a string").into()),
    };
    let parsed = query::parse(text).map_err(|e| HubError::invalid(e.to_string()))?;
    // A header that is present but not ASCII is refused, never read as absent (which would
    // restart a paged query from its first page).
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| HubError::invalid(format!("The {name} header is not valid")))
            })
            .transpose()
    };
    let page_size = match header("x-ms-max-item-count")? {
        None | Some("") => DEFAULT_PAGE,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| HubError::invalid("x-ms-max-item-count must be a positive number"))?
            .min(MAX_PAGE),
    };
    let continuation = header("x-ms-continuation")?
        .filter(|t| !t.trim().is_empty())
        .map(Continuation::decode)
        .transpose()?;
    let modules = parsed.source() == Source::Modules;
    let registry = hub.registry();

    let (items, next) = if parsed.is_aggregate() {
        let mut rows = Vec::new();
        registry.scan_all_twins(modules, parsed.row_shape(), |row| {
            if parsed.matches(&row) {
                rows.push(row);
            }
        });
        (parsed.aggregate(rows.iter()), None)
    } else {
        let served = continuation.as_ref().map_or(0, |c| c.n);
        let limit = parsed
            .top()
            .map_or(page_size, |top| top.saturating_sub(served).min(page_size));
        let after = continuation.map(|c| IdentityKey {
            device_id: c.d,
            module_id: c.m,
        });
        let mut items = Vec::new();
        let mut last = None;
        let mut more = false;
        // `SELECT *` returns whole twins, but only the page's twins need building whole: the
        // scan builds rows as light as the WHERE clause allows.
        let star = parsed.is_select_star();
        let shape = if star {
            parsed.filter_shape()
        } else {
            parsed.row_shape()
        };
        if limit > 0 {
            registry.scan_twins(modules, after.as_ref(), shape, |key, row| {
                if !parsed.matches(&row) {
                    return true;
                }
                if items.len() == limit {
                    // One more match exists: there is a next page.
                    more = true;
                    return false;
                }
                let item = if star {
                    // The twin as it is now; one deleted since the scan is left out.
                    match registry.get_twin(&key) {
                        Ok(twin) => twin,
                        Err(_) => return true,
                    }
                } else {
                    parsed.project(&row)
                };
                items.push(item);
                last = Some(key);
                true
            });
        }
        let served = served + items.len();
        let top_reached = parsed.top().is_some_and(|top| served >= top);
        let next = match last {
            Some(key) if more && !top_reached => Some(Continuation {
                d: key.device_id,
                m: key.module_id,
                n: served,
            }),
            _ => None,
        };
        (items, next)
    };

    let item_type = if parsed.is_select_star() {
        "twin"
    } else {
        "raw"
    };
    let mut response = super::body::ok(&Value::Array(items));
    let headers = response.headers_mut();
    headers.insert("x-ms-item-type", HeaderValue::from_static(item_type));
    // No header at all on the last page: an empty one makes the Node SDK page forever.
    if let Some(next) = next {
        if let Ok(v) = HeaderValue::from_str(&next.encode()) {
            headers.insert("x-ms-continuation", v);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_round_trips_and_rejects_garbage() {
        let c = Continuation {
            d: "dev/1".into(),
            m: Some("m".into()),
            n: 7,
        };
        assert_eq!(Continuation::decode(&c.encode()).unwrap(), c);
        assert!(Continuation::decode("not a token!").is_err());
        assert!(Continuation::decode("e30").is_err());
    }
}
