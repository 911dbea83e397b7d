//! Request bodies in, JSON responses out.
//!
//! Bodies are read with a size cap and parsed here, so that an oversized or malformed body gets
//! IoT Hub's error shape (413 / 400 ArgumentInvalid) instead of a framework default.

use super::error::HttpError;
use crate::error::{ErrorCode, HubError};
use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// Largest request body accepted. Twin documents are at most 40 KB and bulk registry calls at
/// most 100 devices, so 256 KB leaves room without letting a client make the hub buffer more.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// A JSON request body.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = HttpError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                HubError::new(
                    ErrorCode::MessageTooLarge,
                    format!("The request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(HubError::new(ErrorCode::ArgumentNull, "The request body is empty").into());
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| HubError::invalid(format!("The request body is not valid JSON: {e}")))?;
        Ok(Self(value))
    }
}

impl JsonBody {
    /// The body as a JSON object, or 400.
    pub fn object(self) -> Result<Map<String, Value>, HttpError> {
        match self.0 {
            Value::Object(m) => Ok(m),
            _ => Err(HubError::invalid("The request body must be a JSON object").into()),
        }
    }
}

/// The parsed query string of a request, or 400 ArgumentInvalid in IoT Hub's error shape
/// (axum's own rejection would be plain text).
pub fn query_string<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, HubError> {
    query
        .map(|axum::extract::Query(q)| q)
        .map_err(|e| HubError::invalid(format!("Bad query string: {e}")))
}

/// A JSON response with IoT Hub's content type. The Node SDK only parses bodies whose
/// content type contains `application/json` (`shared/protocol.md` E.1).
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    // `to_vec` writes straight into a buffer; `to_string` goes through `fmt`, which the
    // fan-out profile showed as a visible cost per response (docs/performance.md).
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, Body::from(bytes)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// `200 OK` with a JSON body.
pub fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}
