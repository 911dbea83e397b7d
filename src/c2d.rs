//! Cloud-to-device messages: what the service sends a device, how it waits in the device's
//! queue, and the property bag it carries over MQTT (`shared/protocol.md` C.4, C.5; Microsoft's
//! "Send cloud-to-device messages from an IoT hub").
//!
//! Queues live in the registry, beside the device they belong to (under its lock): at most 50
//! messages, each expiring after its time-to-live. A message leaves the queue when the device
//! completes it (MQTT: PUBACK).

use crate::error::{ErrorCode, HubError, HubResult};
use bytes::Bytes;
use percent_encoding::utf8_percent_encode;
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime};

/// Most messages waiting for one device (403004 DeviceMaximumQueueDepthExceeded beyond it).
pub const MAX_QUEUE: usize = 50;
/// Largest cloud-to-device message (64 KB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// IoT Hub's default time-to-live (`defaultTtlAsIso8601`, PT1H) and its maximum (2 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// Deliveries after which an abandoned message is dead-lettered (`maxDeliveryCount`).
pub const MAX_DELIVERY_COUNT: u32 = 10;

/// One queued message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CloudMessage {
    /// Identifies this message in the queue (the completion handle).
    pub lock_token: u64,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// `full`, `positive`, `negative` or `none` (`iothub-ack`).
    pub ack: Option<String>,
    pub expires: SystemTime,
    /// Application properties; `None` is a property without a value.
    pub properties: Vec<(String, Option<String>)>,
    pub body: Bytes,
    /// How many times the device abandoned it (AMQP `released`/`modified`).
    #[serde(default)]
    pub delivery_count: u32,
    /// When the hub queued it.
    #[serde(default = "SystemTime::now")]
    pub enqueued: SystemTime,
}

impl CloudMessage {
    /// Parses the control API's message body:
    /// `{"body": <text or JSON>, "bodyBase64": "…", "messageId", "correlationId", "userId",
    /// "contentType", "contentEncoding", "ack", "ttlSeconds", "properties": {"k": "v" | null}}`.
    pub fn from_json(request: &Map<String, Value>) -> HubResult<Self> {
        use base64::Engine;
        let text = |field: &str| -> HubResult<Option<String>> {
            match request.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(HubError::invalid(format!("'{field}' must be a string"))),
            }
        };
        let body = match (request.get("body"), text("bodyBase64")?) {
            (Some(_), Some(_)) => {
                return Err(HubError::invalid(
                    "give either 'body' or 'bodyBase64', not both",
                ))
            }
            (_, Some(b64)) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| HubError::invalid("'bodyBase64' is not valid base64"))?,
            ),
            (None | Some(Value::Null), None) => Bytes::new(),
            (Some(Value::String(s)), None) => Bytes::from(s.clone()),
            (Some(other), None) => Bytes::from(other.to_string()),
        };
        let ack = text("ack")?;
        if let Some(a) = &ack {
            if !["full", "positive", "negative", "none"].contains(&a.as_str()) {
                return Err(HubError::invalid(
                    "'ack' must be full, positive, negative or none",
                ));
            }
        }
        let ttl = match request.get("ttlSeconds") {
            None | Some(Value::Null) => DEFAULT_TTL,
            Some(v) => v
                .as_u64()
                .map(Duration::from_secs)
                .filter(|d| !d.is_zero() && *d <= MAX_TTL)
                .ok_or_else(|| {
                    HubError::invalid(format!(
                        "'ttlSeconds' must be 1 to {} seconds",
                        MAX_TTL.as_secs()
                    ))
                })?,
        };
        let properties = match request.get("properties") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(p)) => p
                .iter()
                .map(|(k, v)| match v {
                    Value::Null => Ok((k.clone(), None)),
                    Value::String(s) => Ok((k.clone(), Some(s.clone()))),
                    _ => Err(HubError::invalid(format!(
                        "property '{k}' must be a string or null"
                    ))),
                })
                .collect::<HubResult<_>>()?,
            Some(_) => return Err(HubError::invalid("'properties' must be a JSON object")),
        };
        let message = Self {
            lock_token: 0,
            message_id: text("messageId")?
                .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
            correlation_id: text("correlationId")?,
            user_id: text("userId")?,
            content_type: text("contentType")?,
            content_encoding: text("contentEncoding")?,
            ack,
            expires: SystemTime::now() + ttl,
            properties,
            body,
            delivery_count: 0,
            enqueued: SystemTime::now(),
        };
        let size = message.body.len()
            + message
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                .sum::<usize>();
        if size > MAX_MESSAGE_BYTES {
            return Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!("The message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"),
            ));
        }
        Ok(message)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires <= now
    }

    /// The property bag of the delivery topic `devices/{d}/messages/devicebound/{bag}`: system
    /// properties as `%24.` keys, then application properties; a property without a value is a
    /// bare key (C.5).
    pub fn property_bag(&self, device_id: &str) -> String {
        let expiry = time::OffsetDateTime::from(self.expires)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let to = format!("/devices/{device_id}/messages/deviceBound");
        let system = [
            ("$.mid", Some(self.message_id.as_str())),
            ("$.to", Some(to.as_str())),
            ("$.exp", Some(expiry.as_str())),
            ("$.cid", self.correlation_id.as_deref()),
            ("$.uid", self.user_id.as_deref()),
            ("$.ct", self.content_type.as_deref()),
            ("$.ce", self.content_encoding.as_deref()),
        ];
        let mut parts: Vec<String> = system
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{}={}", encode(k), encode(v))))
            .collect();
        if let Some(ack) = &self.ack {
            parts.push(format!("iothub-ack={}", encode(ack)));
        }
        for (k, v) in &self.properties {
            parts.push(match v {
                Some(v) => format!("{}={}", encode(k), encode(v)),
                None => encode(k),
            });
        }
        parts.join("&")
    }
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, crate::auth::sas::URI_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> HubResult<CloudMessage> {
        CloudMessage::from_json(v.as_object().unwrap())
    }

    #[test]
    fn property_bag_matches_the_hub_encoding() {
        let m = parse(json!({
            "body": "hi", "messageId": "m 1", "contentType": "application/json",
            "ack": "full", "properties": {"app": "v&w", "bare": null, "empty": ""}
        }))
        .unwrap();
        let bag = m.property_bag("dev1");
        assert!(
            bag.starts_with(
                "%24.mid=m%201&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&%24.exp="
            ),
            "{bag}"
        );
        assert!(
            bag.contains("&%24.ct=application%2Fjson&iothub-ack=full&"),
            "{bag}"
        );
        assert!(bag.ends_with("&app=v%26w&bare&empty="), "{bag}");
    }

    #[test]
    fn bodies_ttls_and_limits() {
        assert_eq!(
            parse(json!({"body": {"a": 1}})).unwrap().body,
            Bytes::from("{\"a\":1}")
        );
        assert_eq!(
            parse(json!({"bodyBase64": "AAE="})).unwrap().body,
            Bytes::from(vec![0u8, 1])
        );
        for bad in [
            json!({"body": "x", "bodyBase64": "AA=="}),
            json!({"bodyBase64": "!!"}),
            json!({"ttlSeconds": 0}),
            json!({"ttlSeconds": 200_000}),
            json!({"ack": "maybe"}),
            json!({"properties": {"n": 1}}),
            json!({"body": "x".repeat(MAX_MESSAGE_BYTES + 1)}),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
        let short = parse(json!({"ttlSeconds": 1})).unwrap();
        assert!(short.is_expired(SystemTime::now() + Duration::from_secs(2)));
    }
}

/// A random lock token in the GUID form IoT Hub uses (feedback batches, HTTPS receives).
pub fn lock_token() -> String {
    let n = rand::random::<u128>();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        n >> 96,
        (n >> 80) & 0xffff,
        (n >> 64) & 0xffff,
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    )
}

/// How a device settled a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// MQTT PUBACK, AMQP `accepted`: done.
    Completed,
    /// AMQP `rejected`: dropped, never delivered again.
    Rejected,
    /// AMQP `released`/`modified`: deliver again (up to [`MAX_DELIVERY_COUNT`]).
    Abandoned,
}

/// Most feedback records kept for the service to collect; older ones are dropped.
pub const FEEDBACK_CAPACITY: usize = 1000;

/// The delivery feedback record (`iothub-ack`) for outcome `status` (`Success`, `Rejected`,
/// `DeliveryCountExceeded`) of `message`, as IoT Hub's feedback records, if its `iothub-ack`
/// asked for that kind of outcome.
pub fn feedback_record(
    message: &CloudMessage,
    status: &str,
    device_id: &str,
    generation_id: &str,
) -> Option<Value> {
    let wanted = match message.ack.as_deref() {
        Some("full") => true,
        Some("positive") => status == "Success",
        Some("negative") => status != "Success",
        _ => false,
    };
    wanted.then(|| {
        serde_json::json!({
            "originalMessageId": message.message_id,
            "enqueuedTimeUtc": crate::timestamp::Timestamp::now(),
            "statusCode": status,
            "description": status,
            "deviceId": device_id,
            "deviceGenerationId": generation_id,
        })
    })
}
