//! Cloud-to-device queues: one per device, kept in its record.

use super::Registry;
use crate::c2d::{self, CloudMessage};
use crate::error::{ErrorCode, HubError, HubResult};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A message received over HTTPS, locked for the device until it settles it or the lock lapses
/// (then it can be delivered again, on any protocol).
#[derive(Debug, Clone)]
pub struct HttpLock {
    /// The lock token the device got in `ETag` and settles with.
    pub etag: String,
    pub until: Instant,
}

/// How long a message received over HTTPS stays locked when the device names no
/// `IotHub-MessageLockTimeout` (IoT Hub's C2D lock timeout, 60 s).
pub const HTTP_LOCK: Duration = Duration::from_secs(60);

/// The lock timeouts a device may ask for, in seconds: the range IoT Hub allows for its
/// message locks (as for the feedback queue's lock duration).
pub const HTTP_LOCK_RANGE: std::ops::RangeInclusive<u64> = 5..=300;

impl Registry {
    /// Queues a message for a device.
    ///
    /// # Errors
    /// 404001 for an unknown device; 403004 when 50 messages already wait.
    pub fn enqueue_c2d(&self, device_id: &str, mut message: CloudMessage) -> HubResult<()> {
        self.change_device(device_id, |rec| {
            rec.purge_expired_c2d();
            if rec.c2d.len() >= c2d::MAX_QUEUE {
                return Err(HubError::new(
                    ErrorCode::DeviceMaximumQueueDepthExceeded,
                    format!(
                        "Device {device_id} already has the maximum of {} cloud-to-device messages waiting",
                        c2d::MAX_QUEUE
                    ),
                ));
            }
            message.lock_token = self.c2d_seq.fetch_add(1, Ordering::Relaxed);
            rec.c2d.push_back(message);
            rec.device.common.c2d_count = rec.c2d.len() as u32;
            Ok(())
        }, |()| {})
    }

    /// `DELETE /devices/{id}/commands`: drops every message waiting for the device, delivered
    /// or not; returns how many there were.
    pub fn purge_c2d(&self, device_id: &str) -> HubResult<usize> {
        self.change_device(
            device_id,
            |rec| {
                let purged = rec.c2d.len();
                rec.c2d.clear();
                rec.device.common.c2d_count = 0;
                Ok(purged)
            },
            |_| {},
        )
    }

    /// Unexpired messages waiting for a device, except those in `in_flight` and those locked
    /// by an HTTPS receive, oldest first.
    pub fn pending_c2d(&self, device_id: &str, in_flight: &HashSet<u64>) -> Vec<CloudMessage> {
        let now = Instant::now();
        self.with_device(device_id, |rec| {
            rec.purge_expired_c2d();
            Ok(rec
                .c2d
                .iter()
                .filter(|m| !in_flight.contains(&m.lock_token))
                .filter(|m| {
                    rec.http_locks
                        .get(&m.lock_token)
                        .is_none_or(|l| l.until <= now)
                })
                .cloned()
                .collect())
        })
        .unwrap_or_default()
    }

    /// An HTTPS receive (`GET /devices/{id}/messages/deviceBound`): the oldest message that is
    /// neither locked nor `in_flight` on a device connection, locked for `lock` under a new lock
    /// token. `None` when nothing is waiting.
    ///
    /// # Errors
    /// 404001 for an unknown device.
    pub fn lock_c2d(
        &self,
        device_id: &str,
        in_flight: &HashSet<u64>,
        lock: Duration,
    ) -> HubResult<Option<(CloudMessage, String)>> {
        let now = Instant::now();
        self.change_device(
            device_id,
            |rec| {
                rec.purge_expired_c2d();
                rec.http_locks.retain(|_, l| l.until > now);
                let Some(message) = rec.c2d.iter().find(|m| {
                    !in_flight.contains(&m.lock_token)
                        && !rec.http_locks.contains_key(&m.lock_token)
                }) else {
                    return Ok(None);
                };
                let message = message.clone();
                let etag = c2d::lock_token();
                rec.http_locks.insert(
                    message.lock_token,
                    HttpLock {
                        etag: etag.clone(),
                        until: now + lock,
                    },
                );
                Ok(Some((message, etag)))
            },
            |_| {},
        )
    }

    /// Ends the HTTPS locks of `device_id` that lapsed by `now` and returns their messages'
    /// lock tokens: each was a delivery the device never settled, which the hub counts as an
    /// abandon ([`crate::Hub::lapse_c2d_locks`]).
    pub fn lapsed_http_locks(&self, device_id: &str, now: Instant) -> Vec<u64> {
        self.change_device(
            device_id,
            |rec| {
                let lapsed: Vec<u64> = rec
                    .http_locks
                    .iter()
                    .filter(|(_, l)| l.until <= now)
                    .map(|(t, _)| *t)
                    .collect();
                for token in &lapsed {
                    rec.http_locks.remove(token);
                }
                Ok(lapsed)
            },
            |_| {},
        )
        .unwrap_or_default()
    }

    /// Ends the HTTPS lock named `etag` (the device is settling the message) and returns the
    /// message's queue lock token.
    ///
    /// # Errors
    /// 404001 for an unknown device; 412002 when no live lock has that token.
    pub fn unlock_c2d(&self, device_id: &str, etag: &str) -> HubResult<u64> {
        let now = Instant::now();
        self.change_device(
            device_id,
            |rec| {
                rec.http_locks.retain(|_, l| l.until > now);
                let token = rec
                    .http_locks
                    .iter()
                    .find(|(_, l)| l.etag == etag)
                    .map(|(t, _)| *t)
                    .ok_or_else(|| {
                        HubError::new(
                            ErrorCode::DeviceMessageLockLost,
                            format!(
                                "No cloud-to-device message of device {device_id} is locked with lock token '{etag}' (unknown, already settled, or its lock lapsed)"
                            ),
                        )
                    })?;
                rec.http_locks.remove(&token);
                Ok(token)
            },
            |_| {},
        )
    }

    /// The device completed (acknowledged) or rejected a message: it leaves the queue.
    /// Returns the message, if it was still there.
    pub fn complete_c2d(&self, device_id: &str, lock_token: u64) -> Option<CloudMessage> {
        self.change_device(
            device_id,
            |rec| {
                let at = rec.c2d.iter().position(|m| m.lock_token == lock_token);
                let removed = at.and_then(|i| rec.c2d.remove(i));
                rec.http_locks.remove(&lock_token);
                rec.device.common.c2d_count = rec.c2d.len() as u32;
                Ok(removed)
            },
            |_| {},
        )
        .ok()
        .flatten()
    }

    /// The device abandoned a message: it stays queued for another delivery, unless it has
    /// now been delivered [`c2d::MAX_DELIVERY_COUNT`] times, when it leaves the queue and is
    /// returned (dead-lettered).
    pub fn abandon_c2d(&self, device_id: &str, lock_token: u64) -> Option<CloudMessage> {
        self.change_device(
            device_id,
            |rec| {
                let Some(at) = rec.c2d.iter().position(|m| m.lock_token == lock_token) else {
                    return Ok(None);
                };
                rec.c2d[at].delivery_count += 1;
                if rec.c2d[at].delivery_count < c2d::MAX_DELIVERY_COUNT {
                    return Ok(None);
                }
                let removed = rec.c2d.remove(at);
                rec.device.common.c2d_count = rec.c2d.len() as u32;
                Ok(removed)
            },
            |_| {},
        )
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::IfMatch;
    use serde_json::{json, Map};

    #[test]
    fn a_lapsed_https_lock_is_handed_back_once_and_counts_as_a_delivery() {
        let reg = Registry::new(50);
        reg.put_device("d1", &Map::new(), &IfMatch::Absent).unwrap();
        let message = CloudMessage::from_json(json!({"body": "hi"}).as_object().unwrap()).unwrap();
        reg.enqueue_c2d("d1", message).unwrap();
        let lock = Duration::from_secs(10);
        let (locked, etag) = reg.lock_c2d("d1", &HashSet::new(), lock).unwrap().unwrap();
        assert!(reg.lapsed_http_locks("d1", Instant::now()).is_empty());
        let before = Instant::now() + lock - Duration::from_secs(1);
        assert!(
            reg.lapsed_http_locks("d1", before).is_empty(),
            "held for `lock`"
        );
        assert!(reg.pending_c2d("d1", &HashSet::new()).is_empty(), "locked");
        let later = Instant::now() + lock + Duration::from_secs(1);
        assert_eq!(reg.lapsed_http_locks("d1", later), vec![locked.lock_token]);
        assert!(reg.lapsed_http_locks("d1", later).is_empty(), "only once");
        assert_eq!(
            reg.unlock_c2d("d1", &etag).unwrap_err().code,
            ErrorCode::DeviceMessageLockLost
        );
        // The hub abandons it: one more delivery on the count, and it is offered again.
        assert!(reg.abandon_c2d("d1", locked.lock_token).is_none());
        let again = reg.pending_c2d("d1", &HashSet::new());
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].delivery_count, locked.delivery_count + 1);
    }
}
