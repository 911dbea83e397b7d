//! The hub's one error vocabulary.
//!
//! Stores and hub operations return [`HubError`]; each front end maps it to the wire in exactly one
//! place (`http::error` for REST, `mqtt::session` for twin responses). The names and numeric codes
//! are IoT Hub's own (`shared/protocol.md` F, Microsoft's "Understand and resolve Azure IoT Hub
//! errors" page).

use std::fmt;

/// An IoT Hub error code: its name, its six-digit number and the HTTP status it travels with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400000: a request that is wrong in a way no narrower code describes.
    BadRequest,
    /// 400004: the body or a parameter cannot be parsed or fails validation.
    ArgumentInvalid,
    /// 400005: a required argument is missing.
    ArgumentNull,
    /// 400011: an identity id breaks IoT Hub's id rules.
    InvalidDeviceId,
    /// 400022: file upload is not configured, or its storage container cannot be used.
    BlobContainerValidationError,
    /// 401002: the credentials are valid but do not grant this operation, or are wrong.
    IotHubUnauthorizedAccess,
    /// 401003: the token is malformed or expired.
    IotHubUnauthorized,
    /// 403004: the device's cloud-to-device queue is full.
    DeviceMaximumQueueDepthExceeded,
    /// 403006: the device already has the maximum of active file uploads.
    DeviceMaximumActiveFileUploadLimitExceeded,
    /// 403012: the device is disabled.
    DeviceDisabled,
    /// 404001: no such device.
    DeviceNotFound,
    /// 404010: no such module on that device.
    ModuleNotFound,
    /// 404000: no such resource (an unknown path).
    NotFound,
    /// 404103: a direct-method target is not connected.
    DeviceNotOnline,
    /// 405000: the route exists but not with this verb.
    MethodNotAllowed,
    /// 409001: a device with that id exists.
    DeviceAlreadyExists,
    /// 409301: a module with that id exists on the device.
    ModuleAlreadyExistsOnDevice,
    /// 412001: the If-Match etag does not match.
    PreconditionFailed,
    /// 412002: the lock token of a cloud-to-device message is unknown or its lock lapsed.
    DeviceMessageLockLost,
    /// 413001: a message or request body is too large.
    MessageTooLarge,
    /// 413003: the device already has the maximum number of modules.
    TooManyModulesOnDevice,
    /// 500001: a fault of the emulator itself.
    ServerError,
    /// 504101: a direct method got no answer in time.
    GatewayTimeout,
}

impl ErrorCode {
    /// The code's name as IoT Hub spells it in `ErrorCode:<Name>` and `iothub-errorcode`.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::ArgumentNull => "ArgumentNull",
            Self::InvalidDeviceId => "InvalidDeviceId",
            Self::BlobContainerValidationError => "BlobContainerValidationError",
            Self::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            Self::IotHubUnauthorized => "IotHubUnauthorized",
            Self::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            Self::DeviceMaximumActiveFileUploadLimitExceeded => {
                "DeviceMaximumActiveFileUploadLimitExceeded"
            }
            Self::DeviceDisabled => "DeviceDisabled",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::ModuleNotFound => "ModuleNotFound",
            Self::NotFound => "NotFound",
            Self::DeviceNotOnline => "DeviceNotOnline",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::DeviceAlreadyExists => "DeviceAlreadyExists",
            Self::ModuleAlreadyExistsOnDevice => "ModuleAlreadyExistsOnDevice",
            Self::PreconditionFailed => "PreconditionFailed",
            Self::DeviceMessageLockLost => "DeviceMessageLockLost",
            Self::MessageTooLarge => "MessageTooLarge",
            Self::TooManyModulesOnDevice => "TooManyModulesOnDevice",
            Self::ServerError => "ServerError",
            Self::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// The six-digit numeric code; its first three digits are the HTTP status.
    pub fn number(self) -> u32 {
        match self {
            Self::BadRequest => 400_000,
            Self::ArgumentInvalid => 400_004,
            Self::ArgumentNull => 400_005,
            Self::InvalidDeviceId => 400_011,
            Self::BlobContainerValidationError => 400_022,
            Self::IotHubUnauthorizedAccess => 401_002,
            Self::IotHubUnauthorized => 401_003,
            Self::DeviceMaximumQueueDepthExceeded => 403_004,
            Self::DeviceMaximumActiveFileUploadLimitExceeded => 403_006,
            Self::DeviceDisabled => 403_012,
            Self::DeviceNotFound => 404_001,
            Self::ModuleNotFound => 404_010,
            Self::NotFound => 404_000,
            Self::DeviceNotOnline => 404_103,
            Self::MethodNotAllowed => 405_000,
            Self::DeviceAlreadyExists => 409_001,
            Self::ModuleAlreadyExistsOnDevice => 409_301,
            Self::PreconditionFailed => 412_001,
            Self::DeviceMessageLockLost => 412_002,
            Self::MessageTooLarge => 413_001,
            Self::TooManyModulesOnDevice => 413_003,
            Self::ServerError => 500_001,
            Self::GatewayTimeout => 504_101,
        }
    }

    /// The HTTP status (and MQTT twin-response status) the code travels with.
    pub fn status(self) -> u16 {
        // IoT Hub's numeric codes are the status followed by three digits.
        (self.number() / 1000) as u16
    }
}

/// A failed hub operation: what went wrong, in IoT Hub's terms, and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct HubError {
    pub code: ErrorCode,
    pub message: String,
}

impl HubError {
    /// The JSON body a twin error response to a device carries (MQTT and AMQP): the Node SDK
    /// ignores the status and only sees an error when the body has a truthy `errorCode`
    /// (`shared/protocol.md` C.6).
    pub fn device_body(&self) -> serde_json::Value {
        serde_json::json!({
            "errorCode": self.code.number(),
            "trackingId": format!("{:032x}", rand::random::<u128>()),
            "message": self.message,
            "timestampUtc": crate::timestamp::Timestamp::now(),
        })
    }

    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    pub fn device_not_found(device_id: &str) -> Self {
        Self::new(
            ErrorCode::DeviceNotFound,
            format!("Device {device_id} not registered"),
        )
    }

    pub fn module_not_found(device_id: &str, module_id: &str) -> Self {
        Self::new(
            ErrorCode::ModuleNotFound,
            format!("Module {module_id} on device {device_id} not registered"),
        )
    }

    pub fn precondition_failed() -> Self {
        Self::new(
            ErrorCode::PreconditionFailed,
            "Precondition failed: the etag in If-Match does not match the current etag",
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, message)
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

pub type HubResult<T> = Result<T, HubError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_the_leading_three_digits_of_the_number() {
        assert_eq!(ErrorCode::DeviceNotFound.status(), 404);
        assert_eq!(ErrorCode::PreconditionFailed.status(), 412);
        assert_eq!(ErrorCode::TooManyModulesOnDevice.status(), 413);
        assert_eq!(ErrorCode::IotHubUnauthorizedAccess.status(), 401);
    }
}
