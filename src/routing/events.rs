//! IoT Hub's non-telemetry events as messages, from the registry's [`Change`]s: twin change,
//! lifecycle and connection state events with the properties and bodies of Microsoft's "Azure
//! IoT Hub non-telemetry event schemas".

use crate::registry::{Change, IdentityKey};
use crate::telemetry::{Message, Source};
use crate::timestamp::Timestamp;
use bytes::Bytes;
use serde_json::{json, Map};
use std::sync::atomic::{AtomicU64, Ordering};

/// Numbers connection state events, hub-wide, for their `sequenceNumber`.
static CONNECTION_EVENTS: AtomicU64 = AtomicU64::new(0);

/// The event a change makes, for a hub named `hub_name`.
pub fn event_message(change: Change, hub_name: &str) -> Message {
    let (key, source, op, schema, body) = match change {
        Change::Twin {
            key,
            replaced,
            body,
        } => (
            key,
            Source::TwinChangeEvents,
            if replaced {
                "replaceTwin"
            } else {
                "updateTwin"
            },
            "twinChangeNotification",
            body,
        ),
        Change::Created { key, twin } => (
            key,
            Source::DeviceLifecycleEvents,
            "createDeviceIdentity",
            "deviceLifecycleNotification",
            twin,
        ),
        Change::Deleted { key, twin } => (
            key,
            Source::DeviceLifecycleEvents,
            "deleteDeviceIdentity",
            "deviceLifecycleNotification",
            twin,
        ),
        Change::Connection { key, connected } => (
            key,
            Source::DeviceConnectionStateEvents,
            if connected {
                "deviceConnected"
            } else {
                "deviceDisconnected"
            },
            "deviceConnectionStateNotification",
            json!({ "sequenceNumber": connection_sequence() }),
        ),
    };
    let now = Timestamp::now();
    let mut properties = Map::new();
    properties.insert("hubName".into(), json!(hub_name));
    properties.insert("deviceId".into(), json!(key.device_id));
    if let Some(m) = &key.module_id {
        properties.insert("moduleId".into(), json!(m));
    }
    properties.insert("operationTimestamp".into(), json!(now.to_string()));
    properties.insert("opType".into(), json!(op));
    properties.insert("iothub-message-schema".into(), json!(schema));
    let mut system = Map::new();
    system.insert("content-type".into(), json!("application/json"));
    system.insert("content-encoding".into(), json!("utf-8"));
    system.insert(
        "correlation-id".into(),
        json!(format!("{:x}", rand::random::<u64>())),
    );
    system.insert("user-id".into(), json!(hub_name));
    // The module id is an annotation only on module lifecycle and twin events.
    let identity = match (&key.module_id, source) {
        (Some(_), Source::DeviceConnectionStateEvents) => IdentityKey::device(&key.device_id),
        _ => key,
    };
    Message {
        sequence: 0,
        enqueued: now,
        identity,
        auth_method: "",
        source,
        output: None,
        system,
        properties,
        body: Bytes::from(body.to_string()),
        routes: Vec::new(),
        routed: Vec::new(),
    }
}

/// A connection state event's `sequenceNumber`: 64 hexadecimal digits that compare as text in
/// the order the events happened (the time in microseconds, then a hub-wide counter).
fn connection_sequence() -> String {
    let n = CONNECTION_EVENTS.fetch_add(1, Ordering::Relaxed);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    format!("{micros:016X}{n:048X}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn text(m: &Message, k: &str) -> Option<String> {
        m.properties
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    }

    #[test]
    fn events_carry_the_documented_properties() {
        let twin = event_message(
            Change::Twin {
                key: IdentityKey::module("d", "m"),
                replaced: false,
                body: json!({"version": 3}),
            },
            "hub",
        );
        assert_eq!(twin.source, Source::TwinChangeEvents);
        assert_eq!(text(&twin, "opType").as_deref(), Some("updateTwin"));
        assert_eq!(
            text(&twin, "iothub-message-schema").as_deref(),
            Some("twinChangeNotification")
        );
        assert_eq!(text(&twin, "moduleId").as_deref(), Some("m"));
        assert_eq!(text(&twin, "hubName").as_deref(), Some("hub"));
        assert_eq!(twin.identity.module_id.as_deref(), Some("m"));
        assert_eq!(twin.system["content-type"], "application/json");
        assert_eq!(twin.system["user-id"], "hub");
        assert_eq!(&twin.body[..], br#"{"version":3}"#);

        let connected = |connected| {
            event_message(
                Change::Connection {
                    key: IdentityKey::module("d", "m"),
                    connected,
                },
                "hub",
            )
        };
        let (a, b) = (connected(true), connected(false));
        assert_eq!(text(&a, "opType").as_deref(), Some("deviceConnected"));
        assert_eq!(text(&b, "opType").as_deref(), Some("deviceDisconnected"));
        assert_eq!(text(&a, "moduleId").as_deref(), Some("m"));
        assert_eq!(a.identity.module_id, None, "no module annotation");
        let seq = |m: &Message| -> String {
            serde_json::from_slice::<Value>(&m.body).unwrap()["sequenceNumber"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(seq(&a).len(), 64);
        assert!(seq(&a) < seq(&b), "later events compare greater");
    }
}
