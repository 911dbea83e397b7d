//! Service-bound queues: records IoT Hub holds for the back end until it collects them, the
//! cloud-to-device delivery feedback (`/messages/serviceBound/feedback`) and the file upload
//! notifications (`/messages/serviceBound/filenotifications`).
//!
//! A record leaves the queue when a receiver accepts it. Over AMQP a record is taken, sent and
//! given back if the receiver does not accept it; over HTTPS a batch is locked under a lock
//! token until it is completed, abandoned, or its lock lapses.

use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a batch received over HTTPS stays locked before it is offered again (IoT Hub's
/// default lock timeout, 60 s).
pub const LOCK: Duration = Duration::from_secs(60);

/// One queue of JSON records, oldest first, holding at most `capacity` (older ones are
/// dropped, as the hub drops what outlives its time-to-live).
pub struct Outbox {
    capacity: usize,
    records: Mutex<VecDeque<Value>>,
    arrived: tokio::sync::Notify,
    /// Batches handed out over HTTPS and not yet completed or abandoned: lock token →
    /// (records, when the lock lapses).
    locked: Mutex<HashMap<String, (Vec<Value>, Instant)>>,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            records: Mutex::new(VecDeque::new()),
            arrived: tokio::sync::Notify::new(),
            locked: Mutex::new(HashMap::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Vec<Value>, Instant)>> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record for the next receiver.
    pub fn push(&self, record: Value) {
        let mut records = self.records();
        if records.len() >= self.capacity {
            records.pop_front();
        }
        records.push_back(record);
        drop(records);
        self.arrived.notify_waiters();
    }

    /// Waits for records and takes up to `max` of them, oldest first.
    pub async fn take(&self, max: usize) -> Vec<Value> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut records = self.records();
                if !records.is_empty() {
                    let n = records.len().min(max);
                    return records.drain(..n).collect();
                }
            }
            arrived.await;
        }
    }

    /// Puts records a receiver did not accept back at the front.
    pub fn give_back(&self, batch: Vec<Value>) {
        let mut records = self.records();
        for record in batch.into_iter().rev() {
            records.push_front(record);
        }
        drop(records);
        self.arrived.notify_waiters();
    }

    /// Takes up to `max` records under a new lock token (an HTTPS receive), or `None` when
    /// there are none. Batches whose lock lapsed are offered again first.
    pub fn lock_batch(&self, max: usize) -> Option<(String, Vec<Value>)> {
        self.release_lapsed();
        let batch: Vec<Value> = {
            let mut records = self.records();
            let n = records.len().min(max);
            records.drain(..n).collect()
        };
        if batch.is_empty() {
            return None;
        }
        let token = crate::c2d::lock_token();
        self.locked()
            .insert(token.clone(), (batch.clone(), Instant::now() + LOCK));
        Some((token, batch))
    }

    /// Completes a batch received over HTTPS; `false` for an unknown or lapsed lock token.
    pub fn complete(&self, token: &str) -> bool {
        self.release_lapsed();
        self.locked().remove(token).is_some()
    }

    /// Gives a batch received over HTTPS back; `false` for an unknown or lapsed lock token.
    pub fn abandon(&self, token: &str) -> bool {
        self.release_lapsed();
        let batch = self.locked().remove(token);
        match batch {
            Some((batch, _)) => {
                self.give_back(batch);
                true
            }
            None => false,
        }
    }

    /// Puts the batches whose lock lapsed back in the queue.
    fn release_lapsed(&self) {
        let now = Instant::now();
        let lapsed: Vec<Vec<Value>> = {
            let mut locked = self.locked();
            let tokens: Vec<String> = locked
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(t, _)| t.clone())
                .collect();
            tokens
                .iter()
                .filter_map(|t| locked.remove(t).map(|(batch, _)| batch))
                .collect()
        };
        for batch in lapsed {
            self.give_back(batch);
        }
    }

    pub fn clear(&self) {
        self.records().clear();
        self.locked().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn oldest_records_are_dropped_beyond_the_capacity() {
        let outbox = Outbox::new(2);
        for n in 0..3 {
            outbox.push(json!(n));
        }
        let (token, batch) = outbox.lock_batch(10).unwrap();
        assert_eq!(batch, vec![json!(1), json!(2)]);
        assert!(outbox.abandon(&token));
        assert!(!outbox.complete(&token), "a settled token is gone");
        let (token, again) = outbox.lock_batch(1).unwrap();
        assert_eq!(again, vec![json!(1)]);
        assert!(outbox.complete(&token));
        assert_eq!(outbox.lock_batch(10).unwrap().1, vec![json!(2)]);
        assert!(outbox.lock_batch(10).is_none());
    }

    #[tokio::test]
    async fn records_given_back_come_first() {
        let outbox = Outbox::new(10);
        outbox.push(json!("a"));
        outbox.push(json!("b"));
        let first = outbox.take(1).await;
        outbox.give_back(first);
        assert_eq!(outbox.take(5).await, vec![json!("a"), json!("b")]);
    }
}
