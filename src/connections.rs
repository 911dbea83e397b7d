//! Live device and module connections, by identity.
//!
//! The hub side of "route every publish by the authenticated identity": each connected identity
//! has exactly one [`Connection`] here, holding a bounded queue of [`Outbound`] events (desired
//! patches today; direct methods and cloud-to-device messages later). The REST side calls
//! [`Connections::notify`]; the connection's own task turns events into packets. Nothing here
//! knows MQTT.
//!
//! A second connection of the same identity replaces the first, which is told to close
//! (IoT Hub error 400027, ConnectionForcefullyClosedOnNewConnection). An event that finds a
//! connection's queue full closes that connection instead of waiting: one client that stops
//! reading can never stall the service side.

use crate::registry::IdentityKey;
use dashmap::DashMap;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

/// Events from the hub to one connected identity. Payloads are boxed so that the enum, and
/// so every connection's queue, stays small (the queue's first block is allocated up front).
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// A desired-properties change: the patch (or the whole document after a replace), with
    /// `$version` (`shared/protocol.md` C.6).
    DesiredPatch(Box<Value>),
    /// A direct-method call awaiting the device's answer (C.4, C.7).
    MethodRequest(Box<MethodRequest>),
    /// Cloud-to-device messages are waiting in the device's queue.
    CloudToDevice,
}

/// A direct-method call on its way to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodRequest {
    /// The request id the device's answer must carry.
    pub rid: u64,
    pub name: String,
    pub payload: Value,
}

/// What a device has asked to receive (MQTT: by subscribing), kept across reconnects
/// (clean session 0). The hub uses it to know whether, say, a direct method can be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `$iothub/twin/res/#`
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`
    DesiredPatches,
    /// `$iothub/methods/POST/#`
    Methods,
    /// `devices/{d}/messages/devicebound/#` (devices only)
    CloudToDevice,
    /// `devices/{d}/modules/{m}/inputs/#` (modules; the C SDK subscribes `devices/{d}/modules/{m}/#`)
    Inputs,
}

impl Feature {
    pub const ALL: [Feature; 5] = [
        Feature::TwinResponses,
        Feature::DesiredPatches,
        Feature::Methods,
        Feature::CloudToDevice,
        Feature::Inputs,
    ];

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// How many events may wait for one connection before it is considered stuck.
pub const QUEUE_DEPTH: usize = 256;

/// The hub's handle on one live connection.
struct Connection {
    /// Distinguishes this connection from a later one of the same identity.
    id: u64,
    events: mpsc::Sender<Outbound>,
    /// Fired to make the connection close itself (taken over, or too slow).
    close: Arc<Notify>,
    /// Set once the queue has overflowed: the connection is closing, and later drops until it
    /// is gone are not logged again.
    overflowed: std::sync::atomic::AtomicBool,
}

/// What a connection task holds: its events, its close signal and its registration id.
pub struct Registration {
    pub id: u64,
    pub events: mpsc::Receiver<Outbound>,
    pub close: Arc<Notify>,
}

/// All live connections, and the session state that outlives them. Sharded maps; no global lock.
#[derive(Default)]
pub struct Connections {
    live: DashMap<IdentityKey, Connection>,
    /// Per-identity session state that survives reconnects (clean session 0): which
    /// subscriptions are on, as a protocol-defined bit set. The SDKs do not re-subscribe after a
    /// token-renewal reconnect (`shared/protocol.md` C.3), so this must persist.
    sessions: DashMap<IdentityKey, u8>,
    next_id: AtomicU64,
    /// Signalled whenever a connection registers or changes its subscriptions, for callers
    /// waiting for a device to come online (`connectTimeoutInSeconds`). Not a hot path.
    changed: Notify,
}

impl Connections {
    /// Registers a new connection of `key`, closing any previous one of the same identity.
    pub fn register(&self, key: &IdentityKey) -> Registration {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let close = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = self.live.insert(
            key.clone(),
            Connection {
                id,
                events: tx,
                close: Arc::clone(&close),
                overflowed: Default::default(),
            },
        );
        if let Some(old) = previous {
            old.close.notify_one();
        }
        self.changed.notify_waiters();
        Registration {
            id,
            events: rx,
            close,
        }
    }

    /// Removes a connection, unless a newer one of the same identity has replaced it. Returns
    /// whether it was still the current one.
    pub fn unregister(&self, key: &IdentityKey, id: u64) -> bool {
        self.live.remove_if(key, |_, c| c.id == id).is_some()
    }

    /// Queues an event for `key`'s connection, if it has one. A full queue closes the connection.
    pub fn notify(&self, key: &IdentityKey, event: Outbound) -> bool {
        let Some(conn) = self.live.get(key) else {
            return false;
        };
        match conn.events.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !conn.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(identity = %key, "outbound queue full; closing the connection");
                }
                conn.close.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The identity's stored session state (0 when it has none).
    pub fn session(&self, key: &IdentityKey) -> u8 {
        self.sessions.get(key).map_or(0, |s| *s)
    }

    /// Stores the identity's session state; 0 forgets it.
    pub fn set_session(&self, key: &IdentityKey, state: u8) {
        if state == 0 {
            self.sessions.remove(key);
        } else {
            self.sessions.insert(key.clone(), state);
        }
        self.changed.notify_waiters();
    }

    /// Whether `key` is connected and has `feature` on.
    pub fn can_receive(&self, key: &IdentityKey, feature: Feature) -> bool {
        self.is_connected(key) && self.session(key) & feature.bit() != 0
    }

    /// Waits until `key` is connected with `feature` on, or `deadline` passes.
    pub async fn wait_for(
        &self,
        key: &IdentityKey,
        feature: Feature,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            // Register interest before checking, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.can_receive(key, feature) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.can_receive(key, feature);
            }
        }
    }

    /// Closes `key`'s connection, if any (its identity was deleted, or the hub is reset).
    pub fn close(&self, key: &IdentityKey) {
        if let Some(conn) = self.live.get(key) {
            conn.close.notify_one();
        }
    }

    /// Closes every connection and forgets every session.
    pub fn close_all(&self) {
        for conn in self.live.iter() {
            conn.close.notify_one();
        }
        self.sessions.clear();
    }

    /// How many identities are connected now.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn is_connected(&self, key: &IdentityKey) -> bool {
        self.live.contains_key(key)
    }

    /// Connected devices (device-level connections), for `/statistics/service`.
    pub fn connected_devices(&self) -> usize {
        self.live
            .iter()
            .filter(|e| e.key().module_id.is_none())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_second_connection_replaces_the_first() {
        let conns = Connections::default();
        let key = IdentityKey::device("d");
        let first = conns.register(&key);
        let mut second = conns.register(&key);
        // The first is told to close; its late unregister does not remove the second.
        first.close.notified().await;
        assert!(!conns.unregister(&key, first.id));
        assert!(conns.notify(
            &key,
            Outbound::DesiredPatch(Box::new(json!({"$version": 2})))
        ));
        assert_eq!(
            second.events.recv().await,
            Some(Outbound::DesiredPatch(Box::new(json!({"$version": 2}))))
        );
        assert!(conns.unregister(&key, second.id));
        assert!(!conns.is_connected(&key));
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_instead_of_blocking() {
        let conns = Connections::default();
        let key = IdentityKey::module("d", "m");
        let reg = conns.register(&key);
        for _ in 0..QUEUE_DEPTH {
            assert!(conns.notify(&key, Outbound::DesiredPatch(Box::new(json!({})))));
        }
        assert!(!conns.notify(&key, Outbound::DesiredPatch(Box::new(json!({})))));
        reg.close.notified().await;
        assert_eq!(conns.connected_devices(), 0);
    }
}
