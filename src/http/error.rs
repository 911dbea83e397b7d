//! The one place a [`HubError`] becomes an HTTP response.
//!
//! Body shape: IoT Hub's legacy error body, which the Node SDK parses (it splits `Message` on
//! `;` and reads `ErrorCode:<Name>`), plus the `iothub-errorcode` header C# and others read
//! (`shared/protocol.md` E.3).

use super::body::json_response;
use crate::error::HubError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A [`HubError`] on its way out over HTTP.
#[derive(Debug)]
pub struct HttpError(pub HubError);

impl From<HubError> for HttpError {
    fn from(e: HubError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let HubError { code, message } = self.0;
        let status =
            StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let now = time::OffsetDateTime::now_utc();
        let tracking = format!(
            "Tracking ID:{:032x}-G:0-TimeStamp:{:02}/{:02}/{:04} {:02}:{:02}:{:02}",
            rand::random::<u128>(),
            u8::from(now.month()),
            now.day(),
            now.year(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let body = json!({
            "Message": format!("ErrorCode:{};{}", code.name(), message),
            "ExceptionMessage": tracking,
        });
        let mut response = json_response(status, &body);
        response
            .headers_mut()
            .insert("iothub-errorcode", HeaderValue::from_static(code.name()));
        tracing::debug!(status = status.as_u16(), code = code.name(), %message, "request failed");
        response
    }
}

pub type HttpResult<T> = Result<T, HttpError>;
