//! Device-to-cloud messages: the system properties IoT Hub stamps on them, and a bounded
//! in-memory log that tests and tools read through the control API.
//!
//! The log is sharded by device so that devices sending at once do not queue on one lock: each
//! shard is a small `Mutex<VecDeque>` holding at most its share of the capacity, every message
//! gets a hub-wide sequence number from an atomic counter, and readers merge the shards by
//! sequence. A watermark (`published`) advances only once every lower sequence number is in its
//! shard, and readers never look past it, so a reader paging by sequence number never skips a
//! message that another shard was still storing. When a shard is full its oldest message is dropped and counted. Readers that wait
//! for new messages are woken through a `Notify` that writers touch only when someone waits.

use crate::registry::IdentityKey;
use crate::timestamp::Timestamp;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Largest device-to-cloud message: body plus property names and values (256 KB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Default number of messages the log keeps.
pub const DEFAULT_CAPACITY: usize = 10_000;
const SHARDS: usize = 16;

/// Where a message comes from: device telemetry or one of IoT Hub's event categories. Routes
/// select by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    DeviceMessages,
    TwinChangeEvents,
    DeviceLifecycleEvents,
    DeviceConnectionStateEvents,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::DeviceMessages,
        Source::TwinChangeEvents,
        Source::DeviceLifecycleEvents,
        Source::DeviceConnectionStateEvents,
    ];

    /// The name routes use (`DeviceMessages`, `TwinChangeEvents`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::DeviceMessages => "DeviceMessages",
            Self::TwinChangeEvents => "TwinChangeEvents",
            Self::DeviceLifecycleEvents => "DeviceLifecycleEvents",
            Self::DeviceConnectionStateEvents => "DeviceConnectionStateEvents",
        }
    }

    /// The `iothub-message-source` an event carries (`Telemetry` for device messages).
    pub fn message_source(self) -> &'static str {
        match self {
            Self::DeviceMessages => "Telemetry",
            Self::TwinChangeEvents => "twinChangeEvents",
            Self::DeviceLifecycleEvents => "deviceLifecycleEvents",
            Self::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
        }
    }

    /// Either name, ignoring ASCII case.
    pub fn parse(name: &str) -> Option<Source> {
        Self::ALL.into_iter().find(|s| {
            name.eq_ignore_ascii_case(s.name()) || name.eq_ignore_ascii_case(s.message_source())
        })
    }
}

/// One endpoint a message was routed to, with the enrichments added for that endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The endpoint's index in the hub's routing (0 is the built-in `events`).
    pub endpoint: usize,
    pub enrichments: Vec<(String, String)>,
}

/// One device-to-cloud message (or hub event) as the hub recorded it.
#[derive(Debug, Clone)]
pub struct Message {
    pub sequence: u64,
    pub enqueued: Timestamp,
    pub identity: IdentityKey,
    /// `SAS` or `X509`, as `iothub-connection-auth-method` reports; empty for hub events.
    pub auth_method: &'static str,
    pub source: Source,
    /// Module output name (`$.on`), for module output messages.
    pub output: Option<String>,
    /// System properties the device set (`$.mid`, `$.ct`, …), under their IoT Hub names.
    pub system: Map<String, Value>,
    /// Application properties; a bare key (no `=`) has a null value.
    pub properties: Map<String, Value>,
    pub body: Bytes,
    /// The routes that selected it (`$fallback` for the fallback route), for the control API.
    pub routes: Vec<std::sync::Arc<str>>,
    /// The endpoints it went to; none when no route selected it.
    pub routed: Vec<Routed>,
}

/// A message as a device sent it, before the hub stamps it.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub properties: Vec<(String, Option<String>)>,
    pub body: Bytes,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message of {0} bytes is larger than the {MAX_MESSAGE_BYTES}-byte limit")]
pub struct TooLarge(pub usize);

/// Maps the property-bag system keys (`shared/protocol.md` C.5) to IoT Hub's property names.
fn system_name(key: &str) -> Option<&'static str> {
    Some(match key {
        "$.mid" => "message-id",
        "$.cid" => "correlation-id",
        "$.uid" => "user-id",
        "$.ct" => "content-type",
        "$.ce" => "content-encoding",
        "$.exp" => "absolute-expiry-time",
        "$.to" => "to",
        "$.ifid" => "iothub-interface-id",
        "$.sub" => "dt-subject",
        "$.on" => "iothub-outputname",
        _ => return None,
    })
}

impl Incoming {
    /// The size IoT Hub counts: body plus property names and values.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                .sum::<usize>()
    }
}

/// The bounded, sharded telemetry log.
pub struct TelemetryLog {
    shards: Vec<Mutex<VecDeque<Arc<Message>>>>,
    per_shard: usize,
    next_sequence: AtomicU64,
    /// Every message with a sequence number up to this one is stored.
    published: AtomicU64,
    dropped: AtomicU64,
    /// Readers currently waiting for new messages; writers notify only when it is non-zero.
    waiting: AtomicUsize,
    arrived: Notify,
}

impl TelemetryLog {
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(VecDeque::new())).collect(),
            per_shard,
            next_sequence: AtomicU64::new(1),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            arrived: Notify::new(),
        }
    }

    fn shard(&self, identity: &IdentityKey) -> &Mutex<VecDeque<Arc<Message>>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        identity.device_id.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Stamps and records a device message, unrouted; returns its sequence number.
    pub fn append(
        &self,
        identity: &IdentityKey,
        auth_method: &'static str,
        incoming: Incoming,
    ) -> Result<u64, TooLarge> {
        Ok(self.store(Message::stamp(identity, auth_method, incoming)?))
    }

    /// Records a message under the next sequence number, which it returns.
    pub fn store(&self, mut message: Message) -> u64 {
        let mut shard = self
            .shard(&message.identity)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Taken under the shard lock so that each shard stays ordered by sequence.
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        if shard.len() >= self.per_shard {
            shard.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        message.sequence = sequence;
        shard.push_back(Arc::new(message));
        drop(shard);
        // Publish in sequence order: wait (briefly; the predecessor is between two
        // instructions) until every earlier message is stored.
        while self
            .published
            .compare_exchange_weak(sequence - 1, sequence, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            std::thread::yield_now();
        }
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.arrived.notify_waiters();
        }
        sequence
    }

    /// Messages with a sequence number above `after` that pass `filter`, oldest first, at most
    /// `limit`.
    pub fn read(
        &self,
        after: u64,
        limit: usize,
        filter: impl Fn(&Message) -> bool,
    ) -> Vec<Arc<Message>> {
        let upto = self.published.load(Ordering::Acquire);
        let mut found: Vec<Arc<Message>> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            found.extend(
                shard
                    .iter()
                    .filter(|m| m.sequence > after && m.sequence <= upto && filter(m))
                    .cloned(),
            );
        }
        found.sort_by_key(|m| m.sequence);
        found.truncate(limit);
        found
    }

    /// Like [`read`](Self::read), but waits up to `wait` for a first matching message.
    pub async fn read_or_wait(
        &self,
        after: u64,
        limit: usize,
        wait: std::time::Duration,
        filter: impl Fn(&Message) -> bool,
    ) -> Vec<Arc<Message>> {
        let deadline = tokio::time::Instant::now() + wait;
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let found = loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let found = self.read(after, limit, &filter);
            if !found.is_empty() || tokio::time::timeout_at(deadline, arrived).await.is_err() {
                break if found.is_empty() {
                    self.read(after, limit, &filter)
                } else {
                    found
                };
            }
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        found
    }

    /// How many messages were dropped to keep the log within its capacity.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The sequence number of the newest message (0 when none was ever sent).
    pub fn last_sequence(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Forgets every message (hub reset). Sequence numbers keep increasing.
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
}

impl Message {
    /// A device message as the hub stamps it: system and application properties separated,
    /// the enqueued time set, not yet routed or numbered.
    ///
    /// # Errors
    /// When it is larger than [`MAX_MESSAGE_BYTES`].
    pub fn stamp(
        identity: &IdentityKey,
        auth_method: &'static str,
        incoming: Incoming,
    ) -> Result<Message, TooLarge> {
        let size = incoming.size();
        if size > MAX_MESSAGE_BYTES {
            return Err(TooLarge(size));
        }
        let mut system = Map::new();
        let mut properties = Map::new();
        let mut output = None;
        for (key, value) in incoming.properties {
            match system_name(&key) {
                Some("iothub-outputname") => output = value,
                Some(name) => {
                    system.insert(name.to_owned(), value.map_or(Value::Null, Value::String));
                }
                None => {
                    properties.insert(key, value.map_or(Value::Null, Value::String));
                }
            }
        }
        Ok(Message {
            sequence: 0,
            enqueued: Timestamp::now(),
            identity: identity.clone(),
            auth_method,
            source: Source::DeviceMessages,
            output,
            system,
            properties,
            body: incoming.body,
            routes: Vec::new(),
            routed: Vec::new(),
        })
    }

    /// [`to_json`](Self::to_json) plus `endpoints`: where it went (`names` are the hub's
    /// endpoint names by index), each with its enrichments.
    pub fn to_json_routed(&self, names: &[String]) -> Value {
        let mut json = self.to_json();
        json["endpoints"] = self
            .routed
            .iter()
            .map(|r| {
                let enrichments: Map<String, Value> = r
                    .enrichments
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                json!({
                    "name": names.get(r.endpoint).map_or("", String::as_str),
                    "enrichments": enrichments,
                })
            })
            .collect();
        json
    }

    /// Whether it went to endpoint `endpoint`.
    pub fn routed_to(&self, endpoint: usize) -> Option<&Routed> {
        self.routed.iter().find(|r| r.endpoint == endpoint)
    }

    /// The control API's JSON for a message. The body is given as text when it is UTF-8 and
    /// always as base64.
    pub fn to_json(&self) -> Value {
        use base64::Engine;
        let mut system = self.system.clone();
        system.insert(
            "iothub-connection-device-id".into(),
            json!(self.identity.device_id),
        );
        if let Some(m) = &self.identity.module_id {
            system.insert("iothub-connection-module-id".into(), json!(m));
        }
        if !self.auth_method.is_empty() {
            system.insert(
                "iothub-connection-auth-method".into(),
                json!(self.auth_method),
            );
        }
        system.insert("iothub-enqueuedtime".into(), json!(self.enqueued));
        system.insert(
            "iothub-message-source".into(),
            json!(self.source.message_source()),
        );
        if let Some(o) = &self.output {
            system.insert("iothub-outputname".into(), json!(o));
        }
        json!({
            "sequenceNumber": self.sequence,
            "deviceId": self.identity.device_id,
            "moduleId": self.identity.module_id,
            "outputName": self.output,
            "enqueuedTime": self.enqueued,
            "systemProperties": system,
            "properties": self.properties,
            "source": self.source.name(),
            "routes": self.routes.iter().map(|r| r.as_ref()).collect::<Vec<_>>(),
            "body": std::str::from_utf8(&self.body).ok(),
            "bodyBase64": base64::engine::general_purpose::STANDARD.encode(&self.body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(props: &[(&str, Option<&str>)], body: &str) -> Incoming {
        Incoming {
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
                .collect(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn system_and_application_properties_are_separated() {
        let log = TelemetryLog::new(100);
        let who = IdentityKey::module("d", "m");
        log.append(
            &who,
            "SAS",
            msg(
                &[
                    ("$.mid", Some("1")),
                    ("$.ct", Some("application/json")),
                    ("$.on", Some("out1")),
                    ("alert", Some("hi")),
                    ("bare", None),
                ],
                "{}",
            ),
        )
        .unwrap();
        let m = &log.read(0, 10, |_| true)[0];
        let json = m.to_json();
        assert_eq!(json["systemProperties"]["message-id"], "1");
        assert_eq!(json["systemProperties"]["content-type"], "application/json");
        assert_eq!(json["systemProperties"]["iothub-connection-device-id"], "d");
        assert_eq!(json["systemProperties"]["iothub-connection-module-id"], "m");
        assert_eq!(
            json["systemProperties"]["iothub-connection-auth-method"],
            "SAS"
        );
        assert_eq!(json["outputName"], "out1");
        assert_eq!(json["properties"], json!({"alert":"hi","bare":null}));
        assert_eq!(json["body"], "{}");
    }

    #[test]
    fn log_is_bounded_drops_oldest_and_counts() {
        let log = TelemetryLog::new(SHARDS); // one message per shard
        let who = IdentityKey::device("same-device");
        for i in 0..5 {
            log.append(&who, "SAS", msg(&[], &i.to_string())).unwrap();
        }
        let kept = log.read(0, 100, |_| true);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].body, Bytes::from("4"));
        assert_eq!(log.dropped(), 4);
        assert_eq!(log.last_sequence(), 5);
    }

    #[test]
    fn reads_merge_shards_in_sequence_order_and_filter() {
        let log = TelemetryLog::new(1000);
        for i in 0..50 {
            let who = IdentityKey::device(format!("d{}", i % 7));
            log.append(&who, "SAS", msg(&[], &i.to_string())).unwrap();
        }
        let all = log.read(0, 1000, |_| true);
        assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert_eq!(all.len(), 50);
        let later = log.read(40, 1000, |m| m.identity.device_id == "d3");
        assert!(later
            .iter()
            .all(|m| m.sequence > 40 && m.identity.device_id == "d3"));
        assert_eq!(log.read(0, 3, |_| true).len(), 3);
    }

    #[test]
    fn oversized_messages_are_refused() {
        let log = TelemetryLog::new(10);
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(log
            .append(
                &IdentityKey::device("d"),
                "SAS",
                msg(&[("k", Some("v"))], &big)
            )
            .is_err());
        assert!(log.read(0, 10, |_| true).is_empty());
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_a_new_message() {
        let log = Arc::new(TelemetryLog::new(10));
        let reader = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                log.read_or_wait(0, 10, std::time::Duration::from_secs(10), |_| true)
                    .await
            })
        };
        tokio::task::yield_now().await;
        log.append(&IdentityKey::device("d"), "SAS", msg(&[], "late"))
            .unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got[0].body, Bytes::from("late"));
    }
}
