//! Device and module identities: create, update, delete, list, keys, and edge parents.

use super::events::{self, Change};
use super::identity::{self, Credentials, Device, DeviceSpec, Module, ModuleSpec, Status};
use super::{
    common_of, lock, module_of, DeviceRecord, DeviceStats, IdentityKey, IfMatch, ModuleRecord,
    Registry,
};
use crate::auth::SymmetricKey;
use crate::error::{ErrorCode, HubError, HubResult};
use crate::twin::Twin;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

impl Registry {
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
            let created = match self.devices.entry(device_id.into()) {
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
                        http_locks: Default::default(),
                        deleted: false,
                    };
                    self.add_edge_modules(&mut record);
                    self.persist(device_id, &record)?;
                    let changes = events::lifecycle(&record, true);
                    let record = Arc::new(Mutex::new(record));
                    self.index_mut()
                        .insert(Arc::clone(slot.key()), Arc::clone(&record));
                    slot.insert(record);
                    Ok((json, changes))
                }
            };
            // Reported once the map's entry is released: an observer may read the registry.
            let (json, changes) = created?;
            self.report_all(changes);
            return Ok(json);
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
        let changes = self.with_device(device_id, |rec| {
            if_match.check(&rec.device.common.etag)?;
            if let Some(store) = &self.store {
                store.remove(device_id).map_err(|e| {
                    tracing::error!(error = %e, device = device_id, "deleting from the data dir failed");
                    HubError::new(ErrorCode::ServerError, "The deletion could not be saved")
                })?;
            }
            rec.deleted = true;
            Ok(events::lifecycle(rec, false))
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
        self.report_all(changes);
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
        let key = IdentityKey::module(device_id, module_id);
        let (json, created) = self.change_device(
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
                    Ok((existing.module.to_json(), None))
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
                    let twin = events::twin_document(rec, &key);
                    Ok((json, twin))
                }
            },
            |_| {},
        )?;
        if let Some(twin) = created {
            self.report(Change::Created { key, twin });
        }
        Ok(json)
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
        let key = IdentityKey::module(device_id, module_id);
        let twin = self.change_device(
            device_id,
            |rec| {
                let m = module_of(rec, device_id, module_id)?;
                if_match.check(&m.module.common.etag)?;
                let twin = events::twin_document(rec, &key);
                rec.modules.remove(module_id);
                Ok(twin)
            },
            |_| {},
        )?;
        if let Some(twin) = twin {
            self.report(Change::Deleted { key, twin });
        }
        Ok(())
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
}

/// The module identities IoT Hub gives every edge device (its runtime's two system modules).
const EDGE_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

/// How far up a chain of edge parents the cycle check walks (IoT Hub allows five layers).
const MAX_EDGE_DEPTH: usize = 10;
