//! Evaluator: runs a parsed [`Query`] against twin JSON rows.
//!
//! Values are `Option<Cow<Value>>`: `None` is *undefined* (a missing property, a type mismatch,
//! a failed function), and paths borrow from the row instead of copying subtrees.
//!
//! Rules, from Microsoft's "IoT Hub query language for device and module twins, jobs, and
//! message routing" (section "Expressions and conditions") unless noted:
//! - A row matches when the WHERE condition is exactly `true`: "Any constant different than
//!   Boolean true is considered as false", including null, undefined, objects and strings.
//! - "Comparisons are supported only between primitive types": comparing across types, or with
//!   an object or array, is undefined (no error, no match), in both `=` and `!=` directions.
//!   `= null` matches only a present `null`; an undefined side makes any comparison undefined.
//! - `AND`/`OR`/`NOT` are three-valued as in Cosmos DB SQL (which the language mirrors):
//!   `false AND undefined` is false, `true OR undefined` is true, `NOT undefined` is undefined.
//! - Numbers compare by value (`1 = 1.0`); strings compare ordinally, so ISO-8601 timestamps
//!   such as `lastActivityTime` order correctly.
//! - Property names resolve exactly first and then ignoring ASCII case: the twin-query article
//!   projects `SELECT DeviceId, LastActivityTime` as `deviceId` and `lastActivityTime`.

use super::ast::{Aggregate, ArithOp, CmpOp, Expr, ItemKind, Path, Query, Select};
use super::functions;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

/// An evaluated expression; `None` is undefined.
pub(crate) type Val<'a> = Option<Cow<'a, Value>>;

/// What a condition reads a twin through. A JSON row (`Value`) is one; the registry also reads
/// stored twins in place through it, so a scan need not build a row for a twin that does not
/// match. Every implementation must answer as the twin's JSON row would.
pub trait Row {
    /// The value at `path` (property names resolved exactly first, then ignoring ASCII case),
    /// or `None` when it is undefined.
    fn value_at(&self, path: &[String]) -> Option<Cow<'_, Value>>;
}

impl Row for Value {
    fn value_at(&self, path: &[String]) -> Option<Cow<'_, Value>> {
        lookup_segments(self, path).map(|(_, v)| Cow::Borrowed(v))
    }
}

/// Whether `row` passes `filter` (true when there is none).
pub(crate) fn passes<R: Row + ?Sized>(filter: Option<&Expr>, row: &R) -> bool {
    filter.is_none_or(|f| matches!(eval(f, row).as_deref(), Some(Value::Bool(true))))
}

/// Whether `row` passes the WHERE clause (true when there is none).
pub(crate) fn matches(query: &Query, row: &Value) -> bool {
    passes(query.filter.as_ref(), row)
}

/// Evaluates one expression against one row.
pub(crate) fn eval<'a, R: Row + ?Sized>(expr: &'a Expr, row: &'a R) -> Val<'a> {
    match expr {
        Expr::Const(c) => c.as_ref().map(Cow::Borrowed),
        Expr::Path(p) => row.value_at(&p.0),
        // Undefined elements are left out of a constructed array, as in Cosmos DB.
        Expr::Array(items) => Some(Cow::Owned(Value::Array(
            items
                .iter()
                .filter_map(|i| eval(i, row).map(Cow::into_owned))
                .collect(),
        ))),
        Expr::Not(inner) => as_bool(&eval(inner, row)).map(|b| boolean(!b)),
        Expr::Neg(inner) => number(-as_f64(&eval(inner, row))?),
        Expr::And(terms) => logic(terms, row, false),
        Expr::Or(terms) => logic(terms, row, true),
        Expr::Compare(op, a, b) => {
            compare(*op, eval(a, row).as_deref()?, eval(b, row).as_deref()?).map(boolean)
        }
        Expr::Arith(first, rest) => {
            let mut acc = as_f64(&eval(first, row))?;
            for (op, e) in rest {
                acc = arith(*op, acc, as_f64(&eval(e, row))?)?;
            }
            number(acc)
        }
        Expr::In {
            expr,
            list,
            negated,
        } => {
            let value = eval(expr, row)?;
            let found = list.iter().any(|item| {
                eval(item, row).is_some_and(|v| compare(CmpOp::Eq, &value, &v) == Some(true))
            });
            Some(boolean(found != *negated))
        }
        Expr::Call(function, args) => {
            let args: Vec<Val<'a>> = args.iter().map(|a| eval(a, row)).collect();
            functions::call(*function, &args)
        }
    }
}

/// `AND` (`short = false`) or `OR` (`short = true`): the short-circuit value wins; otherwise
/// any undefined or non-Boolean term makes the result undefined.
fn logic<R: Row + ?Sized>(terms: &[Expr], row: &R, short: bool) -> Val<'static> {
    let mut undefined = false;
    for term in terms {
        match as_bool(&eval(term, row)) {
            Some(b) if b == short => return Some(boolean(short)),
            Some(_) => {}
            None => undefined = true,
        }
    }
    (!undefined).then(|| boolean(!short))
}

/// Resolves a path: the key it matched (as spelled in the document) and the value.
pub(crate) fn lookup<'a>(row: &'a Value, path: &Path) -> Option<(&'a str, &'a Value)> {
    lookup_segments(row, &path.0)
}

/// [`lookup`] by segments; no segments is the value itself, under an empty key.
fn lookup_segments<'a>(value: &'a Value, segments: &[String]) -> Option<(&'a str, &'a Value)> {
    let mut found = ("", value);
    for segment in segments {
        found = entry(found.1.as_object()?, segment)?;
    }
    Some(found)
}

/// One property of an object: the exact name first, else the first name equal ignoring ASCII
/// case (in document order).
fn entry<'a>(object: &'a Map<String, Value>, name: &str) -> Option<(&'a str, &'a Value)> {
    object
        .get_key_value(name)
        .or_else(|| object.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
        .map(|(k, v)| (k.as_str(), v))
}

/// The value at `segments` inside `object`, resolved as a query resolves property paths; the
/// whole object (copied) for no segments. For rows read in place (see [`Row`]).
pub fn value_in<'a>(object: &'a Map<String, Value>, segments: &[String]) -> Option<Cow<'a, Value>> {
    let Some((first, rest)) = segments.split_first() else {
        return Some(Cow::Owned(Value::Object(object.clone())));
    };
    let (_, child) = entry(object, first)?;
    lookup_segments(child, rest).map(|(_, v)| Cow::Borrowed(v))
}

/// Compares two primitives; `None` (undefined) across types or for objects and arrays.
pub(crate) fn compare(op: CmpOp, a: &Value, b: &Value) -> Option<bool> {
    let ordering = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?)?,
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        // null equals null, but has no order.
        (Value::Null, Value::Null) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Ordering::Equal,
        _ => return None,
    };
    Some(match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    })
}

fn arith(op: ArithOp, a: f64, b: f64) -> Option<f64> {
    let result = match op {
        ArithOp::Add => a + b,
        ArithOp::Sub => a - b,
        ArithOp::Mul => a * b,
        ArithOp::Div if b == 0.0 => return None,
        ArithOp::Div => a / b,
        ArithOp::Rem if b == 0.0 => return None,
        ArithOp::Rem => a % b,
    };
    Some(result)
}

pub(crate) fn boolean<'a>(b: bool) -> Cow<'a, Value> {
    Cow::Owned(Value::Bool(b))
}

pub(crate) fn as_bool(v: &Val<'_>) -> Option<bool> {
    v.as_deref()?.as_bool()
}

pub(crate) fn as_f64(v: &Val<'_>) -> Option<f64> {
    v.as_deref()?.as_f64()
}

/// A computed number: integral results within ±2^53 become JSON integers; NaN and infinities
/// are undefined.
pub(crate) fn number<'a>(f: f64) -> Val<'a> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if !f.is_finite() {
        return None;
    }
    let value = if f.fract() == 0.0 && f.abs() < EXACT {
        Value::from(f as i64)
    } else {
        Value::Number(serde_json::Number::from_f64(f)?)
    };
    Some(Cow::Owned(value))
}

/// Applies a non-aggregate SELECT list to one row.
pub(crate) fn project(query: &Query, row: &Value) -> Value {
    let Select::Items(items) = &query.select else {
        return row.clone();
    };
    if query.is_aggregate() {
        return aggregate(query, std::iter::once(row))
            .pop()
            .unwrap_or_else(|| Value::Object(Map::new()));
    }
    let mut out = Map::new();
    for item in items {
        let ItemKind::Expr(expr) = &item.kind else {
            continue;
        };
        match (&item.name, expr) {
            (None, Expr::Path(path)) => {
                if let Some((key, value)) = lookup(row, path) {
                    out.insert(key.to_owned(), value.clone());
                }
            }
            (name, expr) => {
                if let Some(value) = eval(expr, row) {
                    out.insert(name.clone().unwrap_or_default(), value.into_owned());
                }
            }
        }
    }
    Value::Object(out)
}

/// Running state of one SELECT item within one group.
enum Acc {
    /// A GROUP BY path: its value is the group's key.
    Key(usize),
    Count(u64),
    Sum(f64),
    Avg(f64, u64),
    Min(Option<Value>),
    Max(Option<Value>),
}

struct Group {
    /// Per GROUP BY path: the key as spelled in the first row of the group, and the value.
    keys: Vec<Option<(String, Value)>>,
    accs: Vec<Acc>,
}

/// Groups `rows` by the GROUP BY paths (one group of everything without GROUP BY, even when
/// there are no rows, so `COUNT()` reports 0) and produces one result object per group, in
/// order of first appearance, at most TOP of them.
pub(crate) fn aggregate<'a>(query: &Query, rows: impl Iterator<Item = &'a Value>) -> Vec<Value> {
    let top = query.top.unwrap_or(usize::MAX);
    let Select::Items(items) = &query.select else {
        return rows.take(top).cloned().collect();
    };
    if !query.is_aggregate() {
        return rows.take(top).map(|r| project(query, r)).collect();
    }
    let new_group = |keys: Vec<Option<(String, Value)>>| Group {
        keys,
        accs: items
            .iter()
            .map(|item| match &item.kind {
                ItemKind::Expr(Expr::Path(p)) => Acc::Key(
                    query
                        .group_by
                        .iter()
                        .position(|g| g.same_as(p))
                        .unwrap_or(0),
                ),
                ItemKind::Expr(_) | ItemKind::Aggregate(Aggregate::Count) => Acc::Count(0),
                ItemKind::Aggregate(Aggregate::Sum(_)) => Acc::Sum(0.0),
                ItemKind::Aggregate(Aggregate::Avg(_)) => Acc::Avg(0.0, 0),
                ItemKind::Aggregate(Aggregate::Min(_)) => Acc::Min(None),
                ItemKind::Aggregate(Aggregate::Max(_)) => Acc::Max(None),
            })
            .collect(),
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if query.group_by.is_empty() {
        groups.push(new_group(Vec::new()));
    }
    for row in rows {
        let slot = if query.group_by.is_empty() {
            0
        } else {
            let found: Vec<_> = query.group_by.iter().map(|p| lookup(row, p)).collect();
            let mut key = String::new();
            for part in &found {
                canonical(part.map(|(_, v)| v), &mut key);
                key.push('|');
            }
            *index.entry(key).or_insert_with(|| {
                let keys = found
                    .iter()
                    .map(|f| f.map(|(k, v)| (k.to_owned(), v.clone())))
                    .collect();
                groups.push(new_group(keys));
                groups.len() - 1
            })
        };
        let group = &mut groups[slot];
        for (item, acc) in items.iter().zip(&mut group.accs) {
            let ItemKind::Aggregate(aggregate) = &item.kind else {
                continue;
            };
            let arg = match aggregate {
                Aggregate::Count => None,
                Aggregate::Avg(e) | Aggregate::Sum(e) | Aggregate::Min(e) | Aggregate::Max(e) => {
                    eval(e, row)
                }
            };
            accumulate(acc, arg.as_deref());
        }
    }
    groups
        .into_iter()
        .take(top)
        .map(|group| {
            let mut out = Map::new();
            for (item, acc) in items.iter().zip(group.accs) {
                let (key, value) = match acc {
                    Acc::Key(i) => match group.keys.get(i).cloned().flatten() {
                        Some((key, value)) => (item.name.clone().unwrap_or(key), value),
                        None => continue,
                    },
                    Acc::Count(n) => (item.name.clone().unwrap_or_default(), Value::from(n)),
                    Acc::Sum(sum) => match number(sum) {
                        Some(v) => (item.name.clone().unwrap_or_default(), v.into_owned()),
                        None => continue,
                    },
                    Acc::Avg(sum, n) => match number(sum / n as f64) {
                        Some(v) if n > 0 => (item.name.clone().unwrap_or_default(), v.into_owned()),
                        _ => continue,
                    },
                    Acc::Min(v) | Acc::Max(v) => match v {
                        Some(v) => (item.name.clone().unwrap_or_default(), v),
                        None => continue,
                    },
                };
                out.insert(key, value);
            }
            Value::Object(out)
        })
        .collect()
}

/// Folds one row's value into an aggregate. SUM and AVG take numbers only; MIN and MAX take
/// numbers and strings (numbers order before strings, as in Cosmos DB); other values are skipped.
fn accumulate(acc: &mut Acc, value: Option<&Value>) {
    match acc {
        Acc::Count(n) => *n += 1,
        Acc::Sum(sum) => *sum += value.and_then(Value::as_f64).unwrap_or(0.0),
        Acc::Avg(sum, n) => {
            if let Some(f) = value.and_then(Value::as_f64) {
                *sum += f;
                *n += 1;
            }
        }
        Acc::Min(best) => keep(best, value, Ordering::Less),
        Acc::Max(best) => keep(best, value, Ordering::Greater),
        Acc::Key(_) => {}
    }
}

/// MIN/MAX step: replaces `best` when `value` orders `want` of it.
fn keep(best: &mut Option<Value>, value: Option<&Value>, want: Ordering) {
    let Some(v) = value.filter(|v| v.is_number() || v.is_string()) else {
        return;
    };
    if best.as_ref().is_none_or(|b| order(v, b) == want) {
        *best = Some(v.clone());
    }
}

/// Order for MIN/MAX: numbers by value, then strings ordinally.
fn order(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::String(_), _) => Ordering::Greater,
        (_, Value::String(_)) => Ordering::Less,
        _ => {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
    }
}

/// A string that is equal for GROUP BY keys that are equal: numbers by value (`1` and `1.0`
/// group together), everything else by its JSON form; undefined is its own key.
fn canonical(value: Option<&Value>, out: &mut String) {
    match value {
        None => out.push('u'),
        Some(Value::Number(n)) => {
            out.push('d');
            out.push_str(&format!("{:?}", n.as_f64().unwrap_or(0.0)));
        }
        Some(Value::Array(items)) => {
            out.push('[');
            for item in items {
                canonical(Some(item), out);
                out.push(',');
            }
            out.push(']');
        }
        Some(Value::Object(map)) => {
            out.push('{');
            for (k, v) in map {
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(Some(v), out);
                out.push(',');
            }
            out.push('}');
        }
        Some(other) => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use crate::query::parse;
    use serde_json::{json, Value};

    /// A device twin in the `GET /twins/{id}` shape (`shared/protocol.md` D).
    fn device(id: &str, reported: Value, tags: Option<Value>) -> Value {
        let mut twin = json!({
            "deviceId": id,
            "etag": "AAAAAAAAAAE=",
            "deviceEtag": "MTIzNDU2Nzg=",
            "status": "enabled",
            "statusReason": null,
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": "Disconnected",
            "lastActivityTime": "2021-05-07T00:50:38.0543092Z",
            "cloudToDeviceMessageCount": 0,
            "authenticationType": "sas",
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "modelId": "",
            "version": 2,
            "capabilities": {"iotEdge": false},
            "properties": {
                "desired": {
                    "mode": "eco",
                    "$metadata": {"$lastUpdated": "2024-01-01T00:00:00.000Z", "$lastUpdatedVersion": 3},
                    "$version": 3
                },
                "reported": reported
            }
        });
        if let Some(tags) = tags {
            twin["tags"] = tags;
        }
        twin
    }

    fn d1() -> Value {
        device(
            "d1",
            json!({"temperature": 21.5, "fw": "1.2.0", "$version": 7, "mode": "eco",
                   "list": [1, "a"], "config": {"a": 1}}),
            Some(json!({"location": {"region": "US", "floor": 3}, "group": {"name": "g1"}})),
        )
    }

    fn module(device_id: &str, module_id: &str) -> Value {
        let mut twin = device(
            device_id,
            json!({"status": "scanning", "$version": 1}),
            None,
        );
        let object = twin.as_object_mut().unwrap();
        object.remove("capabilities");
        object.insert("moduleId".into(), json!(module_id));
        twin
    }

    fn hits(filter: &str, row: &Value) -> bool {
        parse(&format!("SELECT * FROM devices WHERE {filter}"))
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(row)
    }

    fn project(query: &str, row: &Value) -> Value {
        parse(query).unwrap().project(row)
    }

    fn aggregate(query: &str, rows: &[Value]) -> Vec<Value> {
        let q = parse(query).unwrap();
        assert!(q.is_aggregate());
        q.aggregate(rows.iter().filter(|r| q.matches(r)))
    }

    #[test]
    fn equality_on_every_kind_of_path() {
        let twin = d1();
        for filter in [
            "deviceId = 'd1'",
            "tags.location.region = 'US'",
            "tags.location.floor = 3",
            "properties.desired.mode = 'eco'",
            "properties.reported.temperature = 21.5",
            "properties.reported.$version = 7",
            "properties.desired.$metadata.$lastUpdatedVersion = 3",
            "status = 'enabled'",
            "connectionState = 'Disconnected'",
            "capabilities.iotEdge = false",
            "version = 2.0",
            "statusReason = null",
            "x509Thumbprint.primaryThumbprint = null",
            "tags.[[group]].name = 'g1'",
            "tags.group.name = \"g1\"",
            "properties.desired.mode = properties.reported.mode",
        ] {
            assert!(hits(filter, &twin), "{filter}");
        }
        assert!(!hits("deviceId = 'd2'", &twin));
        assert!(hits("deviceId != 'd2'", &twin));
        assert!(hits("deviceId <> 'd2'", &twin));
    }

    #[test]
    fn property_names_fall_back_to_case_insensitive() {
        let twin = d1();
        assert!(hits("DeviceId = 'd1'", &twin));
        assert!(hits("Properties.Reported.Temperature > 20", &twin));
        // Values stay case-sensitive.
        assert!(!hits("deviceId = 'D1'", &twin));
    }

    #[test]
    fn ordering_numbers_strings_timestamps() {
        let twin = d1();
        for filter in [
            "properties.reported.temperature > 21",
            "properties.reported.temperature >= 21.5",
            "properties.reported.temperature < 22",
            "properties.reported.temperature <= 21.5",
            "properties.reported.temperature > -5",
            "cloudToDeviceMessageCount < 1",
            "lastActivityTime > '2021-01-01'",
            "lastActivityTime < '2021-05-08T00:00:00Z'",
            "properties.reported.fw >= '1.10'",
            "capabilities.iotEdge < true",
        ] {
            assert!(hits(filter, &twin), "{filter}");
        }
        assert!(!hits("properties.reported.temperature > 21.5", &twin));
    }

    #[test]
    fn type_mismatches_never_match_in_either_direction() {
        let twin = d1();
        for filter in [
            "tags.location.region = 5",
            "tags.location.region != 5",
            "tags.location.region > 5",
            "tags.location.floor = '3'",
            "tags.location.floor != '3'",
            "capabilities.iotEdge = 0",
            "statusReason != 'x'",
            "statusReason < null",
            "properties.reported.config = properties.reported.config",
            "properties.reported.list = [1, 'a']",
            "tags.location != 'US'",
        ] {
            assert!(!hits(filter, &twin), "{filter}");
            assert!(!hits(&format!("NOT ({filter})"), &twin), "NOT ({filter})");
        }
    }

    #[test]
    fn undefined_paths_never_match_and_null_needs_a_present_null() {
        let twin = d1();
        for filter in [
            "tags.missing = 'x'",
            "tags.missing != 'x'",
            "NOT (tags.missing = 'x')",
            "tags.missing = null",
            "tags.location.region.deeper = 'US'",
            "moduleId = 'm1'",
            "undefined = undefined",
            "tags.missing IN ['x']",
            "tags.missing NIN ['x']",
        ] {
            assert!(!hits(filter, &twin), "{filter}");
        }
    }

    #[test]
    fn three_valued_logic() {
        let twin = d1();
        assert!(hits("tags.missing = 1 OR deviceId = 'd1'", &twin));
        assert!(hits("NOT (tags.missing = 1 AND deviceId = 'x')", &twin));
        assert!(!hits("tags.missing = 1 AND deviceId = 'd1'", &twin));
        assert!(!hits("NOT (tags.missing = 1 OR deviceId = 'x')", &twin));
        assert!(hits("NOT NOT deviceId = 'd1'", &twin));
        assert!(hits(
            "deviceId = 'x' OR (status = 'enabled' AND version = 2)",
            &twin
        ));
    }

    #[test]
    fn only_boolean_true_is_a_match() {
        let twin = d1();
        assert!(hits("true", &twin));
        for filter in [
            "false",
            "null",
            "1",
            "'true'",
            "deviceId",
            "tags",
            "[true]",
            "undefined",
        ] {
            assert!(!hits(filter, &twin), "{filter}");
        }
        assert!(parse("SELECT * FROM devices").unwrap().matches(&twin));
    }

    #[test]
    fn in_and_nin() {
        let twin = d1();
        assert!(hits("tags.location.region IN ['EU', 'US']", &twin));
        assert!(hits("tags.location.region IN ('EU', 'US')", &twin));
        assert!(!hits("tags.location.region IN ['EU']", &twin));
        assert!(hits("tags.location.region NIN ['EU']", &twin));
        assert!(hits("tags.location.region NOT IN ['EU']", &twin));
        assert!(!hits("tags.location.region NIN ['US']", &twin));
        assert!(hits("tags.location.floor IN [1, 3.0]", &twin));
        assert!(!hits("tags.location.floor IN ['3']", &twin));
        assert!(hits("tags.location.floor NIN ['3']", &twin));
        assert!(hits("statusReason IN [null]", &twin));
        assert!(!hits("deviceId IN []", &twin));
        assert!(hits("deviceId NIN []", &twin));
        assert!(hits("properties.reported.temperature IN [-1, 21.5]", &twin));
    }

    #[test]
    fn arithmetic() {
        let twin = d1();
        for filter in [
            "properties.reported.temperature * 2 = 43",
            "tags.location.floor + 1 = 4",
            "tags.location.floor - 5 = -2",
            "tags.location.floor / 2 = 1.5",
            "tags.location.floor % 2 = 1",
            "-tags.location.floor = -3",
            "2 + 3 * 4 = 14",
            "(2 + 3) * 4 = 20",
            "10 - 2 - 3 = 5",
            "0x10 = 16",
        ] {
            assert!(hits(filter, &twin), "{filter}");
        }
        for filter in [
            "1 / 0 = 1",
            "1 % 0 = 0",
            "deviceId + 1 = 1",
            "-deviceId = 1",
            "1 / 0 != 1",
        ] {
            assert!(!hits(filter, &twin), "{filter}");
        }
    }

    #[test]
    fn module_rows() {
        let twin = module("device1", "m1");
        let q = parse(
            "SELECT * FROM devices.modules WHERE moduleId = 'm1' AND deviceId IN ['device1']",
        )
        .unwrap();
        assert!(q.matches(&twin));
        assert!(!hits("is_defined(capabilities)", &twin));
    }

    #[test]
    fn select_star_returns_the_row() {
        let twin = d1();
        assert_eq!(project("SELECT * FROM devices", &twin), twin);
    }

    #[test]
    fn projection_with_alias_nested_paths_and_missing_values() {
        let twin = d1();
        assert_eq!(
            project(
                "SELECT deviceId, properties.reported.temperature AS t, tags.location, \
                 tags.nope, properties.reported.$version FROM devices",
                &twin
            ),
            json!({"deviceId": "d1", "t": 21.5, "location": {"region": "US", "floor": 3},
                   "$version": 7})
        );
        // Unaliased paths take the key as spelled in the document.
        assert_eq!(
            project("SELECT DeviceId, LastActivityTime FROM devices", &twin),
            json!({"deviceId": "d1", "lastActivityTime": "2021-05-07T00:50:38.0543092Z"})
        );
        // Other unaliased items are numbered; undefined ones are left out.
        assert_eq!(
            project(
                "SELECT version * 10, UPPER(deviceId) AS id, LENGTH(tags.nope) FROM devices",
                &twin
            ),
            json!({"$1": 20, "id": "D1"})
        );
        // The output keeps SELECT order.
        let out = project("SELECT version, deviceId FROM devices", &twin);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["version", "deviceId"]);
    }

    fn statuses() -> Vec<Value> {
        let with = |id: &str, status: Value| {
            device(
                id,
                json!({"telemetryConfig": {"status": status}, "n": 2}),
                None,
            )
        };
        vec![
            with("a", json!("Success")),
            with("b", json!("Pending")),
            with("c", json!("Success")),
            with("d", json!("Error")),
            with("e", json!("Pending")),
            with("f", json!("Success")),
            device("g", json!({}), None),
        ]
    }

    #[test]
    fn group_by_counts_per_value_in_first_seen_order() {
        let rows = statuses();
        assert_eq!(
            aggregate(
                "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices \
                 FROM devices GROUP BY properties.reported.telemetryConfig.status",
                &rows
            ),
            vec![
                json!({"status": "Success", "numberOfDevices": 3}),
                json!({"status": "Pending", "numberOfDevices": 2}),
                json!({"status": "Error", "numberOfDevices": 1}),
                // The device without the property forms its own group, without the key.
                json!({"numberOfDevices": 1}),
            ]
        );
        // Unaliased, the group key takes its document name; WHERE filters before grouping.
        assert_eq!(
            aggregate(
                "SELECT properties.reported.telemetryConfig.status, COUNT() FROM devices \
                 WHERE is_defined(properties.reported.telemetryConfig.status) \
                 GROUP BY properties.reported.telemetryConfig.status",
                &rows
            )[0],
            json!({"status": "Success", "$1": 3})
        );
    }

    #[test]
    fn group_by_several_paths_and_numeric_keys() {
        let rows = vec![
            device("a", json!({"n": 1}), Some(json!({"r": "US"}))),
            device("b", json!({"n": 1.0}), Some(json!({"r": "US"}))),
            device("c", json!({"n": 1}), Some(json!({"r": "EU"}))),
            device("d", json!({"n": 2}), Some(json!({"r": "US"}))),
        ];
        assert_eq!(
            aggregate(
                "SELECT tags.r AS r, properties.reported.n AS n, COUNT() AS c FROM devices \
                 GROUP BY tags.r, properties.reported.n",
                &rows
            ),
            vec![
                json!({"r": "US", "n": 1, "c": 2}),
                json!({"r": "EU", "n": 1, "c": 1}),
                json!({"r": "US", "n": 2, "c": 1}),
            ]
        );
        // GROUP BY without aggregates lists the distinct values.
        assert_eq!(
            aggregate("SELECT tags.r FROM devices GROUP BY tags.r", &rows),
            vec![json!({"r": "US"}), json!({"r": "EU"})]
        );
    }

    #[test]
    fn count_without_group_by_is_one_row_even_when_empty() {
        let rows = statuses();
        assert_eq!(
            aggregate("SELECT COUNT() AS numberOfDevices FROM devices", &rows),
            vec![json!({"numberOfDevices": 7})]
        );
        assert_eq!(
            aggregate(
                "SELECT COUNT() AS n FROM devices WHERE deviceId = 'none'",
                &rows
            ),
            vec![json!({"n": 0})]
        );
        assert_eq!(
            aggregate("SELECT COUNT() FROM devices", &rows),
            vec![json!({"$1": 7})]
        );
        let q = parse("SELECT COUNT() AS n FROM devices GROUP BY status").unwrap();
        assert_eq!(q.aggregate(std::iter::empty()), Vec::<Value>::new());
    }

    #[test]
    fn sum_avg_min_max() {
        let rows = vec![
            device("a", json!({"t": 10, "s": "b"}), None),
            device("b", json!({"t": 20.5, "s": "a"}), None),
            device("c", json!({"t": "hot", "s": 5}), None),
            device("d", json!({}), None),
        ];
        assert_eq!(
            aggregate(
                "SELECT SUM(properties.reported.t) AS sum, AVG(properties.reported.t) AS avg, \
                 MIN(properties.reported.t) AS min, MAX(properties.reported.t) AS max, \
                 MIN(properties.reported.s) AS smin, MAX(properties.reported.s) AS smax, \
                 AVG(properties.reported.none) AS none, SUM(properties.reported.none) AS zero \
                 FROM devices",
                &rows
            ),
            vec![json!({"sum": 30.5, "avg": 15.25, "min": 10, "max": "hot",
                        "smin": 5, "smax": "b", "zero": 0})]
        );
    }

    #[test]
    fn top_limits_aggregate_results() {
        let rows = statuses();
        let q = parse(
            "SELECT TOP 2 properties.reported.telemetryConfig.status AS s, COUNT() AS n \
             FROM devices GROUP BY properties.reported.telemetryConfig.status",
        )
        .unwrap();
        assert_eq!(q.top(), Some(2));
        assert_eq!(q.aggregate(rows.iter()).len(), 2);
        // On a plain query aggregate() projects, also honouring TOP.
        let q = parse("SELECT TOP 3 deviceId FROM devices").unwrap();
        assert!(!q.is_aggregate());
        assert_eq!(
            q.aggregate(rows.iter()),
            vec![
                json!({"deviceId": "a"}),
                json!({"deviceId": "b"}),
                json!({"deviceId": "c"})
            ]
        );
        assert_eq!(
            parse("SELECT TOP 1 * FROM devices")
                .unwrap()
                .aggregate(rows.iter()),
            vec![rows[0].clone()]
        );
    }

    #[test]
    fn project_on_an_aggregate_query_aggregates_the_one_row() {
        let twin = d1();
        assert_eq!(
            project("SELECT COUNT() AS n FROM devices", &twin),
            json!({"n": 1})
        );
    }
}
