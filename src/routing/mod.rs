//! Message routing (Microsoft, "IoT Hub message routing" and "IoT Hub message routing query
//! syntax"): which endpoints a device message or hub event goes to, and the enrichments it
//! carries there.
//!
//! - A **route** has a source (`DeviceMessages`, `TwinChangeEvents`, `DeviceLifecycleEvents`,
//!   `DeviceConnectionStateEvents`), a condition in the query language (`query::Condition`),
//!   endpoints, and an enabled flag.
//! - **Endpoints**: the built-in `events` (the Event Hub-compatible endpoint) is index 0;
//!   custom endpoints are further Event Hub-compatible entities this emulator hosts itself,
//!   named as configured (IoT Hub would write to an Event Hub, Service Bus or Storage there).
//! - The **fallback route** (on unless turned off) sends device messages that no route selects
//!   to `events`. With no routes at all, that is every device message, as on a new hub. Hub
//!   events go nowhere unless a route selects them.
//! - A message that several routes send to one endpoint arrives there once.
//! - **Enrichments** add an application property to what goes to their endpoints: a fixed
//!   string, `$iothubname`, or a `$twin.…` path of the sender's twin (when the twin has no
//!   value there, the text itself).
//!
//! A condition sees, by name: the application properties; the system properties as
//! `$contentType`, `$contentEncoding`, `$connectionDeviceId`, `$connectionModuleId`,
//! `$messageId`, `$correlationId`, `$userId`, `$to`, `$enqueuedTime`; `$body.…` when the message
//! says it is JSON (`contentType` `application/json`, `contentEncoding` UTF-8, UTF-16 or
//! UTF-32, any case); `$twin.…` (tags and properties) of the device or module that sent it.
//! Anything that is not exactly `true` (null, undefined, a string) does not match.
//!
//! The grammar is the twin query language's WHERE expression (`query`'s lexer, parser and
//! evaluator, so operators, functions and undefined-value rules are the same). Where they
//! differ: a condition is one expression with no SELECT/FROM; names are resolved against the
//! message as above instead of a twin; application property values are strings (as every SDK
//! sends them), so `severity > 3` on a property compares a string with a number and does not
//! match; hyphenated system keywords (`$iothub-enqueuedtime`, `$dt-dataschema`) do not lex as
//! one name, so only the camel-case keywords above are offered.

mod config;
pub mod events;
mod row;

pub use config::{EndpointEntry, EnrichmentEntry, RouteEntry, RoutingFile};

use crate::query::Condition;
use crate::telemetry::{Message, Routed, Source};
use serde_json::Value;
use std::sync::Arc;

/// The built-in endpoint's name and index.
pub const BUILT_IN: &str = "events";
/// What the control API names the fallback route.
pub const FALLBACK: &str = "$fallback";

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub source: Source,
    /// `None` is the condition `true`.
    pub condition: Option<Condition>,
    /// Endpoint indexes.
    pub endpoints: Vec<usize>,
    pub enabled: bool,
}

/// What an enrichment's value is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrichValue {
    Text(String),
    HubName,
    /// A `$twin.…` path, without `$twin`.
    Twin(Vec<String>, String),
}

/// A compiled enrichment.
#[derive(Debug, Clone)]
pub struct Enrichment {
    pub key: String,
    pub value: EnrichValue,
    pub endpoints: Vec<usize>,
}

/// The hub's routing, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Endpoint names; index 0 is [`BUILT_IN`].
    endpoints: Vec<String>,
    routes: Vec<Route>,
    enrichments: Vec<Enrichment>,
    fallback: bool,
    /// [`FALLBACK`], shared by every message the fallback route selects.
    fallback_name: Arc<str>,
}

impl Default for Routing {
    /// A new hub's: no routes, the fallback route on.
    fn default() -> Self {
        Self {
            endpoints: vec![BUILT_IN.to_owned()],
            routes: Vec::new(),
            enrichments: Vec::new(),
            fallback: true,
            fallback_name: Arc::from(FALLBACK),
        }
    }
}

impl Routing {
    /// Every endpoint's name, the built-in first.
    pub fn endpoint_names(&self) -> &[String] {
        &self.endpoints
    }

    /// The index of the endpoint an Event Hubs client names (ASCII case ignored).
    pub fn endpoint(&self, name: &str) -> Option<usize> {
        self.endpoints
            .iter()
            .position(|e| e.eq_ignore_ascii_case(name))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn fallback(&self) -> bool {
        self.fallback
    }

    /// Whether any route of `source` is enabled: the hub builds events of a source only then.
    pub fn selects(&self, source: Source) -> bool {
        source == Source::DeviceMessages
            || self.routes.iter().any(|r| r.enabled && r.source == source)
    }

    /// Routes `message`: fills its `routes` and `routed` (endpoints, each with its
    /// enrichments). `twin(identity, path)` reads the sender's twin, only for the `$twin` paths
    /// a condition or enrichment reads.
    pub fn route(
        &self,
        message: &mut Message,
        hub_name: &str,
        twin: impl Fn(&crate::registry::IdentityKey, &[String]) -> Option<Value>,
    ) {
        let row = row::MessageRow::new(message, twin);
        let mut routes: Vec<Arc<str>> = Vec::new();
        let mut endpoints: Vec<usize> = Vec::new();
        for route in &self.routes {
            if !route.enabled || route.source != message.source {
                continue;
            }
            if route.condition.as_ref().is_some_and(|c| !c.matches(&row)) {
                continue;
            }
            routes.push(Arc::clone(&route.name));
            for e in &route.endpoints {
                if !endpoints.contains(e) {
                    endpoints.push(*e);
                }
            }
        }
        if routes.is_empty() && self.fallback && message.source == Source::DeviceMessages {
            routes.push(Arc::clone(&self.fallback_name));
            endpoints.push(0);
        }
        let routed = endpoints
            .into_iter()
            .map(|endpoint| Routed {
                endpoint,
                enrichments: self
                    .enrichments
                    .iter()
                    .filter(|e| e.endpoints.contains(&endpoint))
                    .map(|e| (e.key.clone(), row.enrichment(&e.value, hub_name)))
                    .collect(),
            })
            .collect();
        drop(row);
        message.routes = routes;
        message.routed = routed;
    }
}

#[cfg(test)]
mod tests;
