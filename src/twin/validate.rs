//! Checks of twin content against IoT Hub's limits: keys, values, depth and sizes.

use super::{KEY_MAX_BYTES, MAX_DEPTH, MAX_SAFE_INT, STRING_MAX_BYTES};
use crate::error::{HubError, HubResult};
use serde_json::{Map, Value};

/// Where a value sits (`properties.reported.a.b[2]`), for error messages: written out only
/// when there is an error, so a valid patch costs no string building.
pub(super) enum Place<'a> {
    /// The section checked: `tags`, `properties.desired`, …
    Root(&'a str),
    Key(&'a Place<'a>, &'a str),
    Index(&'a Place<'a>, usize),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Root(what) => f.write_str(what),
            Place::Key(parent, key) => write!(f, "{parent}.{key}"),
            Place::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Checks keys, value types, string lengths, integer range and depth. `allow_null` is true for
/// patches, where `null` means "delete".
pub(super) fn validate_object(
    map: &Map<String, Value>,
    depth: usize,
    path: &Place<'_>,
    allow_null: bool,
) -> HubResult<()> {
    if depth > MAX_DEPTH {
        return Err(HubError::invalid(format!(
            "{path}: nesting is deeper than the maximum of {MAX_DEPTH} levels"
        )));
    }
    for (key, value) in map {
        validate_key(key, path)?;
        validate_value(value, depth, &Place::Key(path, key), allow_null)?;
    }
    Ok(())
}

pub(super) fn validate_value(
    value: &Value,
    depth: usize,
    path: &Place<'_>,
    allow_null: bool,
) -> HubResult<()> {
    match value {
        Value::Null if allow_null => Ok(()),
        Value::Null => Err(HubError::invalid(format!(
            "{path}: null is only allowed in a patch, to delete a property"
        ))),
        Value::String(s) if s.len() > STRING_MAX_BYTES => Err(HubError::invalid(format!(
            "{path}: string value is longer than {STRING_MAX_BYTES} bytes"
        ))),
        Value::Number(n) => {
            let in_range = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => (-MAX_SAFE_INT - 1..=MAX_SAFE_INT).contains(&i),
                (None, Some(_)) => false,
                (None, None) => n.as_f64().is_some_and(f64::is_finite),
            };
            if in_range {
                Ok(())
            } else {
                Err(HubError::invalid(format!(
                    "{path}: integer is outside the supported range {} to {MAX_SAFE_INT}",
                    -MAX_SAFE_INT - 1
                )))
            }
        }
        Value::Object(sub) => validate_object(sub, depth + 1, path, allow_null),
        Value::Array(items) => {
            // Array elements are values, not patches: a null inside an array is kept as data.
            for (i, item) in items.iter().enumerate() {
                if !item.is_null() {
                    validate_value(item, depth + 1, &Place::Index(path, i), false)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

pub(super) fn validate_key(key: &str, path: &Place<'_>) -> HubResult<()> {
    let bad = |why: &str| {
        Err(HubError::invalid(format!(
            "{path}: property name '{}' {why}",
            key.chars().take(64).collect::<String>()
        )))
    };
    if key.is_empty() {
        return bad("is empty");
    }
    if key.len() > KEY_MAX_BYTES {
        return bad("is longer than 1024 bytes");
    }
    if key
        .chars()
        .any(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
    {
        return bad(
            "contains a character IoT Hub does not allow (control characters, '.', '$' or space)",
        );
    }
    Ok(())
}

/// IoT Hub's size measure: key bytes plus value bytes; numbers 8, booleans 4.
pub(super) fn size_of(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

pub(super) fn value_size(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_size).sum(),
        Value::Object(m) => size_of(m),
    }
}

/// The size `target` (absent: empty) would have after [`merge`] with `patch`, worked out
/// without merging.
pub(super) fn merged_size(
    target: Option<&Map<String, Value>>,
    patch: &Map<String, Value>,
) -> usize {
    let mut size = target.map_or(0, size_of);
    for (key, value) in patch {
        let old = target.and_then(|t| t.get(key));
        if let Some(old) = old {
            size -= key.len() + value_size(old);
        }
        size += match value {
            Value::Null => 0,
            // Merged into the old object, or into a new empty one if it was not an object.
            Value::Object(sub) => key.len() + merged_size(old.and_then(Value::as_object), sub),
            leaf => key.len() + value_size(leaf),
        };
    }
    size
}

pub(super) fn check_size(size: usize, max: usize, what: &str) -> HubResult<()> {
    if size > max {
        return Err(HubError::invalid(format!(
            "{what} would be {size} bytes, over the maximum of {max} bytes"
        )));
    }
    Ok(())
}
