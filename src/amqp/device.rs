//! Device and module links (`shared/protocol-amqp.md`, "Link addresses and message shapes"):
//! telemetry in, cloud-to-device out with settlement, twin requests and responses with
//! desired-property notifications, direct-method requests and responses.
//!
//! An identity with links on a connection has a [`Presence`] there: it is registered with the
//! hub's [`crate::connections::Connections`] like an MQTT connection, so the service side
//! (REST twin writes, method calls, cloud-to-device sends) reaches it through the same queue,
//! and [`deliver_events`] hands each event to the link that carries it.

use super::address::Node;
use super::link::{error, pump, refuse, Conn, Presence, LINK_QUEUE};
use super::message::{
    annotation_text, body_bytes, data_message, device_message_of, id_text, parse_uuid,
    property_text, telemetry_of, AmqpMessage,
};
use crate::c2d::Settlement;
use crate::connections::Feature;
use crate::error::HubError;
use crate::metrics::Metrics;
use crate::registry::IdentityKey;
use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::{Body, MessageAnnotations, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol, Uuid, Value};
use fe2o3_amqp::{Receiver, Sender};
use serde_json::Value as Json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Starts the task of a device or module link, once the connection holds a grant for it.
pub fn route(conn: Arc<Conn>, node: Node, link: LinkEndpoint) {
    let key = match &node {
        Node::Events(k) | Node::Twin(k) | Node::Methods(k) => k.clone(),
        Node::DeviceBound(d) => IdentityKey::device(d.clone()),
        _ => {
            refuse(
                link,
                error(
                    "amqp:not-found",
                    format!("{node:?} cannot be attached in this direction"),
                ),
            );
            return;
        }
    };
    if !conn.may_act_as(&key) {
        tracing::info!(peer = %conn.peer, identity = %key, "amqp link refused: no token for it");
        refuse(
            link,
            error(
                "amqp:unauthorized-access",
                format!("Unauthorized: put a valid SAS token for {key} on $cbs before attaching its links, or connect with a client certificate that authenticates it"),
            ),
        );
        return;
    }
    let presence = conn.presence(&key);
    match (node, link) {
        (Node::Events(_), LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(telemetry(conn, presence, r));
        }
        (Node::Events(_), LinkEndpoint::Sender(s)) => {
            // A module's input messages: the link stays open; routing to inputs is not built.
            crate::transport::spawn(hold(s));
        }
        (Node::DeviceBound(_), LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(cloud_to_device(conn, presence, s));
        }
        (Node::Twin(_), LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(twin_requests(conn, presence, r));
        }
        (Node::Twin(_), LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(outgoing(conn, presence, s, Feature::TwinResponses));
        }
        (Node::Methods(_), LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(outgoing(conn, presence, s, Feature::Methods));
        }
        (Node::Methods(_), LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(method_responses(conn, presence, r));
        }
        (node, link) => refuse(
            link,
            error(
                "amqp:not-found",
                format!("{node:?} cannot be attached in this direction"),
            ),
        ),
    }
}

/// Holds a link open until the client detaches it.
async fn hold(mut sender: Sender) {
    let _ = sender.on_detach().await;
    let _ = sender.close().await;
}

/// The twin or methods link the client receives on: responses and notifications, or method
/// requests, go out through it.
async fn outgoing(conn: Arc<Conn>, presence: Arc<Presence>, sender: Sender, feature: Feature) {
    let (tx, mut rx) = mpsc::channel(LINK_QUEUE);
    let slot = match feature {
        Feature::Methods => &presence.methods_out,
        _ => &presence.twin_out,
    };
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    presence.set_feature(&conn.hub, feature, true);
    pump(sender, &mut rx).await;
    presence.set_feature(&conn.hub, feature, false);
    if feature == Feature::TwinResponses {
        presence.set_feature(&conn.hub, Feature::DesiredPatches, false);
        presence.desired.store(false, Ordering::Release);
    }
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Device-to-cloud messages: recorded in the telemetry log (and so on the Event
/// Hub-compatible endpoint), then accepted. A message over 256 KB is rejected.
async fn telemetry(conn: Arc<Conn>, presence: Arc<Presence>, mut receiver: Receiver) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let started = std::time::Instant::now();
        let incoming = telemetry_of(delivery.message());
        let result = conn.hub.ingest(&presence.key, "SAS", incoming);
        let settled = match result {
            Ok(_) => {
                conn.hub.registry().touch(&presence.key);
                receiver.accept(&delivery).await
            }
            Err(e) => {
                receiver
                    .reject(
                        &delivery,
                        Some(error("amqp:link:message-size-exceeded", e.to_string())),
                    )
                    .await
            }
        };
        conn.hub
            .metrics()
            .device_op(crate::metrics::DeviceOp::Telemetry, started.elapsed());
        if settled.is_err() {
            break;
        }
    }
    let _ = receiver.close().await;
}

/// Cloud-to-device messages for a device: each queued message is sent unsettled and its
/// outcome settles it in the queue (`accepted` completes, `rejected` drops, `released` or
/// `modified` abandons it for another delivery).
async fn cloud_to_device(conn: Arc<Conn>, presence: Arc<Presence>, mut sender: Sender) {
    let hub = &conn.hub;
    let device = presence.key.device_id.clone();
    presence.set_feature(hub, Feature::CloudToDevice, true);
    'link: loop {
        let queued = presence.c2d.notified();
        tokio::pin!(queued);
        queued.as_mut().enable();
        let pending = hub
            .registry()
            .pending_c2d(&device, &std::collections::HashSet::new());
        if pending.is_empty() {
            tokio::select! {
                () = queued => continue,
                _ = sender.on_detach() => break,
            }
        }
        for message in pending {
            Metrics::count(&hub.metrics().c2d_delivered);
            let sendable = Sendable::builder()
                .message(device_message_of(&message, &device))
                .settled(false)
                .build();
            let Ok(delivery) = sender.send_batchable(sendable).await else {
                break 'link;
            };
            // Wait for the device's outcome, or for it to detach with the message unsettled
            // (it then stays queued for the next connection, and the detach is answered).
            let outcome = tokio::select! {
                outcome = delivery => outcome,
                _ = sender.on_detach() => break 'link,
            };
            let how = match outcome {
                Ok(Outcome::Accepted(_)) => Settlement::Completed,
                Ok(Outcome::Rejected(_)) => Settlement::Rejected,
                Ok(_) => Settlement::Abandoned,
                Err(_) => break 'link,
            };
            hub.settle_c2d(&device, message.lock_token, how);
        }
    }
    presence.set_feature(hub, Feature::CloudToDevice, false);
    let _ = sender.close().await;
}

/// Twin requests: `GET`, `PATCH /properties/reported`, and `PUT`/`DELETE
/// /notifications/twin/properties/desired` (subscribe/unsubscribe). Each gets a response with
/// the request's `correlation_id` and `status` (and `version`) annotations.
async fn twin_requests(conn: Arc<Conn>, presence: Arc<Presence>, mut receiver: Receiver) {
    const DESIRED: &str = "/notifications/twin/properties/desired";
    let hub = &conn.hub;
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let message = delivery.message();
        let operation = annotation_text(message, "operation");
        let resource = annotation_text(message, "resource");
        let correlation = message
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone());
        let started = std::time::Instant::now();
        let result: Result<(u16, Option<Json>, Option<u64>), HubError> =
            match (operation.as_deref(), resource.as_deref()) {
                (Some("GET"), _) => hub
                    .registry()
                    .device_twin(&presence.key)
                    .map(|twin| (200, Some(twin), None)),
                (Some("PATCH"), Some("/properties/reported")) => {
                    match crate::twin::parse_json(&body_bytes(&message.body)) {
                        Ok(Json::Object(patch)) => hub
                            .registry()
                            .patch_reported(&presence.key, &patch)
                            .map(|version| (204, None, Some(version))),
                        Ok(_) => Err(HubError::invalid(
                            "The reported-properties patch must be a JSON object",
                        )),
                        Err(e) => Err(HubError::invalid(format!(
                            "The reported-properties patch {e}"
                        ))),
                    }
                }
                (Some("PUT"), Some(DESIRED)) => {
                    presence.desired.store(true, Ordering::Release);
                    presence.set_feature(hub, Feature::DesiredPatches, true);
                    Ok((200, None, None))
                }
                (Some("DELETE"), Some(DESIRED)) => {
                    presence.desired.store(false, Ordering::Release);
                    presence.set_feature(hub, Feature::DesiredPatches, false);
                    Ok((200, None, None))
                }
                _ => Err(HubError::invalid(format!(
                    "Unsupported twin operation {} on resource {}",
                    operation.as_deref().unwrap_or("(none)"),
                    resource.as_deref().unwrap_or("(none)")
                ))),
            };
        if receiver.accept(&delivery).await.is_err() {
            break;
        }
        let op = if operation.as_deref() == Some("PATCH") {
            crate::metrics::DeviceOp::ReportedPatch
        } else {
            crate::metrics::DeviceOp::TwinGet
        };
        hub.metrics().device_op(op, started.elapsed());
        hub.registry().touch(&presence.key);
        let (status, body, version) = match result {
            Ok(r) => r,
            Err(e) => (e.code.status(), Some(e.device_body()), None),
        };
        let reply = twin_response(correlation, status, version, body);
        Presence::send_on(&presence.twin_out, reply);
    }
    let _ = receiver.close().await;
}

fn twin_response(
    correlation: Option<MessageId>,
    status: u16,
    version: Option<u64>,
    body: Option<Json>,
) -> AmqpMessage {
    let mut message = data_message(body.map(|b| b.to_string()).unwrap_or_default());
    let mut annotations = OrderedMap::new();
    annotations.insert(Symbol::from("status").into(), Value::Int(i32::from(status)));
    if let Some(v) = version {
        annotations.insert(Symbol::from("version").into(), Value::Long(v as i64));
    }
    message.message_annotations = Some(MessageAnnotations(annotations));
    message.properties = Some(Properties {
        correlation_id: correlation,
        ..Properties::default()
    });
    message
}

/// The request id a method response answers: the UUID we sent (or its text), or an id as
/// text.
fn request_id(correlation: &MessageId) -> String {
    let from_uuid = |u: &Uuid| {
        let b = u.as_inner();
        let mut low = [0u8; 8];
        low.copy_from_slice(&b[8..]);
        u64::from_be_bytes(low).to_string()
    };
    match correlation {
        MessageId::Uuid(u) => from_uuid(u),
        MessageId::String(s) => parse_uuid(s).map_or_else(|| s.clone(), |u| from_uuid(&u)),
        other => id_text(other),
    }
}

/// Method responses: `IoThub-status` and a JSON body, matched to the call by `correlation_id`.
async fn method_responses(conn: Arc<Conn>, presence: Arc<Presence>, mut receiver: Receiver) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let message = delivery.message();
        let rid = message
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(request_id);
        let status = property_text(message, "IoThub-status").and_then(|s| s.parse::<i32>().ok());
        match (rid, status) {
            (Some(rid), Some(status)) => {
                let started = std::time::Instant::now();
                conn.hub.methods().complete(
                    &presence.key,
                    &rid,
                    status,
                    &body_bytes(&message.body),
                );
                conn.hub.registry().touch(&presence.key);
                conn.hub
                    .metrics()
                    .device_op(crate::metrics::DeviceOp::MethodResponse, started.elapsed());
                if receiver.accept(&delivery).await.is_err() {
                    break;
                }
            }
            _ => {
                let refused = receiver
                    .reject(
                        &delivery,
                        Some(error(
                            "com.microsoft:argument-error",
                            "A method response needs a correlation_id and an integer IoThub-status property",
                        )),
                    )
                    .await;
                if refused.is_err() {
                    break;
                }
            }
        }
    }
    let _ = receiver.close().await;
}
