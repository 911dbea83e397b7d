//! What the links of one connection share, below every link handler: the connection's state
//! ([`Conn`]: the hub, the grants its tokens earned, the reply queues of `$cbs` and
//! `$management`), each device identity's [`Presence`] on it, and the helpers every link uses.
//! The handlers ([`super::device`], [`super::service`], [`super::eventhub`]) depend on this
//! file; [`super::connection`] drives the connection and dispatches attaches to the handlers;
//! nothing here knows either.

use super::cbs::Grant;
use super::message::{data_message, method_request, AmqpMessage};
use crate::connections::{Feature, Outbound, Registration};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::registry::IdentityKey;
use crate::timestamp::unix_now;
use crate::tls::ClientCertInfo;
use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::primitives::Symbol;
use fe2o3_amqp::Sender;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// What one connection's links share.
pub struct Conn {
    pub hub: Hub,
    pub peer: String,
    grants: Mutex<Vec<Grant>>,
    grants_changed: Notify,
    /// Replies to `$cbs` put-token requests, for the `$cbs` receiver link.
    pub cbs_replies: Replies,
    /// Replies to `$management` requests, for the `$management` receiver link.
    pub management_replies: Replies,
    /// Device identities with links on this connection.
    devices: Mutex<HashMap<IdentityKey, Arc<Presence>>>,
    /// Set to close the connection, with the error to close it with.
    closing: Mutex<Option<definitions::Error>>,
    close: Notify,
    /// The certificate the client presented in the TLS handshake: X.509 devices attach their
    /// links with no token at all (the Node SDK skips `$cbs` for them).
    client_cert: Option<ClientCertInfo>,
}

/// A reply queue between a request link and the response link of the same node.
pub struct Replies {
    tx: mpsc::Sender<AmqpMessage>,
    rx: tokio::sync::Mutex<mpsc::Receiver<AmqpMessage>>,
}

impl Replies {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(64);
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    /// Queues a reply; a client that never reads its replies loses them rather than
    /// blocking its requests.
    pub fn send(&self, reply: AmqpMessage) {
        let _ = self.tx.try_send(reply);
    }

    /// Sends queued replies on `sender` until the link or the connection goes.
    pub async fn serve(&self, sender: fe2o3_amqp::Sender) {
        let mut rx = self.rx.lock().await;
        pump(sender, &mut rx).await;
    }
}

impl Conn {
    pub fn new(hub: Hub, peer: String, client_cert: Option<ClientCertInfo>) -> Self {
        Self {
            hub,
            peer,
            grants: Mutex::new(Vec::new()),
            grants_changed: Notify::new(),
            cbs_replies: Replies::new(),
            management_replies: Replies::new(),
            devices: Mutex::new(HashMap::new()),
            closing: Mutex::new(None),
            close: Notify::new(),
            client_cert,
        }
    }

    /// Resolves when [`close_with`](Self::close_with) was called, with its error.
    pub async fn closed(&self) -> Option<definitions::Error> {
        self.close.notified().await;
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The connection ended: every identity it carried is offline, whether or not the peer
    /// answers the Close.
    pub fn unregister_identities(&self) {
        let devices: Vec<_> = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, presence) in devices {
            presence.unregister(&self.hub);
        }
    }

    /// Adds a verified token's grant; a grant for the same subject and scope is replaced
    /// (token renewal).
    pub fn add_grant(&self, grant: Grant) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.retain(|g| !(g.subject == grant.subject && g.scope == grant.scope));
        grants.push(grant);
        drop(grants);
        self.grants_changed.notify_one();
    }

    /// Whether the connection may act as `key`: a token for it, or a client certificate that
    /// authenticates it (checked at each attach, so a changed registration applies at once).
    pub fn may_act_as(&self, key: &IdentityKey) -> bool {
        if self.authorized(|g| g.allows_device(key)) {
            return true;
        }
        let Some(cert) = &self.client_cert else {
            return false;
        };
        match self.hub.authenticate_x509(key, cert) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(peer = %self.peer, identity = %key, error = %e.message, "amqp client certificate refused");
                false
            }
        }
    }

    /// Whether an unexpired grant satisfies `check`.
    pub fn authorized(&self, check: impl Fn(&Grant) -> bool) -> bool {
        let now = unix_now();
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|g| g.expiry > now && check(g))
    }

    /// Asks the connection to close with `error`.
    pub fn close_with(&self, error: definitions::Error) {
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        if closing.is_none() {
            *closing = Some(error);
        }
        drop(closing);
        self.close.notify_one();
    }

    /// This connection's presence for `key`, registering the identity as connected on first use
    /// (which closes any other connection of the same identity).
    pub fn presence(self: &Arc<Self>, key: &IdentityKey) -> Arc<Presence> {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = devices.get(key) {
            return Arc::clone(p);
        }
        let (presence, registration) = Presence::register(&self.hub, key);
        crate::transport::record_identity(key);
        devices.insert(key.clone(), Arc::clone(&presence));
        drop(devices);
        crate::transport::spawn(deliver_events(
            Arc::clone(self),
            Arc::clone(&presence),
            registration,
        ));
        presence
    }

    /// Waits until the earliest grant expires, then drops expired grants. Returns an error to
    /// close the connection with when a grant expired without being renewed.
    pub async fn watch_expiry(&self) -> definitions::Error {
        loop {
            let changed = self.grants_changed.notified();
            let next = self
                .grants
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|g| g.expiry)
                .min();
            match next {
                None => changed.await,
                Some(expiry) => {
                    let wait = Duration::from_secs(expiry.saturating_sub(unix_now()));
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep(wait) => {
                            let now = unix_now();
                            let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
                            if grants.iter().any(|g| g.expiry <= now) {
                                grants.clear();
                                return error(
                                    "amqp:unauthorized-access",
                                    "The SAS token expired and was not renewed on $cbs",
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An AMQP error with an IoT Hub condition symbol.
pub fn error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description.into()),
        None,
    )
}

/// Detaches a just-attached link with `error` (IoT Hub's way of refusing a link).
pub fn refuse(link: LinkEndpoint, error: definitions::Error) {
    crate::transport::spawn(async move {
        let _ = match link {
            LinkEndpoint::Sender(s) => s.close_with_error(error).await.map_err(drop),
            LinkEndpoint::Receiver(r) => r.close_with_error(error).await.map_err(drop),
        };
    });
}

/// How many outgoing messages may wait for one twin or methods link.
pub(super) const LINK_QUEUE: usize = 64;

/// One identity's links on one connection.
pub struct Presence {
    pub(super) key: IdentityKey,
    pub(super) registration_id: u64,
    /// Twin responses and desired-property notifications, for the twin receiver link.
    pub(super) twin_out: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    /// Method requests, for the methods receiver link.
    pub(super) methods_out: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    /// Whether the device asked for desired-property notifications (twin `PUT`).
    pub(super) desired: AtomicBool,
    /// [`Feature`] bits on, for the hub's "can this identity receive …" checks.
    pub(super) features: AtomicU8,
    /// Woken when cloud-to-device messages are queued.
    pub(super) c2d: Notify,
    /// Cleared when the connection ends: links closing after that change nothing.
    pub(super) active: AtomicBool,
}

impl Presence {
    /// Registers `key` as connected (closing any other connection of it).
    pub fn register(hub: &Hub, key: &IdentityKey) -> (Arc<Self>, Registration) {
        let registration = hub.connections().register(key);
        hub.registry().set_connected(key, true, None);
        // What an AMQP client receives follows its links, not an earlier session.
        hub.set_session(key, 0);
        let presence = Arc::new(Self {
            key: key.clone(),
            registration_id: registration.id,
            twin_out: Mutex::new(None),
            methods_out: Mutex::new(None),
            desired: AtomicBool::new(false),
            features: AtomicU8::new(0),
            c2d: Notify::new(),
            active: AtomicBool::new(true),
        });
        (presence, registration)
    }

    /// The connection ended: the identity is disconnected, unless a newer connection took over.
    pub fn unregister(&self, hub: &Hub) {
        self.active.store(false, Ordering::Release);
        if hub
            .connections()
            .unregister(&self.key, self.registration_id)
        {
            hub.registry().set_connected(&self.key, false, None);
            hub.set_session(&self.key, 0);
        }
    }

    pub(super) fn set_feature(&self, hub: &Hub, feature: Feature, on: bool) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let bits = if on {
            self.features.fetch_or(feature.bit(), Ordering::AcqRel) | feature.bit()
        } else {
            self.features.fetch_and(!feature.bit(), Ordering::AcqRel) & !feature.bit()
        };
        hub.set_session(&self.key, bits);
    }

    pub(super) fn send_on(
        slot: &Mutex<Option<mpsc::Sender<AmqpMessage>>>,
        message: AmqpMessage,
    ) -> bool {
        let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().is_some_and(|tx| tx.try_send(message).is_ok())
    }

    /// Hands one hub event to the link that carries it.
    fn deliver(&self, hub: &Hub, event: Outbound) {
        match event {
            Outbound::DesiredPatch(patch) => {
                if self.desired.load(Ordering::Acquire)
                    && Self::send_on(&self.twin_out, data_message(patch.to_string()))
                {
                    Metrics::count(&hub.metrics().desired_pushes);
                }
            }
            Outbound::MethodRequest(request) => {
                Self::send_on(&self.methods_out, method_request(&request));
            }
            Outbound::CloudToDevice => self.c2d.notify_one(),
        }
    }
}

/// Forwards the hub's events for one identity to its links until the connection ends; closes
/// the connection when the hub says so (another connection took over, identity deleted).
pub async fn deliver_events(
    conn: Arc<Conn>,
    presence: Arc<Presence>,
    mut registration: Registration,
) {
    loop {
        tokio::select! {
            event = registration.events.recv() => match event {
                Some(event) => presence.deliver(&conn.hub, event),
                None => break,
            },
            () = registration.close.notified() => {
                conn.close_with(error(
                    "amqp:connection:forced",
                    format!("The connection of {} was closed by the hub (a newer connection, or the identity was deleted or disabled)", presence.key),
                ));
                break;
            }
        }
    }
}

/// Sends messages from `rx` on `sender` until either ends. Messages go out unsettled or
/// settled as the link negotiated, without waiting for each one's outcome.
pub async fn pump(mut sender: Sender, rx: &mut mpsc::Receiver<AmqpMessage>) {
    loop {
        let next = tokio::select! {
            message = rx.recv() => message,
            _ = sender.on_detach() => None,
        };
        let Some(message) = next else { break };
        let sendable = Sendable::builder().message(message).build();
        if sender.send_batchable(sendable).await.is_err() {
            break;
        }
    }
    let _ = sender.close().await;
}
