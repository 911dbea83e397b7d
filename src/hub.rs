//! [`Hub`]: the one shared handle every front end holds.
//!
//! It owns the registry (identities and twins), the live connections, and the hub's policies and
//! names, and it is where authentication and authorization happen, so that REST, MQTT and (later)
//! AMQP apply exactly the same rules. Cheap to clone.

use crate::auth::{sas::SasError, Permission, Policy, SasToken};
use crate::c2d::CloudMessage;
use crate::config::Config;
use crate::connections::{Connections, Outbound};
use crate::error::{ErrorCode, HubError, HubResult};
use crate::methods::{MethodCall, MethodReply, Methods};
use crate::registry::{Credentials, IdentityKey, IfMatch, Registry, Status};
use crate::telemetry::TelemetryLog;
use crate::timestamp::unix_now;
use serde_json::{Map, Value};
use std::sync::Arc;

/// The hub: cheap-to-clone handle to shared state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Identities and twins. Written by the REST API and the device front ends; internally
    /// sharded per device (see `registry`).
    registry: Registry,
    /// Live device connections; written by the device front ends, read by the REST side to
    /// push events.
    connections: Connections,
    /// Direct-method calls in flight; internally a sharded map of oneshot channels.
    methods: Methods,
    /// Device-to-cloud messages and routed hub events, for the control API and the Event
    /// Hub-compatible endpoints; sharded, bounded.
    telemetry: TelemetryLog,
    /// Which endpoints messages and events go to; fixed after start-up.
    routing: crate::routing::Routing,
    /// Counters and histograms for `/_emulator/metrics`; atomics only.
    metrics: crate::metrics::Metrics,
    /// Cloud-to-device delivery feedback waiting for the service (AMQP).
    feedback: crate::outbox::Outbox,
    /// File uploads in progress and their notifications; configured once at start-up
    /// ([`Hub::set_file_uploads`]), not configured until then.
    uploads: std::sync::OnceLock<crate::uploads::FileUploads>,
    /// The Event Hub-compatible endpoint's entity name (the hub name).
    event_hub_name: String,
    /// The CA certificate (PEM) clients trust, served by the control API. Set once at start-up.
    ca_pem: std::sync::OnceLock<String>,
    /// The port AMQP/TLS listens on, once bound (where `amqp:link:redirect` sends clients).
    amqp_port: std::sync::OnceLock<u16>,
    /// Shared access policies; fixed after start-up, so no lock.
    policies: Vec<Policy>,
    /// Host names accepted in SAS `sr`, lower-case; fixed after start-up.
    host_names: Vec<String>,
    /// The hub's own host name, as in connection strings.
    hostname: String,
    /// Whether the hub listens on a loopback address only (the web portal then needs no sign-in).
    loopback_only: bool,
    /// Identities created at start-up and again on reset.
    seeds: crate::seed::Seeds,
    /// CA certificates that CA-signed device certificates must chain to.
    trusted_cas: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// Which service operation a caller wants, for the permission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read identities (RegistryRead; RegistryWrite implies it).
    RegistryRead,
    /// Create, update, delete identities (RegistryWrite).
    RegistryWrite,
    /// Read twins (ServiceConnect or RegistryRead).
    TwinRead,
    /// Update twins (ServiceConnect or RegistryWrite).
    TwinWrite,
    /// Service-facing operations: statistics, methods (ServiceConnect).
    Service,
    /// The emulator's control API: telemetry, C2D injection, reset (ServiceConnect).
    Control,
    /// Service-side messaging over HTTPS: the feedback queue (ServiceConnect).
    Messaging,
}

impl Access {
    fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Self::RegistryRead => &[RegistryRead, RegistryWrite],
            Self::RegistryWrite => &[RegistryWrite],
            Self::TwinRead => &[ServiceConnect, RegistryRead, RegistryWrite],
            Self::TwinWrite => &[ServiceConnect, RegistryWrite],
            Self::Service => &[ServiceConnect, RegistryRead],
            Self::Control | Self::Messaging => &[ServiceConnect],
        }
    }
}

impl Hub {
    /// A hub whose state lives in memory only.
    pub fn new(config: &Config) -> Self {
        Self::with_registry(config, Registry::new(config.max_modules_per_device))
    }

    /// A hub over a given registry (one backed by a data dir, see [`Registry::with_store`]).
    /// Persistent sessions stored in it are restored, so devices that reconnect without
    /// subscribing again (as the SDKs do) still get their pushes.
    pub fn with_registry(config: &Config, registry: Registry) -> Self {
        let connections = Connections::default();
        for (key, session) in registry.sessions() {
            connections.set_session(&key, session);
        }
        let inner = Arc::new_cyclic(|hub: &std::sync::Weak<Inner>| {
            let hub = hub.clone();
            registry.observe(Box::new(move |change| {
                if let Some(inner) = hub.upgrade() {
                    Hub { inner }.on_change(change);
                }
            }));
            Inner {
                registry,
                connections,
                methods: Methods::default(),
                telemetry: TelemetryLog::new(config.telemetry_capacity),
                routing: config.routing.clone(),
                metrics: crate::metrics::Metrics::default(),
                feedback: crate::outbox::Outbox::new(crate::c2d::FEEDBACK_CAPACITY),
                event_hub_name: config.hub_name(),
                uploads: std::sync::OnceLock::new(),
                ca_pem: std::sync::OnceLock::new(),
                amqp_port: std::sync::OnceLock::new(),
                policies: config.policies.clone(),
                host_names: config.host_names(),
                hostname: config.hostname.clone(),
                loopback_only: config.bind.is_loopback(),
                seeds: config.seeds.clone(),
                trusted_cas: config.trusted_cas.clone(),
            }
        });
        Self { inner }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn connections(&self) -> &Connections {
        &self.inner.connections
    }

    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }

    pub fn methods(&self) -> &Methods {
        &self.inner.methods
    }

    /// The hub's message routing.
    pub fn routing(&self) -> &crate::routing::Routing {
        &self.inner.routing
    }

    /// A device-to-cloud message: stamped, routed and logged. Returns its sequence number.
    ///
    /// # Errors
    /// When it is larger than IoT Hub's limit.
    pub fn ingest(
        &self,
        identity: &IdentityKey,
        auth_method: &'static str,
        incoming: crate::telemetry::Incoming,
    ) -> Result<u64, crate::telemetry::TooLarge> {
        let mut message = crate::telemetry::Message::stamp(identity, auth_method, incoming)?;
        self.route(&mut message);
        Ok(self.inner.telemetry.store(message))
    }

    fn route(&self, message: &mut crate::telemetry::Message) {
        let routing = &self.inner.routing;
        routing.route(message, &self.inner.event_hub_name, |identity, path| {
            self.inner.registry.twin_value(identity, path)
        });
    }

    /// A registry change: the event it makes, when a route selects events of its kind, is
    /// routed and logged (an event no route selects is not kept).
    fn on_change(&self, change: crate::registry::Change) {
        use crate::registry::Change;
        use crate::telemetry::Source;
        let source = match &change {
            Change::Twin { .. } => Source::TwinChangeEvents,
            Change::Created { .. } | Change::Deleted { .. } => Source::DeviceLifecycleEvents,
            Change::Connection { .. } => Source::DeviceConnectionStateEvents,
        };
        if !self.inner.routing.selects(source) {
            return;
        }
        let mut message = crate::routing::events::event_message(change, &self.inner.event_hub_name);
        self.route(&mut message);
        if !message.routed.is_empty() {
            self.inner.telemetry.store(message);
        }
    }

    pub fn telemetry(&self) -> &TelemetryLog {
        &self.inner.telemetry
    }

    pub fn feedback(&self) -> &crate::outbox::Outbox {
        &self.inner.feedback
    }

    /// The entity name of the Event Hub-compatible endpoint (`EntityPath`).
    pub fn event_hub_name(&self) -> &str {
        &self.inner.event_hub_name
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// The Prometheus text of `/_emulator/metrics`.
    pub fn render_metrics(&self) -> String {
        let telemetry = &self.inner.telemetry;
        self.inner.metrics.render(
            self.inner.connections.live_count(),
            telemetry.last_sequence(),
            telemetry.dropped(),
        )
    }

    /// Records the CA certificate clients trust (once, at start-up).
    pub fn set_amqp_port(&self, port: u16) {
        let _ = self.inner.amqp_port.set(port);
    }

    /// The AMQP/TLS port clients are redirected to (5671 until the listener is bound).
    pub fn amqp_port(&self) -> u16 {
        self.inner.amqp_port.get().copied().unwrap_or(5671)
    }

    /// Configures file upload (the blob store and container). Set once, at start-up.
    pub fn set_file_uploads(&self, settings: crate::uploads::Settings) {
        let _ = self
            .inner
            .uploads
            .set(crate::uploads::FileUploads::new(Some(settings)));
    }

    /// File uploads: those in progress, and the notifications waiting for the service.
    pub fn file_uploads(&self) -> &crate::uploads::FileUploads {
        self.inner
            .uploads
            .get_or_init(|| crate::uploads::FileUploads::new(None))
    }

    pub fn set_ca_pem(&self, pem: String) {
        let _ = self.inner.ca_pem.set(pem);
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.inner.ca_pem.get().map(String::as_str)
    }

    // ----- operations that span the registry and live connections -----

    /// Deletes a device (and its modules), closing their connections.
    pub fn delete_device(&self, device_id: &str, if_match: &IfMatch) -> HubResult<()> {
        let modules: Vec<String> = self
            .inner
            .registry
            .list_modules(device_id)?
            .iter()
            .filter_map(|m| m["moduleId"].as_str().map(str::to_owned))
            .collect();
        self.inner.registry.delete_device(device_id, if_match)?;
        self.inner
            .connections
            .close(&IdentityKey::device(device_id));
        for m in modules {
            self.inner
                .connections
                .close(&IdentityKey::module(device_id, m));
        }
        Ok(())
    }

    /// Deletes a module, closing its connection.
    pub fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: &IfMatch,
    ) -> HubResult<()> {
        self.inner
            .registry
            .delete_module(device_id, module_id, if_match)?;
        self.inner
            .connections
            .close(&IdentityKey::module(device_id, module_id));
        Ok(())
    }

    /// Invokes a direct method on a device or module and waits for its answer.
    pub async fn invoke_method(
        &self,
        key: &IdentityKey,
        call: MethodCall,
    ) -> HubResult<MethodReply> {
        self.inner.registry.exists(key)?;
        crate::metrics::Metrics::count(&self.inner.metrics.methods_invoked);
        self.inner
            .methods
            .invoke(&self.inner.connections, key, call)
            .await
    }

    /// Queues a cloud-to-device message and tells the device's connection.
    pub fn send_c2d(&self, device_id: &str, message: CloudMessage) -> HubResult<()> {
        self.inner.registry.enqueue_c2d(device_id, message)?;
        self.inner
            .connections
            .notify(&IdentityKey::device(device_id), Outbound::CloudToDevice);
        Ok(())
    }

    /// Counts each HTTPS receive lock of `device_id` that lapsed unsettled as an abandon: the
    /// message's delivery count goes up, and past the maximum it is dead-lettered with its
    /// feedback, as when a device abandons it.
    pub fn lapse_c2d_locks(&self, device_id: &str) {
        let lapsed = self
            .inner
            .registry
            .lapsed_http_locks(device_id, std::time::Instant::now());
        for token in lapsed {
            self.settle_c2d(device_id, token, crate::c2d::Settlement::Abandoned);
        }
    }

    /// A device settled a delivered cloud-to-device message: it leaves the queue (or, when
    /// abandoned, waits for another delivery), and the service gets the feedback it asked for.
    pub fn settle_c2d(&self, device_id: &str, lock_token: u64, how: crate::c2d::Settlement) {
        use crate::c2d::Settlement;
        let registry = &self.inner.registry;
        let (message, status) = match how {
            Settlement::Completed => (registry.complete_c2d(device_id, lock_token), "Success"),
            Settlement::Rejected => (registry.complete_c2d(device_id, lock_token), "Rejected"),
            Settlement::Abandoned => (
                registry.abandon_c2d(device_id, lock_token),
                "DeliveryCountExceeded",
            ),
        };
        let Some(message) = message else { return };
        if how == Settlement::Completed {
            crate::metrics::Metrics::count(&self.inner.metrics.c2d_completed);
        }
        if message.ack.is_some() {
            let generation = registry
                .get_device(device_id)
                .ok()
                .and_then(|d| {
                    d.get("generationId")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            if let Some(record) =
                crate::c2d::feedback_record(&message, status, device_id, &generation)
            {
                self.inner.feedback.push(record);
            }
        }
    }

    /// Stores an identity's session state: live for the connections, and in the registry so
    /// that it outlives a restart with `--data-dir`.
    pub fn set_session(&self, key: &IdentityKey, session: u8) {
        self.inner.connections.set_session(key, session);
        self.inner.registry.set_session(key, session);
    }

    /// Creates the seeded identities of the config file.
    ///
    /// # Errors
    /// The file, line and reason of the first seed the registry refuses.
    /// A data dir that already holds identities keeps them, and the seeds are not applied.
    pub fn seed(&self) -> Result<(), String> {
        if self.inner.registry.device_stats().total > 0 {
            return Ok(());
        }
        self.inner.seeds.apply(&self.inner.registry)
    }

    /// Back to the start-up state: only the seeded identities, no sessions, no messages, no
    /// calls in flight.
    pub fn reset(&self) {
        self.inner.registry.clear();
        self.inner.connections.close_all();
        self.inner.methods.clear();
        self.inner.telemetry.clear();
        self.inner.feedback.clear();
        self.file_uploads().clear();
        if let Err(e) = self.seed() {
            // They applied at start-up, so this cannot happen short of a bug; say so loudly.
            tracing::error!(error = %e, "re-applying the seeded identities after reset failed");
        }
    }

    // ----- authentication -----

    /// Checks a service caller's `Authorization` header for `access`.
    pub fn authorize_service(&self, authorization: Option<&str>, access: Access) -> HubResult<()> {
        let header = authorization.ok_or_else(|| {
            HubError::new(
                ErrorCode::IotHubUnauthorizedAccess,
                "The request has no Authorization header; send a SAS token",
            )
        })?;
        let token = SasToken::parse(header).map_err(sas_error)?;
        let name = token.policy().ok_or_else(|| {
            HubError::unauthorized(
                "A device or module token cannot call the service API; sign with a shared access policy (skn)",
            )
        })?;
        let policy = self.policy(name)?;
        self.check_token(&token, &[&policy.primary_key, &policy.secondary_key])?;
        if !token.resource().map_err(sas_error)?.covers(&[]) {
            return Err(sas_error(SasError::OutOfScope));
        }
        if !policy.permissions.has_any(access.permissions()) {
            return Err(HubError::unauthorized(format!(
                "Policy '{name}' does not grant the permission this operation needs ({})",
                access
                    .permissions()
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        Ok(())
    }

    /// Authenticates a device or module connecting with a SAS token as its password. Returns
    /// the token's expiry (unix seconds): the connection must end then.
    pub fn authenticate_device(&self, key: &IdentityKey, password: &str) -> HubResult<u64> {
        let token = SasToken::parse(password).map_err(sas_error)?;
        let (credentials, status) = self.inner.registry.credentials(key)?;
        match token.policy() {
            Some(name) => {
                let policy = self.policy(name)?;
                if !policy.permissions.has(Permission::DeviceConnect) {
                    return Err(HubError::unauthorized(format!(
                        "Policy '{name}' does not grant DeviceConnect"
                    )));
                }
                self.check_token(&token, &[&policy.primary_key, &policy.secondary_key])?;
            }
            None => {
                let keys = credentials.keys().ok_or_else(|| {
                    HubError::unauthorized(format!(
                        "{key} uses {} authentication, not SAS",
                        credentials.type_name()
                    ))
                })?;
                self.check_token(&token, &keys)?;
            }
        }
        let resource = token.resource().map_err(sas_error)?;
        let mut target = vec!["devices", key.device_id.as_str()];
        if let Some(m) = &key.module_id {
            target.extend(["modules", m.as_str()]);
        }
        if !resource.covers(&target) {
            return Err(sas_error(SasError::OutOfScope));
        }
        if status == Status::Disabled {
            return Err(HubError::new(
                ErrorCode::DeviceDisabled,
                format!("Device {} is disabled", key.device_id),
            ));
        }
        Ok(token.expiry())
    }

    /// Authenticates an identity that presented an X.509 client certificate (the TLS layer
    /// has already checked that the client holds its key):
    /// - `selfSigned`: the certificate's SHA-1 or SHA-256 thumbprint must be registered;
    /// - `certificateAuthority`: the chain must lead to a CA of the config file's
    ///   `trusted_ca_files` and the subject CN must be `deviceId` or `deviceId/moduleId`, as
    ///   IoT Hub requires for CA-signed devices and modules.
    pub fn authenticate_x509(
        &self,
        key: &IdentityKey,
        cert: &crate::tls::ClientCertInfo,
    ) -> HubResult<()> {
        let (sha1, sha256) = (cert.sha1.as_str(), cert.sha256.as_str());
        let (credentials, status) = self.inner.registry.credentials(key)?;
        let ok = match &credentials {
            Credentials::SelfSigned { primary, secondary } => [primary, secondary]
                .into_iter()
                .flatten()
                .any(|t| t.eq_ignore_ascii_case(sha1) || t.eq_ignore_ascii_case(sha256)),
            Credentials::CertificateAuthority => {
                cert.common_name.as_deref() == Some(key.to_string().as_str())
                    && cert.chains_to(&self.inner.trusted_cas)
            }
            _ => false,
        };
        if !ok {
            return Err(HubError::unauthorized(format!(
                "The client certificate does not authenticate {key}"
            )));
        }
        if status == Status::Disabled {
            return Err(HubError::new(
                ErrorCode::DeviceDisabled,
                format!("Device {} is disabled", key.device_id),
            ));
        }
        Ok(())
    }

    /// Verifies a token signed by a shared access policy (`skn`) and returns the policy.
    /// `service_bus_style` tokens are signed with the key's base64 text (Event Hubs SDKs).
    pub fn verify_policy_token(
        &self,
        token: &SasToken,
        service_bus_style: bool,
    ) -> HubResult<&Policy> {
        let name = token
            .policy()
            .ok_or_else(|| HubError::unauthorized("The token names no policy (skn)"))?;
        let policy = self.policy(name)?;
        if service_bus_style {
            let keys = [
                policy.primary_key.as_text_key(),
                policy.secondary_key.as_text_key(),
            ];
            self.check_token(token, &[&keys[0], &keys[1]])?;
        } else {
            self.check_token(token, &[&policy.primary_key, &policy.secondary_key])?;
        }
        Ok(policy)
    }

    fn policy(&self, name: &str) -> HubResult<&Policy> {
        self.inner
            .policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| sas_error(SasError::UnknownPolicy(name.to_owned())))
    }

    /// Whether `host` is one of the names the hub answers to (case-insensitive).
    pub fn answers_to(&self, host: &str) -> bool {
        self.inner
            .host_names
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Signature, then expiry, then host. The signature comes first so that an unsigned token
    /// learns nothing about which hosts or times would be accepted.
    fn check_token(&self, token: &SasToken, keys: &[&crate::auth::SymmetricKey]) -> HubResult<()> {
        if !keys.iter().any(|k| token.is_signed_by(k)) {
            tracing::debug!(string_to_sign = %token.string_to_sign().escape_debug(), "SAS signature mismatch");
            return Err(sas_error(SasError::BadSignature));
        }
        token.check_expiry(unix_now()).map_err(sas_error)?;
        let host = token.resource().map_err(sas_error)?.host;
        if !self.inner.host_names.contains(&host) {
            return Err(sas_error(SasError::WrongHost(host)));
        }
        Ok(())
    }

    // ----- twins: the writes that must reach connected devices -----

    /// Service PATCH of a twin; a desired change is pushed to the identity's connection.
    pub fn patch_twin(
        &self,
        key: &IdentityKey,
        body: &Map<String, Value>,
        if_match: &IfMatch,
    ) -> HubResult<Value> {
        self.inner.registry.patch_twin(key, body, if_match, |note| {
            self.inner
                .connections
                .notify(key, Outbound::DesiredPatch(Box::new(note)));
        })
    }

    /// Service PUT of a twin; devices get the whole new desired document.
    pub fn replace_twin(
        &self,
        key: &IdentityKey,
        body: &Map<String, Value>,
        if_match: &IfMatch,
    ) -> HubResult<Value> {
        self.inner
            .registry
            .replace_twin(key, body, if_match, |note| {
                self.inner
                    .connections
                    .notify(key, Outbound::DesiredPatch(Box::new(note)));
            })
    }
}

// ----- the web portal's access checks (see `portal`) -----

impl Hub {
    /// Whether the hub listens on a loopback address only, so that only this machine can reach
    /// it. The web portal opens without sign-in then.
    pub fn loopback_only(&self) -> bool {
        self.inner.loopback_only
    }

    /// The shared access policy named `name`, if any.
    pub fn find_policy(&self, name: &str) -> Option<&Policy> {
        self.inner.policies.iter().find(|p| p.name == name)
    }

    /// The policy whose primary or secondary key is `key` (compared in constant time), limited
    /// to the policy named `name` when one is given.
    pub fn policy_with_key(&self, name: Option<&str>, key: &str) -> Option<&Policy> {
        use subtle::ConstantTimeEq;
        let given = key.trim().as_bytes();
        self.inner
            .policies
            .iter()
            .filter(|p| name.is_none_or(|n| n == p.name))
            .find(|p| {
                let primary = p.primary_key.to_base64();
                let secondary = p.secondary_key.to_base64();
                bool::from(primary.as_bytes().ct_eq(given))
                    | bool::from(secondary.as_bytes().ct_eq(given))
            })
    }
}

impl Access {
    /// Whether a policy with `permissions` may perform this operation.
    pub fn granted_by(self, permissions: crate::auth::Permissions) -> bool {
        permissions.has_any(self.permissions())
    }
}

pub(crate) fn sas_error(e: SasError) -> HubError {
    let code = match e {
        SasError::Expired(_)
        | SasError::Malformed
        | SasError::Missing(_)
        | SasError::Invalid(_) => ErrorCode::IotHubUnauthorized,
        _ => ErrorCode::IotHubUnauthorizedAccess,
    };
    HubError::new(code, e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::{sas::make_token, SymmetricKey, OWNER_KEY};

    pub(crate) fn config() -> Config {
        Config {
            hostname: "myhub.local".into(),
            bind: "127.0.0.1".parse().unwrap(),
            https_port: 0,
            mqtt_port: 0,
            amqp_port: 0,
            certs_dir: std::env::temp_dir(),
            extra_sans: vec![],
            policies: crate::auth::default_policies(),
            max_modules_per_device: 50,
            telemetry_capacity: 1000,
            seeds: Default::default(),
            trusted_cas: Vec::new(),
            routing: Default::default(),
        }
    }

    fn owner() -> SymmetricKey {
        SymmetricKey::parse(OWNER_KEY).unwrap()
    }

    fn later() -> u64 {
        unix_now() + 3600
    }

    #[test]
    fn service_tokens_need_a_policy_a_known_host_and_the_permission() {
        let hub = Hub::new(&config());
        let ok = make_token("myhub.local", &owner(), Some("iothubowner"), later());
        assert!(hub
            .authorize_service(Some(&ok), Access::RegistryWrite)
            .is_ok());
        let with_port = make_token("MyHub.local:443", &owner(), Some("iothubowner"), later());
        assert!(hub
            .authorize_service(Some(&with_port), Access::RegistryWrite)
            .is_ok());
        let other_host = make_token("elsewhere", &owner(), Some("iothubowner"), later());
        assert!(hub
            .authorize_service(Some(&other_host), Access::RegistryRead)
            .is_err());
        let expired = make_token("myhub.local", &owner(), Some("iothubowner"), 1000);
        let err = hub
            .authorize_service(Some(&expired), Access::RegistryRead)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::IotHubUnauthorized);
        let forged = make_token(
            "myhub.local",
            &SymmetricKey::generate(),
            Some("iothubowner"),
            later(),
        );
        assert!(hub
            .authorize_service(Some(&forged), Access::RegistryRead)
            .is_err());
        assert!(hub.authorize_service(None, Access::RegistryRead).is_err());

        let read_policy = config()
            .policies
            .into_iter()
            .find(|p| p.name == "registryRead")
            .unwrap();
        let read = make_token(
            "myhub.local",
            &read_policy.primary_key,
            Some("registryRead"),
            later(),
        );
        assert!(hub
            .authorize_service(Some(&read), Access::RegistryRead)
            .is_ok());
        let err = hub
            .authorize_service(Some(&read), Access::RegistryWrite)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::IotHubUnauthorizedAccess);
    }

    #[test]
    fn device_tokens_are_scoped_to_their_identity() {
        let hub = Hub::new(&config());
        let reg = hub.registry();
        let dev = reg.put_device("d1", &Map::new(), &IfMatch::Absent).unwrap();
        reg.put_device("d2", &Map::new(), &IfMatch::Absent).unwrap();
        let module = reg
            .put_module("d1", "m1", &Map::new(), &IfMatch::Absent)
            .unwrap();
        let key_of = |v: &Value, which: &str| {
            SymmetricKey::parse(v["authentication"]["symmetricKey"][which].as_str().unwrap())
                .unwrap()
        };
        let d1 = IdentityKey::device("d1");
        let m1 = IdentityKey::module("d1", "m1");

        let t = make_token(
            "localhost/devices/d1",
            &key_of(&dev, "primaryKey"),
            None,
            later(),
        );
        assert!(hub.authenticate_device(&d1, &t).is_ok());
        let t2 = make_token(
            "localhost/devices/d1",
            &key_of(&dev, "secondaryKey"),
            None,
            later(),
        );
        assert!(hub.authenticate_device(&d1, &t2).is_ok());
        // d1's token is not d2's.
        assert!(hub
            .authenticate_device(&IdentityKey::device("d2"), &t)
            .is_err());
        // A token for device d1 signed with d1's key does not authenticate module m1 (other key).
        assert!(hub.authenticate_device(&m1, &t).is_err());
        let tm = make_token(
            "localhost/devices/d1/modules/m1",
            &key_of(&module, "primaryKey"),
            None,
            later(),
        );
        assert!(hub.authenticate_device(&m1, &tm).is_ok());
        // Out of scope: a module token presented for the device.
        assert!(hub.authenticate_device(&d1, &tm).is_err());
        // A policy with DeviceConnect works for any device; one without does not.
        let p = make_token("localhost", &owner(), Some("iothubowner"), later());
        assert!(hub.authenticate_device(&m1, &p).is_ok());
        let svc = config()
            .policies
            .into_iter()
            .find(|p| p.name == "service")
            .unwrap();
        let ps = make_token("localhost", &svc.primary_key, Some("service"), later());
        assert!(hub.authenticate_device(&m1, &ps).is_err());
        // Unknown identity.
        assert_eq!(
            hub.authenticate_device(&IdentityKey::device("ghost"), &t)
                .unwrap_err()
                .code,
            ErrorCode::DeviceNotFound
        );
        // Disabled device.
        reg.put_device(
            "d1",
            &serde_json::json!({"status":"disabled"})
                .as_object()
                .unwrap()
                .clone(),
            &IfMatch::Any,
        )
        .unwrap();
        assert_eq!(
            hub.authenticate_device(&d1, &t).unwrap_err().code,
            ErrorCode::DeviceDisabled
        );
    }
}
