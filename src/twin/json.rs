//! Parsing JSON that may become part of a twin: syntax, then the integer range.

use super::MAX_SAFE_INT;
use serde_json::Value;

/// Why a JSON document was refused before any of it was looked at.
#[derive(Debug)]
pub enum JsonError {
    Syntax(serde_json::Error),
    /// An integer literal too large for 64 bits, which the parser would silently turn into a
    /// float (and so let it past the range check that catches 2^52).
    HugeInteger(String),
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Syntax(e) => write!(f, "is not valid JSON: {e}"),
            Self::HugeInteger(n) => write!(
                f,
                "holds the integer {n}, outside the supported range {} to {MAX_SAFE_INT}",
                -MAX_SAFE_INT - 1
            ),
        }
    }
}

/// Parses a JSON document that may become (part of) a twin: syntax first, then every integer
/// literal must fit 64 bits, so that `123456789012345678901234567890` is refused like 2^52 is
/// instead of being stored as a float.
pub fn parse_json(bytes: &[u8]) -> Result<Value, JsonError> {
    let value = serde_json::from_slice(bytes).map_err(JsonError::Syntax)?;
    match huge_integer(bytes) {
        Some(n) => Err(JsonError::HugeInteger(n)),
        None => Ok(value),
    }
}

/// The first integer literal of a (valid) JSON text that fits neither i64 nor u64.
fn huge_integer(text: &[u8]) -> Option<String> {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < text.len()
                    && matches!(text[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let token = std::str::from_utf8(&text[start..i]).unwrap_or_default();
                let integer = !token.contains(['.', 'e', 'E']);
                if integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                    return Some(token.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    None
}
