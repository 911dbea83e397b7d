//! Link addresses: the nodes a client may attach to, parsed into one typed [`Node`]
//! (`shared/protocol-amqp.md`, "Link addresses and message shapes").
//!
//! A client may write an address as a path (`/devices/d/twin`) or as a full URL
//! (`amqps://host/messages/devicebound`, uamqp); the scheme and host are dropped. Fixed words
//! are matched case-insensitively (the Node SDK writes `serviceBound`, the docs `servicebound`);
//! ids are percent-decoded and kept as written.

use crate::registry::IdentityKey;

/// What a link attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// `$cbs`: claims-based security (put-token requests and their replies).
    Cbs,
    /// `$management`: the Event Hub-compatible endpoint's management node.
    Management,
    /// `{p}/messages/events`: device-to-cloud messages (a module's input messages when the
    /// client receives from it).
    Events(IdentityKey),
    /// `/devices/{d}/messages/devicebound`: cloud-to-device messages for a device.
    DeviceBound(String),
    /// `{p}/twin`: twin requests, responses and desired-property notifications.
    Twin(IdentityKey),
    /// `{p}/methods/devicebound`: direct-method requests and responses.
    Methods(IdentityKey),
    /// `/messages/devicebound`: the service sending cloud-to-device messages.
    ServiceBound,
    /// `/messages/serviceBound/feedback`: delivery feedback for the service.
    Feedback,
    /// `/messages/serviceBound/filenotifications`: file upload notifications for the service.
    FileNotifications,
    /// `/messages/events[/…]`: IoT Hub's own address for the built-in events endpoint, which
    /// it answers with `amqp:link:redirect` to the Event Hub-compatible one; holds the rest of
    /// the path (`$management`, `ConsumerGroups/{g}/Partitions/{n}`, or empty).
    EventsRedirect(String),
    /// `/{entity}/ConsumerGroups/{group}/Partitions/{n}`: an Event Hub partition.
    Partition {
        entity: String,
        group: String,
        partition: u32,
    },
}

/// Parses a link address, or `None` for an address the hub has no node at.
pub fn parse(address: &str) -> Option<Node> {
    let path = strip_scheme_and_host(address.trim());
    match path {
        "$cbs" | "/$cbs" => return Some(Node::Cbs),
        "$management" | "/$management" => return Some(Node::Management),
        _ => {}
    }
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let words: Vec<&str> = segments.iter().map(String::as_str).collect();
    let is = |word: &str, want: &str| word.eq_ignore_ascii_case(want);
    let node = match words.as_slice() {
        [m, d] if is(m, "messages") && is(d, "devicebound") => Node::ServiceBound,
        [m, e, rest @ ..] if is(m, "messages") && is(e, "events") => {
            Node::EventsRedirect(rest.join("/"))
        }
        // `{entity}/$management`: where a redirected client (uamqp, `az iot hub
        // monitor-events`) attaches its management link.
        [_, m] if *m == "$management" => Node::Management,
        [m, s, f] if is(m, "messages") && is(s, "servicebound") && is(f, "feedback") => {
            Node::Feedback
        }
        [m, s, f]
            if is(m, "messages")
                && is(s, "servicebound")
                && (is(f, "filenotifications") || is(f, "fileuploadnotifications")) =>
        {
            Node::FileNotifications
        }
        [entity, c, group, p, n] if is(c, "consumergroups") && is(p, "partitions") => {
            Node::Partition {
                entity: (*entity).to_owned(),
                group: (*group).to_owned(),
                partition: n.parse().ok()?,
            }
        }
        [d, id, rest @ ..] if is(d, "devices") && !id.is_empty() => {
            let (key, rest) = match rest {
                [m, module, rest @ ..] if is(m, "modules") && !module.is_empty() => {
                    (IdentityKey::module(*id, *module), rest)
                }
                _ => (IdentityKey::device(*id), rest),
            };
            match rest {
                [t] if is(t, "twin") => Node::Twin(key),
                [m, d] if is(m, "methods") && is(d, "devicebound") => Node::Methods(key),
                [m, e] if is(m, "messages") && is(e, "events") => Node::Events(key),
                [m, d] if is(m, "messages") && is(d, "devicebound") && key.module_id.is_none() => {
                    Node::DeviceBound(key.device_id)
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(node)
}

/// `amqps://host:5671/x/y` → `/x/y`; a bare path is returned as it is.
fn strip_scheme_and_host(address: &str) -> &str {
    let Some((_, rest)) = address.split_once("://") else {
        return address;
    };
    rest.find('/').map_or("", |i| &rest[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_module_nodes() {
        assert_eq!(
            parse("/devices/d1/modules/m1/twin"),
            Some(Node::Twin(IdentityKey::module("d1", "m1")))
        );
        assert_eq!(
            parse("/devices/d1/twin"),
            Some(Node::Twin(IdentityKey::device("d1")))
        );
        assert_eq!(
            parse("/devices/d%20x/methods/devicebound"),
            Some(Node::Methods(IdentityKey::device("d x")))
        );
        assert_eq!(
            parse("/devices/d1/messages/deviceBound"),
            Some(Node::DeviceBound("d1".into()))
        );
        assert_eq!(
            parse("/devices/d1/modules/m/messages/events"),
            Some(Node::Events(IdentityKey::module("d1", "m")))
        );
        // Modules have no cloud-to-device queue.
        assert_eq!(parse("/devices/d1/modules/m/messages/devicebound"), None);
    }

    #[test]
    fn service_and_event_hub_nodes() {
        assert_eq!(
            parse("amqps://localhost/messages/devicebound"),
            Some(Node::ServiceBound)
        );
        assert_eq!(parse("/messages/devicebound"), Some(Node::ServiceBound));
        assert_eq!(
            parse("/messages/serviceBound/feedback"),
            Some(Node::Feedback)
        );
        assert_eq!(
            parse("/messages/serviceBound/filenotifications"),
            Some(Node::FileNotifications)
        );
        assert_eq!(parse("$cbs"), Some(Node::Cbs));
        assert_eq!(parse("$management"), Some(Node::Management));
        assert_eq!(
            parse("amqps://localhost/localhost/$management"),
            Some(Node::Management)
        );
        assert_eq!(
            parse("amqps://localhost/messages/events/$management"),
            Some(Node::EventsRedirect("$management".into()))
        );
        assert_eq!(
            parse("/messages/events/ConsumerGroups/$Default/Partitions/1"),
            Some(Node::EventsRedirect(
                "ConsumerGroups/$Default/Partitions/1".into()
            ))
        );
        assert_eq!(
            parse("/messages/events"),
            Some(Node::EventsRedirect(String::new()))
        );
        assert_eq!(
            parse("amqps://127.0.0.1:5671/hub/ConsumerGroups/$Default/Partitions/3"),
            Some(Node::Partition {
                entity: "hub".into(),
                group: "$Default".into(),
                partition: 3
            })
        );
    }

    #[test]
    fn unknown_addresses() {
        for a in [
            "",
            "/",
            "/devices",
            "/devices//twin",
            "/devices/d/twin/extra",
            "/devices/d/modules//twin",
            "/devices/%ff/twin",
            "/hub/ConsumerGroups/$Default/Partitions/x",
            "queue",
        ] {
            assert_eq!(parse(a), None, "{a}");
        }
    }
}
