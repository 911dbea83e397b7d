//! The config file's `[routing]` table, checked and compiled into [`Routing`]. Anything it gets
//! wrong stops start-up with the file, the line and the reason.

use super::{EnrichValue, Enrichment, Route, Routing, BUILT_IN};
use crate::query::Condition;
use crate::telemetry::Source;
use serde::Deserialize;
use std::sync::Arc;
use toml::Spanned;

/// IoT Hub's limits for a standard hub: 100 routes, 10 enrichments, 10 custom endpoints of a
/// kind (Event Hubs here).
pub const MAX_ROUTES: usize = 100;
pub const MAX_ENRICHMENTS: usize = 10;
pub const MAX_ENDPOINTS: usize = 10;

/// `[routing]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    /// The fallback route (default on).
    pub fallback: Option<bool>,
    #[serde(default)]
    pub endpoints: Vec<Spanned<EndpointEntry>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteEntry>>,
    #[serde(default)]
    pub enrichments: Vec<Spanned<EnrichmentEntry>>,
}

/// `[[routing.endpoints]]`: a custom endpoint, served as an Event Hub-compatible entity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    pub name: String,
}

/// `[[routing.routes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub name: String,
    pub source: String,
    /// Absent means `true`.
    pub condition: Option<String>,
    pub endpoints: Vec<String>,
    pub enabled: Option<bool>,
}

/// `[[routing.enrichments]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentEntry {
    pub key: String,
    pub value: String,
    pub endpoints: Vec<String>,
}

/// A route or endpoint name as IoT Hub accepts it: 1–64 letters, digits, `-`, `_` and `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl RoutingFile {
    /// Checks and compiles the table; `path` and `text` (the file's) give line numbers.
    pub fn compile(&self, path: &str, text: &str, hub_name: &str) -> Result<Routing, String> {
        let line = |span: std::ops::Range<usize>| {
            text.get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1
        };
        let mut routing = Routing {
            fallback: self.fallback.unwrap_or(true),
            ..Routing::default()
        };
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!(
                "{path}: at most {MAX_ENDPOINTS} custom endpoints, not {}",
                self.endpoints.len()
            ));
        }
        for spanned in &self.endpoints {
            let at = format!(
                "{path}:{}: endpoint '{}'",
                line(spanned.span()),
                spanned.get_ref().name
            );
            let name = &spanned.get_ref().name;
            if !valid_name(name) {
                return Err(format!(
                    "{at}: a name is 1 to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            if routing.endpoint(name).is_some() || name.eq_ignore_ascii_case(hub_name) {
                return Err(format!(
                    "{at}: the name is taken ('{BUILT_IN}', the hub's own event hub '{hub_name}' and every other endpoint's)"
                ));
            }
            routing.endpoints.push(name.clone());
        }
        let endpoints_of = |names: &[String], at: &str, routing: &Routing| {
            if names.is_empty() {
                return Err(format!("{at}: name at least one endpoint"));
            }
            names
                .iter()
                .map(|n| {
                    routing.endpoint(n).ok_or_else(|| {
                        format!(
                            "{at}: no endpoint named '{n}' (there are: {})",
                            routing.endpoints.join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<usize>, String>>()
        };
        if self.routes.len() > MAX_ROUTES {
            return Err(format!(
                "{path}: at most {MAX_ROUTES} routes, not {}",
                self.routes.len()
            ));
        }
        for spanned in &self.routes {
            let entry = spanned.get_ref();
            let at = format!("{path}:{}: route '{}'", line(spanned.span()), entry.name);
            if !valid_name(&entry.name) {
                return Err(format!(
                    "{at}: a name is 1 to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            if routing
                .routes
                .iter()
                .any(|r| r.name.eq_ignore_ascii_case(&entry.name))
            {
                return Err(format!("{at}: another route has this name"));
            }
            if ["DigitalTwinChangeEvents", "DeviceJobLifecycleEvents"]
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&entry.source))
            {
                return Err(format!(
                    "{at}: IoT Hub's source '{}' is not produced by this emulator yet (it emits {})",
                    entry.source,
                    Source::ALL.map(Source::name).join(", ")
                ));
            }
            let source = Source::parse(&entry.source).ok_or_else(|| {
                format!(
                    "{at}: unknown source '{}' (one of {})",
                    entry.source,
                    Source::ALL.map(Source::name).join(", ")
                )
            })?;
            let condition = match entry.condition.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(text) => {
                    Some(Condition::parse(text).map_err(|e| format!("{at}: condition: {e}"))?)
                }
            };
            let endpoints = endpoints_of(&entry.endpoints, &at, &routing)?;
            routing.routes.push(Route {
                name: Arc::from(entry.name.as_str()),
                source,
                condition,
                endpoints,
                enabled: entry.enabled.unwrap_or(true),
            });
        }
        if self.enrichments.len() > MAX_ENRICHMENTS {
            return Err(format!(
                "{path}: at most {MAX_ENRICHMENTS} enrichments, not {}",
                self.enrichments.len()
            ));
        }
        for spanned in &self.enrichments {
            let entry = spanned.get_ref();
            let at = format!(
                "{path}:{}: enrichment '{}'",
                line(spanned.span()),
                entry.key
            );
            if entry.key.is_empty() || entry.key.len() > 64 {
                return Err(format!("{at}: a key is 1 to 64 characters"));
            }
            if entry.value.is_empty() || entry.value.len() > 256 {
                return Err(format!("{at}: a value is 1 to 256 characters"));
            }
            let value = if entry.value.eq_ignore_ascii_case("$iothubname") {
                EnrichValue::HubName
            } else if let Some(path) = entry.value.strip_prefix("$twin.") {
                let path: Vec<String> = path.split('.').map(str::to_owned).collect();
                let readable = matches!(
                    path.first().map(String::as_str),
                    Some("tags" | "properties")
                ) && path.len() >= 2
                    && path.iter().all(|s| !s.is_empty());
                if !readable {
                    return Err(format!(
                        "{at}: a twin value is $twin.tags.… or $twin.properties.desired/reported.…"
                    ));
                }
                EnrichValue::Twin(path, entry.value.clone())
            } else {
                EnrichValue::Text(entry.value.clone())
            };
            let endpoints = endpoints_of(&entry.endpoints, &at, &routing)?;
            routing.enrichments.push(Enrichment {
                key: entry.key.clone(),
                value,
                endpoints,
            });
        }
        Ok(routing)
    }
}
