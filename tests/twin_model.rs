//! Model-based property test of the twin store: random sequences of service PATCH and PUT,
//! device reported patches and reads on a device twin and a module twin of the same device,
//! run against the registry and against a small reference model of IoT Hub's twin rules
//! ("Understand and use device twins in IoT Hub"; `shared/protocol.md` D):
//! - PATCH merges recursively, `null` deletes, any non-object value replaces; a section set to
//!   `null` is cleared; PUT replaces tags and desired whole and refuses `null` values;
//! - keys may not start with `$` or contain `.` or a space; integers stay within ±2^52; a
//!   refused write changes nothing, in either section it names;
//! - `version` goes up on every write, the etag on service writes only, each section's
//!   `$version` when that section is written; `If-Match` with a stale etag is 412;
//! - `$metadata` mirrors every object and leaf, desired entries carry `$lastUpdatedVersion` =
//!   the desired `$version` of the write that last touched them.
//!
//! Every response and, after each step, both twins are compared with the model.

use iothub_emulator::error::HubResult;
use iothub_emulator::registry::{IdentityKey, IfMatch, Registry};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Largest integer a twin holds (IoT Hub keeps numbers as doubles).
const MAX_SAFE: i64 = 4_503_599_627_370_495;

#[derive(Debug, Clone, Default, PartialEq)]
struct MetaModel {
    /// Desired `$version` of the write that last touched this node; `None` for the root of a
    /// section nothing has written yet (IoT Hub shows only `$lastUpdated` there).
    version: Option<u64>,
    children: BTreeMap<String, MetaModel>,
}

impl MetaModel {
    /// The meta of a value written whole at `version`.
    fn of(value: &Value, version: u64) -> Self {
        let children = match value {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), Self::of(v, version)))
                .collect(),
            _ => BTreeMap::new(),
        };
        Self {
            version: Some(version),
            children,
        }
    }
}

#[derive(Debug, Clone)]
struct SectionModel {
    props: Map<String, Value>,
    meta: MetaModel,
    version: u64,
}

impl SectionModel {
    fn new() -> Self {
        Self {
            props: Map::new(),
            meta: MetaModel::default(),
            version: 1,
        }
    }

    fn patch(&mut self, patch: &Map<String, Value>) {
        self.version += 1;
        merge(&mut self.props, &mut self.meta, patch, self.version);
    }

    fn replace(&mut self, props: Map<String, Value>) {
        self.version += 1;
        self.meta = MetaModel::of(&Value::Object(props.clone()), self.version);
        self.props = props;
    }
}

/// The documented merge: null deletes, an object merges into an object (or replaces a
/// non-object, starting empty), anything else replaces.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut MetaModel,
    patch: &Map<String, Value>,
    v: u64,
) {
    meta.version = Some(v);
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                meta.children.remove(key);
            }
            Value::Object(sub) => {
                if !target.get(key).is_some_and(Value::is_object) {
                    target.insert(key.clone(), json!({}));
                    meta.children.remove(key);
                }
                let child_meta = meta.children.entry(key.clone()).or_default();
                let Some(Value::Object(child)) = target.get_mut(key) else {
                    unreachable!()
                };
                merge(child, child_meta, sub, v);
            }
            leaf => {
                target.insert(key.clone(), leaf.clone());
                meta.children.insert(key.clone(), MetaModel::of(leaf, v));
            }
        }
    }
}

#[derive(Debug, Clone)]
struct TwinModel {
    tags: Map<String, Value>,
    desired: SectionModel,
    reported: SectionModel,
    version: u64,
    etag: u64,
}

impl TwinModel {
    fn new() -> Self {
        Self {
            tags: Map::new(),
            desired: SectionModel::new(),
            reported: SectionModel::new(),
            version: 2,
            etag: 1,
        }
    }

    fn etag_text(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.etag.to_be_bytes())
    }
}

fn key_valid(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('$')
        && !key.contains(['.', ' '])
        && !key.chars().any(char::is_control)
}

/// Whether IoT Hub accepts `value` in a twin section (`nulls`: a patch, where null deletes).
fn value_valid(value: &Value, nulls: bool) -> bool {
    match value {
        Value::Null => nulls,
        Value::Number(n) => n
            .as_i64()
            .is_none_or(|i| (-MAX_SAFE - 1..=MAX_SAFE).contains(&i)),
        Value::Array(items) => items.iter().all(|v| value_valid(v, false)),
        Value::Object(m) => object_valid(m, nulls),
        _ => true,
    }
}

fn object_valid(map: &Map<String, Value>, nulls: bool) -> bool {
    map.iter()
        .all(|(k, v)| key_valid(k) && value_valid(v, nulls))
}

#[derive(Debug, Clone, Copy)]
enum Precondition {
    Current,
    Stale,
    Any,
    Absent,
}

/// A section in a service body: absent, `null` (clear), or an object.
type Part = Option<Option<Map<String, Value>>>;

#[derive(Debug, Clone)]
enum Op {
    Patch {
        module: bool,
        tags: Part,
        desired: Part,
        pre: Precondition,
    },
    Replace {
        module: bool,
        tags: Part,
        desired: Part,
        pre: Precondition,
    },
    Reported {
        module: bool,
        patch: Map<String, Value>,
    },
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["$x", "x.y", "a b"]).prop_map(str::to_owned),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(Value::Null),
        3 => (-5i64..5).prop_map(Value::from),
        1 => Just(Value::from(MAX_SAFE + 1)),
        2 => any::<bool>().prop_map(Value::from),
        2 => "[a-z]{0,3}".prop_map(Value::from),
        1 => prop::collection::vec(0i64..3, 0..3).prop_map(|v| json!(v)),
    ]
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec((key(), value()), 0..4).prop_map(|kvs| kvs.into_iter().collect())
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop::collection::vec((key(), inner), 0..4)
            .prop_map(|kvs| Value::Object(kvs.into_iter().collect()))
    })
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(None)),
        4 => object().prop_map(|m| Some(Some(m))),
    ]
}

fn precondition() -> impl Strategy<Value = Precondition> {
    prop_oneof![
        3 => Just(Precondition::Current),
        1 => Just(Precondition::Stale),
        2 => Just(Precondition::Any),
        2 => Just(Precondition::Absent),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), part(), part(), precondition())
            .prop_map(|(module, tags, desired, pre)| Op::Patch { module, tags, desired, pre }),
        2 => (any::<bool>(), part(), part(), precondition())
            .prop_map(|(module, tags, desired, pre)| Op::Replace { module, tags, desired, pre }),
        3 => (any::<bool>(), object()).prop_map(|(module, patch)| Op::Reported { module, patch }),
    ]
}

fn body(tags: &Part, desired: &Part) -> Map<String, Value> {
    let as_json = |p: &Option<Map<String, Value>>| p.clone().map_or(Value::Null, Value::Object);
    let mut out = Map::new();
    if let Some(t) = tags {
        out.insert("tags".into(), as_json(t));
    }
    if let Some(d) = desired {
        out.insert("properties".into(), json!({ "desired": as_json(d) }));
    }
    out
}

fn if_match(pre: Precondition, model: &TwinModel) -> IfMatch {
    match pre {
        Precondition::Current => IfMatch::Etag(model.etag_text()),
        Precondition::Stale => IfMatch::Etag("AAAAAAAAAAA=".into()),
        Precondition::Any => IfMatch::Any,
        Precondition::Absent => IfMatch::Absent,
    }
}

/// What the model says an operation answers: Ok, or the HTTP status of the refusal.
fn apply(model: &mut TwinModel, op: &Op) -> Result<(), u16> {
    let stale = |pre: &Precondition| matches!(pre, Precondition::Stale);
    match op {
        Op::Patch {
            tags, desired, pre, ..
        } => {
            if stale(pre) {
                return Err(412);
            }
            let valid = |p: &Part| match p {
                Some(Some(m)) => object_valid(m, true),
                _ => true,
            };
            if !valid(tags) || !valid(desired) {
                return Err(400);
            }
            if tags.is_none() && desired.is_none() {
                return Ok(());
            }
            let clear =
                |m: &Map<String, Value>| m.keys().map(|k| (k.clone(), Value::Null)).collect();
            if let Some(t) = tags {
                let patch: Map<String, Value> = t.clone().unwrap_or_else(|| clear(&model.tags));
                let mut scratch = MetaModel::default();
                merge(&mut model.tags, &mut scratch, &patch, 0);
            }
            if let Some(d) = desired {
                let patch = d.clone().unwrap_or_else(|| clear(&model.desired.props));
                model.desired.patch(&patch);
            }
            model.version += 1;
            model.etag += 1;
            Ok(())
        }
        Op::Replace {
            tags, desired, pre, ..
        } => {
            if stale(pre) {
                return Err(412);
            }
            let whole = |p: &Part| p.clone().flatten().unwrap_or_default();
            let (tags, desired) = (whole(tags), whole(desired));
            if !object_valid(&tags, false) || !object_valid(&desired, false) {
                return Err(400);
            }
            model.tags = tags;
            model.desired.replace(desired);
            model.version += 1;
            model.etag += 1;
            Ok(())
        }
        Op::Reported { patch, .. } => {
            if !object_valid(patch, true) {
                return Err(400);
            }
            model.reported.patch(patch);
            model.version += 1;
            Ok(())
        }
    }
}

/// Compares a section of the stored twin with the model, `$metadata` included.
fn check_section(got: &Value, want: &SectionModel, versioned: bool, what: &str) {
    let mut props = got.as_object().expect("a section object").clone();
    let meta = props.remove("$metadata").expect("$metadata");
    let version = props.remove("$version").expect("$version");
    assert_eq!(
        Value::Object(props),
        Value::Object(want.props.clone()),
        "{what}"
    );
    assert_eq!(version, json!(want.version), "{what} $version");
    check_meta(
        &meta,
        &want.meta,
        &Value::Object(want.props.clone()),
        versioned,
        what,
    );
}

fn check_meta(got: &Value, want: &MetaModel, value: &Value, versioned: bool, at: &str) {
    let got = got
        .as_object()
        .unwrap_or_else(|| panic!("{at}: $metadata not an object"));
    assert!(got.contains_key("$lastUpdated"), "{at}: no $lastUpdated");
    if versioned {
        let version = want.version.map(|v| json!(v));
        assert_eq!(got.get("$lastUpdatedVersion"), version.as_ref(), "{at}");
    } else {
        assert!(!got.contains_key("$lastUpdatedVersion"), "{at}");
    }
    // As sets: `$metadata` lists its entries in its own order.
    let children: std::collections::BTreeSet<&String> =
        got.keys().filter(|k| !k.starts_with('$')).collect();
    match value {
        Value::Object(m) => {
            assert_eq!(children, m.keys().collect(), "{at}: $metadata keys");
            for (k, v) in m {
                check_meta(
                    &got[k],
                    &want.children[k],
                    v,
                    versioned,
                    &format!("{at}.{k}"),
                );
            }
        }
        _ => assert!(
            children.is_empty(),
            "{at}: $metadata of a leaf has children"
        ),
    }
}

fn check_twin(registry: &Registry, key: &IdentityKey, model: &TwinModel) {
    let twin = registry.get_twin(key).expect("the twin exists");
    assert_eq!(twin["version"], json!(model.version), "{key} version");
    assert_eq!(twin["etag"], json!(model.etag_text()), "{key} etag");
    // Empty tags are left out of the service JSON, as IoT Hub does.
    let tags = twin.get("tags").cloned().unwrap_or(json!({}));
    assert_eq!(tags, Value::Object(model.tags.clone()), "{key} tags");
    let desired = &twin["properties"]["desired"];
    let reported = &twin["properties"]["reported"];
    check_section(desired, &model.desired, true, &format!("{key} desired"));
    check_section(reported, &model.reported, false, &format!("{key} reported"));
    // The device's own view: the same properties and versions, no metadata.
    let device = registry.device_twin(key).unwrap();
    let mut want_desired = model.desired.props.clone();
    want_desired.insert("$version".into(), json!(model.desired.version));
    assert_eq!(
        device["desired"],
        Value::Object(want_desired),
        "{key} device view"
    );
}

fn status(result: HubResult<impl Sized>) -> Result<(), u16> {
    result.map(drop).map_err(|e| e.code.status())
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=… for a longer run.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn twin_store_follows_the_model(ops in prop::collection::vec(op(), 1..24)) {
        let registry = Registry::new(50);
        registry.put_device("d", &Map::new(), &IfMatch::Absent).unwrap();
        registry.put_module("d", "m", &Map::new(), &IfMatch::Absent).unwrap();
        let keys = [IdentityKey::device("d"), IdentityKey::module("d", "m")];
        let mut models = [TwinModel::new(), TwinModel::new()];
        for op in &ops {
            let module = match op {
                Op::Patch { module, .. } | Op::Replace { module, .. } | Op::Reported { module, .. } => *module,
            };
            let (key, model) = (&keys[usize::from(module)], &mut models[usize::from(module)]);
            let got = match op {
                Op::Patch { tags, desired, pre, .. } => status(registry.patch_twin(
                    key, &body(tags, desired), &if_match(*pre, model), |_| {},
                )),
                Op::Replace { tags, desired, pre, .. } => status(registry.replace_twin(
                    key, &body(tags, desired), &if_match(*pre, model), |_| {},
                )),
                Op::Reported { patch, .. } => status(registry.patch_reported(key, patch)),
            };
            let want = apply(model, op);
            prop_assert_eq!(got, want, "{:?}", op);
            // Both twins, after every step: a write to one never touches the other.
            for (key, model) in keys.iter().zip(&models) {
                check_twin(&registry, key, model);
            }
        }
    }
}
