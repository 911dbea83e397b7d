//! The service side over AMQP: `$cbs` put-token, cloud-to-device send on
//! `/messages/devicebound`, delivery feedback on `/messages/serviceBound/feedback` and file
//! upload notifications on `/messages/serviceBound/filenotifications`.

use super::cbs::verify_token;
use super::link::{error, Conn};
use super::message::{
    body_bytes, cloud_message_of, data_message, property_text, status_reply, AmqpMessage,
};
use crate::c2d::MAX_MESSAGE_BYTES;
use crate::error::HubError;
use crate::outbox::Outbox;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::{AmqpValue, Body, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Receiver, Sender};
use std::collections::HashMap;
use std::sync::Arc;

/// `$cbs` put-token requests: the token in the body is verified and, if good, becomes a grant
/// of this connection. The reply carries `status-code` as an AMQP int (uamqp reads nothing
/// else) and the request's `message_id` as `correlation_id`, with its AMQP type kept.
pub async fn cbs_requests(conn: Arc<Conn>, mut receiver: Receiver) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let message = delivery.message();
        let operation = property_text(message, "operation");
        let token = match &message.body {
            Body::Value(AmqpValue(Value::String(s))) => Some(s.clone()),
            body @ Body::Data(_) => String::from_utf8(body_bytes(body).to_vec()).ok(),
            _ => None,
        };
        let (status, description) = match (operation.as_deref(), token) {
            (Some("put-token"), Some(token)) => match verify_token(&conn.hub, &token) {
                Ok(grant) => {
                    tracing::info!(peer = %conn.peer, subject = ?grant.subject, "amqp token accepted");
                    conn.add_grant(grant);
                    (200, "OK".to_owned())
                }
                Err(e) => {
                    tracing::info!(peer = %conn.peer, error = %e.message, "amqp token refused");
                    (401, e.message)
                }
            },
            (Some("put-token"), None) => (
                400,
                "The put-token body must be the token as a string".to_owned(),
            ),
            (op, _) => (
                400,
                format!("Unsupported $cbs operation {}", op.unwrap_or("(none)")),
            ),
        };
        if receiver.accept(&delivery).await.is_err() {
            break;
        }
        let correlation = message
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        conn.cbs_replies
            .send(status_reply(correlation, status, &description, Value::Null));
    }
    let _ = receiver.close().await;
}

/// The AMQP error for a hub error: IoT Hub's condition for its status, the IoT Hub error code
/// and message in the description.
pub fn hub_error(e: &HubError) -> definitions::Error {
    let condition = match e.code.status() {
        401 => "amqp:unauthorized-access",
        403 => "amqp:resource-limit-exceeded",
        404 => "amqp:not-found",
        413 => "amqp:link:message-size-exceeded",
        400 => "com.microsoft:argument-error",
        _ => "amqp:internal-error",
    };
    error(condition, format!("{}: {}", e.code.number(), e.message))
}

/// `/messages/devicebound`: the service sends cloud-to-device messages, each addressed by
/// its `to` property (`/devices/{id}/messages/devicebound`). A message is accepted once it
/// is in the device's queue, and rejected with IoT Hub's condition otherwise (unknown device,
/// queue full, too large).
pub async fn cloud_to_device_send(conn: Arc<Conn>, mut receiver: Receiver) {
    if !conn.authorized(|g| g.allows_service()) {
        let _ = receiver
            .close_with_error(error(
                "amqp:unauthorized-access",
                "Sending cloud-to-device messages needs a token of a policy with ServiceConnect on $cbs",
            ))
            .await;
        return;
    }
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "cloud-to-device link ended");
                break;
            }
        };
        let message = delivery.message();
        let outcome = enqueue(&conn, message);
        let settled = match outcome {
            Ok(()) => receiver.accept(&delivery).await,
            Err(e) => {
                tracing::info!(peer = %conn.peer, error = ?e.description, "cloud-to-device message refused");
                receiver.reject(&delivery, Some(e)).await
            }
        };
        if settled.is_err() {
            break;
        }
    }
    let _ = receiver.close().await;
}

fn enqueue(conn: &Conn, message: &AmqpMessage) -> Result<(), definitions::Error> {
    let to = message.properties.as_ref().and_then(|p| p.to.clone());
    let Some(super::address::Node::DeviceBound(device)) =
        to.as_deref().and_then(super::address::parse)
    else {
        return Err(error(
            "com.microsoft:argument-error",
            format!(
                "The message's 'to' must be /devices/{{deviceId}}/messages/devicebound, not {}",
                to.as_deref().unwrap_or("(none)")
            ),
        ));
    };
    let cloud = cloud_message_of(message);
    let size = cloud.body.len()
        + cloud
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
            .sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(error(
            "amqp:link:message-size-exceeded",
            format!("The message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"),
        ));
    }
    if let Some(ack) = &cloud.ack {
        if !["full", "positive", "negative", "none"].contains(&ack.as_str()) {
            return Err(error(
                "com.microsoft:argument-error",
                "iothub-ack must be full, positive, negative or none",
            ));
        }
    }
    conn.hub.send_c2d(&device, cloud).map_err(|e| hub_error(&e))
}

/// `/messages/serviceBound/feedback`: delivery feedback records, a JSON array per message
/// (a data section: the Node SDK reads `body.content`).
pub async fn feedback(conn: Arc<Conn>, sender: Sender) {
    let outbox = conn.hub.feedback();
    serve_outbox(&conn, sender, outbox, FEEDBACK).await;
}

/// `/messages/serviceBound/filenotifications`: file upload notifications, one JSON object
/// per message.
pub async fn file_notifications(conn: Arc<Conn>, sender: Sender) {
    let outbox = conn.hub.file_uploads().notifications();
    serve_outbox(&conn, sender, outbox, FILE_NOTIFICATIONS).await;
}

/// How one service-bound queue's records travel.
struct Shape {
    what: &'static str,
    /// Most records in one message; 1 sends each record alone (not in an array).
    batch: usize,
    content_type: &'static str,
}

const FEEDBACK: Shape = Shape {
    what: "feedback",
    batch: 64,
    content_type: "application/vnd.microsoft.iothub.feedback.json",
};

const FILE_NOTIFICATIONS: Shape = Shape {
    what: "file upload notifications",
    batch: 1,
    content_type: "application/json",
};

/// Sends a service-bound queue's records, unsettled, as they arrive, without waiting for one
/// to be settled before sending the next (a receiver may hold messages it does not want).
/// `accepted` and `rejected` records leave the queue; `released` or `modified` ones, and the
/// ones still unsettled when the link goes, are queued again for the next receiver.
async fn serve_outbox(conn: &Conn, mut sender: Sender, outbox: &Outbox, shape: Shape) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    if !conn.authorized(|g| g.allows_service()) {
        let _ = sender
            .close_with_error(error(
                "amqp:unauthorized-access",
                format!(
                    "Receiving {} needs a token of a policy with ServiceConnect on $cbs",
                    shape.what
                ),
            ))
            .await;
        return;
    }
    let mut unsettled: HashMap<u64, Vec<serde_json::Value>> = HashMap::new();
    let mut outcomes = FuturesUnordered::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            batch = outbox.take(shape.batch) => {
                let body = if shape.batch == 1 && batch.len() == 1 {
                    batch[0].to_string()
                } else {
                    serde_json::Value::Array(batch.clone()).to_string()
                };
                let mut message = data_message(body);
                message.properties = Some(Properties {
                    message_id: Some(MessageId::String(format!(
                        "{:032x}",
                        rand::random::<u128>()
                    ))),
                    content_type: Some(Symbol::from(shape.content_type)),
                    ..Properties::default()
                });
                let sendable = Sendable::builder().message(message).settled(false).build();
                match sender.send_batchable(sendable).await {
                    Ok(delivery) => {
                        let id = next_id;
                        next_id += 1;
                        unsettled.insert(id, batch);
                        outcomes.push(async move { (id, delivery.await) });
                    }
                    Err(_) => {
                        outbox.give_back(batch);
                        break;
                    }
                }
            }
            Some((id, outcome)) = outcomes.next(), if !outcomes.is_empty() => {
                let Some(batch) = unsettled.remove(&id) else { continue };
                match outcome {
                    Ok(Outcome::Accepted(_) | Outcome::Rejected(_)) => {}
                    _ => outbox.give_back(batch),
                }
            }
            _ = sender.on_detach() => break,
        }
    }
    for (_, batch) in unsettled {
        outbox.give_back(batch);
    }
    let _ = sender.close().await;
}
