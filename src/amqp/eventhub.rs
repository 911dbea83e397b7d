//! The Event Hub-compatible endpoint: device telemetry read with the Event Hubs SDKs
//! (`shared/protocol-amqp.md`, "Event Hub-compatible endpoint").
//!
//! The entity is named after the hub ([`Hub::event_hub_name`]), with [`PARTITIONS`] partitions
//! and the `$Default` consumer group. A device's messages always land in the same partition
//! (a stable hash of its id). Events come from the hub's telemetry log, so they are bounded by
//! its capacity (oldest dropped first); the log's sequence number is each event's sequence
//! number and offset: increasing within a partition, though not contiguous.

use super::link::{error, refuse, Conn};
use super::message::{full_message, property_text, status_reply, AmqpMessage};
use crate::hub::Hub;
use crate::telemetry::Message;
use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::{Body, MessageId, Properties};
use fe2o3_amqp::types::primitives::{
    Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value,
};
use fe2o3_amqp::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Partitions of the Event Hub-compatible endpoint (IoT Hub's default is 4).
pub const PARTITIONS: u32 = 4;
/// The one consumer group.
pub const CONSUMER_GROUP: &str = "$Default";
/// Events sent per read of the telemetry log.
const BATCH: usize = 100;

/// The partition a device's messages go to: FNV-1a of its id, so it is the same in every run.
pub fn partition_of(device_id: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in device_id.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % PARTITIONS
}

/// `$management` requests (`operation=READ`, `type=com.microsoft:eventhub` or
/// `com.microsoft:partition`): hub and partition properties. The request's
/// `security_token` is verified like a put-token.
pub async fn management_requests(conn: Arc<Conn>, mut receiver: Receiver) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let message = delivery.message();
        if let Some(token) = property_text(message, "security_token") {
            if let Ok(grant) = super::cbs::verify_token(&conn.hub, &token) {
                conn.add_grant(grant);
            }
        }
        let correlation = message
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        let reply = management_reply(&conn, message);
        if receiver.accept(&delivery).await.is_err() {
            break;
        }
        let (status, description, body) = match reply {
            Ok(body) => (200, "OK".to_owned(), body),
            Err((status, description)) => (status, description, Value::Null),
        };
        conn.management_replies
            .send(status_reply(correlation, status, &description, body));
    }
    let _ = receiver.close().await;
}

fn management_reply(conn: &Conn, message: &AmqpMessage) -> Result<Value, (i32, String)> {
    let hub = &conn.hub;
    let name = property_text(message, "name").unwrap_or_default();
    let Some(endpoint) = endpoint_of(hub, &name) else {
        return Err((
            404,
            format!(
                "No event hub named '{name}'; this hub's are {}",
                entity_names(hub).join(", ")
            ),
        ));
    };
    let entity = entity_name(hub, endpoint);
    if !conn.authorized(|g| g.allows_event_hub(entity)) {
        return Err((
            401,
            "Unauthorized: send a security_token of a policy with ServiceConnect".to_owned(),
        ));
    }
    if property_text(message, "operation").as_deref() != Some("READ") {
        return Err((400, "Only the READ operation is supported".to_owned()));
    }
    let mut map = OrderedMap::new();
    let mut put = |k: &str, v: Value| {
        map.insert(Value::String(k.to_owned()), v);
    };
    match property_text(message, "type").as_deref() {
        Some("com.microsoft:eventhub") => {
            put("name", Value::String(entity.to_owned()));
            put("type", Value::String("com.microsoft:eventhub".to_owned()));
            put(
                "created_at",
                Value::Timestamp(Timestamp::from_milliseconds(0)),
            );
            put("partition_count", Value::Int(PARTITIONS as i32));
            put(
                "partition_ids",
                Value::Array(Array::from(
                    (0..PARTITIONS)
                        .map(|p| Value::String(p.to_string()))
                        .collect::<Vec<_>>(),
                )),
            );
        }
        Some("com.microsoft:partition") => {
            let partition = property_text(message, "partition")
                .and_then(|p| p.parse::<u32>().ok())
                .filter(|p| *p < PARTITIONS)
                .ok_or((
                    404,
                    format!("No such partition; partitions are 0 to {}", PARTITIONS - 1),
                ))?;
            let events = partition_events(hub, endpoint, partition);
            let (first, last) = (events.first(), events.last());
            put("name", Value::String(entity.to_owned()));
            put("type", Value::String("com.microsoft:partition".to_owned()));
            put("partition", Value::String(partition.to_string()));
            put(
                "begin_sequence_number",
                Value::Long(first.map_or(-1, |m| m.sequence as i64)),
            );
            put(
                "last_enqueued_sequence_number",
                Value::Long(last.map_or(-1, |m| m.sequence as i64)),
            );
            put(
                "last_enqueued_offset",
                Value::String(last.map_or("-1".to_owned(), |m| m.sequence.to_string())),
            );
            put(
                "last_enqueued_time_utc",
                Value::Timestamp(Timestamp::from_milliseconds(
                    last.map_or(0, |m| m.enqueued.unix_millis()),
                )),
            );
            put("is_partition_empty", Value::Bool(events.is_empty()));
        }
        other => {
            return Err((
                400,
                format!("Unsupported management type {}", other.unwrap_or("(none)")),
            ));
        }
    }
    Ok(Value::Map(map))
}

fn partition_events(hub: &Hub, endpoint: usize, partition: u32) -> Vec<Arc<Message>> {
    hub.telemetry().read(0, usize::MAX, |m| {
        partition_of(&m.identity.device_id) == partition && m.routed_to(endpoint).is_some()
    })
}

/// The routing endpoint an entity name stands for: the hub's own event hub is the built-in
/// `events` endpoint; a custom endpoint is an entity of its own name.
fn endpoint_of(hub: &Hub, entity: &str) -> Option<usize> {
    if entity.eq_ignore_ascii_case(hub.event_hub_name()) {
        return Some(0);
    }
    hub.routing().endpoint(entity).filter(|e| *e != 0)
}

/// The entity name an endpoint is read at.
fn entity_name(hub: &Hub, endpoint: usize) -> &str {
    if endpoint == 0 {
        hub.event_hub_name()
    } else {
        &hub.routing().endpoint_names()[endpoint]
    }
}

fn entity_names(hub: &Hub) -> Vec<&str> {
    (0..hub.routing().endpoint_names().len())
        .map(|e| entity_name(hub, e))
        .collect()
}

/// Where a partition receiver starts, from its `apache.org:selector-filter:string` filter.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Start {
    /// Events with a sequence number above this one.
    after: u64,
    /// Only events enqueued after this time (unix milliseconds).
    after_time: Option<i64>,
}

/// Parses `amqp.annotation.x-opt-offset > '-1'`, `… x-opt-sequence-number >= '5'`,
/// `… x-opt-enqueued-time > '1700000000000'` (`@latest` for the offset means the end).
fn parse_selector(selector: &str, last: u64) -> Option<Start> {
    let rest = selector.trim().strip_prefix("amqp.annotation.")?;
    let (field, rest) = rest.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(r) = rest.strip_prefix(">=") {
        (true, r)
    } else {
        (false, rest.strip_prefix('>')?)
    };
    let value = rest.trim().trim_matches('\'');
    let position = |n: i64| -> u64 {
        let n = if inclusive { n - 1 } else { n };
        n.max(0) as u64
    };
    match field {
        "x-opt-offset" if value == "@latest" => Some(Start {
            after: last,
            after_time: None,
        }),
        "x-opt-offset" | "x-opt-sequence-number" => Some(Start {
            after: position(value.parse().ok()?),
            after_time: None,
        }),
        // `x-opt-enqueuedtimeutc`: the older name, which uamqp (`az iot hub monitor-events`)
        // still writes, unquoted.
        "x-opt-enqueued-time" | "x-opt-enqueuedtimeutc" => {
            let ms: i64 = value.parse().ok()?;
            Some(Start {
                after: 0,
                after_time: Some(if inclusive { ms - 1 } else { ms }),
            })
        }
        _ => None,
    }
}

fn start_of(sender: &Sender, last: u64) -> Result<Start, String> {
    let Some(filters) = sender.source().as_ref().and_then(|s| s.filter.as_ref()) else {
        return Ok(Start::default());
    };
    for value in filters.values() {
        let text = match value {
            Value::Described(d) => match &d.value {
                Value::String(s) => Some(s.as_str()),
                _ => None,
            },
            Value::String(s) => Some(s.as_str()),
            _ => None,
        };
        if let Some(text) = text {
            return parse_selector(text, last).ok_or_else(|| format!("Unsupported filter: {text}"));
        }
    }
    Ok(Start::default())
}

/// A partition receiver: the partition's events from the requested start, then new ones as
/// they arrive, as fast as the receiver gives credit.
pub async fn partition(
    conn: Arc<Conn>,
    mut sender: Sender,
    entity: String,
    group: String,
    partition: u32,
) {
    let hub = conn.hub.clone();
    let endpoint = endpoint_of(&hub, &entity)
        .filter(|_| group.eq_ignore_ascii_case(CONSUMER_GROUP) && partition < PARTITIONS);
    let Some(endpoint) = endpoint else {
        refuse(
            LinkEndpoint::Sender(sender),
            error(
                "amqp:not-found",
                format!(
                    "No partition {partition} of consumer group {group} of event hub {entity}; this hub has {{{}}}/ConsumerGroups/$Default/Partitions/0..{}",
                    entity_names(&hub).join(", "),
                    PARTITIONS - 1
                ),
            ),
        );
        return;
    };
    if !conn.authorized(|g| g.allows_event_hub(entity_name(&hub, endpoint))) {
        refuse(
            LinkEndpoint::Sender(sender),
            error(
                "amqp:unauthorized-access",
                "Reading events needs a token of a policy with ServiceConnect on $cbs",
            ),
        );
        return;
    }
    let start = match start_of(&sender, hub.telemetry().last_sequence()) {
        Ok(s) => s,
        Err(e) => {
            refuse(
                LinkEndpoint::Sender(sender),
                error("com.microsoft:argument-error", e),
            );
            return;
        }
    };
    let mut after = start.after;
    let filter = |m: &Message| {
        partition_of(&m.identity.device_id) == partition
            && m.routed_to(endpoint).is_some()
            && start
                .after_time
                .is_none_or(|t| m.enqueued.unix_millis() > t)
    };
    'link: loop {
        let batch = tokio::select! {
            batch = hub.telemetry().read_or_wait(after, BATCH, Duration::from_secs(30), filter) => batch,
            _ = sender.on_detach() => break,
        };
        for event in batch {
            after = event.sequence;
            let sendable = Sendable::builder()
                .message(event_message(&hub, endpoint, &event))
                .build();
            if sender.send_batchable(sendable).await.is_err() {
                break 'link;
            }
        }
    }
    let _ = sender.close().await;
}

/// One telemetry message as an Event Hubs event: the IoT Hub system properties as message
/// annotations, message id and content type/encoding in the properties section, the device's
/// properties as application properties, the body as a data section.
fn event_message(hub: &Hub, endpoint: usize, m: &Message) -> AmqpMessage {
    let mut annotations = OrderedMap::new();
    let mut note = |k: &str, v: Value| {
        annotations.insert(Symbol::from(k).into(), v);
    };
    let enqueued = Timestamp::from_milliseconds(m.enqueued.unix_millis());
    note("x-opt-sequence-number", Value::Long(m.sequence as i64));
    note("x-opt-offset", Value::String(m.sequence.to_string()));
    note("x-opt-enqueued-time", Value::Timestamp(enqueued.clone()));
    note(
        "iothub-connection-device-id",
        Value::String(m.identity.device_id.clone()),
    );
    if let Some(module) = &m.identity.module_id {
        note("iothub-connection-module-id", Value::String(module.clone()));
    }
    let scope = if m.identity.module_id.is_some() {
        "module"
    } else {
        "device"
    };
    // Device messages say how the device authenticated; hub events do not.
    if !m.auth_method.is_empty() {
        note(
            "iothub-connection-auth-method",
            Value::String(
                serde_json::json!({
                    "scope": scope,
                    "type": m.auth_method.to_ascii_lowercase(),
                    "issuer": "iothub",
                    "acceptingIpFilterRule": null,
                })
                .to_string(),
            ),
        );
    }
    if !m.auth_method.is_empty() {
        let generation = hub
            .registry()
            .get_device(&m.identity.device_id)
            .ok()
            .and_then(|d| {
                d.get("generationId")
                    .and_then(|g| g.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        note(
            "iothub-connection-auth-generation-id",
            Value::String(generation),
        );
    }
    note("iothub-enqueuedtime", Value::Timestamp(enqueued));
    note(
        "iothub-message-source",
        Value::String(m.source.message_source().to_owned()),
    );
    if let Some(output) = &m.output {
        note("iothub-outputname", Value::String(output.clone()));
    }
    for key in ["iothub-interface-id", "dt-subject"] {
        if let Some(v) = m.system.get(key).and_then(|v| v.as_str()) {
            note(key, Value::String(v.to_owned()));
        }
    }

    let text = |k: &str| m.system.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let properties = Properties {
        // IoT Hub forwards the ids as the strings the device sent, even when they look like
        // UUIDs (the Python SDK's e2e helper looks each arrival up by the id string it sent).
        message_id: text("message-id").map(MessageId::String),
        correlation_id: text("correlation-id").map(MessageId::String),
        user_id: text("user-id").map(|u| Binary::from(u.into_bytes())),
        content_type: text("content-type").map(Symbol::from),
        content_encoding: text("content-encoding").map(Symbol::from),
        to: text("to"),
        ..Properties::default()
    };
    let mut application = OrderedMap::new();
    for (k, v) in &m.properties {
        let value = match v {
            serde_json::Value::String(s) => SimpleValue::String(s.clone()),
            serde_json::Value::Null => SimpleValue::Null,
            other => SimpleValue::String(other.to_string()),
        };
        application.insert(k.clone(), value);
    }
    for (k, v) in m
        .routed_to(endpoint)
        .map_or(&[][..], |r| &r.enrichments[..])
    {
        application.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    full_message(annotations, properties, application, &m.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let p = |s| parse_selector(s, 42);
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '-1'"),
            Some(Start {
                after: 0,
                after_time: None
            })
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '@latest'"),
            Some(Start {
                after: 42,
                after_time: None
            })
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number >= '5'"),
            Some(Start {
                after: 4,
                after_time: None
            })
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number > '5'"),
            Some(Start {
                after: 5,
                after_time: None
            })
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueued-time > '1700000000000'"),
            Some(Start {
                after: 0,
                after_time: Some(1_700_000_000_000)
            })
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueuedtimeutc > 1796612973836"),
            Some(Start {
                after: 0,
                after_time: Some(1_796_612_973_836)
            })
        );
        assert_eq!(p("amqp.annotation.x-opt-partition-key > 'a'"), None);
        assert_eq!(p("nonsense"), None);
    }

    #[test]
    fn events_carry_the_ids_as_sent_and_no_empty_properties_section() {
        let hub = Hub::new(&crate::hub::tests::config());
        let message = |system: serde_json::Value| Message {
            sequence: 1,
            enqueued: crate::timestamp::Timestamp::now(),
            identity: crate::registry::IdentityKey::device("d"),
            auth_method: "SAS",
            output: None,
            system: system.as_object().unwrap().clone(),
            properties: serde_json::Map::new(),
            body: bytes::Bytes::from_static(b"{}"),
            source: crate::telemetry::Source::DeviceMessages,
            routes: Vec::new(),
            routed: Vec::new(),
        };
        let uuid = "2b1e0f0c-6f43-4bd6-9d1c-7b0b2d5f1e1a";
        let event = event_message(
            &hub,
            0,
            &message(serde_json::json!({
                "message-id": uuid,
                "correlation-id": uuid,
                "content-type": "application/json",
                "content-encoding": "utf-8",
            })),
        );
        let p = event.properties.expect("a properties section");
        assert_eq!(p.message_id, Some(MessageId::String(uuid.to_owned())));
        assert_eq!(p.correlation_id, Some(MessageId::String(uuid.to_owned())));
        assert_eq!(p.content_type, Some(Symbol::from("application/json")));
        assert_eq!(p.content_encoding, Some(Symbol::from("utf-8")));

        let bare = event_message(&hub, 0, &message(serde_json::json!({})));
        assert!(bare.properties.is_none(), "{:?}", bare.properties);
        let annotations = bare.message_annotations.unwrap().0;
        let annotation = |k: &str| {
            let key: fe2o3_amqp::types::messaging::annotations::OwnedKey = Symbol::from(k).into();
            annotations.get(&key).cloned()
        };
        assert!(matches!(
            annotation("x-opt-sequence-number"),
            Some(Value::Long(1))
        ));
        assert!(matches!(
            annotation("iothub-enqueuedtime"),
            Some(Value::Timestamp(_))
        ));
        assert_eq!(
            annotation("iothub-connection-device-id"),
            Some(Value::String("d".to_owned()))
        );
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("device-1"), partition_of("device-1"));
        let used: std::collections::HashSet<u32> =
            (0..64).map(|i| partition_of(&format!("d{i}"))).collect();
        assert_eq!(used.len() as u32, PARTITIONS);
    }
}
