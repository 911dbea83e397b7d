//! SAS authorization for every service route: which permission a request needs, and the check.

use super::error::HttpError;
use crate::hub::{Access, Hub};
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The permission a service request needs, from its method and path.
fn required_access(method: &Method, path: &str) -> Access {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match (first, method) {
        ("_emulator", _) => Access::Control,
        // The feedback queue is a messaging operation (ServiceConnect).
        ("messages", _) => Access::Messaging,
        ("twins", &Method::GET) => Access::TwinRead,
        ("twins", &Method::POST) => Access::Service,
        ("twins", _) => Access::TwinWrite,
        ("statistics", _) if path.trim_end_matches('/').ends_with("/service") => Access::Service,
        // Purging a device's cloud-to-device queue is a messaging operation.
        ("devices", &Method::DELETE) if path.trim_end_matches('/').ends_with("/commands") => {
            Access::Service
        }
        ("devices", &Method::POST) if path.trim_end_matches('/').ends_with("/query") => {
            Access::RegistryRead
        }
        (_, &Method::GET) => Access::RegistryRead,
        _ => Access::RegistryWrite,
    }
}

/// Middleware: refuses the request with 401 unless its SAS token grants the route's permission.
pub async fn require_sas(State(hub): State<Hub>, request: Request, next: Next) -> Response {
    let access = required_access(request.method(), request.uri().path());
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = hub.authorize_service(authorization, access) {
        return HttpError(e).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_permissions() {
        assert_eq!(
            required_access(&Method::GET, "/devices/d"),
            Access::RegistryRead
        );
        assert_eq!(
            required_access(&Method::PUT, "/devices/d/modules/m"),
            Access::RegistryWrite
        );
        assert_eq!(
            required_access(&Method::DELETE, "/devices/d"),
            Access::RegistryWrite
        );
        assert_eq!(
            required_access(&Method::POST, "/devices"),
            Access::RegistryWrite
        );
        assert_eq!(
            required_access(&Method::POST, "/devices/query"),
            Access::RegistryRead
        );
        assert_eq!(required_access(&Method::GET, "/twins/d"), Access::TwinRead);
        assert_eq!(
            required_access(&Method::PATCH, "/twins/d/modules/m"),
            Access::TwinWrite
        );
        assert_eq!(
            required_access(&Method::POST, "/twins/d/methods"),
            Access::Service
        );
        assert_eq!(
            required_access(&Method::GET, "/statistics/service"),
            Access::Service
        );
        assert_eq!(
            required_access(&Method::DELETE, "/devices/d/commands"),
            Access::Service
        );
        assert_eq!(
            required_access(&Method::POST, "/devices/keys/regenerate"),
            Access::RegistryWrite
        );
        assert_eq!(
            required_access(&Method::GET, "/statistics/devices"),
            Access::RegistryRead
        );
    }
}
