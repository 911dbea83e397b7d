//! Twin documents: tags, desired and reported properties, their versions and `$metadata`.
//!
//! This module is pure logic with no locking: the registry owns one [`Twin`] per device and per
//! module under that identity's lock. Every write is checked completely *before* anything
//! changes, so a rejected patch leaves the twin exactly as it was: a patch is validated, and the
//! size its section would have after the merge is worked out without merging; only then is it
//! merged in place, which cannot fail. A small patch thus costs in proportion to the patch, not
//! to a copy of the whole section.
//!
//! Rules (`shared/protocol.md` D; Microsoft's "Understand and use device twins in IoT Hub"):
//! - PATCH merges recursively; `null` deletes; any non-object value, arrays included, replaces.
//! - PUT replaces `tags` and `properties.desired` whole; `reported` is written only by the device.
//! - `$metadata` mirrors every object and leaf with `$lastUpdated`, plus `$lastUpdatedVersion` on
//!   the desired side.
//! - Limits: tags 8 KB, desired and reported 32 KB each (keys plus values; numbers count 8 bytes,
//!   booleans 4), keys ≤ 1 KB without control characters, `.`, `$` or space, strings ≤ 4 KB,
//!   at most 10 levels of objects nested below a section (the documented example's `one` …
//!   `ten`, the last holding leaves), integers within ±2^52.
//! - `"tags": null` or `"properties": {"desired": null}` in a PATCH clears that section.
//! - Versions: a new twin has `version` 2 and etag `AAAAAAAAAAE=`, both sections `$version` 1
//!   (Microsoft's DeviceCreated event sample; the CLI article's module twin shows `version` 3,
//!   etag `AAAAAAAAAAI=` and desired `$version` 2 after one desired update). `version` goes up on
//!   every change; the etag only on service writes (tags, desired).

use crate::error::{HubError, HubResult};
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use validate::{check_size, merged_size, size_of, validate_object, Place};

mod json;
mod validate;

pub use json::{parse_json, JsonError};

/// Size limit of `tags`, in bytes as IoT Hub counts them.
pub const TAGS_MAX_BYTES: usize = 8 * 1024;
/// Size limit of `properties.desired` and of `properties.reported`.
pub const PROPERTIES_MAX_BYTES: usize = 32 * 1024;
/// Longest string value.
pub const STRING_MAX_BYTES: usize = 4 * 1024;
/// Longest key.
pub const KEY_MAX_BYTES: usize = 1024;
/// Most levels of objects nested below a section (`tags`, `desired`, `reported`): in
/// Microsoft's valid example, `one` to `ten` each hold an object and `ten`'s holds leaves.
pub const MAX_DEPTH: usize = 10;
/// `version` of a twin that nothing has written yet.
const NEW_TWIN_VERSION: u64 = 2;
/// Largest magnitude of an integer value (IoT Hub stores numbers as doubles).
pub const MAX_SAFE_INT: i64 = 4_503_599_627_370_495;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meta {
    last_updated: Timestamp,
    /// Desired side only: the section version that last wrote this node.
    last_updated_version: Option<u64>,
    children: BTreeMap<String, Meta>,
}

impl Meta {
    fn stamp(at: Timestamp, version: Option<u64>) -> Self {
        Self {
            last_updated: at,
            last_updated_version: version,
            children: BTreeMap::new(),
        }
    }

    /// Metadata for a whole new value: every object and leaf under it gets the same stamp.
    fn for_value(value: &Value, at: Timestamp, version: Option<u64>) -> Self {
        let mut meta = Self::stamp(at, version);
        if let Value::Object(map) = value {
            for (k, v) in map {
                meta.children
                    .insert(k.clone(), Self::for_value(v, at, version));
            }
        }
        meta
    }

    fn to_json(&self) -> Value {
        self.to_json_with(&mut StampText::default())
    }

    fn to_json_with(&self, stamps: &mut StampText) -> Value {
        let mut out = Map::with_capacity(2 + self.children.len());
        out.insert(
            "$lastUpdated".into(),
            Value::String(stamps.format(self.last_updated)),
        );
        if let Some(v) = self.last_updated_version {
            out.insert("$lastUpdatedVersion".into(), json!(v));
        }
        for (k, child) in &self.children {
            out.insert(k.clone(), child.to_json_with(stamps));
        }
        Value::Object(out)
    }
}

/// Timestamps as text, formatting each one once per `$metadata` tree: a write stamps every node
/// it touches with the same instant, so neighbouring nodes mostly share their `$lastUpdated`.
#[derive(Default)]
struct StampText {
    last: Option<(Timestamp, String)>,
}

impl StampText {
    fn format(&mut self, at: Timestamp) -> String {
        match &self.last {
            Some((t, text)) if *t == at => text.clone(),
            _ => {
                let text = at.to_string();
                self.last = Some((at, text.clone()));
                text
            }
        }
    }
}

/// One properties section (desired or reported) with its version and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    properties: Map<String, Value>,
    meta: Meta,
    version: u64,
    /// Whether metadata carries `$lastUpdatedVersion` (desired: yes; reported: no).
    versioned_meta: bool,
}

impl Section {
    fn new(versioned_meta: bool) -> Self {
        Self {
            properties: Map::new(),
            meta: Meta::stamp(Timestamp::NEVER, None),
            version: 1,
            versioned_meta,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn properties(&self) -> &Map<String, Value> {
        &self.properties
    }

    /// The section as the service sees it: properties, `$metadata`, `$version`.
    pub fn to_service_json(&self) -> Value {
        let mut out = self.properties.clone();
        out.insert("$metadata".into(), self.meta.to_json());
        out.insert("$version".into(), json!(self.version));
        Value::Object(out)
    }

    /// The section for the service (`metadata`: with `$metadata`) or for a device.
    pub fn to_json(&self, metadata: bool) -> Value {
        if metadata {
            self.to_service_json()
        } else {
            self.to_device_json()
        }
    }

    /// The section's `$metadata` as the service sees it.
    pub fn metadata_json(&self) -> Value {
        self.meta.to_json()
    }

    /// The section as a device sees it over MQTT: properties and `$version`, no metadata.
    pub fn to_device_json(&self) -> Value {
        let mut out = self.properties.clone();
        out.insert("$version".into(), json!(self.version));
        Value::Object(out)
    }

    /// A change event's view of this section after `patch` was merged: the patch as sent
    /// (`null`s included), the section's `$metadata` for the keys it names (and the section's
    /// own `$lastUpdated…`), and `$version`.
    fn change_event(&self, patch: &Map<String, Value>) -> Value {
        let mut out = patch.clone();
        let mut meta = Map::new();
        if let Value::Object(all) = self.meta.to_json() {
            meta.extend(
                all.into_iter()
                    .filter(|(k, _)| k.starts_with('$') || patch.contains_key(k)),
            );
        }
        out.insert("$metadata".into(), Value::Object(meta));
        out.insert("$version".into(), json!(self.version));
        Value::Object(out)
    }

    /// Checks `patch`, then merges it in place (see the module docs).
    fn patch(&mut self, patch: &Map<String, Value>, max_bytes: usize, what: &str) -> HubResult<()> {
        self.check_patch(patch, max_bytes, what)?;
        self.apply_patch(patch);
        Ok(())
    }

    /// Every check [`patch`](Self::patch) makes, without changing anything.
    fn check_patch(
        &self,
        patch: &Map<String, Value>,
        max_bytes: usize,
        what: &str,
    ) -> HubResult<()> {
        validate_object(patch, 0, &Place::Root(what), true)?;
        check_size(merged_size(Some(&self.properties), patch), max_bytes, what)
    }

    /// Merges a checked patch: properties, `$metadata`, `$version`.
    fn apply_patch(&mut self, patch: &Map<String, Value>) {
        let version = self.version + 1;
        let stamp_version = self.versioned_meta.then_some(version);
        merge(
            &mut self.properties,
            &mut self.meta,
            patch,
            Timestamp::now(),
            stamp_version,
        );
        self.version = version;
    }

    /// Replaces the whole section, after the same checks as a patch.
    fn replace(
        &mut self,
        properties: Map<String, Value>,
        max_bytes: usize,
        what: &str,
    ) -> HubResult<()> {
        validate_object(&properties, 0, &Place::Root(what), false)?;
        check_size(size_of(&properties), max_bytes, what)?;
        let version = self.version + 1;
        let stamp_version = self.versioned_meta.then_some(version);
        let whole = Value::Object(properties);
        self.meta = Meta::for_value(&whole, Timestamp::now(), stamp_version);
        let Value::Object(properties) = whole else {
            unreachable!("built from an object just above")
        };
        self.properties = properties;
        self.version = version;
        Ok(())
    }
}

/// Which heavy parts of a twin's service JSON to build: a query whose conditions never look
/// at tags or properties need not copy them for every twin it scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowShape {
    /// Identity and status fields (`status`, `connectionState`, `etag`, `version`, …); the
    /// ids themselves are always there.
    pub identity: bool,
    pub tags: bool,
    pub properties: bool,
    /// `$metadata` inside the property sections (only with `properties`).
    pub metadata: bool,
}

impl RowShape {
    /// The whole twin, as `GET /twins` returns it.
    pub const FULL: Self = Self {
        identity: true,
        tags: true,
        properties: true,
        metadata: true,
    };
}

/// A device or module twin's document state (identity fields live in the registry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
    /// Goes up on every change to tags, desired or reported.
    version: u64,
    /// Goes up on every service-side write (tags or desired); the twin etag is derived from it.
    etag_counter: u64,
    /// The DTDL model id a device announced on connect (`model-id` in the MQTT username).
    pub model_id: String,
}

impl Default for Twin {
    fn default() -> Self {
        Self::new()
    }
}

impl Twin {
    pub fn new() -> Self {
        Self {
            tags: Map::new(),
            desired: Section::new(true),
            reported: Section::new(false),
            version: NEW_TWIN_VERSION,
            etag_counter: 1,
            model_id: String::new(),
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// The twin etag: base64 of an 8-byte big-endian counter, the shape real hubs use
    /// (`"AAAAAAAAAAE="`).
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.etag_counter.to_be_bytes())
    }

    /// Applies a service PATCH (`{"tags":…, "properties":{"desired":…}}`). Returns the desired
    /// patch that devices must be told about, with `$version`, if desired changed.
    ///
    /// Read-only fields that clients echo back (identity fields, `reported`, `$metadata`,
    /// `$version`) are ignored, as IoT Hub does: the CLI PATCHes the whole fetched twin.
    pub fn patch_from_service(&mut self, body: &Map<String, Value>) -> HubResult<Option<Value>> {
        let (tags, desired) = writable_parts(body)?;
        // A whole section set to null clears it: a patch that deletes every key.
        let clear = |section: &Map<String, Value>| -> Map<String, Value> {
            section.keys().map(|k| (k.clone(), Value::Null)).collect()
        };
        let tags = match tags {
            Part::Absent => None,
            Part::Clear => Some(Cow::Owned(clear(&self.tags))),
            Part::Patch(t) => Some(Cow::Borrowed(t)),
        };
        let desired = match desired {
            Part::Absent => None,
            Part::Clear => Some(clear(&self.desired.properties)),
            Part::Patch(d) => Some(d),
        };
        if tags.is_none() && desired.is_none() {
            return Ok(None);
        }
        // Both parts are checked before either is applied.
        if let Some(tags) = &tags {
            validate_object(tags, 0, &Place::Root("tags"), true)?;
            check_size(merged_size(Some(&self.tags), tags), TAGS_MAX_BYTES, "tags")?;
        }
        if let Some(desired) = &desired {
            self.desired
                .check_patch(desired, PROPERTIES_MAX_BYTES, "properties.desired")?;
        }
        if let Some(tags) = &tags {
            // Tags have no `$metadata`: the merge's is thrown away.
            let mut meta = Meta::stamp(Timestamp::NEVER, None);
            merge(&mut self.tags, &mut meta, tags, Timestamp::now(), None);
        }
        let mut notification = None;
        if let Some(mut patch) = desired {
            self.desired.apply_patch(&patch);
            patch.insert("$version".into(), json!(self.desired.version));
            notification = Some(Value::Object(patch));
        }
        self.version += 1;
        self.etag_counter += 1;
        Ok(notification)
    }

    /// Applies a service PUT: tags and desired are replaced whole (absent means empty). Returns
    /// the full new desired document, with `$version`, for the devices.
    pub fn replace_from_service(&mut self, body: &Map<String, Value>) -> HubResult<Value> {
        let (tags, desired) = writable_parts(body)?;
        let tags = match tags {
            Part::Patch(t) => t.clone(),
            Part::Absent | Part::Clear => Map::new(),
        };
        let desired = match desired {
            Part::Patch(d) => d,
            Part::Absent | Part::Clear => Map::new(),
        };
        validate_object(&tags, 0, &Place::Root("tags"), false)?;
        check_size(size_of(&tags), TAGS_MAX_BYTES, "tags")?;
        // Checks everything before it changes anything.
        self.desired
            .replace(desired, PROPERTIES_MAX_BYTES, "properties.desired")?;
        self.tags = tags;
        self.version += 1;
        self.etag_counter += 1;
        Ok(self.desired.to_device_json())
    }

    /// Applies a device's reported-properties patch; returns the new reported `$version`.
    pub fn patch_reported(&mut self, patch: &Map<String, Value>) -> HubResult<u64> {
        self.reported
            .patch(patch, PROPERTIES_MAX_BYTES, "properties.reported")?;
        self.version += 1;
        Ok(self.reported.version)
    }

    /// The document a device gets for `$iothub/twin/GET` (`shared/protocol.md` C.6).
    pub fn to_device_json(&self) -> Value {
        sections(
            self.desired.to_device_json(),
            self.reported.to_device_json(),
        )
    }

    /// The twin-owned part of the service JSON: tags (left out when empty, as IoT Hub does),
    /// properties with metadata, version and etag. Identity fields are added by the registry.
    pub fn write_service_fields(&self, out: &mut Map<String, Value>) {
        self.write_fields(out, RowShape::FULL);
    }

    /// Like [`write_service_fields`](Self::write_service_fields), leaving out what `shape`
    /// does not ask for (queries read rows that are only as heavy as their conditions need).
    pub fn write_fields(&self, out: &mut Map<String, Value>, shape: RowShape) {
        if shape.identity {
            out.insert("etag".into(), Value::String(self.etag()));
            out.insert("version".into(), Value::from(self.version));
        }
        if shape.tags && !self.tags.is_empty() {
            out.insert("tags".into(), Value::Object(self.tags.clone()));
        }
        if shape.properties {
            out.insert("properties".into(), self.properties_json(shape.metadata));
        }
    }

    /// The body of the twin change event (`opType` `updateTwin`) for a service PATCH with
    /// `body` that was just applied: the twin's version, the tags as patched, and the desired
    /// properties as patched with their `$metadata` and `$version` (Microsoft, "Azure IoT Hub
    /// non-telemetry event schemas").
    pub fn update_event(&self, body: &Map<String, Value>) -> Value {
        let mut out = Map::new();
        out.insert("version".into(), json!(self.version));
        let Ok((tags, desired)) = writable_parts(body) else {
            return Value::Object(out);
        };
        match tags {
            Part::Absent => {}
            Part::Clear => {
                out.insert("tags".into(), Value::Null);
            }
            Part::Patch(t) => {
                out.insert("tags".into(), Value::Object(t.clone()));
            }
        }
        let desired = match desired {
            Part::Absent => None,
            Part::Clear => Some(Map::new()),
            Part::Patch(d) => Some(d),
        };
        if let Some(patch) = desired {
            out.insert(
                "properties".into(),
                json!({ "desired": self.desired.change_event(&patch) }),
            );
        }
        Value::Object(out)
    }

    /// The body of the twin change event for a reported-properties patch just applied.
    pub fn reported_event(&self, patch: &Map<String, Value>) -> Value {
        json!({
            "version": self.version,
            "properties": { "reported": self.reported.change_event(patch) },
        })
    }

    /// `properties` as the service sees it, with or without `$metadata`.
    pub fn properties_json(&self, metadata: bool) -> Value {
        sections(
            self.desired.to_json(metadata),
            self.reported.to_json(metadata),
        )
    }
}

/// `{"desired": …, "reported": …}`. Built by hand: `json!` would copy both values through
/// serde once more.
fn sections(desired: Value, reported: Value) -> Value {
    let mut out = Map::with_capacity(2);
    out.insert("desired".into(), desired);
    out.insert("reported".into(), reported);
    Value::Object(out)
}

/// One service-writable part of a twin body, as a request gives it.
enum Part<T> {
    /// Not in the body: left as it is.
    Absent,
    /// `null`: the whole section is cleared.
    Clear,
    Patch(T),
}

/// The parts of a service twin body that the service may write: tags, and desired properties.
type WritableParts<'a> = (Part<&'a Map<String, Value>>, Part<Map<String, Value>>);

/// Picks the service-writable parts out of a twin body: `tags` and `properties.desired`, with
/// the read-only `$metadata` and `$version` that clients echo back dropped from desired's root.
fn writable_parts(body: &Map<String, Value>) -> HubResult<WritableParts<'_>> {
    let tags = match body.get("tags") {
        None => Part::Absent,
        Some(Value::Null) => Part::Clear,
        Some(Value::Object(t)) => Part::Patch(t),
        Some(_) => return Err(HubError::invalid("'tags' must be a JSON object")),
    };
    let desired = match body.get("properties") {
        None | Some(Value::Null) => Part::Absent,
        Some(Value::Object(p)) => match p.get("desired") {
            None => Part::Absent,
            Some(Value::Null) => Part::Clear,
            Some(Value::Object(d)) => Part::Patch(
                d.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "$metadata" | "$version"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            Some(_) => {
                return Err(HubError::invalid(
                    "'properties.desired' must be a JSON object",
                ))
            }
        },
        Some(_) => return Err(HubError::invalid("'properties' must be a JSON object")),
    };
    Ok((tags, desired))
}

/// Recursive merge with metadata upkeep. Assumes `patch` was validated.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Meta,
    patch: &Map<String, Value>,
    at: Timestamp,
    version: Option<u64>,
) {
    meta.last_updated = at;
    meta.last_updated_version = version;
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                meta.children.remove(key);
            }
            // Keys are copied only for properties the patch adds.
            Value::Object(sub) => {
                match target.get_mut(key) {
                    Some(slot) if slot.is_object() => {}
                    Some(slot) => {
                        *slot = Value::Object(Map::new());
                        meta.children.remove(key);
                    }
                    None => {
                        target.insert(key.clone(), Value::Object(Map::new()));
                    }
                }
                if !meta.children.contains_key(key) {
                    meta.children.insert(key.clone(), Meta::stamp(at, version));
                }
                if let (Some(Value::Object(child)), Some(child_meta)) =
                    (target.get_mut(key), meta.children.get_mut(key))
                {
                    merge(child, child_meta, sub, at, version);
                }
            }
            leaf => {
                match target.get_mut(key) {
                    Some(slot) => *slot = leaf.clone(),
                    None => {
                        target.insert(key.clone(), leaf.clone());
                    }
                }
                let stamp = Meta::for_value(leaf, at, version);
                match meta.children.get_mut(key) {
                    Some(child) => *child = stamp,
                    None => {
                        meta.children.insert(key.clone(), stamp);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn patch_merges_recursively_and_null_deletes() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(
            json!({"properties":{"desired":{"a":{"b":1,"c":2},"d":true}}}),
        ))
        .unwrap();
        let note = twin
            .patch_from_service(&obj(
                json!({"properties":{"desired":{"a":{"b":null,"e":[1,2]},"d":"x"}}}),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(
            Value::Object(twin.desired.properties().clone()),
            json!({"a":{"c":2,"e":[1,2]},"d":"x"})
        );
        assert_eq!(note, json!({"a":{"b":null,"e":[1,2]},"d":"x","$version":3}));
        assert_eq!(twin.desired.version(), 3);
        assert_eq!(twin.version(), 4);
    }

    #[test]
    fn versions_follow_the_cli_article() {
        let mut twin = Twin::new();
        assert_eq!((twin.version(), twin.etag().as_str()), (2, "AAAAAAAAAAE="));
        twin.patch_from_service(&obj(json!({"properties":{"desired":{"conditions":{"temperature":{"warning":75,"critical":100}}}}})))
            .unwrap();
        assert_eq!((twin.version(), twin.etag().as_str()), (3, "AAAAAAAAAAI="));
        assert_eq!(twin.desired.version(), 2);
        // Reported changes move the version, not the etag (which guards service writes).
        twin.patch_reported(&obj(json!({"fw":"1"}))).unwrap();
        assert_eq!((twin.version(), twin.etag().as_str()), (4, "AAAAAAAAAAI="));
    }

    #[test]
    fn a_null_section_clears_it_and_tells_the_device_what_went() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(
            json!({"tags":{"t":1,"u":{"v":2}},"properties":{"desired":{"a":1,"b":{"c":2}}}}),
        ))
        .unwrap();
        let note = twin
            .patch_from_service(&obj(json!({"properties":{"desired":null}})))
            .unwrap()
            .unwrap();
        assert_eq!(note, json!({"a":null,"b":null,"$version":3}));
        assert!(twin.desired.properties().is_empty());
        assert_eq!(twin.tags().len(), 2, "tags were not named, so they stay");
        let meta = &twin.desired.to_service_json()["$metadata"];
        assert_eq!(
            meta,
            &json!({"$lastUpdated": meta["$lastUpdated"], "$lastUpdatedVersion": 3})
        );
        let note = twin.patch_from_service(&obj(json!({"tags":null}))).unwrap();
        assert_eq!(note, None, "a tags change is not a desired change");
        assert!(twin.tags().is_empty());
        // Clearing an empty section is still a write.
        let note = twin
            .patch_from_service(&obj(json!({"properties":{"desired":null}})))
            .unwrap();
        assert_eq!(note, Some(json!({"$version":4})));
    }

    #[test]
    fn arrays_replace_whole_and_objects_replace_leaves() {
        let mut twin = Twin::new();
        twin.patch_reported(&obj(json!({"list":[1,2,3],"x":5})))
            .unwrap();
        twin.patch_reported(&obj(json!({"list":[9],"x":{"y":1}})))
            .unwrap();
        assert_eq!(
            Value::Object(twin.reported.properties().clone()),
            json!({"list":[9],"x":{"y":1}})
        );
        assert_eq!(twin.reported.version(), 3);
    }

    #[test]
    fn metadata_has_the_shape_of_the_cli_article() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(json!({"properties":{"desired":{"conditions":{"temperature":{"warning":75,"critical":100}}}}})))
            .unwrap();
        let json = twin.desired.to_service_json();
        let meta = &json["$metadata"];
        assert_eq!(json["$version"], json!(2));
        for node in [
            meta,
            &meta["conditions"],
            &meta["conditions"]["temperature"],
            &meta["conditions"]["temperature"]["warning"],
            &meta["conditions"]["temperature"]["critical"],
        ] {
            assert!(node["$lastUpdated"].as_str().unwrap().ends_with('Z'));
            assert_eq!(node["$lastUpdatedVersion"], json!(2));
        }
        let reported = twin.reported.to_service_json();
        assert_eq!(
            reported,
            json!({"$metadata":{"$lastUpdated":"0001-01-01T00:00:00Z"},"$version":1})
        );
    }

    #[test]
    fn untouched_siblings_keep_their_metadata() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(json!({"properties":{"desired":{"a":1,"b":2}}})))
            .unwrap();
        twin.patch_from_service(&obj(json!({"properties":{"desired":{"b":3}}})))
            .unwrap();
        let meta = &twin.desired.to_service_json()["$metadata"];
        assert_eq!(meta["a"]["$lastUpdatedVersion"], json!(2));
        assert_eq!(meta["b"]["$lastUpdatedVersion"], json!(3));
        assert_eq!(meta["$lastUpdatedVersion"], json!(3));
    }

    #[test]
    fn read_only_fields_echoed_by_clients_are_ignored() {
        let mut twin = Twin::new();
        let body = json!({
            "deviceId":"d","etag":"x","version":9,"status":"enabled",
            "properties":{
                "desired":{"$metadata":{"$lastUpdated":"x"},"$version":1,"k":1},
                "reported":{"r":1,"$version":1}
            }
        });
        twin.patch_from_service(&obj(body)).unwrap();
        assert_eq!(
            Value::Object(twin.desired.properties().clone()),
            json!({"k":1})
        );
        assert!(twin.reported.properties().is_empty());
    }

    #[test]
    fn a_rejected_patch_changes_nothing() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(
            json!({"tags":{"t":1},"properties":{"desired":{"a":1}}}),
        ))
        .unwrap();
        let before = twin.clone();
        // Valid tags, invalid desired: neither may be applied.
        let err = twin
            .patch_from_service(&obj(
                json!({"tags":{"t":2},"properties":{"desired":{"bad key":1}}}),
            ))
            .unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::ArgumentInvalid);
        assert_eq!(twin, before);
        let big = "x".repeat(4000);
        let many: Map<String, Value> = (0..9).map(|i| (format!("k{i}"), json!(big))).collect();
        assert!(twin.patch_reported(&many).is_err());
        assert_eq!(twin, before);
    }

    #[test]
    fn merged_size_is_the_size_after_the_merge() {
        let target = obj(json!({"a": {"b": 1, "c": "xyz"}, "d": [1, "ab", true], "e": "s"}));
        for patch in [
            json!({}),
            json!({"a": null}),
            json!({"a": {"b": null}}),
            json!({"a": {"b": {"deep": "v"}}}),
            json!({"a": "leaf"}),
            json!({"e": {"now": "object"}}),
            json!({"new": {"only": null}}),
            json!({"new": {"x": {"y": 1.5, "z": false}}, "d": null}),
            json!({"missing": null, "d": ["a", "bcd"]}),
        ] {
            let patch = obj(patch);
            let mut merged = target.clone();
            let mut meta = Meta::stamp(Timestamp::NEVER, None);
            merge(&mut merged, &mut meta, &patch, Timestamp::NEVER, None);
            assert_eq!(
                merged_size(Some(&target), &patch),
                size_of(&merged),
                "{patch:?}"
            );
            assert_eq!(merged_size(None, &patch), {
                let mut fresh = Map::new();
                merge(&mut fresh, &mut meta, &patch, Timestamp::NEVER, None);
                size_of(&fresh)
            });
        }
    }

    #[test]
    fn a_patch_that_frees_room_first_fits() {
        let mut twin = Twin::new();
        let big = "x".repeat(4000);
        let seven: Map<String, Value> = (0..7).map(|i| (format!("k{i}"), json!(big))).collect();
        twin.patch_reported(&seven).unwrap();
        // Nine values of 4,000 bytes are over 32 KiB, eight are not.
        let before = twin.clone();
        let swap = obj(json!({"k0": null, "n0": big, "n1": big, "n2": big}));
        assert!(twin.patch_reported(&swap).is_err());
        assert_eq!(twin, before);
        let swap = obj(json!({"k0": null, "k1": null, "n0": big, "n1": big, "n2": big}));
        twin.patch_reported(&swap).unwrap();
        assert_eq!(twin.reported.properties().len(), 8);
    }

    #[test]
    fn errors_name_the_place() {
        let mut twin = Twin::new();
        let err = twin
            .patch_reported(&obj(json!({"a": {"b": [1, {"c d": 1}]}})))
            .unwrap_err();
        assert!(
            err.message.starts_with(
                "properties.reported.a.b[1]: property name 'c d' contains a character"
            ),
            "{}",
            err.message
        );
        let err = twin
            .patch_from_service(&obj(
                json!({"tags": {"t": {"n": 4_503_599_627_370_496_i64}}}),
            ))
            .unwrap_err();
        assert!(
            err.message.starts_with("tags.t.n: integer is outside"),
            "{}",
            err.message
        );
    }

    #[test]
    fn limits_are_enforced() {
        let mut twin = Twin::new();
        let cases = [
            json!({"a.b":1}),
            json!({"$a":1}),
            json!({"a b":1}),
            json!({"a\u{7}":1}),
            json!({"":1}),
            json!({"s":"x".repeat(STRING_MAX_BYTES + 1)}),
            json!({"n":4_503_599_627_370_496_i64}),
            json!({"n":18_446_744_073_709_551_615_u64}),
            json!({ "k".repeat(KEY_MAX_BYTES + 1): 1 }),
        ];
        for patch in cases {
            assert!(twin.patch_reported(&obj(patch.clone())).is_err(), "{patch}");
        }
        // Microsoft's valid example: `one` … `ten` each hold an object, `ten`'s holds a leaf.
        let mut deep = json!({"property": "value"});
        for name in [
            "ten", "nine", "eight", "seven", "six", "five", "four", "three", "two", "one",
        ] {
            deep = json!({ name: deep });
        }
        assert!(twin.patch_reported(&obj(deep.clone())).is_ok());
        assert!(twin
            .patch_from_service(&obj(json!({"tags": deep.clone()})))
            .is_ok());
        assert!(twin.patch_reported(&obj(json!({ "zero": deep }))).is_err());
        for patch in [json!({"a$b":1}), json!({"$other":1}), json!({"x":{"a$":1}})] {
            let body = obj(json!({"properties":{"desired":patch}}));
            assert!(twin.patch_from_service(&body).is_err(), "{body:?}");
        }
        assert!(twin
            .patch_reported(&obj(
                json!({"n":MAX_SAFE_INT,"m":-MAX_SAFE_INT - 1,"f":1.5})
            ))
            .is_ok());
        let tags: Map<String, Value> = (0..3)
            .map(|i| (format!("t{i}"), json!("x".repeat(3000))))
            .collect();
        assert!(twin
            .patch_from_service(&obj(json!({"tags": tags})))
            .is_err());
    }

    #[test]
    fn replace_swaps_tags_and_desired_and_notifies_the_whole_document() {
        let mut twin = Twin::new();
        twin.patch_from_service(&obj(
            json!({"tags":{"a":1},"properties":{"desired":{"x":1,"y":2}}}),
        ))
        .unwrap();
        let note = twin
            .replace_from_service(&obj(json!({"properties":{"desired":{"z":3}}})))
            .unwrap();
        assert_eq!(note, json!({"z":3,"$version":3}));
        assert!(twin.tags().is_empty());
        assert_eq!(twin.etag(), "AAAAAAAAAAM=");
    }

    #[test]
    fn device_view_has_versions_and_no_metadata() {
        let mut twin = Twin::new();
        twin.patch_reported(&obj(json!({"fw":"1.0"}))).unwrap();
        assert_eq!(
            twin.to_device_json(),
            json!({"desired":{"$version":1},"reported":{"fw":"1.0","$version":2}})
        );
    }

    #[test]
    fn integer_literals_beyond_64_bits_are_refused_not_made_floats() {
        let huge = br#"{"a":{"b":123456789012345678901234567890}}"#;
        assert!(
            matches!(parse_json(huge), Err(JsonError::HugeInteger(n)) if n == "123456789012345678901234567890")
        );
        let negative = br#"{"a":[1,-123456789012345678901234567890]}"#;
        assert!(matches!(
            parse_json(negative),
            Err(JsonError::HugeInteger(_))
        ));
        // Inside strings, or written as floats, they are fine; so is every 64-bit integer.
        for ok in [
            &br#"{"s":"123456789012345678901234567890","t":"\"9999999999999999999999\""}"#[..],
            br#"{"f":1.5e300,"g":12345678901234567890123.0}"#,
            br#"{"i":-9223372036854775808,"u":18446744073709551615}"#,
        ] {
            parse_json(ok).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(ok)));
        }
        assert!(matches!(parse_json(b"{"), Err(JsonError::Syntax(_))));
    }
}
