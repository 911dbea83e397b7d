//! Built-in scalar functions, applied to already-evaluated arguments.
//!
//! Microsoft's query-language article documents `IS_DEFINED` for twin queries and the type,
//! math and string functions for route conditions; the emulator accepts them all in twin
//! queries too, plus the Cosmos DB-style `LOG`, `LOG10`, `LTRIM`, `RTRIM`, `REPLACE`, `REVERSE`
//! and `ARRAY_CONTAINS`. Common rules:
//! - The `IS_*` checks always return a Boolean (`false` for undefined); `IS_DEFINED` is true
//!   for any present value "(including `null`)".
//! - Every other function returns undefined when an argument is undefined or of the wrong type
//!   (`LENGTH(5)`), or when the result is not a finite number (`SQRT(-1)`). No errors.
//! - String positions and lengths count characters, not bytes; `SUBSTRING` and `INDEX_OF` are
//!   zero-based as documented.
//!
//! The parser has already checked argument counts; missing arguments still read as undefined
//! here, so nothing can panic.

use super::ast::{CmpOp, Function};
use super::eval::{as_f64, boolean, compare, number, Val};
use serde_json::Value;
use std::borrow::Cow;

/// Calls `function` on evaluated `args`.
pub(crate) fn call<'a>(function: Function, args: &[Val<'a>]) -> Val<'a> {
    use Function as F;
    let arg = |i: usize| args.get(i).and_then(|v| v.as_deref());
    let num = |i: usize| args.get(i).and_then(as_f64);
    let text = |i: usize| arg(i).and_then(Value::as_str);
    let is = |check: fn(&Value) -> bool| Some(boolean(arg(0).is_some_and(check)));
    match function {
        F::IsDefined => Some(boolean(arg(0).is_some())),
        F::IsNull => is(Value::is_null),
        F::IsBool => is(Value::is_boolean),
        F::IsNumber => is(Value::is_number),
        F::IsString => is(Value::is_string),
        F::IsObject => is(Value::is_object),
        F::IsArray => is(Value::is_array),
        F::IsPrimitive => is(|v| !v.is_object() && !v.is_array()),
        // "Converts the input string to a number. noop if input is a number; Undefined if
        // string doesn't represent a number."
        F::AsNumber => match arg(0)? {
            Value::Number(_) => args.first().cloned().flatten(),
            Value::String(s) => number(s.trim().parse::<f64>().ok()?),
            _ => None,
        },
        F::Abs => number(num(0)?.abs()),
        F::Ceiling => number(num(0)?.ceil()),
        F::Exp => number(num(0)?.exp()),
        F::Floor => number(num(0)?.floor()),
        F::Log => match args.len() {
            2 => number(num(0)?.log(num(1)?)),
            _ => number(num(0)?.ln()),
        },
        F::Log10 => number(num(0)?.log10()),
        F::Power => number(num(0)?.powf(num(1)?)),
        F::Square => number(num(0)?.powi(2)),
        // f64::signum(0.0) is 1; the documented SIGN(0) is 0.
        F::Sign => {
            let x = num(0)?;
            number(if x == 0.0 { 0.0 } else { x.signum() })
        }
        F::Sqrt => number(num(0)?.sqrt()),
        F::Concat => {
            let mut out = String::new();
            for i in 0..args.len() {
                out.push_str(text(i)?);
            }
            string(out)
        }
        F::Length => number(text(0)?.chars().count() as f64),
        F::Lower => string(text(0)?.to_lowercase()),
        F::Upper => string(text(0)?.to_uppercase()),
        F::Ltrim => string(text(0)?.trim_start().to_owned()),
        F::Rtrim => string(text(0)?.trim_end().to_owned()),
        F::Reverse => string(text(0)?.chars().rev().collect()),
        F::Replace => {
            let (s, from, to) = (text(0)?, text(1)?, text(2)?);
            string(if from.is_empty() {
                s.to_owned()
            } else {
                s.replace(from, to)
            })
        }
        F::Substring => substring(text(0)?, num(1)?, args.get(2).map(as_f64)),
        F::IndexOf => {
            let (s, fragment) = (text(0)?, text(1)?);
            let index = s
                .find(fragment)
                .map_or(-1.0, |byte| s[..byte].chars().count() as f64);
            number(index)
        }
        F::StartsWith => Some(boolean(text(0)?.starts_with(text(1)?))),
        F::EndsWith => Some(boolean(text(0)?.ends_with(text(1)?))),
        F::Contains => Some(boolean(text(0)?.contains(text(1)?))),
        F::ArrayContains => {
            let items = arg(0)?.as_array()?;
            let wanted = arg(1)?;
            let partial = match args.get(2) {
                None => false,
                Some(v) => v.as_deref()?.as_bool()?,
            };
            Some(boolean(
                items.iter().any(|item| same(item, wanted, partial)),
            ))
        }
    }
}

fn string<'a>(s: String) -> Val<'a> {
    Some(Cow::Owned(Value::String(s)))
}

/// `SUBSTRING(s, start [, length])`: zero-based, in characters, clamped to the string. A
/// length that is present but not a number makes the result undefined.
fn substring<'a>(s: &str, start: f64, length: Option<Option<f64>>) -> Val<'a> {
    let count = s.chars().count();
    let start = clamp(start, count);
    let take = match length {
        None => count,
        Some(length) => clamp(length?, count),
    };
    string(s.chars().skip(start).take(take).collect())
}

/// A position or length from a query number, truncated and clamped to `0..=max`.
fn clamp(f: f64, max: usize) -> usize {
    if f.is_nan() || f <= 0.0 {
        0
    } else if f >= max as f64 {
        max
    } else {
        f as usize
    }
}

/// `ARRAY_CONTAINS` element test: primitives by value; objects and arrays deeply, or (with
/// `partial`) an object element matches when it holds every property of `wanted`.
fn same(item: &Value, wanted: &Value, partial: bool) -> bool {
    match (item, wanted) {
        (Value::Object(have), Value::Object(want)) => {
            (partial || have.len() == want.len())
                && want
                    .iter()
                    .all(|(k, w)| have.get(k).is_some_and(|h| same(h, w, false)))
        }
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len() && have.iter().zip(want).all(|(h, w)| same(h, w, false))
        }
        (a, b) => compare(CmpOp::Eq, a, b) == Some(true),
    }
}

#[cfg(test)]
mod tests {
    use crate::query::parse;
    use serde_json::{json, Value};

    fn row() -> Value {
        json!({
            "deviceId": "Sensor-01",
            "statusReason": null,
            "capabilities": {"iotEdge": true},
            "tags": {"list": [1, "two", {"k": 3, "j": 4}, [5]], "pad": "  x  ", "n": "42"},
            "properties": {"reported": {"t": -2.5, "$version": 4}}
        })
    }

    /// Evaluates `expr` against [`row`]; `None` when undefined.
    fn eval(expr: &str) -> Option<Value> {
        let q = parse(&format!("SELECT {expr} AS v FROM devices"))
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        q.project(&row()).get("v").cloned()
    }

    fn check(cases: &[(&str, Option<Value>)]) {
        for (expr, expected) in cases {
            assert_eq!(&eval(expr), expected, "{expr}");
        }
    }

    #[test]
    fn type_checks_are_always_boolean() {
        let t = Some(json!(true));
        let f = Some(json!(false));
        check(&[
            ("IS_DEFINED(deviceId)", t.clone()),
            ("IS_DEFINED(statusReason)", t.clone()),
            ("IS_DEFINED(capabilities)", t.clone()),
            ("is_defined(tags.nope)", f.clone()),
            ("IS_NULL(statusReason)", t.clone()),
            ("IS_NULL(tags.nope)", f.clone()),
            ("IS_NULL(deviceId)", f.clone()),
            ("IS_BOOL(capabilities.iotEdge)", t.clone()),
            ("IS_BOOL('true')", f.clone()),
            ("IS_NUMBER(properties.reported.$version)", t.clone()),
            ("IS_NUMBER(tags.n)", f.clone()),
            ("IS_STRING(deviceId)", t.clone()),
            ("IS_STRING(tags.nope)", f.clone()),
            ("IS_OBJECT(capabilities)", t.clone()),
            ("IS_OBJECT(tags.list)", f.clone()),
            ("IS_ARRAY(tags.list)", t.clone()),
            ("IS_PRIMITIVE(statusReason)", t.clone()),
            ("IS_PRIMITIVE(deviceId)", t.clone()),
            ("IS_PRIMITIVE(capabilities)", f.clone()),
            ("IS_PRIMITIVE(tags.nope)", f),
        ]);
    }

    #[test]
    fn as_number() {
        check(&[
            ("AS_NUMBER(tags.n)", Some(json!(42))),
            ("AS_NUMBER('2.5')", Some(json!(2.5))),
            ("AS_NUMBER(7)", Some(json!(7))),
            ("AS_NUMBER('seven')", None),
            ("AS_NUMBER(true)", None),
            ("AS_NUMBER(tags.nope)", None),
        ]);
    }

    #[test]
    fn math() {
        check(&[
            ("ABS(properties.reported.t)", Some(json!(2.5))),
            ("CEILING(properties.reported.t)", Some(json!(-2))),
            ("FLOOR(properties.reported.t)", Some(json!(-3))),
            ("FLOOR(2.7)", Some(json!(2))),
            ("EXP(0)", Some(json!(1))),
            ("LOG(1)", Some(json!(0))),
            ("LOG(8, 2)", Some(json!(3))),
            ("LOG10(1000)", Some(json!(3))),
            ("POWER(2, 10)", Some(json!(1024))),
            ("SQUARE(-3)", Some(json!(9))),
            ("SIGN(-4)", Some(json!(-1))),
            ("SIGN(0)", Some(json!(0))),
            ("SIGN(0.5)", Some(json!(1))),
            ("SQRT(16)", Some(json!(4))),
            ("SQRT(2)", Some(json!(std::f64::consts::SQRT_2))),
            ("SQRT(-1)", None),
            ("LOG(0)", None),
            ("ABS('x')", None),
            ("POWER(2, tags.nope)", None),
        ]);
    }

    #[test]
    fn strings() {
        check(&[
            ("CONCAT(deviceId, '-', 'x')", Some(json!("Sensor-01-x"))),
            ("CONCAT(deviceId, 1)", None),
            ("LENGTH(deviceId)", Some(json!(9))),
            ("LENGTH('héllo')", Some(json!(5))),
            ("LENGTH(5)", None),
            ("LOWER(deviceId)", Some(json!("sensor-01"))),
            ("UPPER(deviceId)", Some(json!("SENSOR-01"))),
            ("LTRIM(tags.pad)", Some(json!("x  "))),
            ("RTRIM(tags.pad)", Some(json!("  x"))),
            ("REPLACE(deviceId, '-', '_')", Some(json!("Sensor_01"))),
            ("REPLACE(deviceId, '', '_')", Some(json!("Sensor-01"))),
            ("REVERSE('abé')", Some(json!("éba"))),
            ("SUBSTRING(deviceId, 0, 6)", Some(json!("Sensor"))),
            ("SUBSTRING(deviceId, 7)", Some(json!("01"))),
            ("SUBSTRING('héllo', 1, 3)", Some(json!("éll"))),
            ("SUBSTRING('abc', -1, 2)", Some(json!("ab"))),
            ("SUBSTRING('abc', 5)", Some(json!(""))),
            ("SUBSTRING('abc', 1, 'x')", None),
            ("INDEX_OF(deviceId, '-')", Some(json!(6))),
            ("INDEX_OF('héllo', 'l')", Some(json!(2))),
            ("INDEX_OF(deviceId, 'zz')", Some(json!(-1))),
            ("STARTSWITH(deviceId, 'Sensor')", Some(json!(true))),
            ("STARTS_WITH(deviceId, 'sensor')", Some(json!(false))),
            ("ENDSWITH(deviceId, '01')", Some(json!(true))),
            ("ENDS_WITH(deviceId, '02')", Some(json!(false))),
            ("CONTAINS(deviceId, 'or-')", Some(json!(true))),
            ("CONTAINS(deviceId, 'x')", Some(json!(false))),
            ("STARTSWITH(tags.nope, 'a')", None),
            ("STARTSWITH(5, '5')", None),
        ]);
    }

    #[test]
    fn array_contains() {
        check(&[
            ("ARRAY_CONTAINS(tags.list, 1)", Some(json!(true))),
            ("ARRAY_CONTAINS(tags.list, 1.0)", Some(json!(true))),
            ("ARRAY_CONTAINS(tags.list, 'two')", Some(json!(true))),
            ("ARRAY_CONTAINS(tags.list, 'three')", Some(json!(false))),
            ("ARRAY_CONTAINS(tags.list, [5])", Some(json!(true))),
            ("ARRAY_CONTAINS(['a', 'b'], 'b')", Some(json!(true))),
            ("ARRAY_CONTAINS(tags.list, tags.nope)", None),
            ("ARRAY_CONTAINS(deviceId, 'S')", None),
            ("ARRAY_CONTAINS(tags.list, 1, 'yes')", None),
        ]);
    }

    #[test]
    fn array_contains_objects_whole_or_partial() {
        // Object constants are not in the grammar; compare against the document's own values.
        let row = json!({"a": [{"k": 3, "j": 4}], "whole": {"k": 3, "j": 4}, "part": {"k": 3}});
        let run = |filter: &str| {
            parse(&format!("SELECT * FROM devices WHERE {filter}"))
                .unwrap()
                .matches(&row)
        };
        assert!(run("ARRAY_CONTAINS(a, whole)"));
        assert!(!run("ARRAY_CONTAINS(a, part)"));
        assert!(run("ARRAY_CONTAINS(a, part, true)"));
        assert!(!run("ARRAY_CONTAINS(a, part, false)"));
    }

    #[test]
    fn functions_compose_in_filters() {
        let q = parse(
            "SELECT * FROM devices WHERE STARTSWITH(LOWER(deviceId), 'sensor') \
             AND LENGTH(deviceId) = 9 AND ABS(properties.reported.t) < 3",
        )
        .unwrap();
        assert!(q.matches(&row()));
    }
}
