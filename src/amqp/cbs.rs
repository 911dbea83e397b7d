//! Authentication on AMQP: SASL, and claims-based security (CBS) `put-token` on `$cbs`
//! (`shared/protocol-amqp.md`, "SASL and CBS").
//!
//! Every client ends up presenting SAS tokens, checked by the same [`Hub`] code as MQTT and
//! REST. A verified token becomes a [`Grant`] on the connection; each link is authorised
//! against the connection's unexpired grants when it attaches.
//! - SASL `ANONYMOUS` (pyamqp) and `MSSBCBS` (uamqp) authenticate nobody: tokens follow on
//!   `$cbs`. Node sends no SASL layer at all, which `super` accepts too.
//! - SASL `PLAIN` carries a token as the password (IoT Hub's `{policy}@sas.root.{hub}` or
//!   `{device}@sas.{hub}` user names); the token alone decides who is authenticated.

use crate::auth::{Permission, Permissions, SasToken};
use crate::error::{HubError, HubResult};
use crate::hub::Hub;
use crate::registry::IdentityKey;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use std::sync::{Arc, Mutex};

/// Who a verified token authenticates, and for how long.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: Subject,
    /// The token's `sr` path segments under the host (e.g. `["devices", "d"]`).
    pub scope: Vec<String>,
    /// Unix seconds.
    pub expiry: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// A device or module token, signed with its own key.
    Identity(IdentityKey),
    /// A shared access policy token.
    Policy {
        name: String,
        permissions: Permissions,
    },
}

impl Grant {
    /// Whether this grant lets a client act as `key` (device links).
    pub fn allows_device(&self, key: &IdentityKey) -> bool {
        match &self.subject {
            Subject::Identity(k) => k == key,
            Subject::Policy { permissions, .. } => {
                let mut path = vec!["devices", key.device_id.as_str()];
                if let Some(m) = &key.module_id {
                    path.extend(["modules", m.as_str()]);
                }
                permissions.has(Permission::DeviceConnect) && covers(&self.scope, &path)
            }
        }
    }

    /// Whether this grant allows service-side operations (cloud-to-device send, feedback).
    pub fn allows_service(&self) -> bool {
        matches!(&self.subject, Subject::Policy { permissions, .. }
            if permissions.has(Permission::ServiceConnect) && self.scope.is_empty())
    }

    /// Whether this grant allows reading the Event Hub-compatible endpoint `entity`.
    pub fn allows_event_hub(&self, entity: &str) -> bool {
        matches!(&self.subject, Subject::Policy { permissions, .. }
            if permissions.has(Permission::ServiceConnect)
                && self.scope.first().is_none_or(|e| e.eq_ignore_ascii_case(entity)))
    }
}

fn covers(scope: &[String], path: &[&str]) -> bool {
    scope.len() <= path.len() && scope.iter().zip(path).all(|(a, b)| a == b)
}

/// Verifies a SAS token presented over AMQP (CBS or SASL PLAIN) and says what it grants.
///
/// Tokens for the Event Hub-compatible endpoint (`sr=sb://…`) are signed Service Bus style,
/// with the policy key's base64 text as the HMAC key (trap 6); all others with the decoded key.
pub fn verify_token(hub: &Hub, text: &str) -> HubResult<Grant> {
    let token = SasToken::parse(text).map_err(crate::hub::sas_error)?;
    let resource = token.resource().map_err(crate::hub::sas_error)?;
    let subject = match token.policy() {
        Some(name) => {
            let policy = hub.verify_policy_token(&token, token.is_service_bus_style())?;
            Subject::Policy {
                name: name.to_owned(),
                permissions: policy.permissions,
            }
        }
        None => {
            let key = match resource.segments.as_slice() {
                [d, id] if d == "devices" => IdentityKey::device(id.clone()),
                [d, id, m, module] if d == "devices" && m == "modules" => {
                    IdentityKey::module(id.clone(), module.clone())
                }
                _ => {
                    return Err(HubError::unauthorized(
                        "A token without skn must be scoped to one device or module (sr=<host>/devices/<id>[/modules/<id>])",
                    ))
                }
            };
            hub.authenticate_device(&key, text)?;
            Subject::Identity(key)
        }
    };
    Ok(Grant {
        subject,
        scope: resource.segments,
        expiry: token.expiry(),
    })
}

/// The SASL mechanisms IoT Hub's AMQP endpoint offers.
pub const MSSBCBS: &str = "MSSBCBS";
pub const ANONYMOUS: &str = "ANONYMOUS";
pub const PLAIN: &str = "PLAIN";

/// One connection's SASL negotiation. A PLAIN login leaves its grant in `granted`.
#[derive(Clone)]
pub struct Sasl {
    hub: Hub,
    pub granted: Arc<Mutex<Option<Grant>>>,
}

impl Sasl {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            granted: Arc::default(),
        }
    }

    fn plain(&self, response: &[u8]) -> SaslCode {
        // authzid NUL authcid NUL password
        let mut parts = response.split(|b| *b == 0);
        let (Some(_), Some(_user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return SaslCode::Auth;
        };
        let Ok(password) = std::str::from_utf8(password) else {
            return SaslCode::Auth;
        };
        match verify_token(&self.hub, password) {
            Ok(grant) => {
                *self.granted.lock().unwrap_or_else(|p| p.into_inner()) = Some(grant);
                SaslCode::Ok
            }
            Err(e) => {
                tracing::info!(error = %e.message, "SASL PLAIN refused");
                SaslCode::Auth
            }
        }
    }
}

impl SaslAcceptor for Sasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from(MSSBCBS),
            Symbol::from(ANONYMOUS),
            Symbol::from(PLAIN),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.0.as_str() {
            MSSBCBS | ANONYMOUS => SaslCode::Ok,
            PLAIN => self.plain(init.initial_response.as_ref().map_or(&[][..], |b| &b[..])),
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // None of the offered mechanisms has a challenge.
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}
