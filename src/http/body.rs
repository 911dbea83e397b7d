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
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
            .map_err(body_error)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(HubError::new(ErrorCode::ArgumentNull, "The request body is empty").into());
        }
        let value = crate::twin::parse_json(&bytes)
            .map_err(|e| HubError::invalid(format!("The request body {e}")))?;
        Ok(Self(value))
    }
}

/// What reading a body failed on: the client was too slow ([`DeadlineBody`]), or the body was
/// too large (or the connection broke, which no one will read the answer to).
fn body_error(e: axum::Error) -> HubError {
    let timed_out = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .any(|e| e.is::<BodyTimedOut>());
    if timed_out {
        HubError::new(
            ErrorCode::BadRequest,
            "The request body did not arrive in time; the connection is closed",
        )
    } else {
        HubError::new(
            ErrorCode::MessageTooLarge,
            format!("The request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    }
}

/// A request body that fails if it has not fully arrived by a deadline, so that a client that
/// never finishes its body cannot hold its connection (and a handler) forever.
pub struct DeadlineBody {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    pub fn new(inner: hyper::body::Incoming, within: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
