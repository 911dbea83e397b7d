//! One AMQP connection: protocol header and SASL, then sessions, then links, each link a
//! task of its own, handed by its address to the handler of that node ([`super::device`],
//! [`super::service`], [`super::eventhub`]). What the links share lives in [`super::link`],
//! below the handlers: this file is the only one that knows them all.

use super::cbs::Sasl;
use super::frames::FullFrames;
use super::link::{error, refuse, Conn};
use super::{address, device, eventhub, service};
use crate::hub::Hub;
use crate::tls::ClientCertInfo;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SessionAcceptor, SupportedReceiverSettleModes,
};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::TargetArchetype;
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a client has to send its protocol header and complete SASL and Open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the hub waits for the peer's Close reply before dropping the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame accepted (IoT Hub's 256 KB message limit plus headers).
pub const MAX_FRAME_SIZE: u32 = 256 * 1024 + 16 * 1024;
/// Idle time-out announced in Open (IoT Hub announces 4 minutes).
const IDLE_TIMEOUT_MS: u32 = 240_000;
/// Most sessions (channels) and links per session per connection.
const CHANNEL_MAX: u16 = 255;
const HANDLE_MAX: u32 = 255;

/// Serves one connection, from its first byte to its end.
pub async fn run<S>(hub: Hub, mut stream: S, peer: String, client_cert: Option<ClientCertInfo>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout(OPEN_TIMEOUT, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    // "AMQP", protocol id (0 AMQP, 3 SASL), version 1.0.0. Anything else gets the header we
    // support, and the connection ends (AMQP 1.0 §2.2).
    let sasl = match header {
        [b'A', b'M', b'Q', b'P', 0, 1, 0, 0] => false,
        [b'A', b'M', b'Q', b'P', 3, 1, 0, 0] => true,
        _ => {
            tracing::info!(%peer, "refused an AMQP connection with an unsupported protocol header");
            let _ = stream.write_all(b"AMQP\x03\x01\x00\x00").await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let io = FullFrames::with_prefix(stream, &header);
    let sasl_acceptor = Sasl::new(hub.clone());
    let builder = ConnectionAcceptor::builder()
        .container_id(format!("iothub-emulator-{}", hub.event_hub_name()))
        .max_frame_size(MAX_FRAME_SIZE)
        .channel_max(CHANNEL_MAX)
        .idle_time_out(IDLE_TIMEOUT_MS);
    let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
        if sasl {
            builder
                .sasl_acceptor(sasl_acceptor.clone())
                .build()
                .accept(io)
                .await
        } else {
            builder.build().accept(io).await
        }
    })
    .await;
    let mut connection = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "AMQP connection not opened");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "AMQP connection not opened in time");
            return;
        }
    };
    tracing::info!(%peer, sasl, "amqp connection opened");
    crate::metrics::Metrics::count(&hub.metrics().amqp_connections);

    let conn = Arc::new(Conn::new(hub, peer, client_cert));
    if let Some(grant) = sasl_acceptor
        .granted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        conn.add_grant(grant);
    }

    let closing = serve_sessions(&conn, &mut connection).await;
    // The identities are offline from here, whether or not the peer answers the Close.
    conn.unregister_identities();
    let close = async {
        match closing {
            Some(e) => {
                tracing::info!(peer = %conn.peer, error = ?e.description, "closing amqp connection");
                let _ = connection.close_with_error(e).await;
            }
            None => {
                let _ = connection.close().await;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    tracing::info!(peer = %conn.peer, "amqp connection closed");
}

/// Accepts sessions until the peer closes or the connection must close; returns the error to
/// close with, if any.
async fn serve_sessions(
    conn: &Arc<Conn>,
    connection: &mut ListenerConnectionHandle,
) -> Option<definitions::Error> {
    let session_acceptor = SessionAcceptor::builder().handle_max(HANDLE_MAX).build();
    loop {
        tokio::select! {
            session = session_acceptor.accept(connection) => match session {
                Ok(session) => {
                    crate::transport::spawn(serve_links(Arc::clone(conn), session));
                }
                Err(e) => {
                    tracing::debug!(peer = %conn.peer, error = %e, "amqp connection ended");
                    return None;
                }
            },
            e = conn.closed() => return e,
            e = conn.watch_expiry() => return Some(e),
        }
    }
}

/// Accepts the links of one session, each into its own task.
async fn serve_links(conn: Arc<Conn>, mut session: ListenerSessionHandle) {
    // Receivers settle first, as IoT Hub does: a client asking for `second` (uamqp) is
    // answered with `first` in the attach, and each delivery is settled with its outcome.
    let acceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .max_message_size(u64::from(MAX_FRAME_SIZE) * 4)
        .build();
    while let Some(mut attach) = session.next_incoming_attach().await {
        let address = node_address(&attach);
        let role = attach.role.clone();
        let node = address.as_deref().and_then(address::parse);
        // An attach without a source or target is answered like any refused link, attached
        // and at once detached with the reason; the engine would instead wait for the client's
        // detach, holding up every later attach of the session.
        let missing = missing_terminus(&mut attach);
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(link) => link,
            Err(e) => {
                tracing::info!(peer = %conn.peer, error = %e, "amqp link refused");
                if is_duplicate_name(&e) {
                    // The engine keeps one link per name in a session, whatever the role, and
                    // has no way to answer the attach itself: end the session with the reason,
                    // so the client hears why instead of waiting for an attach that never comes.
                    let reason = error(
                        "amqp:invalid-field",
                        "A link of this name is already attached in this session; link names must be unique within a session",
                    );
                    let _ = session.end_with_error(reason).await;
                    return;
                }
                continue;
            }
        };
        if let Some(which) = missing {
            refuse(
                link,
                error("amqp:invalid-field", format!("The attach has no {which}")),
            );
            continue;
        }
        let Some(node) = node else {
            tracing::info!(peer = %conn.peer, ?address, "amqp link to an unknown address");
            refuse(
                link,
                error(
                    "amqp:not-found",
                    format!("No node at address {}", address.unwrap_or_default()),
                ),
            );
            continue;
        };
        tracing::debug!(peer = %conn.peer, ?node, ?role, "amqp link attached");
        route(&conn, node, link);
    }
    let _ = session.on_end().await;
}

/// Gives an attach without a source or target an empty one, so the engine can attach it, and
/// says which was missing.
fn missing_terminus(attach: &mut Attach) -> Option<&'static str> {
    let missing = match (&attach.source, &attach.target) {
        (None, _) => "source",
        (_, None) => "target",
        _ => return None,
    };
    attach.source.get_or_insert_with(Box::default);
    attach
        .target
        .get_or_insert_with(|| Box::new(TargetArchetype::Target(Default::default())));
    Some(missing)
}

fn is_duplicate_name(e: &fe2o3_amqp::acceptor::error::AcceptorAttachError) -> bool {
    use fe2o3_amqp::acceptor::error::AcceptorAttachError as E;
    use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
    matches!(
        e,
        E::LocalSender(SenderAttachError::DuplicatedLinkName)
            | E::LocalReceiver(ReceiverAttachError::DuplicatedLinkName)
    )
}

/// The address a link attaches to: the target when the client sends, the source when it
/// receives.
fn node_address(attach: &Attach) -> Option<String> {
    match attach.role {
        Role::Sender => match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            _ => None,
        },
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
    }
}

/// Hands an attached link to the task for its node.
fn route(conn: &Arc<Conn>, node: address::Node, link: LinkEndpoint) {
    use address::Node;
    let conn = Arc::clone(conn);
    match (node, link) {
        (Node::Cbs, LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(service::cbs_requests(conn, r));
        }
        (Node::Cbs, LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(async move { conn.cbs_replies.serve(s).await });
        }
        (Node::Management, LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(eventhub::management_requests(conn, r));
        }
        (Node::Management, LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(async move { conn.management_replies.serve(s).await });
        }
        (Node::ServiceBound, LinkEndpoint::Receiver(r)) => {
            crate::transport::spawn(service::cloud_to_device_send(conn, r));
        }
        (Node::Feedback, LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(service::feedback(conn, s));
        }
        (Node::FileNotifications, LinkEndpoint::Sender(s)) => {
            crate::transport::spawn(service::file_notifications(conn, s));
        }
        (
            Node::Partition {
                entity,
                group,
                partition,
            },
            LinkEndpoint::Sender(s),
        ) => {
            crate::transport::spawn(eventhub::partition(conn, s, entity, group, partition));
        }
        (Node::EventsRedirect(rest), link) => {
            let error = if conn.authorized(|g| g.allows_event_hub(conn.hub.event_hub_name())) {
                redirect(&conn.hub, &rest)
            } else {
                error(
                    "amqp:unauthorized-access",
                    "Unauthorized: connect with a token of a policy with ServiceConnect",
                )
            };
            refuse(link, error);
        }
        (node, link) => device::route(conn, node, link),
    }
}

/// IoT Hub's answer to a link on `messages/events`: `amqp:link:redirect` to the same path on
/// the Event Hub-compatible endpoint, with `hostname`, `network-host`, `port` and `address` in
/// the error's info (AMQP 1.0 §2.8.17), as uamqp and the Event Hubs SDKs read it.
fn redirect(hub: &Hub, rest: &str) -> definitions::Error {
    let host = hub.hostname();
    let address = if rest.is_empty() {
        format!("amqps://{host}/{}", hub.event_hub_name())
    } else {
        format!("amqps://{host}/{}/{rest}", hub.event_hub_name())
    };
    let mut info = definitions::Fields::new();
    for (k, v) in [
        ("hostname", Value::String(host.to_owned())),
        ("network-host", Value::String(host.to_owned())),
        ("port", Value::Int(i32::from(hub.amqp_port()))),
        ("address", Value::String(address.clone())),
    ] {
        info.insert(Symbol::from(k), v);
    }
    definitions::Error::new(
        ErrorCondition::LinkError(definitions::LinkError::Redirect),
        Some(format!("Use the Event Hub-compatible endpoint: {address}")),
        Some(info),
    )
}
