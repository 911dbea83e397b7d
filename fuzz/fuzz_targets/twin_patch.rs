//! Twin writes: JSON intake, validation and merge. A refused write must leave the twin exactly
//! as it was; an accepted one must leave a twin whose JSON reads back.
#![no_main]

use iothub_emulator::twin::{parse_json, Twin};
use iothub_emulator_fuzz::object;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = parse_json(rest) else {
        return;
    };
    let Some(body) = object(value) else {
        return;
    };
    let mut twin = Twin::new();
    // A twin with some content first, so that merges meet existing values.
    let _ = twin.patch_reported(&body);
    let before = (twin.to_device_json(), twin.tags().clone(), twin.version());
    let ok = match mode % 3 {
        0 => twin.patch_from_service(&body).is_ok(),
        1 => twin.replace_from_service(&body).is_ok(),
        _ => twin.patch_reported(&body).is_ok(),
    };
    let after = (twin.to_device_json(), twin.tags().clone(), twin.version());
    // A service PATCH that names neither `tags` nor `properties.desired` writes nothing.
    let writes = mode % 3 != 0
        || body.contains_key("tags")
        || body
            .get("properties")
            .and_then(|p| p.as_object())
            .is_some_and(|p| p.contains_key("desired"));
    if ok && writes {
        assert!(after.2 > before.2, "an accepted write bumps the version");
    } else if ok {
        assert_eq!(
            before, after,
            "a PATCH without tags or desired changed the twin"
        );
    } else {
        assert_eq!(before, after, "a refused write changed the twin");
    }
    let _ = twin.properties_json(true);
});
