//! Conversions between AMQP messages and the hub's own message types: telemetry in, cloud-to-
//! device in (service) and out (device), and the small helpers the links share.

use crate::c2d::{CloudMessage, DEFAULT_TTL, MAX_TTL};
use crate::connections::MethodRequest;
use crate::telemetry::Incoming;
use bytes::Bytes;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{AmqpValue, Message};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{
    Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The body as bytes: data sections concatenated; an amqp-value string or binary as its
/// bytes; anything else empty.
pub fn body_bytes(body: &Body<Value>) -> Bytes {
    match body {
        Body::Data(batch) => {
            let mut out = Vec::new();
            for Data(bin) in batch.iter() {
                out.extend_from_slice(bin);
            }
            Bytes::from(out)
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => Bytes::from(s.clone().into_bytes()),
            Value::Binary(b) => Bytes::from(b.to_vec()),
            _ => Bytes::new(),
        },
        _ => Bytes::new(),
    }
}

/// A data-section body, as IoT Hub sends every body.
pub fn data_body(bytes: impl Into<Vec<u8>>) -> Body<Value> {
    Body::Data(std::iter::once(Data(Binary::from(bytes.into()))).collect())
}

/// A message with a data body and nothing else.
pub fn data_message(bytes: impl Into<Vec<u8>>) -> AmqpMessage {
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: None,
        body: data_body(bytes),
        footer: None,
    }
}

/// A message annotation as text (`operation`, `resource`, …).
pub fn annotation_text(message: &AmqpMessage, key: &str) -> Option<String> {
    let annotations = message.message_annotations.as_ref()?;
    let value = annotations
        .0
        .iter()
        .find(|(k, _)| matches!(k, fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s) if s.0 == key))
        .map(|(_, v)| v)?;
    value_text(value)
}

fn value_text(value: &Value) -> Option<String> {
    Some(match value {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.0.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Ubyte(n) => n.to_string(),
        Value::Ushort(n) => n.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Byte(n) => n.to_string(),
        Value::Short(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Uuid(u) => uuid_text(u),
        _ => return None,
    })
}

fn simple_text(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::Null => return None,
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Uuid(u) => uuid_text(u),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        other => format!("{other:?}"),
    })
}

/// An application property as text.
pub fn property_text(message: &AmqpMessage, key: &str) -> Option<String> {
    message
        .application_properties
        .as_ref()?
        .0
        .get(key)
        .and_then(simple_text)
}

/// Application properties as the hub keeps them (a null value is a property without one).
pub fn properties_of(message: &AmqpMessage) -> Vec<(String, Option<String>)> {
    message
        .application_properties
        .as_ref()
        .map(|p| {
            p.0.iter()
                .map(|(k, v)| (k.clone(), simple_text(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// Lower-case hyphenated text of a UUID.
pub fn uuid_text(u: &Uuid) -> String {
    let hex: String = u.as_inner().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Parses hyphenated UUID text (`8-4-4-4-12` hex digits).
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    let groups: Vec<&str> = text.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Uuid::from(bytes))
}

/// A message id as text: strings as they are, UUIDs hyphenated, numbers in decimal, binary
/// as UTF-8 (lossy).
pub fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => uuid_text(u),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// A message id as IoT Hub sends it: a UUID when the text is one, else a string.
pub fn id_value(text: &str) -> MessageId {
    match parse_uuid(text) {
        Some(u) => MessageId::Uuid(u),
        None => MessageId::String(text.to_owned()),
    }
}

/// A device-to-cloud message as the telemetry log takes it: AMQP properties become the
/// system properties an MQTT device would have set in its property bag.
pub fn telemetry_of(message: &AmqpMessage) -> Incoming {
    let mut properties = Vec::new();
    if let Some(p) = &message.properties {
        let mut system = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                properties.push((key.to_owned(), Some(v)));
            }
        };
        system("$.mid", p.message_id.as_ref().map(id_text));
        system("$.cid", p.correlation_id.as_ref().map(id_text));
        system(
            "$.uid",
            p.user_id
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        );
        system("$.ct", p.content_type.as_ref().map(|s| s.0.clone()));
        system("$.ce", p.content_encoding.as_ref().map(|s| s.0.clone()));
        system("$.to", p.to.clone());
        system(
            "$.exp",
            p.absolute_expiry_time
                .as_ref()
                .map(|t| timestamp_text(t.milliseconds())),
        );
    }
    // The Node SDK puts the interface id and `dt-subject` in message annotations.
    for (annotation, key) in [("iothub-interface-id", "$.ifid"), ("dt-subject", "$.sub")] {
        if let Some(value) = annotation_text(message, annotation) {
            properties.push((key.to_owned(), Some(value)));
        }
    }
    // A module output's name is the application property `iothub-outputname`.
    for (key, value) in properties_of(message) {
        if key == "iothub-outputname" {
            properties.push(("$.on".to_owned(), value));
        } else {
            properties.push((key, value));
        }
    }
    Incoming {
        properties,
        body: body_bytes(&message.body),
    }
}

fn timestamp_text(millis: i64) -> String {
    crate::timestamp::Timestamp::from_unix_millis(millis).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A cloud-to-device message the service sent, as the device queue keeps it. `iothub-ack` is
/// an application property; the expiry is capped as IoT Hub caps time-to-live.
pub fn cloud_message_of(message: &AmqpMessage) -> CloudMessage {
    let p = message.properties.clone().unwrap_or_default();
    let now = SystemTime::now();
    let expires = p
        .absolute_expiry_time
        .as_ref()
        .map(|t| UNIX_EPOCH + Duration::from_millis(t.milliseconds().max(0) as u64))
        .unwrap_or(now + DEFAULT_TTL)
        .min(now + MAX_TTL);
    let mut properties = properties_of(message);
    let ack = properties
        .iter()
        .position(|(k, _)| k == "iothub-ack")
        .and_then(|i| properties.remove(i).1);
    CloudMessage {
        lock_token: 0,
        message_id: p
            .message_id
            .as_ref()
            .map(id_text)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
        correlation_id: p.correlation_id.as_ref().map(id_text),
        user_id: p
            .user_id
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        content_type: p.content_type.map(|s| s.0),
        content_encoding: p.content_encoding.map(|s| s.0),
        ack,
        expires,
        properties,
        body: body_bytes(&message.body),
        delivery_count: 0,
        enqueued: now,
    }
}

/// A queued cloud-to-device message as a device receives it over AMQP.
pub fn device_message_of(message: &CloudMessage, device_id: &str) -> AmqpMessage {
    let properties = Properties {
        message_id: Some(id_value(&message.message_id)),
        user_id: message
            .user_id
            .as_ref()
            .map(|u| Binary::from(u.as_bytes().to_vec())),
        to: Some(format!("/devices/{device_id}/messages/devicebound")),
        correlation_id: message.correlation_id.as_deref().map(id_value),
        content_type: message.content_type.clone().map(Symbol::from),
        content_encoding: message.content_encoding.clone().map(Symbol::from),
        absolute_expiry_time: Some(Timestamp::from_milliseconds(millis(message.expires))),
        ..Properties::default()
    };
    let mut application = OrderedMap::new();
    // As over MQTT, the device sees the feedback the service asked for.
    if let Some(ack) = &message.ack {
        application.insert("iothub-ack".to_owned(), SimpleValue::String(ack.clone()));
    }
    for (k, v) in &message.properties {
        application.insert(
            k.clone(),
            v.clone().map_or(SimpleValue::Null, SimpleValue::String),
        );
    }
    let mut annotations = OrderedMap::new();
    annotations.insert(
        Symbol::from("iothub-enqueuedtime").into(),
        Value::Timestamp(Timestamp::from_milliseconds(millis(message.enqueued))),
    );
    annotations.insert(
        Symbol::from("iothub-deliverycount").into(),
        Value::Int(message.delivery_count as i32),
    );
    full_message(annotations, properties, application, &message.body)
}

/// A message with every section IoT Hub fills: annotations, properties, application
/// properties and a data body.
pub fn full_message(
    annotations: OrderedMap<OwnedKey, Value>,
    properties: Properties,
    application: OrderedMap<String, SimpleValue>,
    body: &[u8],
) -> AmqpMessage {
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(MessageAnnotations(annotations)),
        // No section at all when nothing is set: an all-null one breaks readers that take a
        // present section to mean a present content type (the Python SDK's e2e helper).
        properties: (properties != Properties::default()).then_some(properties),
        application_properties: Some(ApplicationProperties(application)),
        body: data_body(body.to_vec()),
        footer: None,
    }
}

/// An AMQP message as the links pass it around.
pub type AmqpMessage = Message<Body<Value>>;

/// A method call as the device receives it: the request id as a UUID `correlation_id`,
/// the method name in `IoThub-methodname`, the payload as JSON in a data section.
pub fn method_request(request: &MethodRequest) -> AmqpMessage {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&request.rid.to_be_bytes());
    let mut message = data_message(request.payload.to_string());
    message.properties = Some(Properties {
        correlation_id: Some(MessageId::Uuid(Uuid::from(id))),
        ..Properties::default()
    });
    let mut properties = OrderedMap::new();
    properties.insert(
        "IoThub-methodname".to_owned(),
        SimpleValue::String(request.name.clone()),
    );
    message.application_properties = Some(ApplicationProperties(properties));
    message
}

/// A management-style reply: `status-code` (int) and `status-description` application
/// properties, `correlation_id` = the request's `message_id`, and an amqp-value body.
pub fn status_reply(
    correlation: Option<MessageId>,
    status: i32,
    description: &str,
    body: Value,
) -> AmqpMessage {
    let mut properties = OrderedMap::new();
    properties.insert("status-code".to_owned(), SimpleValue::Int(status));
    properties.insert(
        "status-description".to_owned(),
        SimpleValue::String(description.to_owned()),
    );
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: correlation,
            ..Properties::default()
        }),
        application_properties: Some(ApplicationProperties(properties)),
        body: Body::Value(AmqpValue(body)),
        footer: None,
    }
}
