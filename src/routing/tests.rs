//! Routing: conditions over properties, `$body` and `$twin`, the fallback route, one delivery
//! per endpoint, enrichments, and the config file's checks.

use super::*;
use crate::registry::IdentityKey;
use crate::telemetry::Incoming;
use serde_json::json;

const CONFIG: &str = r#"
[routing]
[[routing.endpoints]]
name = "hot"
[[routing.endpoints]]
name = "audit"

[[routing.routes]]
name = "hot-path"
source = "DeviceMessages"
condition = "processingPath = 'hot'"
endpoints = ["hot"]

[[routing.routes]]
name = "warm-body"
source = "DeviceMessages"
condition = "$body.Weather.Temperature > 50 AND $connectionDeviceId = 'd1'"
endpoints = ["hot", "events"]

[[routing.routes]]
name = "by-tag"
source = "DeviceMessages"
condition = "$twin.tags.site = 'north'"
endpoints = ["audit"]

[[routing.routes]]
name = "twins"
source = "TwinChangeEvents"
condition = "opType = 'updateTwin' AND IS_DEFINED($body.properties.reported.fw)"
endpoints = ["events"]

[[routing.routes]]
name = "off"
source = "DeviceMessages"
endpoints = ["audit"]
enabled = false

[[routing.enrichments]]
key = "site"
value = "$twin.tags.site"
endpoints = ["hot"]
[[routing.enrichments]]
key = "hub"
value = "$iothubname"
endpoints = ["hot", "audit"]
"#;

fn routing(text: &str) -> Result<Routing, String> {
    let file: crate::config::ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
    file.routing
        .unwrap_or_default()
        .compile("hub.toml", text, "myhub")
}

fn message(props: &[(&str, &str)], body: &str) -> Message {
    Message::stamp(
        &IdentityKey::device("d1"),
        "SAS",
        Incoming {
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
                .collect(),
            body: bytes::Bytes::from(body.to_owned()),
        },
    )
    .unwrap()
}

fn routed(r: &Routing, m: &mut Message, twin: Option<Value>) -> (Vec<String>, Vec<usize>) {
    r.route(m, "myhub", |_, path| {
        twin.as_ref()
            .and_then(|t| crate::query::Row::value_at(t, path))
            .map(std::borrow::Cow::into_owned)
    });
    (
        m.routes.iter().map(|s| s.to_string()).collect(),
        m.routed.iter().map(|x| x.endpoint).collect(),
    )
}

#[test]
fn a_new_hub_sends_every_device_message_to_events_and_no_event_anywhere() {
    let r = Routing::default();
    let (routes, endpoints) = routed(&r, &mut message(&[], "x"), None);
    assert_eq!((routes, endpoints), (vec![FALLBACK.to_owned()], vec![0]));
    let mut event = crate::routing::events::event_message(
        crate::registry::Change::Connection {
            key: IdentityKey::device("d1"),
            connected: true,
        },
        "myhub",
    );
    assert_eq!(routed(&r, &mut event, None).1, Vec::<usize>::new());
    assert!(!r.selects(Source::DeviceConnectionStateEvents));
}

#[test]
fn conditions_read_properties_body_and_twin() {
    let r = routing(CONFIG).unwrap();
    assert_eq!(r.endpoint_names(), ["events", "hot", "audit"]);
    // An application property.
    let (routes, endpoints) = routed(&r, &mut message(&[("processingPath", "hot")], "x"), None);
    assert_eq!((routes, endpoints), (vec!["hot-path".to_owned()], vec![1]));
    // The body, only when the message says it is JSON; a system property.
    let json_props = [("$.ct", "application/json"), ("$.ce", "UTF-8")];
    let body = r#"{"Weather":{"Temperature":51}}"#;
    let (routes, endpoints) = routed(&r, &mut message(&json_props, body), None);
    assert_eq!(
        (routes, endpoints),
        (vec!["warm-body".to_owned()], vec![1, 0])
    );
    let (routes, _) = routed(&r, &mut message(&[], body), None);
    assert_eq!(
        routes,
        vec![FALLBACK.to_owned()],
        "not declared JSON: $body is undefined"
    );
    // Both: one delivery per endpoint.
    let mut both = message(
        &[("processingPath", "hot"), json_props[0], json_props[1]],
        body,
    );
    let (routes, endpoints) = routed(&r, &mut both, None);
    assert_eq!(routes, vec!["hot-path".to_owned(), "warm-body".to_owned()]);
    assert_eq!(endpoints, vec![1, 0]);
    // The twin; and the enrichments for each endpoint.
    let twin = json!({"tags": {"site": "north"}});
    let mut tagged = message(&[("processingPath", "hot")], "x");
    let (routes, endpoints) = routed(&r, &mut tagged, Some(twin));
    assert_eq!(routes, vec!["hot-path".to_owned(), "by-tag".to_owned()]);
    assert_eq!(endpoints, vec![1, 2]);
    assert_eq!(
        tagged.routed_to(1).unwrap().enrichments,
        vec![
            ("site".to_owned(), "north".to_owned()),
            ("hub".to_owned(), "myhub".to_owned())
        ]
    );
    assert_eq!(
        tagged.routed_to(2).unwrap().enrichments,
        vec![("hub".to_owned(), "myhub".to_owned())]
    );
    // A twin without the tag: the enrichment is the text itself.
    let mut untagged = message(&[("processingPath", "hot")], "x");
    routed(&r, &mut untagged, Some(json!({})));
    assert_eq!(
        untagged.routed_to(1).unwrap().enrichments[0],
        ("site".to_owned(), "$twin.tags.site".to_owned())
    );
}

#[test]
fn event_routes_read_the_event_properties_and_body() {
    let r = routing(CONFIG).unwrap();
    let twin_event = |body: Value| {
        crate::routing::events::event_message(
            crate::registry::Change::Twin {
                key: IdentityKey::device("d1"),
                replaced: false,
                body,
            },
            "myhub",
        )
    };
    let mut fw = twin_event(json!({"version": 2, "properties": {"reported": {"fw": "1.0"}}}));
    assert_eq!(
        routed(&r, &mut fw, None),
        (vec!["twins".to_owned()], vec![0])
    );
    let mut other = twin_event(json!({"version": 2, "properties": {"reported": {"x": 1}}}));
    assert_eq!(routed(&r, &mut other, None).1, Vec::<usize>::new());
    assert!(r.selects(Source::TwinChangeEvents));
}

#[test]
fn without_the_fallback_unselected_messages_go_nowhere() {
    let text = "[routing]\nfallback = false\n";
    let r = routing(text).unwrap();
    assert_eq!(routed(&r, &mut message(&[], "x"), None), (vec![], vec![]));
}

#[test]
fn bad_routing_names_the_file_the_line_and_the_reason() {
    let cases = [
        (
            "[routing]\n[[routing.routes]]\nname = \"r\"\nsource = \"DeviceMessages\"\ncondition = \"a = \"\nendpoints = [\"events\"]\n",
            "hub.toml:2: route 'r': condition: Syntax error",
        ),
        (
            "[routing]\n[[routing.routes]]\nname = \"r\"\nsource = \"DeviceMessages\"\nendpoints = [\"nowhere\"]\n",
            "hub.toml:2: route 'r': no endpoint named 'nowhere'",
        ),
        (
            "[routing]\n[[routing.routes]]\nname = \"r\"\nsource = \"Nonsense\"\nendpoints = [\"events\"]\n",
            "hub.toml:2: route 'r': unknown source 'Nonsense'",
        ),
        (
            "[routing]\n[[routing.routes]]\nname = \"r\"\nsource = \"DigitalTwinChangeEvents\"\nendpoints = [\"events\"]\n",
            "route 'r': IoT Hub's source 'DigitalTwinChangeEvents' is not produced by this emulator yet",
        ),
        (
            "[routing]\n[[routing.routes]]\nname = \"r\"\nsource = \"DeviceMessages\"\nendpoints = []\n",
            "route 'r': name at least one endpoint",
        ),
        (
            "[routing]\n[[routing.endpoints]]\nname = \"events\"\n",
            "hub.toml:2: endpoint 'events': the name is taken",
        ),
        (
            "[routing]\n[[routing.endpoints]]\nname = \"myhub\"\n",
            "endpoint 'myhub': the name is taken",
        ),
        (
            "[routing]\n[[routing.endpoints]]\nname = \"a b\"\n",
            "endpoint 'a b': a name is 1 to 64",
        ),
        (
            "[routing]\n\n[[routing.routes]]\nname = \"r\"\nsource = \"DeviceMessages\"\nendpoints = [\"events\"]\n[[routing.routes]]\nname = \"R\"\nsource = \"DeviceMessages\"\nendpoints = [\"events\"]\n",
            "hub.toml:7: route 'R': another route has this name",
        ),
        (
            "[routing]\n[[routing.enrichments]]\nkey = \"k\"\nvalue = \"$twin.status\"\nendpoints = [\"events\"]\n",
            "enrichment 'k': a twin value is",
        ),
    ];
    for (text, expected) in cases {
        let err = routing(text).unwrap_err();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

#[test]
fn the_example_configs_routing_block_compiles_once_uncommented() {
    let example = crate::config::EXAMPLE_CONFIG;
    let start = example
        .find("# [routing]")
        .expect("the example has a routing block");
    let block: String = example[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
        .collect();
    let r = routing(&block).unwrap();
    assert_eq!(r.endpoint_names(), ["events", "alerts"]);
    assert_eq!(r.routes().len(), 2);
}

#[test]
fn the_benchmarks_ten_routes_compile_and_select_its_telemetry() {
    let r = routing(include_str!("../../bench/routes-10.toml")).unwrap();
    assert_eq!(r.routes().len(), 10);
    let props = [
        ("$.ct", "application/json"),
        ("$.ce", "utf-8"),
        ("level", "info"),
    ];
    let mut m = message(&props, r#"{"bench":{"seq":1,"pad":"xx"}}"#);
    let (routes, endpoints) = routed(&r, &mut m, Some(json!({"tags": {}})));
    assert_eq!((routes, endpoints), (vec!["info".to_owned()], vec![1]));
}
