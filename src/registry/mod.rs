//! The identity registry and the twin store: every device, its modules, and their twins.
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

pub mod identity;

pub use identity::{Credentials, Device, DeviceSpec, Module, ModuleSpec, Status};

use crate::auth::SymmetricKey;
use crate::c2d::{self, CloudMessage};
use crate::error::{ErrorCode, HubError, HubResult};
use crate::query::{Row, RowPlan};
use crate::store::Store;
use crate::timestamp::Timestamp;
use crate::twin::{RowShape, Section, Twin};
use dashmap::DashMap;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Bound;
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

    // ----- devices -----

    /// `PUT /devices/{id}`: create (no If-Match) or update (If-Match `*` or an etag).
    pub fn put_device(
        &self,
        device_id: &str,
        body: &Map<String, Value>,
        if_match: &IfMatch,
    ) -> HubResult<Value> {
        identity::validate_id(device_id, "Device id")?;
        // The parent is checked before the device's own record is locked: one record lock
        // at a time.
        let parent = self.check_parent(device_id, body)?;
        if *if_match == IfMatch::Absent {
            let mut spec = DeviceSpec::from_json(device_id, body, None)?;
            spec.parent = parent;
            return match self.devices.entry(device_id.into()) {
                dashmap::Entry::Occupied(_) => Err(HubError::new(
                    ErrorCode::DeviceAlreadyExists,
                    format!("A device with ID '{device_id}' is already registered"),
                )),
                dashmap::Entry::Vacant(slot) => {
                    let device = Device::new(device_id.to_owned(), spec, self.next_etag());
                    let json = device.to_json();
                    let mut record = DeviceRecord {
                        device,
                        twin: Twin::new(),
                        modules: BTreeMap::new(),
                        c2d: VecDeque::new(),
                        deleted: false,
                    };
                    self.add_edge_modules(&mut record);
                    self.persist(device_id, &record)?;
                    let record = Arc::new(Mutex::new(record));
                    self.index_mut()
                        .insert(Arc::clone(slot.key()), Arc::clone(&record));
                    slot.insert(record);
                    Ok(json)
                }
            };
        }
        self.change_device(
            device_id,
            |rec| {
                if_match.check(&rec.device.common.etag)?;
                let mut spec = DeviceSpec::from_json(device_id, body, Some(&rec.device))?;
                spec.parent = parent;
                rec.device.update(spec, self.next_etag());
                self.add_edge_modules(rec);
                Ok(rec.device.to_json())
            },
            |_| {},
        )
    }

    /// The parent edge device a device body names (see [`identity::edge_and_parent`]),
    /// checked as IoT Hub checks it: the scope must be the current scope of a live edge
    /// device other than this one, and an edge device may not become its own ancestor.
    /// A device that stops being an edge device may send back its own old scope: that means
    /// no parent.
    fn check_parent(
        &self,
        device_id: &str,
        body: &Map<String, Value>,
    ) -> HubResult<Option<String>> {
        let (iot_edge, parent) = identity::edge_and_parent(body)?;
        let Some(scope) = parent else {
            return Ok(None);
        };
        let invalid = |why: &str| {
            HubError::invalid(format!(
                "Invalid scope '{scope}' for device '{device_id}': {why}"
            ))
        };
        let Some(parent_id) = identity::scope_device_id(&scope) else {
            return Err(invalid("it is not the scope of an edge device"));
        };
        if parent_id == device_id {
            let own_old_scope = !iot_edge
                && self
                    .with_device(device_id, |rec| {
                        Ok(rec.device.device_scope.as_deref() == Some(&scope))
                    })
                    .unwrap_or(false);
            return if own_old_scope {
                Ok(None)
            } else {
                Err(invalid("a device cannot be its own parent"))
            };
        }
        let mut up = self
            .with_device(parent_id, |rec| {
                let d = &rec.device;
                Ok((d.iot_edge && d.device_scope.as_deref() == Some(&scope))
                    .then(|| d.parent_scopes.first().cloned()))
            })
            .ok()
            .flatten()
            .ok_or_else(|| invalid("no edge device has this scope"))?;
        if iot_edge {
            // Walk up the parent's ancestors (bounded, in case of a stale chain).
            for _ in 0..MAX_EDGE_DEPTH {
                let Some(ancestor) = up.as_deref().and_then(identity::scope_device_id) else {
                    break;
                };
                if ancestor == device_id {
                    return Err(invalid("the parent is a descendant of this device"));
                }
                up = self
                    .with_device(ancestor, |rec| {
                        Ok(rec.device.parent_scopes.first().cloned())
                    })
                    .unwrap_or(None);
            }
        }
        Ok(Some(scope))
    }

    /// An edge device has the `$edgeAgent` and `$edgeHub` module identities (SAS, with keys
    /// the hub generates) and their twins from the moment it is an edge device, as in IoT Hub.
    fn add_edge_modules(&self, rec: &mut DeviceRecord) {
        if !rec.device.iot_edge {
            return;
        }
        for module_id in EDGE_MODULES {
            if rec.modules.contains_key(module_id) {
                continue;
            }
            let spec = ModuleSpec {
                managed_by: None,
                credentials: Credentials::Sas {
                    primary: SymmetricKey::generate(),
                    secondary: SymmetricKey::generate(),
                },
            };
            let module = Module::new(
                rec.device.device_id.clone(),
                module_id.to_owned(),
                spec,
                self.next_etag(),
            );
            rec.modules.insert(
                module_id.to_owned(),
                ModuleRecord {
                    module,
                    twin: Twin::new(),
                },
            );
        }
    }

    pub fn get_device(&self, device_id: &str) -> HubResult<Value> {
        self.with_device(device_id, |rec| Ok(rec.device.to_json()))
    }

    /// All devices, ordered by id, at most `top`.
    pub fn list_devices(&self, top: usize) -> Vec<Value> {
        let mut records: Vec<(Arc<str>, Arc<Mutex<DeviceRecord>>)> = self
            .devices
            .iter()
            .map(|e| (Arc::clone(e.key()), Arc::clone(e.value())))
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
            .iter()
            .filter_map(|(_, r)| {
                let rec = lock(r);
                (!rec.deleted).then(|| rec.device.to_json())
            })
            .take(top)
            .collect()
    }

    /// `DELETE /devices/{id}`: removes the device, its modules and their twins.
    pub fn delete_device(&self, device_id: &str, if_match: &IfMatch) -> HubResult<()> {
        self.with_device(device_id, |rec| {
            if_match.check(&rec.device.common.etag)?;
            if let Some(store) = &self.store {
                store.remove(device_id).map_err(|e| {
                    tracing::error!(error = %e, device = device_id, "deleting from the data dir failed");
                    HubError::new(ErrorCode::ServerError, "The deletion could not be saved")
                })?;
            }
            rec.deleted = true;
            Ok(())
        })?;
        if let Some((_, record)) = self.devices.remove(device_id) {
            let mut index = self.index_mut();
            // A device created again under the same id since then stays.
            if index
                .get(device_id)
                .is_some_and(|r| Arc::ptr_eq(r, &record))
            {
                index.remove(device_id);
            }
        }
        Ok(())
    }

    pub fn device_stats(&self) -> DeviceStats {
        let records: Vec<_> = self.devices.iter().map(|e| Arc::clone(e.value())).collect();
        let mut stats = DeviceStats::default();
        for r in records {
            let rec = lock(&r);
            if rec.deleted {
                continue;
            }
            stats.total += 1;
            match rec.device.status {
                Status::Enabled => stats.enabled += 1,
                Status::Disabled => stats.disabled += 1,
            }
        }
        stats
    }

    // ----- modules -----

    /// `PUT /devices/{id}/modules/{mid}`: create or update, like devices.
    pub fn put_module(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Map<String, Value>,
        if_match: &IfMatch,
    ) -> HubResult<Value> {
        identity::validate_id(module_id, "Module id")?;
        self.change_device(
            device_id,
            |rec| match rec.modules.get_mut(module_id) {
                Some(_) if *if_match == IfMatch::Absent => Err(HubError::new(
                    ErrorCode::ModuleAlreadyExistsOnDevice,
                    format!(
                    "A module with ID '{module_id}' is already registered on device '{device_id}'"
                ),
                )),
                Some(existing) => {
                    if_match.check(&existing.module.common.etag)?;
                    let spec =
                        ModuleSpec::from_json(device_id, module_id, body, Some(&existing.module))?;
                    existing.module.update(spec, self.next_etag());
                    Ok(existing.module.to_json())
                }
                None if *if_match != IfMatch::Absent => {
                    Err(HubError::module_not_found(device_id, module_id))
                }
                None => {
                    let spec = ModuleSpec::from_json(device_id, module_id, body, None)?;
                    if rec.modules.len() >= self.max_modules {
                        return Err(HubError::new(
                            ErrorCode::TooManyModulesOnDevice,
                            format!(
                                "Device '{device_id}' already has the maximum of {} modules",
                                self.max_modules
                            ),
                        ));
                    }
                    let module = Module::new(
                        device_id.to_owned(),
                        module_id.to_owned(),
                        spec,
                        self.next_etag(),
                    );
                    let json = module.to_json();
                    rec.modules.insert(
                        module_id.to_owned(),
                        ModuleRecord {
                            module,
                            twin: Twin::new(),
                        },
                    );
                    Ok(json)
                }
            },
            |_| {},
        )
    }

    pub fn get_module(&self, device_id: &str, module_id: &str) -> HubResult<Value> {
        self.with_device(device_id, |rec| {
            module_of(rec, device_id, module_id).map(|m| m.module.to_json())
        })
    }

    pub fn list_modules(&self, device_id: &str) -> HubResult<Vec<Value>> {
        self.with_device(device_id, |rec| {
            Ok(rec.modules.values().map(|m| m.module.to_json()).collect())
        })
    }

    pub fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: &IfMatch,
    ) -> HubResult<()> {
        self.change_device(
            device_id,
            |rec| {
                let m = module_of(rec, device_id, module_id)?;
                if_match.check(&m.module.common.etag)?;
                rec.modules.remove(module_id);
                Ok(())
            },
            |()| {},
        )
    }

    // ----- twins -----

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
        self.write_twin(key, if_match, |twin| twin.patch_from_service(body), notify)
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
            |twin| twin.replace_from_service(body).map(Some),
            notify,
        )
    }

    /// A service write to a twin: etag check, the change, the save, then `notify` with what the
    /// devices must be told (if anything), all under the device lock.
    fn write_twin(
        &self,
        key: &IdentityKey,
        if_match: &IfMatch,
        change: impl FnOnce(&mut Twin) -> HubResult<Option<Value>>,
        notify: impl FnOnce(Value),
    ) -> HubResult<Value> {
        let (json, _) = self.change_device(
            &key.device_id,
            |rec| {
                let twin = twin_of(rec, key)?;
                if_match.check(&twin.etag())?;
                let note = change(twin)?;
                Ok((twin_json(rec, key)?, note))
            },
            |(_, note)| {
                if let Some(note) = note {
                    notify(note.clone());
                }
            },
        )?;
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
        self.change_device(
            &key.device_id,
            |rec| {
                let version = twin_of(rec, key)?.patch_reported(patch)?;
                if let Ok(common) = common_of(rec, key) {
                    common.presence.last_activity = Timestamp::now();
                }
                Ok(version)
            },
            |_| {},
        )
    }

    /// Twin rows (the `GET /twins` JSON, only as heavy as `plan.shape` asks) of the twins that
    /// pass the plan's condition, in identity order, starting after `after`, fed to `visit`
    /// until it returns `false`. The condition is checked on each stored twin in place, so a
    /// twin that does not match costs no copy at all. Devices are locked one at a time and only
    /// while they are read, so a query over many twins never blocks twin updates for long.
    /// `modules` picks module twins (`FROM devices.modules`) instead of device twins.
    pub fn scan_twins(
        &self,
        modules: bool,
        after: Option<&IdentityKey>,
        plan: RowPlan<'_>,
        mut visit: impl FnMut(IdentityKey, Value) -> bool,
    ) {
        let from = after.map_or(Bound::Unbounded, |a| Bound::Included(a.device_id.as_str()));
        self.walk_devices(from, |record| {
            rows_of(record, modules, after, plan)
                .into_iter()
                .all(|(key, row)| visit(key, row))
        });
    }

    /// Like [`scan_twins`](Self::scan_twins) over every twin, for aggregates (identity order
    /// keeps GROUP BY output stable).
    pub fn scan_all_twins(&self, modules: bool, plan: RowPlan<'_>, mut visit: impl FnMut(Value)) {
        self.walk_devices(Bound::Unbounded, |record| {
            for (_, row) in rows_of(record, modules, None, plan) {
                visit(row);
            }
            true
        });
    }

    /// Feeds the device records from id `from` on, in id order, to `visit` until it returns
    /// `false`. The index is read a chunk at a time and released before `visit` runs, so
    /// devices created meanwhile wait at most for one chunk's copy.
    fn walk_devices(&self, from: Bound<&str>, mut visit: impl FnMut(&Mutex<DeviceRecord>) -> bool) {
        const CHUNK: usize = 256;
        let mut chunk: Vec<(Arc<str>, Arc<Mutex<DeviceRecord>>)> = Vec::with_capacity(CHUNK);
        let mut next: Option<Arc<str>> = None;
        loop {
            {
                let index = self.index.read().unwrap_or_else(|p| p.into_inner());
                let lower = next.as_deref().map_or(from, Bound::Excluded);
                chunk.extend(
                    index
                        .range::<str, _>((lower, Bound::Unbounded))
                        .take(CHUNK)
                        .map(|(id, r)| (Arc::clone(id), Arc::clone(r))),
                );
            }
            let Some((last, _)) = chunk.last() else {
                return;
            };
            next = Some(Arc::clone(last));
            if !chunk.drain(..).all(|(_, record)| visit(&record)) {
                return;
            }
        }
    }

    // ----- cloud-to-device messages -----

    /// Queues a message for a device.
    ///
    /// # Errors
    /// 404001 for an unknown device; 403004 when 50 messages already wait.
    pub fn enqueue_c2d(&self, device_id: &str, mut message: CloudMessage) -> HubResult<()> {
        self.change_device(device_id, |rec| {
            rec.purge_expired_c2d();
            if rec.c2d.len() >= c2d::MAX_QUEUE {
                return Err(HubError::new(
                    ErrorCode::DeviceMaximumQueueDepthExceeded,
                    format!(
                        "Device {device_id} already has the maximum of {} cloud-to-device messages waiting",
                        c2d::MAX_QUEUE
                    ),
                ));
            }
            message.lock_token = self.c2d_seq.fetch_add(1, Ordering::Relaxed);
            rec.c2d.push_back(message);
            rec.device.common.c2d_count = rec.c2d.len() as u32;
            Ok(())
        }, |()| {})
    }

    /// `DELETE /devices/{id}/commands`: drops every message waiting for the device, delivered
    /// or not; returns how many there were.
    pub fn purge_c2d(&self, device_id: &str) -> HubResult<usize> {
        self.change_device(
            device_id,
            |rec| {
                let purged = rec.c2d.len();
                rec.c2d.clear();
                rec.device.common.c2d_count = 0;
                Ok(purged)
            },
            |_| {},
        )
    }

    /// Unexpired messages waiting for a device, except those in `in_flight`, oldest first.
    pub fn pending_c2d(&self, device_id: &str, in_flight: &HashSet<u64>) -> Vec<CloudMessage> {
        self.with_device(device_id, |rec| {
            rec.purge_expired_c2d();
            Ok(rec
                .c2d
                .iter()
                .filter(|m| !in_flight.contains(&m.lock_token))
                .cloned()
                .collect())
        })
        .unwrap_or_default()
    }

    /// The device completed (acknowledged) or rejected a message: it leaves the queue.
    /// Returns the message, if it was still there.
    pub fn complete_c2d(&self, device_id: &str, lock_token: u64) -> Option<CloudMessage> {
        self.change_device(
            device_id,
            |rec| {
                let at = rec.c2d.iter().position(|m| m.lock_token == lock_token);
                let removed = at.and_then(|i| rec.c2d.remove(i));
                rec.device.common.c2d_count = rec.c2d.len() as u32;
                Ok(removed)
            },
            |_| {},
        )
        .ok()
        .flatten()
    }

    /// The device abandoned a message: it stays queued for another delivery, unless it has
    /// now been delivered [`c2d::MAX_DELIVERY_COUNT`] times, when it leaves the queue and is
    /// returned (dead-lettered).
    pub fn abandon_c2d(&self, device_id: &str, lock_token: u64) -> Option<CloudMessage> {
        self.change_device(
            device_id,
            |rec| {
                let Some(at) = rec.c2d.iter().position(|m| m.lock_token == lock_token) else {
                    return Ok(None);
                };
                rec.c2d[at].delivery_count += 1;
                if rec.c2d[at].delivery_count < c2d::MAX_DELIVERY_COUNT {
                    return Ok(None);
                }
                let removed = rec.c2d.remove(at);
                rec.device.common.c2d_count = rec.c2d.len() as u32;
                Ok(removed)
            },
            |_| {},
        )
        .ok()
        .flatten()
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

    /// Replaces an identity's primary key, secondary key or both with new random ones (bulk
    /// key regeneration); the identity gets a new etag. Returns the keys now in force.
    ///
    /// # Errors
    /// 404 for an unknown identity; 400 when it does not authenticate with SAS keys.
    pub fn regenerate_keys(
        &self,
        key: &IdentityKey,
        primary: bool,
        secondary: bool,
    ) -> HubResult<[String; 2]> {
        self.change_device(
            &key.device_id,
            |rec| {
                let etag = self.next_etag();
                let common = common_of(rec, key)?;
                let Credentials::Sas {
                    primary: p,
                    secondary: s,
                } = &mut common.credentials
                else {
                    return Err(HubError::invalid(format!(
                        "{key} authenticates with {}, not with symmetric keys",
                        common.credentials.type_name()
                    )));
                };
                if primary {
                    *p = SymmetricKey::generate();
                }
                if secondary {
                    *s = SymmetricKey::generate();
                }
                let keys = [p.to_base64(), s.to_base64()];
                common.etag = etag;
                Ok(keys)
            },
            |_| {},
        )
    }

    /// Whether an identity exists.
    pub fn exists(&self, key: &IdentityKey) -> HubResult<()> {
        self.with_device(&key.device_id, |rec| common_of(rec, key).map(drop))
    }

    // ----- device-facing identity -----

    /// What the device front ends need to authenticate an identity.
    pub fn credentials(&self, key: &IdentityKey) -> HubResult<(Credentials, Status)> {
        self.with_device(&key.device_id, |rec| {
            let status = rec.device.status;
            Ok((common_of(rec, key)?.credentials.clone(), status))
        })
    }

    /// Records a connect or disconnect, and the model id a device announced on connect.
    pub fn set_connected(&self, key: &IdentityKey, connected: bool, model_id: Option<&str>) {
        let _ = self.with_device(&key.device_id, |rec| {
            if let (Some(model), Ok(twin)) = (model_id, twin_of(rec, key)) {
                twin.model_id = model.to_owned();
            }
            let common = common_of(rec, key)?;
            let now = Timestamp::now();
            common.presence.connected = connected;
            common.presence.state_updated = now;
            if connected {
                common.presence.last_activity = now;
            }
            Ok(())
        });
    }

    /// Stores an identity's session state (saved with the record when it changes).
    pub fn set_session(&self, key: &IdentityKey, session: u8) {
        let unchanged = self
            .with_device(&key.device_id, |rec| {
                Ok(common_of(rec, key)?.session == session)
            })
            .unwrap_or(true);
        if unchanged {
            return;
        }
        let _ = self.change_device(
            &key.device_id,
            |rec| {
                common_of(rec, key)?.session = session;
                Ok(())
            },
            |()| {},
        );
    }

    /// Every identity with session state, for restoring it at start-up.
    pub fn sessions(&self) -> Vec<(IdentityKey, u8)> {
        let records: Vec<_> = self.devices.iter().map(|e| Arc::clone(e.value())).collect();
        let mut out = Vec::new();
        for r in records {
            let rec = lock(&r);
            let id = &rec.device.device_id;
            if rec.device.common.session != 0 {
                out.push((IdentityKey::device(id.clone()), rec.device.common.session));
            }
            for (m, module) in &rec.modules {
                if module.module.common.session != 0 {
                    out.push((
                        IdentityKey::module(id.clone(), m.clone()),
                        module.module.common.session,
                    ));
                }
            }
        }
        out
    }

    /// Records device activity (a message or request from it).
    pub fn touch(&self, key: &IdentityKey) {
        let _ = self.with_device(&key.device_id, |rec| {
            common_of(rec, key)?.presence.last_activity = Timestamp::now();
            Ok(())
        });
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

/// The twin rows of one device record (its own, or its modules'), after `after`, of the twins
/// that pass `plan`'s condition.
fn rows_of(
    record: &Mutex<DeviceRecord>,
    modules: bool,
    after: Option<&IdentityKey>,
    plan: RowPlan<'_>,
) -> Vec<(IdentityKey, Value)> {
    let rec = lock(record);
    if rec.deleted {
        return Vec::new();
    }
    let device = &rec.device;
    let own = (!modules).then_some((None, &rec.twin));
    let of_modules = modules.then(|| rec.modules.values().map(|m| (Some(&m.module), &m.twin)));
    own.into_iter()
        .chain(of_modules.into_iter().flatten())
        .filter(|(module, _)| {
            let id = (
                device.device_id.as_str(),
                module.map(|m| m.module_id.as_str()),
            );
            after.is_none_or(|a| id > (a.device_id.as_str(), a.module_id.as_deref()))
        })
        .filter(|(module, twin)| plan.admits(&TwinView::new(device, *module, twin, plan.shape)))
        .map(|(module, twin)| {
            let key = match module {
                None => IdentityKey::device(device.device_id.clone()),
                Some(m) => IdentityKey::module(device.device_id.clone(), m.module_id.clone()),
            };
            (key, twin_row(device, module, twin, plan.shape))
        })
        .collect()
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
fn twin_row(device: &Device, module: Option<&Module>, twin: &Twin, shape: RowShape) -> Value {
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
const TWIN_FIELDS: usize = 18;

/// The module identities IoT Hub gives every edge device (its runtime's two system modules).
const EDGE_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

/// How far up a chain of edge parents the cycle check walks (IoT Hub allows five layers).
const MAX_EDGE_DEPTH: usize = 10;

/// The identity part of a twin's JSON: every field before `tags`, in the row's order.
fn write_identity(
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

/// A stored twin as a query's condition reads it: paths resolve exactly as in the row
/// [`twin_row`] builds for the same shape (same keys, same order for the case-insensitive
/// fallback), without building it. Tags and properties are read where they are stored;
/// identity fields are built once, and only for a path that reads them.
struct TwinView<'a> {
    device: &'a Device,
    module: Option<&'a Module>,
    twin: &'a Twin,
    /// Whether the property sections carry `$metadata` (as in a row of a shape with metadata).
    metadata: bool,
    identity: OnceCell<Value>,
}

impl<'a> TwinView<'a> {
    fn new(
        device: &'a Device,
        module: Option<&'a Module>,
        twin: &'a Twin,
        shape: RowShape,
    ) -> Self {
        Self {
            device,
            module,
            twin,
            metadata: shape.metadata,
            identity: OnceCell::new(),
        }
    }

    /// A path under `properties`.
    fn properties(&self, path: &[String]) -> Option<Cow<'_, Value>> {
        let Some((name, rest)) = path.split_first() else {
            return Some(Cow::Owned(self.twin.properties_json(self.metadata)));
        };
        let section = if name.eq_ignore_ascii_case("desired") {
            &self.twin.desired
        } else if name.eq_ignore_ascii_case("reported") {
            &self.twin.reported
        } else {
            return None;
        };
        self.section(section, rest)
    }

    /// A path inside one properties section. In the row, `$metadata` and `$version` follow the
    /// properties (whose names never contain `$`), so they win on an exact match and lose on a
    /// case-insensitive one.
    fn section<'s>(&self, section: &'s Section, path: &[String]) -> Option<Cow<'s, Value>> {
        let Some((name, rest)) = path.split_first() else {
            return Some(Cow::Owned(section.to_json(self.metadata)));
        };
        let special = |exact: bool| {
            let is = |wanted: &str| {
                if exact {
                    name == wanted
                } else {
                    name.eq_ignore_ascii_case(wanted)
                }
            };
            if self.metadata && is("$metadata") {
                Some(Cow::Owned(
                    section.metadata_json().value_at(rest)?.into_owned(),
                ))
            } else if is("$version") && rest.is_empty() {
                Some(Cow::Owned(Value::from(section.version())))
            } else {
                None
            }
        };
        special(true)
            .or_else(|| crate::query::value_in(section.properties(), path))
            .or_else(|| special(false))
    }
}

impl Row for TwinView<'_> {
    fn value_at(&self, path: &[String]) -> Option<Cow<'_, Value>> {
        let (root, rest) = path.split_first()?;
        // No identity field's name equals `tags` or `properties` even ignoring case, so these
        // two resolve the same with or without the exact-match-first rule.
        if root.eq_ignore_ascii_case("tags") {
            let tags = self.twin.tags();
            // An empty `tags` is left out of the row.
            return (!tags.is_empty())
                .then(|| crate::query::value_in(tags, rest))
                .flatten();
        }
        if root.eq_ignore_ascii_case("properties") {
            return self.properties(rest);
        }
        let identity = self.identity.get_or_init(|| {
            let mut out = Map::with_capacity(TWIN_FIELDS);
            write_identity(self.device, self.module, self.twin, &mut out);
            Value::Object(out)
        });
        identity.value_at(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
