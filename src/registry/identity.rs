//! Device and module identities: their fields, the JSON the service API speaks, and IoT Hub's
//! id rules.
//!
//! Field names and shapes follow the REST API's `Device` and `Module` models as the SDKs read
//! them (`shared/protocol.md` E.2).

use crate::auth::SymmetricKey;
use crate::error::{ErrorCode, HubError, HubResult};
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Longest device or module id.
pub const ID_MAX_LEN: usize = 128;

/// The characters besides ASCII letters and digits that device and module ids may use.
const ID_SPECIALS: &str = "-:.+%_#*?!(),=@;$'";

/// Checks a device or module id against IoT Hub's rules: 1 to 128 ASCII characters, letters,
/// digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '` (the id rule as Microsoft's device
/// life-cycle and connection event schemas state it).
pub fn validate_id(id: &str, what: &str) -> HubResult<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || ID_SPECIALS.contains(c);
    if id.is_empty() || id.len() > ID_MAX_LEN || !id.chars().all(ok_char) {
        return Err(HubError::new(
            ErrorCode::ArgumentInvalid,
            format!(
                "{what} '{}' is invalid: it must be 1 to {ID_MAX_LEN} characters of ASCII letters, digits and {}",
                id.chars().take(ID_MAX_LEN + 8).collect::<String>(),
                ID_SPECIALS.chars().map(String::from).collect::<Vec<_>>().join(" ")
            ),
        ));
    }
    Ok(())
}

/// Whether an identity may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Enabled,
    Disabled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }

    fn parse(v: Option<&Value>) -> HubResult<Self> {
        match v {
            None | Some(Value::Null) => Ok(Self::Enabled),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("enabled") => Ok(Self::Enabled),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("disabled") => Ok(Self::Disabled),
            Some(other) => Err(HubError::invalid(format!(
                "'status' must be \"enabled\" or \"disabled\", not {other}"
            ))),
        }
    }
}

/// How an identity proves itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Credentials {
    /// Shared access keys; either signs SAS tokens.
    Sas {
        primary: SymmetricKey,
        secondary: SymmetricKey,
    },
    /// Self-signed X.509 certificates, matched by SHA-1 or SHA-256 thumbprint (hex).
    SelfSigned {
        primary: Option<String>,
        secondary: Option<String>,
    },
    /// Certificates issued by a CA the hub trusts; the subject CN names the identity.
    CertificateAuthority,
    /// No credentials (modules managed by an edge runtime).
    None,
}

impl Credentials {
    /// Parses the `authentication` object of a request. Missing or empty symmetric keys are
    /// generated, as IoT Hub does; `keep` supplies the keys already stored, for updates that
    /// leave them out.
    pub fn from_json(v: Option<&Value>, keep: Option<&Credentials>) -> HubResult<Self> {
        let empty = Map::new();
        let auth = match v {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return Err(HubError::invalid("'authentication' must be a JSON object")),
        };
        let kind = match auth.get("type") {
            None | Some(Value::Null) => "sas".to_owned(),
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            Some(other) => {
                return Err(HubError::invalid(format!(
                    "'authentication.type' must be a string, not {other}"
                )))
            }
        };
        match kind.as_str() {
            "sas" => {
                let keys = auth.get("symmetricKey").and_then(Value::as_object);
                let (kept_primary, kept_secondary) = match keep {
                    Some(Credentials::Sas { primary, secondary }) => {
                        (Some(primary.clone()), Some(secondary.clone()))
                    }
                    _ => (None, None),
                };
                let primary = key_field(keys, "primaryKey")?
                    .or(kept_primary)
                    .unwrap_or_else(SymmetricKey::generate);
                let secondary = key_field(keys, "secondaryKey")?
                    .or(kept_secondary)
                    .unwrap_or_else(SymmetricKey::generate);
                Ok(Self::Sas { primary, secondary })
            }
            "selfsigned" => {
                let prints = auth.get("x509Thumbprint").and_then(Value::as_object);
                let primary = thumbprint_field(prints, "primaryThumbprint")?;
                let secondary = thumbprint_field(prints, "secondaryThumbprint")?;
                if primary.is_none() && secondary.is_none() {
                    return Err(HubError::invalid(
                        "selfSigned authentication needs at least one X.509 thumbprint",
                    ));
                }
                Ok(Self::SelfSigned { primary, secondary })
            }
            "certificateauthority" => Ok(Self::CertificateAuthority),
            "none" => Ok(Self::None),
            other => Err(HubError::invalid(format!(
                "'authentication.type' {other:?} is not one of sas, selfSigned, certificateAuthority, none"
            ))),
        }
    }

    /// The `type` string, as IoT Hub spells it (also the twin's `authenticationType`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Sas { .. } => "sas",
            Self::SelfSigned { .. } => "selfSigned",
            Self::CertificateAuthority => "certificateAuthority",
            Self::None => "none",
        }
    }

    /// The `authentication` object of the service API.
    pub fn to_json(&self) -> Value {
        let (pk, sk) = match self {
            Self::Sas { primary, secondary } => {
                (json!(primary.to_base64()), json!(secondary.to_base64()))
            }
            _ => (Value::Null, Value::Null),
        };
        json!({
            "symmetricKey": {"primaryKey": pk, "secondaryKey": sk},
            "x509Thumbprint": self.thumbprints_json(),
            "type": self.type_name(),
        })
    }

    /// `{"primaryThumbprint":…, "secondaryThumbprint":…}`, with nulls when not X.509.
    pub fn thumbprints_json(&self) -> Value {
        match self {
            Self::SelfSigned { primary, secondary } => {
                json!({"primaryThumbprint": primary, "secondaryThumbprint": secondary})
            }
            _ => json!({"primaryThumbprint": null, "secondaryThumbprint": null}),
        }
    }

    /// The symmetric keys, for SAS checks.
    pub fn keys(&self) -> Option<[&SymmetricKey; 2]> {
        match self {
            Self::Sas { primary, secondary } => Some([primary, secondary]),
            _ => None,
        }
    }
}

fn key_field(keys: Option<&Map<String, Value>>, name: &str) -> HubResult<Option<SymmetricKey>> {
    match keys.and_then(|k| k.get(name)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => SymmetricKey::parse(s)
            .map(Some)
            .map_err(|why| HubError::invalid(format!("authentication.symmetricKey.{name}: {why}"))),
        Some(_) => Err(HubError::invalid(format!(
            "authentication.symmetricKey.{name} must be a string"
        ))),
    }
}

fn thumbprint_field(prints: Option<&Map<String, Value>>, name: &str) -> HubResult<Option<String>> {
    match prints.and_then(|p| p.get(name)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            let hex: String = s.chars().filter(|c| *c != ':').collect();
            if (hex.len() == 40 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                Ok(Some(hex.to_ascii_uppercase()))
            } else {
                Err(HubError::invalid(format!(
                    "authentication.x509Thumbprint.{name} must be a SHA-1 (40) or SHA-256 (64) hex thumbprint"
                )))
            }
        }
        Some(_) => Err(HubError::invalid(format!(
            "authentication.x509Thumbprint.{name} must be a string"
        ))),
    }
}

/// Connection state and activity, kept up to date by the device-facing front ends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Presence {
    pub connected: bool,
    pub state_updated: Timestamp,
    pub last_activity: Timestamp,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            connected: false,
            state_updated: Timestamp::NEVER,
            last_activity: Timestamp::NEVER,
        }
    }
}

impl Presence {
    pub fn state_str(&self) -> &'static str {
        if self.connected {
            "Connected"
        } else {
            "Disconnected"
        }
    }
}

/// Fields a device and a module share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Common {
    pub generation_id: String,
    pub etag: String,
    pub credentials: Credentials,
    pub presence: Presence,
    pub c2d_count: u32,
    /// The identity's persistent session (which subscriptions are on), kept here so that
    /// `--data-dir` restores it after a restart; see `connections::Connections::set_session`.
    #[serde(default)]
    pub session: u8,
}

/// A device identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub common: Common,
    pub status: Status,
    pub status_reason: Option<String>,
    pub status_updated: Timestamp,
    pub iot_edge: bool,
    pub device_scope: Option<String>,
    pub parent_scopes: Vec<String>,
}

/// What a create or update request may set on a device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub status: Status,
    pub status_reason: Option<String>,
    pub credentials: Credentials,
    pub iot_edge: bool,
    /// The scope of the parent edge device the request names: `parentScopes[0]` for an edge
    /// device, `deviceScope` for any other (IoT Hub derives the other field from it). The
    /// registry checks that it names a live edge device before applying the spec.
    pub parent: Option<String>,
}

/// Scheme of an edge device's scope: `ms-azure-iot-edge://{deviceId}-{generationId}`.
pub const EDGE_SCOPE_PREFIX: &str = "ms-azure-iot-edge://";

/// The scope IoT Hub gives an edge device.
pub fn edge_scope(device_id: &str, generation_id: &str) -> String {
    format!("{EDGE_SCOPE_PREFIX}{device_id}-{generation_id}")
}

/// The device a scope names: what lies between the prefix and the last `-` (device ids may
/// contain `-`, generation ids do not), as `az iot hub device-identity parent show` reads it.
pub fn scope_device_id(scope: &str) -> Option<&str> {
    let rest = scope.strip_prefix(EDGE_SCOPE_PREFIX)?;
    let (id, generation) = rest.rsplit_once('-')?;
    (!id.is_empty() && !generation.is_empty()).then_some(id)
}

impl DeviceSpec {
    /// Parses a device body. The id in the body, when present, must match the path's.
    pub fn from_json(
        device_id: &str,
        body: &Map<String, Value>,
        existing: Option<&Device>,
    ) -> HubResult<Self> {
        check_body_id(body, "deviceId", device_id)?;
        let credentials = Credentials::from_json(
            body.get("authentication"),
            existing.map(|d| &d.common.credentials),
        )?;
        let (iot_edge, parent) = edge_and_parent(body)?;
        Ok(Self {
            status: Status::parse(body.get("status"))?,
            status_reason: optional_string(body, "statusReason")?,
            credentials,
            iot_edge,
            parent,
        })
    }
}

impl Device {
    pub fn new(device_id: String, spec: DeviceSpec, etag: String) -> Self {
        let generation_id = new_generation_id();
        let (device_scope, parent_scopes) = scopes(&device_id, &generation_id, &spec);
        Self {
            device_id,
            common: Common {
                generation_id,
                etag,
                credentials: spec.credentials,
                presence: Presence::default(),
                c2d_count: 0,
                session: 0,
            },
            status: spec.status,
            status_reason: spec.status_reason,
            // IoT Hub shows "never" until the status is changed by an update.
            status_updated: Timestamp::NEVER,
            iot_edge: spec.iot_edge,
            device_scope,
            parent_scopes,
        }
    }

    /// Applies an update; the generation id, presence and counters are kept.
    pub fn update(&mut self, spec: DeviceSpec, etag: String) {
        if spec.status != self.status {
            self.status_updated = Timestamp::now();
        }
        (self.device_scope, self.parent_scopes) =
            scopes(&self.device_id, &self.common.generation_id, &spec);
        self.iot_edge = spec.iot_edge;
        self.status = spec.status;
        self.status_reason = spec.status_reason;
        self.common.credentials = spec.credentials;
        self.common.etag = etag;
    }

    pub fn to_json(&self) -> Value {
        let c = &self.common;
        json!({
            "deviceId": self.device_id,
            "generationId": c.generation_id,
            "etag": c.etag,
            "connectionState": c.presence.state_str(),
            "status": self.status.as_str(),
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": c.presence.state_updated,
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": c.presence.last_activity,
            "cloudToDeviceMessageCount": c.c2d_count,
            "authentication": c.credentials.to_json(),
            "capabilities": {"iotEdge": self.iot_edge},
            "deviceScope": self.device_scope,
            "parentScopes": self.parent_scopes,
        })
    }

    /// Identity fields of the device twin (`shared/protocol.md` D).
    pub fn write_twin_fields(&self, out: &mut Map<String, Value>) {
        let c = &self.common;
        out.insert("deviceId".into(), json!(self.device_id));
        out.insert("deviceEtag".into(), json!(c.etag));
        out.insert("status".into(), json!(self.status.as_str()));
        out.insert("statusReason".into(), json!(self.status_reason));
        out.insert("statusUpdateTime".into(), json!(self.status_updated));
        out.insert("connectionState".into(), json!(c.presence.state_str()));
        out.insert("lastActivityTime".into(), json!(c.presence.last_activity));
        out.insert("cloudToDeviceMessageCount".into(), json!(c.c2d_count));
        out.insert(
            "authenticationType".into(),
            json!(c.credentials.type_name()),
        );
        out.insert("x509Thumbprint".into(), c.credentials.thumbprints_json());
        out.insert("capabilities".into(), json!({"iotEdge": self.iot_edge}));
        if let Some(scope) = &self.device_scope {
            out.insert("deviceScope".into(), json!(scope));
        }
        if !self.parent_scopes.is_empty() {
            out.insert("parentScopes".into(), json!(self.parent_scopes));
        }
    }
}

/// A module identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Module {
    pub device_id: String,
    pub module_id: String,
    pub managed_by: Option<String>,
    pub common: Common,
}

/// What a create or update request may set on a module.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub managed_by: Option<String>,
    pub credentials: Credentials,
}

impl ModuleSpec {
    pub fn from_json(
        device_id: &str,
        module_id: &str,
        body: &Map<String, Value>,
        existing: Option<&Module>,
    ) -> HubResult<Self> {
        check_body_id(body, "deviceId", device_id)?;
        check_body_id(body, "moduleId", module_id)?;
        Ok(Self {
            managed_by: optional_string(body, "managedBy")?,
            credentials: Credentials::from_json(
                body.get("authentication"),
                existing.map(|m| &m.common.credentials),
            )?,
        })
    }
}

impl Module {
    pub fn new(device_id: String, module_id: String, spec: ModuleSpec, etag: String) -> Self {
        Self {
            device_id,
            module_id,
            managed_by: spec.managed_by,
            common: Common {
                generation_id: new_generation_id(),
                etag,
                credentials: spec.credentials,
                presence: Presence::default(),
                c2d_count: 0,
                session: 0,
            },
        }
    }

    pub fn update(&mut self, spec: ModuleSpec, etag: String) {
        self.managed_by = spec.managed_by;
        self.common.credentials = spec.credentials;
        self.common.etag = etag;
    }

    pub fn to_json(&self) -> Value {
        let c = &self.common;
        json!({
            "moduleId": self.module_id,
            "managedBy": self.managed_by,
            "deviceId": self.device_id,
            "generationId": c.generation_id,
            "etag": c.etag,
            "connectionState": c.presence.state_str(),
            "connectionStateUpdatedTime": c.presence.state_updated,
            "lastActivityTime": c.presence.last_activity,
            "cloudToDeviceMessageCount": c.c2d_count,
            "authentication": c.credentials.to_json(),
        })
    }

    /// Identity fields of the module twin. Modules have no status of their own; IoT Hub reports
    /// them as enabled.
    pub fn write_twin_fields(&self, device: &Device, out: &mut Map<String, Value>) {
        let c = &self.common;
        out.insert("deviceId".into(), json!(self.device_id));
        out.insert("moduleId".into(), json!(self.module_id));
        out.insert("deviceEtag".into(), json!(device.common.etag));
        out.insert("status".into(), json!("enabled"));
        out.insert("statusReason".into(), Value::Null);
        out.insert("statusUpdateTime".into(), json!(Timestamp::NEVER));
        out.insert("connectionState".into(), json!(c.presence.state_str()));
        out.insert("lastActivityTime".into(), json!(c.presence.last_activity));
        out.insert("cloudToDeviceMessageCount".into(), json!(c.c2d_count));
        out.insert(
            "authenticationType".into(),
            json!(c.credentials.type_name()),
        );
        out.insert("x509Thumbprint".into(), c.credentials.thumbprints_json());
    }
}

fn check_body_id(body: &Map<String, Value>, field: &str, expected: &str) -> HubResult<()> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == expected => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(other) => Err(HubError::invalid(format!(
            "'{field}' in the body ({other}) does not match '{expected}' in the path"
        ))),
    }
}

fn optional_string(body: &Map<String, Value>, field: &str) -> HubResult<Option<String>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(HubError::invalid(format!("'{field}' must be a string"))),
    }
}

/// A generation id: IoT Hub uses 18 decimal digits, different for each incarnation of an id.
/// `capabilities.iotEdge` of a device body, and the scope of the parent it names: for an edge
/// device `parentScopes[0]` (its own `deviceScope` is the hub's to assign, so one echoed back is
/// not an error); for any other device its `deviceScope`, from which IoT Hub derives
/// `parentScopes` (so the `parentScopes` it sends are ignored: `az iot hub device-identity
/// children remove` sends `deviceScope: ""` with the old ones). `""` means no parent.
pub fn edge_and_parent(body: &Map<String, Value>) -> HubResult<(bool, Option<String>)> {
    let iot_edge = match body.get("capabilities") {
        None | Some(Value::Null) => false,
        Some(Value::Object(c)) => match c.get("iotEdge") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(HubError::invalid(
                    "'capabilities.iotEdge' must be a boolean",
                ))
            }
        },
        Some(_) => return Err(HubError::invalid("'capabilities' must be a JSON object")),
    };
    let parent_scopes: Vec<String> = match body.get("parentScopes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| HubError::invalid("'parentScopes' must be strings"))
            })
            .collect::<HubResult<_>>()?,
        Some(_) => return Err(HubError::invalid("'parentScopes' must be an array")),
    };
    let device_scope = optional_string(body, "deviceScope")?;
    let parent = if iot_edge {
        if parent_scopes.len() > 1 {
            return Err(HubError::invalid(
                "An edge device can have at most one parent: 'parentScopes' has more than one scope",
            ));
        }
        parent_scopes.into_iter().next()
    } else {
        device_scope
    };
    Ok((iot_edge, parent.filter(|s| !s.is_empty())))
}

/// `deviceScope` and `parentScopes` of a device: an edge device has its own scope and its
/// parent's in `parentScopes`; a leaf device's scope is its parent's, and so is `parentScopes`.
fn scopes(
    device_id: &str,
    generation_id: &str,
    spec: &DeviceSpec,
) -> (Option<String>, Vec<String>) {
    let parents: Vec<String> = spec.parent.iter().cloned().collect();
    if spec.iot_edge {
        (Some(edge_scope(device_id, generation_id)), parents)
    } else {
        (spec.parent.clone(), parents)
    }
}

fn new_generation_id() -> String {
    use rand::Rng;
    format!(
        "{}",
        rand::thread_rng().gen_range(100_000_000_000_000_000u64..1_000_000_000_000_000_000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn id_rules() {
        for good in [
            "dev1",
            "a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p",
            "a+b#c;d",
            &"x".repeat(128),
        ] {
            assert!(validate_id(good, "id").is_ok(), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "a&b",
            "a\\b",
            "a\"b",
            "ünï",
            "a\tb",
            &"x".repeat(129),
        ] {
            assert!(validate_id(bad, "id").is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_keys_are_generated_as_python_and_node_expect() {
        for body in [
            json!({"deviceId":"d","authentication":{"symmetricKey":{},"type":"sas"}}),
            json!({"deviceId":"d","authentication":{"symmetricKey":{"primaryKey":"","secondaryKey":""},"type":"sas"}}),
            json!({"deviceId":"d"}),
        ] {
            let spec = DeviceSpec::from_json("d", &obj(body), None).unwrap();
            let [p, s] = spec.credentials.keys().unwrap();
            assert_ne!(p.to_base64(), s.to_base64());
        }
    }

    #[test]
    fn bad_bodies_are_refused() {
        for body in [
            json!({"deviceId":"other"}),
            json!({"status":"maybe"}),
            json!({"authentication":{"type":"sas","symmetricKey":{"primaryKey":"nope"}}}),
            json!({"authentication":{"type":"selfSigned","x509Thumbprint":{}}}),
            json!({"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"xyz"}}}),
            json!({"authentication":{"type":"magic"}}),
            json!({"capabilities":{"iotEdge":"yes"}}),
        ] {
            assert!(
                DeviceSpec::from_json("d", &obj(body.clone()), None).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn device_json_has_every_field_the_sdks_read() {
        let spec = DeviceSpec::from_json("d", &Map::new(), None).unwrap();
        let device = Device::new("d".into(), spec, "MQ==".into());
        let json = device.to_json();
        for field in [
            "deviceId",
            "generationId",
            "etag",
            "connectionState",
            "status",
            "statusReason",
            "connectionStateUpdatedTime",
            "statusUpdatedTime",
            "lastActivityTime",
            "cloudToDeviceMessageCount",
            "authentication",
            "capabilities",
            "deviceScope",
            "parentScopes",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["connectionState"], "Disconnected");
        assert_eq!(json["authentication"]["type"], "sas");
    }
}
