//! Service-side messaging over HTTPS: the cloud-to-device delivery feedback queue, as the
//! service SDKs' HTTP runtime clients read it (Python `IoTHubHttpRuntimeManager`):
//!
//! - `GET /messages/serviceBound/feedback`: the waiting feedback records as a JSON array,
//!   locked for the caller under the lock token in `ETag` (204 when there are none);
//! - `DELETE /messages/serviceBound/feedback/{lockToken}`: completes that batch;
//! - `POST /messages/serviceBound/feedback/{lockToken}/abandon`: gives it back.
//!
//! The same records are also served over AMQP (`amqp::service`); whichever client takes a
//! batch first gets it. A batch neither completed nor abandoned is offered again after
//! [`LOCK`](crate::outbox::LOCK).

use super::body::json_response;
use super::error::HttpResult;
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::Value;

/// Most records one receive returns.
const MAX_BATCH: usize = 64;

pub fn routes() -> Router<Hub> {
    let mut router = Router::new();
    // The SDKs write `serviceBound`, Microsoft's REST reference `servicebound`.
    for base in [
        "/messages/serviceBound/feedback",
        "/messages/servicebound/feedback",
    ] {
        router = router
            .route(base, get(receive))
            .route(&format!("{base}/{{token}}"), delete(complete))
            .route(&format!("{base}/{{token}}/abandon"), post(abandon));
    }
    router
}

async fn receive(State(hub): State<Hub>) -> Response {
    let Some((token, batch)) = hub.feedback().lock_batch(MAX_BATCH) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let mut response = json_response(StatusCode::OK, &Value::Array(batch));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.microsoft.iothub.feedback.json"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{token}\"")) {
        headers.insert(header::ETAG, etag);
    }
    response
}

async fn complete(State(hub): State<Hub>, Path(token): Path<String>) -> HttpResult<Response> {
    settle(hub.feedback().complete(unquoted(&token)), &token)
}

async fn abandon(State(hub): State<Hub>, Path(token): Path<String>) -> HttpResult<Response> {
    settle(hub.feedback().abandon(unquoted(&token)), &token)
}

/// 204 when the lock token named a locked batch; 412 (IoT Hub's answer to a lapsed or unknown
/// lock) otherwise.
fn settle(found: bool, token: &str) -> HttpResult<Response> {
    if found {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(HubError::new(
            ErrorCode::PreconditionFailed,
            format!("No feedback batch is locked with lock token '{token}' (it may have lapsed)"),
        )
        .into())
    }
}

/// The lock token without the quotes of the `ETag` it came in.
fn unquoted(token: &str) -> &str {
    token.trim_matches('"')
}
