//! Scans for queries: twins in identity order, filtered in place.

use super::identity::{Device, Module};
use super::twins::{twin_row, write_identity, TWIN_FIELDS};
use super::{lock, DeviceRecord, IdentityKey, Registry};
use crate::query::{Row, RowPlan};
use crate::twin::{RowShape, Section, Twin};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::OnceCell;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

impl Registry {
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
    /// The value at `path` of an identity's twin JSON (as `GET /twins` shows it), read in place
    /// under the device's lock: what a route's `$twin.…` reads. `None` when undefined or the
    /// identity does not exist.
    pub fn twin_value(&self, key: &IdentityKey, path: &[String]) -> Option<Value> {
        self.with_device(&key.device_id, |rec| {
            let (module, twin) = match &key.module_id {
                None => (None, &rec.twin),
                Some(m) => match rec.modules.get(m) {
                    Some(r) => (Some(&r.module), &r.twin),
                    None => return Ok(None),
                },
            };
            let view = TwinView::new(&rec.device, module, twin, RowShape::FULL);
            Ok(view.value_at(path).map(Cow::into_owned))
        })
        .ok()
        .flatten()
    }

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
}

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

/// A stored twin as a query's condition reads it: paths resolve exactly as in the row
/// [`twin_row`] builds for the same shape (same keys, same order for the case-insensitive
/// fallback), without building it. Tags and properties are read where they are stored;
/// identity fields are built once, and only for a path that reads them.
pub(super) struct TwinView<'a> {
    device: &'a Device,
    module: Option<&'a Module>,
    twin: &'a Twin,
    /// Whether the property sections carry `$metadata` (as in a row of a shape with metadata).
    metadata: bool,
    identity: OnceCell<Value>,
}

impl<'a> TwinView<'a> {
    pub(super) fn new(
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
    use crate::registry::IfMatch;
    use serde_json::json;

    #[test]
    fn twin_values_are_read_in_place_as_the_twin_json_shows_them() {
        let reg = Registry::new(50);
        reg.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        let key = IdentityKey::device("d");
        let body = json!({"tags": {"site": "north"}, "properties": {"desired": {"rate": 5}}});
        reg.patch_twin(&key, body.as_object().unwrap(), &IfMatch::Absent, |_| {})
            .unwrap();
        let at = |path: &[&str]| {
            let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
            reg.twin_value(&key, &path)
        };
        assert_eq!(at(&["tags", "site"]), Some(json!("north")));
        assert_eq!(
            at(&["TAGS", "Site"]),
            Some(json!("north")),
            "case-insensitive"
        );
        assert_eq!(at(&["properties", "desired", "rate"]), Some(json!(5)));
        assert_eq!(at(&["properties", "desired", "$version"]), Some(json!(2)));
        assert_eq!(at(&["deviceId"]), Some(json!("d")));
        assert_eq!(at(&["tags", "missing"]), None);
        let module = IdentityKey::module("d", "nope");
        assert_eq!(reg.twin_value(&module, &["tags".to_owned()]), None);
    }
}
