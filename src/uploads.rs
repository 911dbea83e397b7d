//! File uploads (Microsoft's "Upload files with IoT Hub"): a device asks the hub for a SAS URI
//! to one blob of the configured storage container, uploads to the store itself, then tells
//! the hub how it went; on success the hub queues a file upload notification for the service
//! (`/messages/serviceBound/filenotifications`).
//!
//! The hub tracks each upload it handed out under its correlation id until the device
//! notifies it or the SAS expires; a device has at most [`MAX_ACTIVE`] at a time.

use crate::error::{ErrorCode, HubError, HubResult};
use crate::outbox::Outbox;
use crate::storage::BlobStore;
use crate::timestamp::Timestamp;
use dashmap::DashMap;
use serde_json::json;
use std::time::{Duration, SystemTime};

/// Most uploads one device may have in progress (403006 beyond it).
pub const MAX_ACTIVE: usize = 10;
/// How long the SAS a device gets is valid (IoT Hub's default `sasTtlAsIso8601`, PT1H).
pub const SAS_TTL: Duration = Duration::from_secs(3600);
/// Most notifications kept for the service; older ones are dropped.
pub const NOTIFICATION_CAPACITY: usize = 1000;
/// Longest blob name a device may ask for (Azure Storage's limit, less the device id prefix).
pub const MAX_BLOB_NAME: usize = 1024;

/// The file-upload settings: where blobs go.
#[derive(Clone)]
pub struct Settings {
    pub store: BlobStore,
    pub container: String,
}

/// What a device gets back from `POST /devices/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadInfo {
    pub correlation_id: String,
    pub host_name: String,
    pub container_name: String,
    pub blob_name: String,
    pub sas_token: String,
}

/// An upload handed out and not yet notified.
struct Active {
    device_id: String,
    blob_name: String,
    expires: SystemTime,
}

/// The hub's file uploads: the settings (`None` when file upload is not configured), the
/// uploads in progress and the notifications waiting for the service.
pub struct FileUploads {
    settings: Option<Settings>,
    /// Correlation id → upload; sharded, so devices do not contend.
    active: DashMap<String, Active>,
    notifications: Outbox,
    /// Whether the container is known to exist (checked once, on the first upload).
    container_ready: tokio::sync::OnceCell<()>,
}

impl FileUploads {
    pub fn new(settings: Option<Settings>) -> Self {
        Self {
            settings,
            active: DashMap::new(),
            notifications: Outbox::new(NOTIFICATION_CAPACITY),
            container_ready: tokio::sync::OnceCell::new(),
        }
    }

    /// The notifications waiting for the service.
    pub fn notifications(&self) -> &Outbox {
        &self.notifications
    }

    fn settings(&self) -> HubResult<&Settings> {
        self.settings.as_ref().ok_or_else(|| {
            HubError::new(
                ErrorCode::BlobContainerValidationError,
                "File upload is not configured for this hub (start the emulator with \
                 --storage-connection-string)",
            )
        })
    }

    /// Starts an upload of `blob_name` for `device_id`: the SAS URI parts the device uploads
    /// with. The blob is `{device_id}/{blob_name}` in the configured container.
    ///
    /// # Errors
    /// File upload is not configured (400022), the name is invalid (400004), the device has
    /// [`MAX_ACTIVE`] uploads in progress (403006), or the store cannot be reached.
    pub async fn start(&self, device_id: &str, blob_name: &str) -> HubResult<UploadInfo> {
        let settings = self.settings()?;
        if blob_name.is_empty() {
            return Err(HubError::new(
                ErrorCode::ArgumentNull,
                "The request must name the blob ('blobName')",
            ));
        }
        if blob_name.len() > MAX_BLOB_NAME
            || blob_name.chars().any(char::is_control)
            || blob_name
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(HubError::invalid(format!(
                "'{}' is not a valid blob name: at most {MAX_BLOB_NAME} characters, no control \
                 characters, no empty, '.' or '..' path segments",
                blob_name.escape_debug()
            )));
        }
        self.container_ready
            .get_or_try_init(|| async {
                settings
                    .store
                    .ensure_container(&settings.container)
                    .await
                    .map_err(|e| {
                        HubError::new(
                            ErrorCode::BlobContainerValidationError,
                            format!("The file upload storage container cannot be used: {e}"),
                        )
                    })
            })
            .await?;
        let now = SystemTime::now();
        self.active.retain(|_, upload| upload.expires > now);
        let in_progress = self
            .active
            .iter()
            .filter(|u| u.device_id == device_id)
            .count();
        if in_progress >= MAX_ACTIVE {
            return Err(HubError::new(
                ErrorCode::DeviceMaximumActiveFileUploadLimitExceeded,
                format!(
                    "Device {device_id} already has {MAX_ACTIVE} file uploads in progress; \
                     notify the hub of one before starting another"
                ),
            ));
        }
        let full_name = format!("{device_id}/{blob_name}");
        let expires = now + SAS_TTL;
        let account = &settings.store.account;
        let sas_token = account.blob_sas(&settings.container, &full_name, "rcw", expires);
        let correlation_id = correlation_id(now);
        self.active.insert(
            correlation_id.clone(),
            Active {
                device_id: device_id.to_owned(),
                blob_name: full_name.clone(),
                expires,
            },
        );
        Ok(UploadInfo {
            correlation_id,
            host_name: account.host_name().to_owned(),
            container_name: settings.container.clone(),
            blob_name: full_name,
            sas_token,
        })
    }

    /// The device's word on an upload: on success, the notification for the service (with the
    /// blob's size and time from the store). The upload is no longer in progress after it,
    /// unless the store could not say whether the blob is there.
    ///
    /// # Errors
    /// No upload of this device has that correlation id (400004), the device says it
    /// succeeded but there is no such blob (400004; the upload stays in progress), or the
    /// store cannot be reached.
    pub async fn finish(
        &self,
        device_id: &str,
        correlation_id: &str,
        succeeded: bool,
    ) -> HubResult<()> {
        let settings = self.settings()?;
        let unknown = || {
            HubError::invalid(format!(
                "No file upload of device {device_id} has correlation id '{}' (or its SAS \
                 expired)",
                correlation_id.escape_debug()
            ))
        };
        let blob_name = match self.active.get(correlation_id) {
            Some(u) if u.device_id == device_id && u.expires > SystemTime::now() => {
                u.blob_name.clone()
            }
            _ => return Err(unknown()),
        };
        if !succeeded {
            self.active.remove(correlation_id);
            return Ok(());
        }
        let properties = settings
            .store
            .blob_properties(&settings.container, &blob_name)
            .await
            .map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()))?
            .ok_or_else(|| {
                HubError::invalid(format!(
                    "The device reported a successful upload, but blob {blob_name} is not in \
                     container {}",
                    settings.container
                ))
            })?;
        // Only the caller that removes it queues the notification (two racing calls: one wins).
        if self.active.remove(correlation_id).is_none() {
            return Err(unknown());
        }
        self.notifications.push(json!({
            "deviceId": device_id,
            "blobUri": settings.store.account.url(&settings.container, Some(&blob_name)),
            "blobName": blob_name,
            "lastUpdatedTime": properties.last_modified,
            "blobSizeInBytes": properties.size,
            "enqueuedTimeUtc": Timestamp::now(),
        }));
        Ok(())
    }

    /// Forgets every upload in progress and every waiting notification (control API reset).
    pub fn clear(&self) {
        self.active.clear();
        self.notifications.clear();
    }
}

/// A correlation id in IoT Hub's form: base64 of the time and a GUID.
fn correlation_id(now: SystemTime) -> String {
    use base64::Engine;
    let stamp = time::OffsetDateTime::from(now)
        .format(&time::macros::format_description!(
            "[year][month][day][hour][minute]"
        ))
        .unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .encode(format!("{stamp}_{}", crate::c2d::lock_token()))
}
