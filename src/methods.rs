//! Direct methods: the service calls a method on a connected device or module and waits for its
//! answer (`shared/protocol.md` C.4, C.7; Microsoft's "Understand and invoke direct methods").
//!
//! A call gets a fresh request id, is queued to the identity's connection as
//! [`Outbound::MethodRequest`], and waits on a oneshot channel that the device's response
//! completes. Each call waits on its own channel, so a slow device never blocks another call.
//! A response is accepted only from the identity the request went to; late or unknown ids are
//! dropped, as IoT Hub drops them.

use crate::connections::{Connections, Feature, MethodRequest, Outbound};
use crate::error::{ErrorCode, HubError, HubResult};
use crate::registry::IdentityKey;
use dashmap::DashMap;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// Largest request or response payload, serialised (128 KB).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// Longest method name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// A validated `POST /twins/{id}[/modules/{mid}]/methods` body.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    pub name: String,
    pub payload: Value,
    /// 5 to 300 s; default 30.
    pub response_timeout: Duration,
    /// 0 to 300 s; default 0 (the device must already be online).
    pub connect_timeout: Duration,
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodReply {
    pub status: i32,
    pub payload: Value,
}

impl MethodCall {
    pub fn from_json(body: &Map<String, Value>) -> HubResult<Self> {
        let name = match body.get("methodName") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err(HubError::new(
                    ErrorCode::ArgumentNull,
                    "'methodName' is required",
                ))
            }
            Some(_) => return Err(HubError::invalid("'methodName' must be a string")),
        };
        // The name travels in the topic `$iothub/methods/POST/{name}/?$rid=…`, so it cannot hold
        // characters that would change the topic's structure.
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .chars()
                .any(|c| c.is_control() || matches!(c, '/' | '?' | '#' | '+' | '&' | '='))
        {
            return Err(HubError::invalid(format!(
                "'methodName' must be 1 to {MAX_NAME_LEN} characters without control characters or / ? # + & ="
            )));
        }
        let payload = body.get("payload").cloned().unwrap_or(Value::Null);
        if payload.to_string().len() > MAX_PAYLOAD_BYTES {
            return Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!("The method payload is larger than {MAX_PAYLOAD_BYTES} bytes"),
            ));
        }
        Ok(Self {
            name,
            payload,
            response_timeout: seconds(body, "responseTimeoutInSeconds", 30, 5..=300)?,
            connect_timeout: seconds(body, "connectTimeoutInSeconds", 0, 0..=300)?,
        })
    }
}

fn seconds(
    body: &Map<String, Value>,
    field: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> HubResult<Duration> {
    // IoT Hub reads these as integers and, like the JSON reader it uses, also takes numeric
    // strings: `az iot hub invoke-device-method` sends `"responseTimeoutInSeconds": "30"`.
    let number = |v: &Value| match v {
        Value::String(s) => s.trim().parse::<u64>().ok(),
        v => v.as_u64(),
    };
    let value = match body.get(field) {
        None | Some(Value::Null) => default,
        Some(v) => number(v).filter(|n| range.contains(n)).ok_or_else(|| {
            HubError::invalid(format!(
                "'{field}' must be a whole number of seconds from {} to {}",
                range.start(),
                range.end()
            ))
        })?,
    };
    Ok(Duration::from_secs(value))
}

struct Pending {
    key: IdentityKey,
    reply: oneshot::Sender<HubResult<MethodReply>>,
}

/// Calls in flight, by request id.
#[derive(Default)]
pub struct Methods {
    pending: DashMap<u64, Pending>,
    next_rid: AtomicU64,
}

/// Removes a call's entry however the wait ends (answer, timeout, or the HTTP caller leaving).
struct PendingGuard<'a> {
    methods: &'a Methods,
    rid: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.methods.pending.remove(&self.rid);
    }
}

impl Methods {
    /// Sends `call` to `key`'s connection and waits for the answer.
    ///
    /// # Errors
    /// 404103 DeviceNotOnline when the identity is not connected and subscribed to methods
    /// within the connect timeout; 504101 GatewayTimeout when no answer comes in time.
    pub async fn invoke(
        &self,
        connections: &Connections,
        key: &IdentityKey,
        call: MethodCall,
    ) -> HubResult<MethodReply> {
        let offline = || {
            HubError::new(
                ErrorCode::DeviceNotOnline,
                format!("{key} is not online, or has not subscribed to direct methods"),
            )
        };
        let connect_deadline = tokio::time::Instant::now() + call.connect_timeout;
        if !connections
            .wait_for(key, Feature::Methods, connect_deadline)
            .await
        {
            return Err(offline());
        }
        let rid = self.next_rid.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.pending.insert(
            rid,
            Pending {
                key: key.clone(),
                reply: tx,
            },
        );
        let _guard = PendingGuard { methods: self, rid };
        let request = Outbound::MethodRequest(Box::new(MethodRequest {
            rid,
            name: call.name,
            payload: call.payload,
        }));
        if !connections.notify(key, request) {
            return Err(offline());
        }
        match tokio::time::timeout(call.response_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            // The sender went away without an answer (hub reset): same as no answer.
            Ok(Err(_)) | Err(_) => Err(HubError::new(
                ErrorCode::GatewayTimeout,
                format!(
                    "Timed out waiting for {key} to answer within {} s",
                    call.response_timeout.as_secs()
                ),
            )),
        }
    }

    /// A device's answer to request `rid`. Ignored unless `key` is the identity it was sent to.
    pub fn complete(&self, key: &IdentityKey, rid: &str, status: i32, payload: &[u8]) {
        let Ok(rid) = rid.parse::<u64>() else {
            return;
        };
        let Some((_, pending)) = self.pending.remove_if(&rid, |_, p| p.key == *key) else {
            tracing::debug!(identity = %key, rid, "dropped a method response for no pending call");
            return;
        };
        let reply = if payload.len() > MAX_PAYLOAD_BYTES {
            Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!("The device's response payload is larger than {MAX_PAYLOAD_BYTES} bytes"),
            ))
        } else if payload.iter().all(u8::is_ascii_whitespace) {
            Ok(MethodReply {
                status,
                payload: Value::Null,
            })
        } else {
            serde_json::from_slice(payload)
                .map(|payload| MethodReply { status, payload })
                .map_err(|e| {
                    HubError::invalid(format!("The device's response payload is not JSON: {e}"))
                })
        };
        let _ = pending.reply.send(reply);
    }

    /// Fails every call in flight (hub reset).
    pub fn clear(&self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(v: Value) -> HubResult<MethodCall> {
        MethodCall::from_json(v.as_object().unwrap())
    }

    #[test]
    fn call_validation() {
        let ok = call(json!({"methodName":"reboot","payload":{"delay":1}})).unwrap();
        assert_eq!(ok.response_timeout, Duration::from_secs(30));
        assert_eq!(ok.connect_timeout, Duration::ZERO);
        let cli = call(
            json!({"methodName":"m","responseTimeoutInSeconds":"30","connectTimeoutInSeconds":"0"}),
        )
        .unwrap();
        assert_eq!(cli.response_timeout, Duration::from_secs(30));
        assert_eq!(cli.connect_timeout, Duration::ZERO);
        for bad in [
            json!({"methodName":"x","responseTimeoutInSeconds":"4"}),
            json!({"methodName":"x","responseTimeoutInSeconds":"thirty"}),
            json!({"methodName":"x","connectTimeoutInSeconds":"301"}),
            json!({"methodName":"x","responseTimeoutInSeconds":true}),
            json!({}),
            json!({"methodName":""}),
            json!({"methodName":"a/b"}),
            json!({"methodName":"x","responseTimeoutInSeconds":4}),
            json!({"methodName":"x","responseTimeoutInSeconds":301}),
            json!({"methodName":"x","connectTimeoutInSeconds":-1}),
            json!({"methodName":"x","payload":"y".repeat(MAX_PAYLOAD_BYTES)}),
        ] {
            assert!(call(bad.clone()).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offline_identity_is_404103_after_the_connect_timeout() {
        let (methods, conns) = (Methods::default(), Connections::default());
        let c = call(json!({"methodName":"m","connectTimeoutInSeconds":5})).unwrap();
        let err = methods
            .invoke(&conns, &IdentityKey::device("d"), c)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DeviceNotOnline);
    }

    #[tokio::test(start_paused = true)]
    async fn answer_completes_the_call_and_only_from_the_right_identity() {
        let (methods, conns) = (Methods::default(), Connections::default());
        let key = IdentityKey::module("d", "m");
        let mut reg = conns.register(&key);
        conns.set_session(&key, Feature::Methods.bit());
        let c = call(json!({"methodName":"reboot","payload":[1]})).unwrap();
        let invoke = methods.invoke(&conns, &key, c);
        let answer = async {
            let Some(Outbound::MethodRequest(request)) = reg.events.recv().await else {
                panic!("no method request")
            };
            let MethodRequest { rid, name, payload } = *request;
            assert_eq!((name.as_str(), payload), ("reboot", json!([1])));
            // Another identity cannot answer it.
            methods.complete(&IdentityKey::device("d"), &rid.to_string(), 500, b"{}");
            methods.complete(&key, &rid.to_string(), 201, br#"{"done":true}"#);
        };
        let (reply, ()) = tokio::join!(invoke, answer);
        assert_eq!(
            reply.unwrap(),
            MethodReply {
                status: 201,
                payload: json!({"done":true})
            }
        );
        assert!(methods.pending.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_is_504101_and_a_late_answer_is_dropped() {
        let (methods, conns) = (Methods::default(), Connections::default());
        let key = IdentityKey::device("d");
        let _reg = conns.register(&key);
        conns.set_session(&key, Feature::Methods.bit());
        let c = call(json!({"methodName":"slow","responseTimeoutInSeconds":5})).unwrap();
        let err = methods.invoke(&conns, &key, c).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::GatewayTimeout);
        assert!(methods.pending.is_empty());
        methods.complete(&key, "1", 200, b"null");
    }
}
