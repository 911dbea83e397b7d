//! CONNECT: who the client is, whether it may connect, and what the session starts with.

use super::framed::{Error, Framed};
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::registry::{identity::validate_id, IdentityKey};
use crate::tls::ClientCertInfo;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::Protocol;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;

/// How long a client has, after the TLS handshake, to send CONNECT.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// IoT Hub caps the keep-alive it honours at 1767 s (DOC-MQTT); 0 means that cap too.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(1767);
/// Whether a CONNECT username names this hub and this client, as IoT Hub requires:
/// `{hostName}/{clientId}`, then optionally `/` and `?{query}` (any query: `shared/protocol.md`
/// C.2). The host is compared without case, against every name the hub answers to.
fn username_matches(hub: &Hub, username: &str, client_id: &str) -> bool {
    let path = username.split_once('?').map_or(username, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some((host, rest)) = path.split_once('/') else {
        return false;
    };
    rest == client_id && hub.answers_to(host)
}

/// What CONNECT established.
pub(super) struct Accepted {
    pub(super) key: IdentityKey,
    pub(super) keep_alive: Duration,
    pub(super) clean_session: bool,
    /// When the SAS token expires (unix seconds); `None` for X.509.
    pub(super) token_expiry: Option<u64>,
    pub(super) model_id: Option<String>,
}

pub(super) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    hub: &Hub,
    framed: &mut Framed<S>,
    client_cert: Option<&ClientCertInfo>,
) -> Result<Accepted, Error> {
    // [MQTT-3.1.0-1] The first packet from the client MUST be CONNECT.
    let packet = match timeout(CONNECT_TIMEOUT, framed.read()).await {
        Err(_) => return Err(Error::ConnectTimeout),
        Ok(r) => r?,
    };
    let Some(Packet::Connect(connect)) = packet else {
        return Err(Error::NotConnect);
    };
    if connect.protocol != Protocol::V4 {
        return refuse(
            framed,
            ConnectReturnCode::RefusedProtocolVersion,
            "only MQTT 3.1.1 is supported".into(),
        )
        .await;
    }
    let Some(key) = parse_client_id(&connect.client_id) else {
        return refuse(
            framed,
            ConnectReturnCode::BadClientId,
            format!(
                "client id {:?} is not deviceId or deviceId/moduleId",
                connect.client_id
            ),
        )
        .await;
    };
    let (username, password) = connect
        .login
        .as_ref()
        .map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
    if !username_matches(hub, username, &connect.client_id) {
        return refuse(
            framed,
            ConnectReturnCode::BadUserNamePassword,
            format!(
                "username {username:?} is not {{hostName}}/{}/?api-version=…",
                connect.client_id
            ),
        )
        .await;
    }
    let auth = if !password.is_empty() {
        hub.authenticate_device(&key, password).map(Some)
    } else if let Some(cert) = client_cert {
        hub.authenticate_x509(&key, cert).map(|()| None)
    } else {
        Err(HubError::unauthorized(
            "no SAS token and no client certificate",
        ))
    };
    let token_expiry = match auth {
        Ok(expiry) => expiry,
        Err(e) => {
            // CONNACK 5 (not authorized) for every credential or identity problem; the SDKs
            // treat it as final instead of retrying (C.2).
            let code = match e.code {
                ErrorCode::ServerError => ConnectReturnCode::ServiceUnavailable,
                _ => ConnectReturnCode::NotAuthorized,
            };
            return refuse(framed, code, format!("{key}: {e}")).await;
        }
    };
    let keep_alive = match connect.keep_alive {
        0 => MAX_KEEP_ALIVE,
        // The hub waits 1.5 × the client's keep-alive before giving up on it.
        k => (Duration::from_secs(u64::from(k)) * 3 / 2).min(MAX_KEEP_ALIVE),
    };
    if connect.clean_session {
        hub.set_session(&key, 0);
    }
    let session_present = hub.connections().session(&key) != 0;
    framed
        .write(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )))
        .await?;
    Ok(Accepted {
        key,
        keep_alive,
        clean_session: connect.clean_session,
        token_expiry,
        model_id: model_id_from_username(username),
    })
}

/// Sends CONNACK with a refusal code and ends the connection attempt.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    code: ConnectReturnCode,
    why: String,
) -> Result<Accepted, Error> {
    let _ = framed
        .write(Packet::ConnAck(ConnAck::new(code, false)))
        .await;
    Err(Error::Refused(why))
}

/// `{deviceId}` or `{deviceId}/{moduleId}`, each following IoT Hub's id rules.
fn parse_client_id(client_id: &str) -> Option<IdentityKey> {
    let key = match client_id.split_once('/') {
        Some((d, m)) => IdentityKey::module(d, m),
        None => IdentityKey::device(client_id),
    };
    validate_id(&key.device_id, "device id").ok()?;
    if let Some(m) = &key.module_id {
        validate_id(m, "module id").ok()?;
    }
    Some(key)
}

/// The `model-id` query parameter of a username `{host}/{clientId}/?{query}`. Parsed loosely:
/// any api-version, unknown parameters, and a raw (unencoded) dtmi are all accepted (C.2).
fn model_id_from_username(username: &str) -> Option<String> {
    let (_, query) = username.split_once("/?")?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "model-id")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert_eq!(parse_client_id("dev1"), Some(IdentityKey::device("dev1")));
        assert_eq!(
            parse_client_id("dev1/mod1"),
            Some(IdentityKey::module("dev1", "mod1"))
        );
        assert_eq!(parse_client_id(""), None);
        assert_eq!(parse_client_id("dev1/"), None);
        assert_eq!(parse_client_id("dev1/mod1/x"), None);
        assert_eq!(parse_client_id("dev 1"), None);
    }

    #[test]
    fn model_id_is_read_loosely() {
        let py = "h/dev1/?api-version=2020-09-30&DeviceClientType=x&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
        assert_eq!(
            model_id_from_username(py).as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        let node = "h/dev1/mod1/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=y";
        assert_eq!(
            model_id_from_username(node).as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        assert_eq!(model_id_from_username("h/dev1/?api-version=1"), None);
        assert_eq!(model_id_from_username(""), None);
    }
}
