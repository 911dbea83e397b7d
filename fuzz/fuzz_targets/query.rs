//! The query language: lexer, parser, and evaluation of what parses against a twin row.
#![no_main]

use iothub_emulator::query::parse;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(query) = parse(text) else {
        return;
    };
    let rows = [
        json!({"deviceId": "d1", "status": "enabled", "version": 3,
               "tags": {"site": "eu", "n": 4, "list": [1, 2]},
               "properties": {"desired": {"t": 21.5, "$version": 2},
                              "reported": {"ok": true, "$version": 5}}}),
        json!({"deviceId": "d2", "moduleId": "m", "tags": {"site": null}}),
    ];
    let _ = query.source();
    let _ = query.top();
    for row in &rows {
        if query.matches(row) {
            let _ = query.project(row);
        }
    }
    if query.is_aggregate() {
        let _ = query.aggregate(rows.iter());
    }
});
