//! Pre-seeded identities: devices and modules, with their keys, tags and twins, declared in the
//! `--config` file so that a CI run starts with exactly the hub its tests expect.
//!
//! Seeds are applied through the same registry operations the REST API uses, so a seed file is
//! validated exactly as strictly as the equivalent REST calls; the first problem stops start-up
//! with the file, the line and the reason.

use crate::error::HubError;
use crate::registry::{IdentityKey, IfMatch, Registry};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use toml::Spanned;

/// A device in the config file (`[[devices]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedDevice {
    pub id: String,
    /// `enabled` (default) or `disabled`.
    pub status: Option<String>,
    /// Base64 symmetric keys; generated when absent.
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    /// X.509 thumbprints (hex); setting one makes the identity `selfSigned`.
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    #[serde(default)]
    pub iot_edge: bool,
    pub tags: Option<Map<String, Value>>,
    pub desired: Option<Map<String, Value>>,
    pub reported: Option<Map<String, Value>>,
    #[serde(default)]
    pub modules: Vec<Spanned<SeedModule>>,
}

/// A module of a seeded device (`[[devices.modules]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedModule {
    pub id: String,
    pub managed_by: Option<String>,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub tags: Option<Map<String, Value>>,
    pub desired: Option<Map<String, Value>>,
    pub reported: Option<Map<String, Value>>,
}

/// Where the seeds came from, for error messages.
#[derive(Debug, Clone, Default)]
pub struct Seeds {
    pub devices: Vec<Spanned<SeedDevice>>,
    /// The file's path and text, to turn spans into line numbers.
    pub path: String,
    pub text: String,
}

/// The `authentication` object of a REST identity body.
fn authentication(
    primary_key: Option<&String>,
    secondary_key: Option<&String>,
    primary_thumbprint: Option<&String>,
    secondary_thumbprint: Option<&String>,
) -> Value {
    if primary_thumbprint.is_some() || secondary_thumbprint.is_some() {
        json!({"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint}})
    } else {
        json!({"type": "sas", "symmetricKey": {
            "primaryKey": primary_key, "secondaryKey": secondary_key}})
    }
}

/// Applies the twin parts of a seed: tags and desired as a service PATCH, reported as a device
/// patch.
fn apply_twin(
    registry: &Registry,
    key: &IdentityKey,
    tags: Option<&Map<String, Value>>,
    desired: Option<&Map<String, Value>>,
    reported: Option<&Map<String, Value>>,
) -> Result<(), HubError> {
    if tags.is_some() || desired.is_some() {
        let body = json!({"tags": tags, "properties": {"desired": desired}});
        let Value::Object(body) = body else {
            unreachable!("built as an object")
        };
        registry.patch_twin(key, &body, &IfMatch::Any, |_| {})?;
    }
    if let Some(reported) = reported {
        registry.patch_reported(key, reported)?;
    }
    Ok(())
}

impl Seeds {
    fn line_of(&self, span: std::ops::Range<usize>) -> usize {
        self.text
            .get(..span.start)
            .map_or(0, |before| before.matches('\n').count())
            + 1
    }

    /// Creates every seeded identity in `registry`.
    ///
    /// # Errors
    /// `"<file>:<line>: device '<id>': <reason>"` for the first seed the registry refuses.
    pub fn apply(&self, registry: &Registry) -> Result<(), String> {
        for spanned in &self.devices {
            let line = self.line_of(spanned.span());
            let d = spanned.get_ref();
            let fail =
                |what: String, e: HubError| format!("{}:{line}: {what}: {}", self.path, e.message);
            let body = json!({
                "deviceId": d.id,
                "status": d.status,
                "authentication": authentication(d.primary_key.as_ref(), d.secondary_key.as_ref(),
                    d.primary_thumbprint.as_ref(), d.secondary_thumbprint.as_ref()),
                "capabilities": {"iotEdge": d.iot_edge},
            });
            let Value::Object(body) = body else {
                unreachable!("built as an object")
            };
            let what = format!("device '{}'", d.id);
            registry
                .put_device(&d.id, &body, &IfMatch::Absent)
                .map_err(|e| fail(what.clone(), e))?;
            apply_twin(
                registry,
                &IdentityKey::device(d.id.clone()),
                d.tags.as_ref(),
                d.desired.as_ref(),
                d.reported.as_ref(),
            )
            .map_err(|e| fail(what.clone(), e))?;
            for spanned in &d.modules {
                let line = self.line_of(spanned.span());
                let m = spanned.get_ref();
                let what = format!("module '{}' of device '{}'", m.id, d.id);
                let fail = |e: HubError| format!("{}:{line}: {what}: {}", self.path, e.message);
                let body = json!({
                    "deviceId": d.id,
                    "moduleId": m.id,
                    "managedBy": m.managed_by,
                    "authentication": authentication(m.primary_key.as_ref(), m.secondary_key.as_ref(),
                        m.primary_thumbprint.as_ref(), m.secondary_thumbprint.as_ref()),
                });
                let Value::Object(body) = body else {
                    unreachable!("built as an object")
                };
                registry
                    .put_module(&d.id, &m.id, &body, &IfMatch::Absent)
                    .map_err(fail)?;
                apply_twin(
                    registry,
                    &IdentityKey::module(d.id.clone(), m.id.clone()),
                    m.tags.as_ref(),
                    m.desired.as_ref(),
                    m.reported.as_ref(),
                )
                .map_err(fail)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ConfigFile;
    use crate::registry::{IdentityKey, Registry};

    fn seeds(text: &str) -> Result<super::Seeds, String> {
        ConfigFile::parse(text, "hub.toml").map(|f| f.seeds())
    }

    #[test]
    fn the_shipped_example_applies() {
        let registry = Registry::new(50);
        seeds(crate::config::EXAMPLE_CONFIG)
            .unwrap()
            .apply(&registry)
            .unwrap();
        let module = registry.get_module("device01", "myFirstModule").unwrap();
        assert_eq!(
            module["authentication"]["symmetricKey"]["primaryKey"],
            "bW9kdWxlLWtleS1mb3ItdGVzdHMtb25seS0wMDAwMDA="
        );
        let twin = registry
            .get_twin(&IdentityKey::module("device01", "myFirstModule"))
            .unwrap();
        assert_eq!(
            twin["properties"]["desired"]["conditions"]["temperature"]["warning"],
            75
        );
        assert_eq!(twin["properties"]["reported"]["firmware"], "1.0.0");
    }

    #[test]
    fn a_bad_seed_names_the_file_the_line_and_the_reason() {
        let text = "[[devices]]\nid = \"ok\"\n\n[[devices]]\nid = \"bad id\"\n";
        let err = seeds(text).unwrap().apply(&Registry::new(50)).unwrap_err();
        assert!(err.starts_with("hub.toml:4: device 'bad id':"), "{err}");

        let text = "[[devices]]\nid = \"d\"\n[devices.desired]\n\"a.b\" = 1\n";
        let err = seeds(text).unwrap().apply(&Registry::new(50)).unwrap_err();
        assert!(err.starts_with("hub.toml:1: device 'd':"), "{err}");
        assert!(err.contains("a.b"), "{err}");

        let text = "[[devices]]\nid = \"d\"\n\n  [[devices.modules]]\n  id = \"m\"\n  primary_key = \"short\"\n";
        let err = seeds(text).unwrap().apply(&Registry::new(50)).unwrap_err();
        assert!(
            err.starts_with("hub.toml:4: module 'm' of device 'd':"),
            "{err}"
        );

        let err = seeds("[[devices]]\nid = \"d\"\ncolour = 1\n").unwrap_err();
        assert!(err.contains("hub.toml") && err.contains("line 3"), "{err}");
    }
}
