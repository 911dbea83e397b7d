//! The identity registry and the twin store: every device, its modules, and their twins.
//!
//! This file holds the records, the locks and persistence; the operations live by concern:
//! [`devices`] (identity CRUD, keys, edge parents), [`twins`] (twin reads and writes),
//! [`queues`] (cloud-to-device queues), [`presence`] (what device front ends read and record)
//! and [`scan`] (twins in id order for queries). New hub features (jobs, configurations,
//! routes) get their own top-level modules and use these public operations.
//!
//! # Locking
//! Devices live in a sharded `DashMap`, each behind its own small `std::sync::Mutex` that also
//! guards the device's modules and all their twins. Work on one device never waits for another,
//! and a device's modules share its lock, which makes "delete a device and its modules", "at most
//! N modules" and "a desired push leaves in version order" simple to get right. Every critical
//! section is short and synchronous: no lock is held across an `.await`. A `DashMap` guard is
//! never held while taking a record lock for longer than the clone of its `Arc`.
//!
//! A deleted record is marked `deleted` under its lock before it leaves the map, so an operation
//! that fetched the `Arc` just before the delete sees "not found" instead of writing to a ghost.
//!
//! Queries walk the devices in id order through a second map, the ordered index. It is written
//! only when a device is created or deleted (never on the twin path), and a scan holds it only
//! while it copies the next few hundred entries. Lock order: a `DashMap` shard, then the index,
//! then a record; nothing takes them in another order.

mod devices;
mod events;
pub mod identity;
mod presence;
mod queues;
mod scan;
mod twins;

pub use events::{Change, Observer};
pub use identity::{Credentials, Device, DeviceSpec, Module, ModuleSpec, Status};
pub use queues::{HTTP_LOCK, HTTP_LOCK_RANGE};

use crate::c2d::CloudMessage;
use crate::error::{ErrorCode, HubError, HubResult};
use crate::store::Store;
use crate::twin::Twin;
use dashmap::DashMap;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

/// The identity a device connection or a twin belongs to: a device, or a module of a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl IdentityKey {
    pub fn device(device_id: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            module_id: None,
        }
    }

    pub fn module(device_id: impl Into<String>, module_id: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            module_id: Some(module_id.into()),
        }
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module_id {
            Some(m) => write!(f, "{}/{m}", self.device_id),
            None => f.write_str(&self.device_id),
        }
    }
}

/// An `If-Match` precondition, quotes and `W/` already stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// No header: for PUT on an identity this means "create".
    Absent,
    /// `*`: any current version.
    Any,
    /// A specific etag.
    Etag(String),
    /// A header no etag can match (not ASCII): fails like a stale etag.
    Unmatchable,
}

impl IfMatch {
    /// The header as it came off the wire. A value that is not visible ASCII (no etag is) is a
    /// precondition no version matches, so the write fails with 412 and changes nothing; it never
    /// turns into "no header", which for twin writes and deletes means "any version".
    pub fn from_header(value: Option<&[u8]>) -> Self {
        match value.map(std::str::from_utf8) {
            None => Self::Absent,
            Some(Ok(v)) if v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) => {
                Self::parse(Some(v))
            }
            Some(_) => Self::Unmatchable,
        }
    }

    /// Parses the header value as the SDKs send it: `"*"` or `"<etag>"`, quoted or not.
    pub fn parse(header: Option<&str>) -> Self {
        let Some(raw) = header.map(str::trim).filter(|s| !s.is_empty()) else {
            return Self::Absent;
        };
        let raw = raw.strip_prefix("W/").unwrap_or(raw);
        let raw = raw
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(raw);
        if raw == "*" {
            Self::Any
        } else {
            Self::Etag(raw.to_owned())
        }
    }

    fn check(&self, current: &str) -> HubResult<()> {
        match self {
            Self::Etag(e) if e != current => Err(HubError::precondition_failed()),
            Self::Unmatchable => Err(HubError::precondition_failed()),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct ModuleRecord {
    module: Module,
    twin: Twin,
}

/// Everything about one device; with `--data-dir`, also the unit the store saves.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct DeviceRecord {
    device: Device,
    twin: Twin,
    modules: BTreeMap<String, ModuleRecord>,
    /// Cloud-to-device messages waiting for the device, oldest first.
    c2d: VecDeque<CloudMessage>,
    /// Messages a device received over HTTPS and has not settled yet: lock token → its lock.
    /// Not persisted: after a restart every message is deliverable again.
    #[serde(skip)]
    http_locks: std::collections::HashMap<u64, queues::HttpLock>,
    #[serde(skip)]
    deleted: bool,
}

impl DeviceRecord {
    /// Drops expired cloud-to-device messages and keeps the device's message count current.
    fn purge_expired_c2d(&mut self) {
        let now = std::time::SystemTime::now();
        self.c2d.retain(|m| !m.is_expired(now));
        self.device.common.c2d_count = self.c2d.len() as u32;
    }
}

/// Counts for `GET /statistics/devices`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub total: usize,
    pub enabled: usize,
    pub disabled: usize,
}

/// The registry: shared by the REST API (writes identities and desired twins) and the device
/// front ends (read credentials, write reported properties and presence).
pub struct Registry {
    /// One record per device; see the module docs for the locking rules. Ids are shared
    /// (`Arc<str>`) so that a scan can order them without copying each one.
    devices: DashMap<Arc<str>, Arc<Mutex<DeviceRecord>>>,
    /// The same records ordered by id, for scans: a query then needs neither a sort nor a heap
    /// of all ids, and a page starts where the previous one stopped instead of at the first id.
    /// May briefly hold a record that is already deleted; scans skip those.
    index: RwLock<BTreeMap<Arc<str>, Arc<Mutex<DeviceRecord>>>>,
    /// Source of identity etags; a global atomic, not a lock.
    etag_seq: AtomicU64,
    /// Source of cloud-to-device lock tokens.
    c2d_seq: AtomicU64,
    /// Most modules a device may have (IoT Hub: 50).
    max_modules: usize,
    /// With `--data-dir`: every change to a device record is saved here, under the record's
    /// lock, before it is acknowledged.
    store: Option<Store>,
    /// Who hears about changes (the hub); see `events`.
    observer: std::sync::OnceLock<Observer>,
}

impl Registry {
    pub fn new(max_modules: usize) -> Self {
        Self {
            devices: DashMap::new(),
            index: RwLock::new(BTreeMap::new()),
            etag_seq: AtomicU64::new(1),
            c2d_seq: AtomicU64::new(1),
            max_modules,
            store: None,
            observer: std::sync::OnceLock::new(),
        }
    }

    /// A registry backed by `store`, holding what it saved before. Everyone starts
    /// disconnected; etags and lock tokens continue after the largest stored ones.
    ///
    /// # Errors
    /// When a stored record cannot be read back.
    pub fn with_store(max_modules: usize, store: Store) -> Result<Self, String> {
        let mut registry = Self::new(max_modules);
        let (mut max_etag, mut max_token) = (0u64, 0u64);
        for (id, bytes) in store.load().map_err(|e| e.to_string())? {
            let mut record: DeviceRecord = serde_json::from_slice(&bytes)
                .map_err(|e| format!("the stored record of device '{id}' is unreadable: {e}"))?;
            record.device.common.presence.connected = false;
            let mut etags = vec![etag_number(&record.device.common.etag)];
            for m in record.modules.values_mut() {
                m.module.common.presence.connected = false;
                etags.push(etag_number(&m.module.common.etag));
            }
            max_etag = max_etag.max(etags.into_iter().max().unwrap_or(0));
            max_token = max_token.max(record.c2d.iter().map(|m| m.lock_token).max().unwrap_or(0));
            let id: Arc<str> = id.into();
            let record = Arc::new(Mutex::new(record));
            registry
                .index_mut()
                .insert(Arc::clone(&id), Arc::clone(&record));
            registry.devices.insert(id, record);
        }
        registry.etag_seq = AtomicU64::new(max_etag + 1);
        registry.c2d_seq = AtomicU64::new(max_token + 1);
        registry.store = Some(store);
        Ok(registry)
    }

    /// Saves a record; no-op without a store.
    fn persist(&self, device_id: &str, record: &DeviceRecord) -> HubResult<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(record).map_err(|e| {
            HubError::new(
                ErrorCode::ServerError,
                format!("cannot encode the record: {e}"),
            )
        })?;
        store.save(device_id, &bytes).map_err(|e| {
            tracing::error!(error = %e, device = device_id, "saving to the data dir failed");
            HubError::new(ErrorCode::ServerError, "The change could not be saved")
        })
    }

    /// Like [`with_device`](Self::with_device), for changes: the record is saved after `f`
    /// succeeds, and if saving fails the change is undone, so memory never gets ahead of the
    /// store. `then` runs under the lock after the save (desired-property pushes go out in
    /// version order, and only for changes that were kept).
    fn change_device<T>(
        &self,
        device_id: &str,
        f: impl FnOnce(&mut DeviceRecord) -> HubResult<T>,
        then: impl FnOnce(&T),
    ) -> HubResult<T> {
        self.with_device(device_id, |rec| {
            let before = self.store.as_ref().map(|_| rec.clone());
            let out = f(rec)?;
            if let Err(e) = self.persist(device_id, rec) {
                if let Some(before) = before {
                    *rec = before;
                }
                return Err(e);
            }
            then(&out);
            Ok(out)
        })
    }

    fn next_etag(&self) -> String {
        use base64::Engine;
        let n = self.etag_seq.fetch_add(1, Ordering::Relaxed);
        // Real identity etags are base64 of a decimal string ("MTIzNDU2Nzg=" is "12345678").
        base64::engine::general_purpose::STANDARD.encode(format!("{n:08}"))
    }

    /// Locks a live device record, or says it is not found.
    fn with_device<T>(
        &self,
        device_id: &str,
        f: impl FnOnce(&mut DeviceRecord) -> HubResult<T>,
    ) -> HubResult<T> {
        let record = self
            .devices
            .get(device_id)
            .map(|r| Arc::clone(r.value()))
            .ok_or_else(|| HubError::device_not_found(device_id))?;
        let mut guard = lock(&record);
        if guard.deleted {
            return Err(HubError::device_not_found(device_id));
        }
        f(&mut guard)
    }

    /// The ordered index, to add or remove a device.
    fn index_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<Arc<str>, Arc<Mutex<DeviceRecord>>>> {
        self.index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets every identity (hub reset).
    pub fn clear(&self) {
        let records: Vec<_> = self.devices.iter().map(|e| Arc::clone(e.value())).collect();
        for r in records {
            lock(&r).deleted = true;
        }
        self.devices.clear();
        self.index_mut().retain(|_, r| !lock(r).deleted);
        if let Some(store) = &self.store {
            if let Err(e) = store.clear() {
                tracing::error!(error = %e, "clearing the data dir failed");
            }
        }
    }
}

/// The number inside an identity etag (base64 of a decimal string), or 0.
fn etag_number(etag: &str) -> u64 {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(etag)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn lock(record: &Mutex<DeviceRecord>) -> MutexGuard<'_, DeviceRecord> {
    // A panic while holding the lock cannot leave a half-applied change (every change is checked
    // completely before anything is written), so a poisoned lock is safe to keep using.
    record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn module_of<'a>(
    rec: &'a mut DeviceRecord,
    device_id: &str,
    module_id: &str,
) -> HubResult<&'a mut ModuleRecord> {
    rec.modules
        .get_mut(module_id)
        .ok_or_else(|| HubError::module_not_found(device_id, module_id))
}

fn twin_of<'a>(rec: &'a mut DeviceRecord, key: &IdentityKey) -> HubResult<&'a mut Twin> {
    match &key.module_id {
        None => Ok(&mut rec.twin),
        Some(m) => Ok(&mut module_of(rec, &key.device_id, m)?.twin),
    }
}

fn common_of<'a>(
    rec: &'a mut DeviceRecord,
    key: &IdentityKey,
) -> HubResult<&'a mut identity::Common> {
    match &key.module_id {
        None => Ok(&mut rec.device.common),
        Some(m) => Ok(&mut module_of(rec, &key.device_id, m)?.module.common),
    }
}

#[cfg(test)]
mod tests {
    use super::scan::TwinView;
    use super::twins::twin_row;
    use super::*;
    use crate::query::RowPlan;
    use crate::twin::RowShape;
    use serde_json::json;
    use serde_json::{Map, Value};
    use std::collections::HashSet;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn if_match_parsing() {
        assert_eq!(IfMatch::parse(None), IfMatch::Absent);
        assert_eq!(IfMatch::parse(Some("\"*\"")), IfMatch::Any);
        assert_eq!(IfMatch::parse(Some("*")), IfMatch::Any);
        assert_eq!(
            IfMatch::parse(Some("W/\"abc\"")),
            IfMatch::Etag("abc".into())
        );
        assert_eq!(
            IfMatch::parse(Some("\"AAAAAAAAAAE=\"")),
            IfMatch::Etag("AAAAAAAAAAE=".into())
        );
    }

    #[test]
    fn create_update_and_etags() {
        let reg = Registry::new(50);
        let created = reg.put_device("d1", &Map::new(), &IfMatch::Absent).unwrap();
        let err = reg
            .put_device("d1", &Map::new(), &IfMatch::Absent)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DeviceAlreadyExists);
        let stale = IfMatch::Etag("nope".into());
        let err = reg
            .put_device("d1", &obj(json!({"status":"disabled"})), &stale)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::PreconditionFailed);
        let etag = IfMatch::Etag(created["etag"].as_str().unwrap().into());
        let updated = reg
            .put_device("d1", &obj(json!({"status":"disabled"})), &etag)
            .unwrap();
        assert_eq!(updated["status"], "disabled");
        assert_ne!(updated["etag"], created["etag"]);
        // Keys survive an update that leaves them out.
        assert_eq!(updated["authentication"], created["authentication"]);
        let err = reg
            .put_device("nope", &Map::new(), &IfMatch::Any)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DeviceNotFound);
    }

    #[test]
    fn deleting_a_device_deletes_its_modules() {
        let reg = Registry::new(50);
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        reg.put_module("d", "m", &Map::new(), &IfMatch::Absent)
            .unwrap();
        reg.delete_device("d", &IfMatch::Any).unwrap();
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        let err = reg.get_module("d", "m").unwrap_err();
        assert_eq!(err.code, ErrorCode::ModuleNotFound);
    }

    #[test]
    fn edge_devices_get_a_scope_system_modules_and_children() {
        let reg = Registry::new(50);
        let edge = json!({"capabilities": {"iotEdge": true}});
        let root = reg
            .put_device("root-1", &obj(edge.clone()), &IfMatch::Absent)
            .unwrap();
        let scope = root["deviceScope"].as_str().unwrap().to_owned();
        assert_eq!(
            scope,
            format!(
                "ms-azure-iot-edge://root-1-{}",
                root["generationId"].as_str().unwrap()
            )
        );
        assert_eq!(root["parentScopes"], json!([]));
        let modules: Vec<Value> = reg.list_modules("root-1").unwrap();
        let ids: Vec<&str> = modules
            .iter()
            .map(|m| m["moduleId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["$edgeAgent", "$edgeHub"]);
        assert_eq!(modules[0]["authentication"]["type"], "sas");
        reg.get_twin(&IdentityKey::module("root-1", "$edgeHub"))
            .unwrap();

        // A leaf device names its parent by deviceScope; parentScopes follows.
        let leaf = reg
            .put_device(
                "leaf",
                &obj(json!({"deviceScope": scope})),
                &IfMatch::Absent,
            )
            .unwrap();
        assert_eq!(leaf["deviceScope"], json!(scope));
        assert_eq!(leaf["parentScopes"], json!([scope]));
        // A scope no edge device has is refused, and the device is unchanged.
        for bad in [
            "2b1e0f0c-6f43-4bd6-9d1c-7b0b2d5f1e1a",
            "ms-azure-iot-edge://root-1-1",
            "ms-azure-iot-edge://leaf-1",
        ] {
            let err = reg
                .put_device("leaf", &obj(json!({"deviceScope": bad})), &IfMatch::Any)
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::ArgumentInvalid, "{bad}");
        }
        assert_eq!(reg.get_device("leaf").unwrap()["deviceScope"], json!(scope));
        // `children remove`: deviceScope "" (with the stale parentScopes) detaches it.
        let detached = reg
            .put_device(
                "leaf",
                &obj(json!({"deviceScope": "", "parentScopes": [scope]})),
                &IfMatch::Any,
            )
            .unwrap();
        assert_eq!(detached["parentScopes"], json!([]));
        assert_eq!(detached["deviceScope"], Value::Null);

        // Nested edge: the child edge device keeps its own scope and names its parent in
        // parentScopes; the parent cannot then become the child's child.
        let mut child_body = edge.clone();
        child_body["parentScopes"] = json!([scope]);
        let child = reg
            .put_device("child", &obj(child_body), &IfMatch::Absent)
            .unwrap();
        let child_scope = child["deviceScope"].as_str().unwrap().to_owned();
        assert!(child_scope.starts_with("ms-azure-iot-edge://child-"));
        assert_eq!(child["parentScopes"], json!([scope]));
        let mut cycle = edge.clone();
        cycle["parentScopes"] = json!([child_scope]);
        let err = reg
            .put_device("root-1", &obj(cycle), &IfMatch::Any)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ArgumentInvalid);
        let mut two = edge.clone();
        two["parentScopes"] = json!([scope, child_scope]);
        let err = reg
            .put_device("child", &obj(two), &IfMatch::Any)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ArgumentInvalid);
        let mut own = edge.clone();
        own["parentScopes"] = json!([child_scope]);
        let err = reg
            .put_device("child", &obj(own), &IfMatch::Any)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ArgumentInvalid);
        // Updating an edge device keeps its scope and modules, whatever deviceScope it sends.
        let mut echo = edge;
        echo["deviceScope"] = json!("something else");
        let root_again = reg.put_device("root-1", &obj(echo), &IfMatch::Any).unwrap();
        assert_eq!(root_again["deviceScope"], json!(scope));
        // No longer an edge device: its own old scope in the body means no parent.
        let plain = reg
            .put_device("root-1", &obj(json!({"deviceScope": scope})), &IfMatch::Any)
            .unwrap();
        assert_eq!(plain["deviceScope"], Value::Null);
        assert_eq!(plain["capabilities"]["iotEdge"], false);
    }

    #[test]
    fn module_limit_is_enforced() {
        let reg = Registry::new(2);
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        reg.put_module("d", "a", &Map::new(), &IfMatch::Absent)
            .unwrap();
        reg.put_module("d", "b", &Map::new(), &IfMatch::Absent)
            .unwrap();
        let err = reg
            .put_module("d", "c", &Map::new(), &IfMatch::Absent)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooManyModulesOnDevice);
        assert_eq!(reg.list_modules("d").unwrap().len(), 2);
    }

    #[test]
    fn twin_patch_notifies_in_order_and_checks_etag() {
        let reg = Registry::new(50);
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        reg.put_module("d", "m", &Map::new(), &IfMatch::Absent)
            .unwrap();
        let key = IdentityKey::module("d", "m");
        let mut notes = Vec::new();
        let twin = reg.get_twin(&key).unwrap();
        let etag = IfMatch::Etag(twin["etag"].as_str().unwrap().into());
        let patch = obj(json!({"properties":{"desired":{"a":1}}}));
        reg.patch_twin(&key, &patch, &etag, |n| notes.push(n))
            .unwrap();
        let err = reg
            .patch_twin(&key, &patch, &etag, |n| notes.push(n))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::PreconditionFailed);
        reg.patch_twin(
            &key,
            &obj(json!({"properties":{"desired":{"b":2}}})),
            &IfMatch::Any,
            |n| notes.push(n),
        )
        .unwrap();
        assert_eq!(
            notes,
            [json!({"a":1,"$version":2}), json!({"b":2,"$version":3})]
        );
        let twin = reg.get_twin(&key).unwrap();
        assert_eq!(twin["moduleId"], "m");
        assert_eq!(twin["properties"]["desired"]["$version"], 3);
    }

    #[test]
    fn reported_patch_is_visible_to_the_service() {
        let reg = Registry::new(50);
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        let key = IdentityKey::device("d");
        let v = reg.patch_reported(&key, &obj(json!({"fw":"2"}))).unwrap();
        assert_eq!(v, 2);
        let twin = reg.get_twin(&key).unwrap();
        assert_eq!(twin["properties"]["reported"]["fw"], "2");
        assert!(twin["properties"]["reported"]["$metadata"]["fw"]["$lastUpdated"].is_string());
    }

    /// A registry with one device with tags and properties, one module of it, and one bare
    /// device.
    fn scan_fixture() -> Registry {
        let reg = Registry::new(50);
        for d in ["d1", "d2"] {
            reg.put_device(d, &Map::new(), &IfMatch::Absent).unwrap();
        }
        reg.put_module("d1", "m", &Map::new(), &IfMatch::Absent)
            .unwrap();
        for key in [IdentityKey::device("d1"), IdentityKey::module("d1", "m")] {
            let patch = json!({
                "tags": {"x": "y", "Loc": {"Region": "eu", "floor": 3}, "loc": {"region": "us"},
                         "list": [1, {"a": 1}]},
                "properties": {"desired": {"mode": "eco", "cfg": {"a": 1, "b": null}}}
            });
            reg.patch_twin(&key, &obj(patch), &IfMatch::Any, |_| {})
                .unwrap();
            reg.patch_reported(&key, &obj(json!({"fw": "1.2", "t": 21.5, "Mode": "on"})))
                .unwrap();
        }
        reg.set_connected(&IdentityKey::device("d1"), true, Some("dtmi:x;1"));
        reg
    }

    #[test]
    fn conditions_read_the_stored_twin_as_they_read_its_row() {
        let reg = scan_fixture();
        let filters = [
            "tags.x = 'y'",
            "Tags.X = 'y'",
            "tags.loc.region = 'us'",
            "tags.LOC.region = 'eu'",
            "tags.Loc.REGION = 'eu'",
            "tags.loc.floor = 3",
            "tags.missing = 'x'",
            "is_defined(tags)",
            "is_object(tags.loc)",
            "ARRAY_CONTAINS(tags.list, properties.desired.cfg)",
            "ARRAY_CONTAINS([properties.reported], properties.reported)",
            "properties.desired.mode = 'eco'",
            "properties.reported.mode = 'on'",
            "properties.reported.Mode = properties.desired.mode",
            "Properties.Reported.T > 20",
            "properties.reported.$version = 2",
            "properties.reported.$VERSION = 2",
            "properties.desired.$version.x = 2",
            "is_defined(properties.desired.cfg.b)",
            "properties.desired.$metadata.mode.$lastUpdatedVersion = 2",
            "is_string(properties.reported.$Metadata.fw.$lastUpdated)",
            "is_defined(properties.reported.$metadata)",
            "is_object(properties.reported)",
            "is_object(properties)",
            "properties.nope.x = 1",
            "deviceId = 'd1'",
            "DeviceId IN ['d1', 'd2']",
            "moduleId = 'm'",
            "connectionState = 'Connected'",
            "modelId = 'dtmi:x;1'",
            "version >= 2 AND etag != 'x'",
            "capabilities.iotEdge = false",
            "status = 'enabled' OR tags.x = 'z'",
            "NOT (tags.x = 'y')",
            "tags.x = 'y' AND deviceId = 'd2'",
        ];
        let mut matched = HashSet::new();
        for filter in filters {
            for source in ["devices", "devices.modules"] {
                let text = format!("SELECT * FROM {source} WHERE {filter}");
                let query = crate::query::parse(&text).unwrap();
                for plan in [query.filter_shape(), query.row_shape()] {
                    for entry in reg.devices.iter() {
                        let rec = lock(entry.value());
                        let mut twins = vec![(None, &rec.twin)];
                        twins.extend(rec.modules.values().map(|m| (Some(&m.module), &m.twin)));
                        for (module, twin) in twins {
                            let row = twin_row(&rec.device, module, twin, plan.shape);
                            let view = TwinView::new(&rec.device, module, twin, plan.shape);
                            let admitted = plan.admits(&view);
                            assert_eq!(
                                admitted,
                                query.matches(&row),
                                "{text} on {}/{module:?}",
                                rec.device.device_id
                            );
                            if admitted {
                                matched.insert(filter);
                            }
                        }
                    }
                }
            }
        }
        // The comparison means something only if conditions do match; these never do.
        let unmatched: Vec<&str> = filters
            .into_iter()
            .filter(|f| !matched.contains(f))
            .collect();
        assert_eq!(
            unmatched,
            [
                "tags.loc.floor = 3",
                "tags.missing = 'x'",
                "properties.reported.Mode = properties.desired.mode",
                "properties.desired.$version.x = 2",
                "is_defined(properties.desired.cfg.b)",
                "properties.nope.x = 1",
                "NOT (tags.x = 'y')",
                "tags.x = 'y' AND deviceId = 'd2'",
            ]
        );
    }

    #[test]
    fn scans_return_matching_rows_in_identity_order_after_a_key() {
        let reg = scan_fixture();
        let query = crate::query::parse("SELECT * FROM devices WHERE version > 0").unwrap();
        let mut seen = Vec::new();
        reg.scan_twins(false, None, query.filter_shape(), |key, _| {
            seen.push(key);
            true
        });
        assert_eq!(seen, [IdentityKey::device("d1"), IdentityKey::device("d2")]);
        seen.clear();
        let after = IdentityKey::device("d1");
        reg.scan_twins(false, Some(&after), query.filter_shape(), |key, _| {
            seen.push(key);
            true
        });
        assert_eq!(seen, [IdentityKey::device("d2")]);
        let query =
            crate::query::parse("SELECT * FROM devices.modules WHERE tags.x = 'y'").unwrap();
        let mut rows = Vec::new();
        reg.scan_twins(true, Some(&after), query.filter_shape(), |key, row| {
            rows.push((key, row));
            true
        });
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, IdentityKey::module("d1", "m"));
        assert_eq!(rows[0].1["tags"]["x"], "y");
        let mut count = 0;
        reg.scan_all_twins(false, query.filter_shape(), |_| count += 1);
        assert_eq!(count, 1);
    }

    #[test]
    fn scans_walk_every_live_device_in_order_across_chunks() {
        let reg = Registry::new(50);
        let ids: Vec<String> = (0..600).rev().map(|i| format!("dev{i:03}")).collect();
        for id in &ids {
            reg.put_device(id, &Map::new(), &IfMatch::Absent).unwrap();
        }
        reg.delete_device("dev100", &IfMatch::Any).unwrap();
        reg.delete_device("dev200", &IfMatch::Any).unwrap();
        reg.put_device("dev200", &Map::new(), &IfMatch::Absent)
            .unwrap();
        let all = || {
            let mut seen = Vec::new();
            reg.scan_all_twins(false, RowPlan::all(RowShape::FULL), |row| {
                seen.push(row["deviceId"].as_str().unwrap().to_owned());
            });
            seen
        };
        let mut expected: Vec<String> = ids.into_iter().filter(|i| i != "dev100").collect();
        expected.sort();
        assert_eq!(all(), expected);
        // Resuming after a key, and stopping early.
        let mut page = Vec::new();
        let after = IdentityKey::device("dev299");
        reg.scan_twins(
            false,
            Some(&after),
            RowPlan::all(RowShape::FULL),
            |key, _| {
                page.push(key.device_id);
                page.len() < 3
            },
        );
        assert_eq!(page, ["dev300", "dev301", "dev302"]);
        reg.clear();
        assert!(all().is_empty());
        reg.put_device("again", &Map::new(), &IfMatch::Absent)
            .unwrap();
        assert_eq!(all(), ["again"]);
    }
}
