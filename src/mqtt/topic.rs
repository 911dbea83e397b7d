//! IoT Hub's MQTT topics, parsed at the edge into typed values (`shared/protocol.md` C.4, C.5).
//!
//! Every topic a device publishes to becomes a [`Topic`], every filter it subscribes to a
//! [`Feature`], and the hub's outbound topics are built by the `format_*` functions. Topics are
//! parsed *for one identity*: a topic that names another device or module does not parse, so a
//! connection can never reach another identity's data.

pub use crate::connections::Feature;
use crate::registry::IdentityKey;
use percent_encoding::percent_decode_str;

/// A device-to-hub publish, by purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `$iothub/twin/GET/?$rid={rid}`
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
    TwinPatchReported { rid: String },
    /// `$iothub/methods/res/{status}/?$rid={rid}`
    MethodResponse { status: i32, rid: String },
    /// `devices/{d}/messages/events/{bag}` or `devices/{d}/modules/{m}/messages/events/{bag}`
    Telemetry {
        properties: Vec<(String, Option<String>)>,
    },
}

/// Why a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topic {0:?} is not an IoT Hub topic this connection may use")]
pub struct UnknownTopic(pub String);

impl Topic {
    /// Parses a publish topic of the connection authenticated as `who`.
    pub fn parse(topic: &str, who: &IdentityKey) -> Result<Self, UnknownTopic> {
        let unknown = || UnknownTopic(topic.chars().take(256).collect());
        if let Some(rest) = topic.strip_prefix("$iothub/") {
            let (path, query) = rest.split_once("/?").ok_or_else(unknown)?;
            let rid = query_value(query, "$rid").ok_or_else(unknown)?;
            return match path.split('/').collect::<Vec<_>>().as_slice() {
                ["twin", "GET"] => Ok(Self::TwinGet { rid }),
                ["twin", "PATCH", "properties", "reported"] => Ok(Self::TwinPatchReported { rid }),
                ["methods", "res", status] => Ok(Self::MethodResponse {
                    status: status.parse().map_err(|_| unknown())?,
                    rid,
                }),
                _ => Err(unknown()),
            };
        }
        let prefix = events_prefix(who);
        let bag = topic
            .strip_prefix(&prefix)
            .and_then(|rest| {
                if rest.is_empty() {
                    Some("")
                } else {
                    rest.strip_prefix('/')
                }
            })
            .ok_or_else(unknown)?;
        Ok(Self::Telemetry {
            properties: parse_bag(bag).ok_or_else(unknown)?,
        })
    }
}

/// Maps a SUBSCRIBE filter of `who` to the feature it enables.
pub fn parse_filter(filter: &str, who: &IdentityKey) -> Option<Feature> {
    match filter {
        "$iothub/twin/res/#" => return Some(Feature::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => return Some(Feature::DesiredPatches),
        "$iothub/methods/POST/#" => return Some(Feature::Methods),
        _ => {}
    }
    let device = &who.device_id;
    match &who.module_id {
        None => (filter == format!("devices/{device}/messages/devicebound/#"))
            .then_some(Feature::CloudToDevice),
        Some(module) => (filter == format!("devices/{device}/modules/{module}/inputs/#")
            || filter == format!("devices/{device}/modules/{module}/#"))
        .then_some(Feature::Inputs),
    }
}

fn events_prefix(who: &IdentityKey) -> String {
    match &who.module_id {
        None => format!("devices/{}/messages/events", who.device_id),
        Some(m) => format!("devices/{}/modules/{m}/messages/events", who.device_id),
    }
}

/// Finds `name=value` in a `&`-separated query and returns the value as written (`$rid` must
/// be echoed byte for byte).
fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

/// Parses a property bag: `k=v&k2&k3=` with percent-encoding, an optional leading `?` and
/// trailing `/`; `%24.` and `$.` system keys are both accepted and normalised to `$.`. A bare
/// key has no value. `+` stays a plus sign (C.5).
pub fn parse_bag(bag: &str) -> Option<Vec<(String, Option<String>)>> {
    let bag = bag.strip_prefix('?').unwrap_or(bag);
    let bag = bag.strip_suffix('/').unwrap_or(bag);
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    bag.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = match kv.split_once('=') {
                Some((k, v)) => (decode(k)?, Some(decode(v)?)),
                None => (decode(kv)?, None),
            };
            (!k.is_empty()).then_some((k, v))
        })
        .collect()
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`
pub fn format_twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`; the name is sent as given (Node reads it raw).
pub fn format_method_request(name: &str, rid: u64) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={rid}")
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`
pub fn format_desired(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> IdentityKey {
        IdentityKey::device("dev1")
    }

    fn module() -> IdentityKey {
        IdentityKey::module("dev1", "mod1")
    }

    #[test]
    fn twin_and_method_topics() {
        let cases = [
            (
                "$iothub/twin/GET/?$rid=abc",
                Topic::TwinGet { rid: "abc".into() },
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=42",
                Topic::TwinPatchReported { rid: "42".into() },
            ),
            (
                "$iothub/methods/res/200/?$rid=7",
                Topic::MethodResponse {
                    status: 200,
                    rid: "7".into(),
                },
            ),
            (
                "$iothub/twin/GET/?x=1&$rid=9d4b-1",
                Topic::TwinGet {
                    rid: "9d4b-1".into(),
                },
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(Topic::parse(topic, &dev()).unwrap(), expected, "{topic}");
        }
        for bad in [
            "$iothub/twin/GET",
            "$iothub/twin/GET/?",
            "$iothub/twin/GET?$rid=1",
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "$iothub/methods/res/abc/?$rid=1",
            "$iothub/other/?$rid=1",
            "somewhere/else",
        ] {
            assert!(Topic::parse(bad, &dev()).is_err(), "{bad}");
        }
    }

    #[test]
    fn telemetry_topics_with_every_bag_variant() {
        let expect = |topic: &str, who: &IdentityKey| match Topic::parse(topic, who) {
            Ok(Topic::Telemetry { properties }) => properties,
            other => panic!("{topic}: {other:?}"),
        };
        assert!(expect("devices/dev1/messages/events/", &dev()).is_empty());
        assert!(expect("devices/dev1/messages/events", &dev()).is_empty());
        let props = expect(
            "devices/dev1/messages/events/%24.mid=mid-1&%24.ct=application%2Fjson&a%2Fb=x%26y%3Dz&alert=high%20temp&p=1+1&bare",
            &dev(),
        );
        assert_eq!(
            props,
            vec![
                ("$.mid".to_owned(), Some("mid-1".to_owned())),
                ("$.ct".to_owned(), Some("application/json".to_owned())),
                ("a/b".to_owned(), Some("x&y=z".to_owned())),
                ("alert".to_owned(), Some("high temp".to_owned())),
                ("p".to_owned(), Some("1+1".to_owned())),
                ("bare".to_owned(), None),
            ]
        );
        let props = expect(
            "devices/dev1/modules/mod1/messages/events/?$.on=out1/",
            &module(),
        );
        assert_eq!(props, vec![("$.on".to_owned(), Some("out1".to_owned()))]);
    }

    #[test]
    fn another_identitys_topics_do_not_parse() {
        assert!(Topic::parse("devices/dev2/messages/events/", &dev()).is_err());
        assert!(Topic::parse("devices/dev1/messages/eventsX", &dev()).is_err());
        assert!(Topic::parse("devices/dev1/modules/mod2/messages/events/", &module()).is_err());
        // A module may not publish as its device, nor the device as its module.
        assert!(Topic::parse("devices/dev1/messages/events/", &module()).is_err());
        assert!(Topic::parse("devices/dev1/modules/mod1/messages/events/", &dev()).is_err());
    }

    #[test]
    fn filters_map_to_features_for_the_right_identity_only() {
        assert_eq!(
            parse_filter("$iothub/twin/res/#", &dev()),
            Some(Feature::TwinResponses)
        );
        assert_eq!(
            parse_filter("$iothub/twin/PATCH/properties/desired/#", &module()),
            Some(Feature::DesiredPatches)
        );
        assert_eq!(
            parse_filter("$iothub/methods/POST/#", &dev()),
            Some(Feature::Methods)
        );
        assert_eq!(
            parse_filter("devices/dev1/messages/devicebound/#", &dev()),
            Some(Feature::CloudToDevice)
        );
        assert_eq!(
            parse_filter("devices/dev2/messages/devicebound/#", &dev()),
            None
        );
        assert_eq!(
            parse_filter("devices/dev1/modules/mod1/inputs/#", &module()),
            Some(Feature::Inputs)
        );
        assert_eq!(
            parse_filter("devices/dev1/modules/mod1/#", &module()),
            Some(Feature::Inputs)
        );
        assert_eq!(
            parse_filter("devices/dev1/modules/mod2/inputs/#", &module()),
            None
        );
        assert_eq!(parse_filter("#", &dev()), None);
        assert_eq!(parse_filter("$iothub/#", &dev()), None);
    }

    #[test]
    fn outbound_topics_keep_the_slash_before_the_query() {
        assert_eq!(
            format_twin_response(200, "r1", None),
            "$iothub/twin/res/200/?$rid=r1"
        );
        assert_eq!(
            format_twin_response(204, "r1", Some(5)),
            "$iothub/twin/res/204/?$rid=r1&$version=5"
        );
        assert_eq!(
            format_desired(3),
            "$iothub/twin/PATCH/properties/desired/?$version=3"
        );
    }
}
