//! What the registry tells the hub after a change: the raw material of IoT Hub's twin change,
//! lifecycle and connection state events (`routing` turns them into messages).
//!
//! A change is reported after the device's lock is released, so whoever listens may read the
//! registry again (a route condition on `$twin`). Changes to one twin are reported in the
//! order their writes completed; each twin change carries the twin's `version`.

use super::{DeviceRecord, IdentityKey, Registry};
use serde_json::{Map, Value};

/// A change worth an event.
#[derive(Debug, Clone)]
pub enum Change {
    /// A twin was patched (`replaced: false`) or replaced; `body` is the event body IoT Hub
    /// sends (the changed parts with their metadata, or the whole twin document).
    Twin {
        key: IdentityKey,
        replaced: bool,
        body: Value,
    },
    /// An identity was created; `twin` is its twin document.
    Created { key: IdentityKey, twin: Value },
    /// An identity was deleted; `twin` is its twin document as it was.
    Deleted { key: IdentityKey, twin: Value },
    /// A device or module connected or disconnected.
    Connection { key: IdentityKey, connected: bool },
}

/// Who hears about changes.
pub type Observer = Box<dyn Fn(Change) + Send + Sync>;

impl Registry {
    /// Sets who hears about changes (the hub, once, at start-up).
    pub fn observe(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    pub(super) fn report(&self, change: Change) {
        if let Some(observer) = self.observer.get() {
            observer(change);
        }
    }

    pub(super) fn report_all(&self, changes: Vec<Change>) {
        for change in changes {
            self.report(change);
        }
    }
}

/// The twin document an identity's lifecycle events and twin replacements carry: the ids, the
/// twin's etag and version, tags (when there are any) and properties with their metadata.
pub(super) fn twin_document(rec: &DeviceRecord, key: &IdentityKey) -> Option<Value> {
    let twin = match &key.module_id {
        None => &rec.twin,
        Some(m) => &rec.modules.get(m)?.twin,
    };
    let mut out = Map::new();
    out.insert("deviceId".into(), Value::String(key.device_id.clone()));
    if let Some(m) = &key.module_id {
        out.insert("moduleId".into(), Value::String(m.clone()));
    }
    twin.write_service_fields(&mut out);
    Some(Value::Object(out))
}

/// Lifecycle changes for every identity in a record (a device and its modules), of one kind.
pub(super) fn lifecycle(rec: &DeviceRecord, created: bool) -> Vec<Change> {
    let device = IdentityKey::device(rec.device.device_id.clone());
    let mut keys = vec![device];
    keys.extend(
        rec.modules
            .keys()
            .map(|m| IdentityKey::module(rec.device.device_id.clone(), m.clone())),
    );
    keys.into_iter()
        .filter_map(|key| {
            let twin = twin_document(rec, &key)?;
            Some(if created {
                Change::Created { key, twin }
            } else {
                Change::Deleted { key, twin }
            })
        })
        .collect()
}
