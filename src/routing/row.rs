//! A message as a routing condition reads it (see the module docs of `routing` for the names).

use super::EnrichValue;
use crate::query::{value_in, Row};
use crate::registry::IdentityKey;
use crate::telemetry::Message;
use serde_json::Value;
use std::borrow::Cow;
use std::cell::OnceCell;

/// A message, with its body parsed as JSON when first read, and a way to read its sender's
/// twin (`twin(identity, path)`: the value at a path of the twin's JSON, read in place).
pub(super) struct MessageRow<'a, F> {
    message: &'a Message,
    body: OnceCell<Option<Value>>,
    twin: F,
}

impl<'a, F: Fn(&IdentityKey, &[String]) -> Option<Value>> MessageRow<'a, F> {
    pub(super) fn new(message: &'a Message, twin: F) -> Self {
        Self {
            message,
            body: OnceCell::new(),
            twin,
        }
    }

    fn twin_at(&self, path: &[String]) -> Option<Value> {
        (self.twin)(&self.message.identity, path)
    }

    /// `$body`: the body as JSON, when the message says it is JSON in a Unicode encoding.
    fn body(&self) -> Option<&Value> {
        self.body
            .get_or_init(|| {
                let text = |k: &str| self.message.system.get(k).and_then(Value::as_str);
                let json = text("content-type").is_some_and(|t| {
                    t.split(';')
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
                });
                let unicode = text("content-encoding").is_some_and(|e| {
                    ["utf-8", "utf-16", "utf-32"]
                        .iter()
                        .any(|u| e.eq_ignore_ascii_case(u))
                });
                if !(json && unicode) {
                    return None;
                }
                serde_json::from_slice(&self.message.body).ok()
            })
            .as_ref()
    }

    /// A system property by its routing keyword (`$contentType` …), without the `$`.
    fn system(&self, keyword: &str) -> Option<Cow<'_, Value>> {
        let m = self.message;
        let system = |k: &str| m.system.get(k).map(Cow::Borrowed);
        let is = |name: &str| keyword.eq_ignore_ascii_case(name);
        if is("contentType") {
            system("content-type")
        } else if is("contentEncoding") {
            system("content-encoding")
        } else if is("messageId") {
            system("message-id")
        } else if is("correlationId") {
            system("correlation-id")
        } else if is("userId") {
            system("user-id")
        } else if is("to") {
            system("to")
        } else if is("connectionDeviceId") {
            Some(Cow::Owned(Value::String(m.identity.device_id.clone())))
        } else if is("connectionModuleId") {
            m.identity
                .module_id
                .clone()
                .map(|id| Cow::Owned(Value::String(id)))
        } else if is("enqueuedTime") {
            Some(Cow::Owned(Value::String(m.enqueued.to_string())))
        } else {
            None
        }
    }

    /// An enrichment's value for this message.
    pub(super) fn enrichment(&self, value: &EnrichValue, hub_name: &str) -> String {
        match value {
            EnrichValue::Text(t) => t.clone(),
            EnrichValue::HubName => hub_name.to_owned(),
            EnrichValue::Twin(path, text) => match self.twin_at(path) {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => text.clone(),
            },
        }
    }
}

impl<F: Fn(&IdentityKey, &[String]) -> Option<Value>> Row for MessageRow<'_, F> {
    fn value_at(&self, path: &[String]) -> Option<Cow<'_, Value>> {
        let (first, rest) = path.split_first()?;
        if first.eq_ignore_ascii_case("$body") {
            return self.body()?.value_at(rest);
        }
        if first.eq_ignore_ascii_case("$twin") {
            return self.twin_at(rest).map(Cow::Owned);
        }
        if let Some(keyword) = first.strip_prefix('$') {
            if !rest.is_empty() {
                return None;
            }
            return self.system(keyword);
        }
        value_in(&self.message.properties, path)
    }
}
