//! The twin store's operations: service reads and writes, device reads and reported patches.

use super::events::{self, Change};
use super::identity::{Device, Module};
use super::{common_of, twin_of, DeviceRecord, IdentityKey, IfMatch, Registry};
use crate::error::{HubError, HubResult};
use crate::timestamp::Timestamp;
use crate::twin::{RowShape, Twin};
use serde_json::{Map, Value};

impl Registry {
    /// The service view of a device or module twin.
    pub fn get_twin(&self, key: &IdentityKey) -> HubResult<Value> {
        self.with_device(&key.device_id, |rec| twin_json(rec, key))
    }

    /// `PATCH /twins/…`. `notify` runs under the device lock with the desired patch (and its
    /// `$version`) when desired changed, so notifications leave in version order.
    pub fn patch_twin(
        &self,
        key: &IdentityKey,
        body: &Map<String, Value>,
        if_match: &IfMatch,
        notify: impl FnOnce(Value),
    ) -> HubResult<Value> {
        self.write_twin(
            key,
            if_match,
            |twin| {
                let before = twin.version();
                let push = twin.patch_from_service(body)?;
                let event = (twin.version() != before).then(|| twin.update_event(body));
                Ok((push, event))
            },
            notify,
        )
    }

    /// `PUT /twins/…`: replaces tags and desired; devices get the whole new desired document.
    pub fn replace_twin(
        &self,
        key: &IdentityKey,
        body: &Map<String, Value>,
        if_match: &IfMatch,
        notify: impl FnOnce(Value),
    ) -> HubResult<Value> {
        self.write_twin(
            key,
            if_match,
            |twin| {
                twin.replace_from_service(body)
                    .map(|push| (Some(push), None))
            },
            notify,
        )
    }

    /// A service write to a twin: etag check, the change, the save, then `notify` with what the
    /// devices must be told (if anything), all under the device lock. `change` returns that
    /// push and the twin change event's body for a patch (`None` for a replacement, whose body
    /// is the whole twin document, and for a patch that changed nothing). The event is
    /// reported once the lock is released.
    fn write_twin(
        &self,
        key: &IdentityKey,
        if_match: &IfMatch,
        change: impl FnOnce(&mut Twin) -> HubResult<(Option<Value>, Option<Value>)>,
        notify: impl FnOnce(Value),
    ) -> HubResult<Value> {
        let replaced = std::cell::Cell::new(false);
        let (json, _, event) = self.change_device(
            &key.device_id,
            |rec| {
                let twin = twin_of(rec, key)?;
                if_match.check(&twin.etag())?;
                let before = twin.version();
                let (push, event) = change(twin)?;
                let changed = twin.version() != before;
                let event = match event {
                    Some(body) => Some(body),
                    None if changed => {
                        replaced.set(true);
                        events::twin_document(rec, key)
                    }
                    None => None,
                };
                Ok((twin_json(rec, key)?, push, event))
            },
            |(_, push, _)| {
                if let Some(push) = push {
                    notify(push.clone());
                }
            },
        )?;
        if let Some(body) = event {
            self.report(Change::Twin {
                key: key.clone(),
                replaced: replaced.get(),
                body,
            });
        }
        Ok(json)
    }

    /// The twin a device or module reads over its own connection.
    pub fn device_twin(&self, key: &IdentityKey) -> HubResult<Value> {
        self.with_device(
            &key.device_id,
            |rec| Ok(twin_of(rec, key)?.to_device_json()),
        )
    }

    /// A device's reported-properties patch; returns the new reported `$version`.
    pub fn patch_reported(&self, key: &IdentityKey, patch: &Map<String, Value>) -> HubResult<u64> {
        let (version, body) = self.change_device(
            &key.device_id,
            |rec| {
                let twin = twin_of(rec, key)?;
                let version = twin.patch_reported(patch)?;
                let body = twin.reported_event(patch);
                if let Ok(common) = common_of(rec, key) {
                    common.presence.last_activity = Timestamp::now();
                }
                Ok((version, body))
            },
            |_| {},
        )?;
        self.report(Change::Twin {
            key: key.clone(),
            replaced: false,
            body,
        });
        Ok(version)
    }
}

/// The full service-side twin JSON: identity fields plus the document.
fn twin_json(rec: &DeviceRecord, key: &IdentityKey) -> HubResult<Value> {
    let (module, twin) = match &key.module_id {
        None => (None, &rec.twin),
        Some(m) => {
            let record = rec
                .modules
                .get(m)
                .ok_or_else(|| HubError::module_not_found(&key.device_id, m))?;
            (Some(&record.module), &record.twin)
        }
    };
    Ok(twin_row(&rec.device, module, twin, RowShape::FULL))
}

/// The twin JSON of a device (`module` None) or module twin with only the heavy parts `shape`
/// asks for. The ids are always there.
pub(super) fn twin_row(
    device: &Device,
    module: Option<&Module>,
    twin: &Twin,
    shape: RowShape,
) -> Value {
    // Room for every field up front: growing the map rehashes every key it holds.
    let mut out = Map::with_capacity(if shape.identity { TWIN_FIELDS } else { 4 });
    if shape.identity {
        write_identity(device, module, twin, &mut out);
    } else {
        out.insert("deviceId".into(), Value::String(device.device_id.clone()));
        if let Some(m) = module {
            out.insert("moduleId".into(), Value::String(m.module_id.clone()));
        }
    }
    twin.write_fields(
        &mut out,
        RowShape {
            identity: false,
            ..shape
        },
    );
    Value::Object(out)
}

/// The most fields a twin's JSON has at its top level.
pub(super) const TWIN_FIELDS: usize = 18;

/// The identity part of a twin's JSON: every field before `tags`, in the row's order.
pub(super) fn write_identity(
    device: &Device,
    module: Option<&Module>,
    twin: &Twin,
    out: &mut Map<String, Value>,
) {
    match module {
        None => device.write_twin_fields(out),
        Some(m) => m.write_twin_fields(device, out),
    }
    out.insert("modelId".into(), Value::String(twin.model_id.clone()));
    twin.write_fields(
        out,
        RowShape {
            identity: true,
            tags: false,
            properties: false,
            metadata: false,
        },
    );
}
