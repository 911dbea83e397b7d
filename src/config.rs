//! Configuration: command-line flags merged with an optional TOML file.
//!
//! The file may set the hub's host name, replace the key of a built-in policy, add policies, and
//! change the per-device module limit. Anything it gets wrong stops start-up with the file and
//! the reason.

use crate::auth::{default_policies, Permission, Permissions, Policy, SymmetricKey};
use crate::seed::{SeedDevice, Seeds};
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Everything the hub needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The hub's host name, as in connection strings (`HostName=`).
    pub hostname: String,
    /// Address the listeners bind to.
    pub bind: IpAddr,
    pub https_port: u16,
    pub mqtt_port: u16,
    pub amqp_port: u16,
    /// Where the CA and server certificate live.
    pub certs_dir: PathBuf,
    /// Extra names for the server certificate (and accepted as SAS hosts).
    pub extra_sans: Vec<String>,
    pub policies: Vec<Policy>,
    /// Most modules a device may have (IoT Hub: 50).
    pub max_modules_per_device: usize,
    /// How many device-to-cloud messages the telemetry log keeps.
    pub telemetry_capacity: usize,
    /// Identities that exist from the start (and again after a reset).
    pub seeds: Seeds,
    /// CA certificates that `certificateAuthority` devices' certificates must chain to.
    pub trusted_cas: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Message routing.
    pub routing: crate::routing::Routing,
}

impl Config {
    /// Every name the hub answers to: in SAS `sr` hosts and in the server certificate.
    /// The hub's name: the first label of its host name (`myhub` of `myhub.azure-devices.net`),
    /// or `iothub-emulator` when the host name is an IP address. The Event Hub-compatible
    /// endpoint's entity is named after it.
    pub fn hub_name(&self) -> String {
        if self.hostname.parse::<std::net::IpAddr>().is_ok() {
            return "iothub-emulator".to_owned();
        }
        let label = self.hostname.split('.').next().unwrap_or_default();
        if label.is_empty() {
            "iothub-emulator".to_owned()
        } else {
            label.to_ascii_lowercase()
        }
    }

    pub fn host_names(&self) -> Vec<String> {
        let mut names = vec![
            self.hostname.to_ascii_lowercase(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            self.bind.to_string(),
        ];
        names.extend(self.extra_sans.iter().map(|s| s.to_ascii_lowercase()));
        names.retain(|n| !n.is_empty() && n != "0.0.0.0" && n != "::");
        names.sort();
        names.dedup();
        names
    }

    /// The owner policy's connection string, as printed at start-up.
    pub fn owner_connection_string(&self) -> String {
        let owner = self.owner_policy();
        format!(
            "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            self.hostname,
            owner.primary_key.to_base64()
        )
    }

    fn owner_policy(&self) -> &crate::auth::Policy {
        self.policies
            .iter()
            .find(|p| p.name == "iothubowner")
            .expect("the iothubowner policy always exists")
    }

    /// The Event Hub-compatible endpoint's connection string (owner policy), as the Event Hubs
    /// SDKs take it.
    pub fn event_hub_connection_string(&self) -> String {
        let owner = self.owner_policy();
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName=iothubowner;SharedAccessKey={};EntityPath={}",
            self.hostname,
            owner.primary_key.to_base64(),
            self.hub_name()
        )
    }
}

/// The commented example configuration, printed by `--print-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/example.toml");

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub hostname: Option<String>,
    pub max_modules_per_device: Option<usize>,
    pub telemetry_log_size: Option<usize>,
    /// PEM files of CA certificates for `certificateAuthority` devices (as if uploaded and
    /// verified on the hub).
    #[serde(default)]
    pub trusted_ca_files: Vec<PathBuf>,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    /// Where file uploads go (flags override it).
    pub file_upload: Option<FileUploadEntry>,
    /// Devices (and their modules) that exist from the start.
    #[serde(default)]
    pub devices: Vec<toml::Spanned<SeedDevice>>,
    /// Message routing: routes, custom endpoints, enrichments, the fallback route.
    pub routing: Option<crate::routing::RoutingFile>,
    /// Where the file came from and its text, for line numbers in seed errors.
    #[serde(skip)]
    source: (String, String),
}

/// The `[file_upload]` table: IoT Hub's file-upload settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUploadEntry {
    /// A storage connection string, or `none` to turn file upload off.
    pub connection_string: Option<String>,
    /// The blob container uploads go to.
    pub container: Option<String>,
}

/// A policy in the config file. A name that exists replaces that policy's key (and its
/// permissions, when given); a new name adds a policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    pub name: String,
    pub key: String,
    pub secondary_key: Option<String>,
    pub permissions: Option<Vec<Permission>>,
}

/// IoT Hub allows at most 16 shared access policies.
pub const MAX_POLICIES: usize = 16;

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a config file's text; `path` names it in errors (which carry TOML's line and
    /// column).
    pub fn parse(text: &str, path: &str) -> Result<Self, String> {
        let mut file: Self =
            toml::from_str(text).map_err(|e| format!("config file {path}: {e}"))?;
        file.source = (path.to_owned(), text.to_owned());
        Ok(file)
    }

    /// The routing the file declares (a new hub's when it declares none), checked.
    pub fn routing(&self, hub_name: &str) -> Result<crate::routing::Routing, String> {
        match &self.routing {
            None => Ok(crate::routing::Routing::default()),
            Some(r) => r.compile(&self.source.0, &self.source.1, hub_name),
        }
    }

    /// The seeded devices, ready to apply.
    pub fn seeds(&self) -> Seeds {
        Seeds {
            devices: self.devices.clone(),
            path: self.source.0.clone(),
            text: self.source.1.clone(),
        }
    }

    /// Applies the file's policies over the built-in ones.
    pub fn policies(&self) -> Result<Vec<Policy>, String> {
        let mut policies = default_policies();
        for entry in &self.policies {
            if entry.name.is_empty()
                || !entry
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                return Err(format!("policy name {:?} is invalid", entry.name));
            }
            let key = SymmetricKey::parse(&entry.key)
                .map_err(|e| format!("policy {}: key: {e}", entry.name))?;
            let secondary = match &entry.secondary_key {
                Some(k) => Some(
                    SymmetricKey::parse(k)
                        .map_err(|e| format!("policy {}: secondary_key: {e}", entry.name))?,
                ),
                None => None,
            };
            let permissions = entry.permissions.as_deref().map(Permissions::of);
            match policies.iter_mut().find(|p| p.name == entry.name) {
                Some(p) => {
                    p.primary_key = key;
                    if let Some(s) = secondary {
                        p.secondary_key = s;
                    }
                    if let Some(perms) = permissions {
                        p.permissions = perms;
                    }
                }
                None => {
                    let permissions = permissions.ok_or_else(|| {
                        format!("policy {}: a new policy needs 'permissions'", entry.name)
                    })?;
                    policies.push(Policy {
                        name: entry.name.clone(),
                        secondary_key: secondary.unwrap_or_else(SymmetricKey::generate),
                        primary_key: key,
                        permissions,
                    });
                }
            }
        }
        if policies.len() > MAX_POLICIES {
            return Err(format!(
                "at most {MAX_POLICIES} shared access policies are allowed, not {}",
                policies.len()
            ));
        }
        Ok(policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_replaces_keys_and_adds_policies() {
        let file: ConfigFile = toml::from_str(
            r#"
            [[policies]]
            name = "registryRead"
            key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

            [[policies]]
            name = "backend"
            key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
            permissions = ["ServiceConnect", "RegistryRead"]
            "#,
        )
        .unwrap();
        let policies = file.policies().unwrap();
        let read = policies.iter().find(|p| p.name == "registryRead").unwrap();
        assert_eq!(
            read.primary_key.to_base64(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
        assert!(read.permissions.has(Permission::RegistryRead));
        let backend = policies.iter().find(|p| p.name == "backend").unwrap();
        assert!(backend.permissions.has(Permission::ServiceConnect));
        assert!(!backend.permissions.has(Permission::RegistryWrite));
    }

    #[test]
    fn the_example_file_parses() {
        let file = ConfigFile::parse(EXAMPLE_CONFIG, "example.toml").unwrap();
        assert!(file.policies().unwrap().iter().any(|p| p.name == "backend"));
        assert_eq!(file.devices.len(), 2);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        assert!(toml::from_str::<ConfigFile>("colour = 1").is_err());
        let bad_key: ConfigFile =
            toml::from_str("[[policies]]\nname = \"x\"\nkey = \"short\"\npermissions = []")
                .unwrap();
        assert!(bad_key.policies().unwrap_err().contains("policy x"));
        let no_perms: ConfigFile = toml::from_str(
            "[[policies]]\nname = \"x\"\nkey = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
        )
        .unwrap();
        assert!(no_perms.policies().is_err());
    }
}
