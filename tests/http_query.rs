//! `POST /devices/query` over real HTTPS: paging, continuation tokens, item types, aggregates
//! and errors. The language itself is unit-tested in `src/query/`.

mod common;

use common::start;
use serde_json::{json, Value};
use std::collections::BTreeSet;

async fn query(
    http: &common::Http,
    q: &str,
    page: Option<&str>,
    token: Option<&str>,
) -> common::Reply {
    let mut headers = vec![];
    if let Some(p) = page {
        headers.push(("x-ms-max-item-count", p));
    }
    if let Some(t) = token {
        headers.push(("x-ms-continuation", t));
    }
    http.send(
        "POST",
        "/devices/query",
        Some(json!({ "query": q })),
        &headers,
    )
    .await
}

/// Scenario: 25 tagged devices, pages of 10: three pages, every device once, and no
/// continuation header at all on the last page (an empty one makes Node loop forever).
#[tokio::test]
async fn paging_visits_every_twin_once_and_ends_without_a_continuation() {
    let hub = start().await;
    let http = hub.http();
    for i in 0..25 {
        let id = format!("dev{i:02}");
        hub.device(&id).await;
        let site = if i % 2 == 0 { "even" } else { "odd" };
        http.send(
            "PATCH",
            &format!("/twins/{id}"),
            Some(json!({"tags":{"site": site, "n": i}})),
            &[],
        )
        .await
        .expect_status(200);
    }
    let mut seen = BTreeSet::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let reply = query(&http, "SELECT * FROM devices", Some("10"), token.as_deref()).await;
        assert_eq!(reply.headers["x-ms-item-type"], "twin");
        let body = reply.body.clone();
        for twin in body.as_array().unwrap() {
            assert!(
                seen.insert(twin["deviceId"].as_str().unwrap().to_owned()),
                "duplicate {twin}"
            );
        }
        pages += 1;
        // A device created between pages, after the cursor, shows up; none is skipped.
        if pages == 1 {
            hub.device("zzz-late").await;
        }
        match reply.headers.get("x-ms-continuation") {
            Some(t) => token = Some(t.to_str().unwrap().to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 26);

    let odd = query(
        &http,
        "SELECT deviceId, tags.n AS n FROM devices WHERE tags.site = 'odd' AND tags.n >= 20",
        None,
        None,
    )
    .await
    .expect_status(200);
    assert_eq!(
        odd,
        json!([{"deviceId":"dev21","n":21},{"deviceId":"dev23","n":23}])
    );

    let top = query(&http, "SELECT TOP 3 * FROM devices", Some("2"), None).await;
    assert_eq!(top.body.as_array().unwrap().len(), 2);
    let token = top.headers["x-ms-continuation"]
        .to_str()
        .unwrap()
        .to_owned();
    let rest = query(
        &http,
        "SELECT TOP 3 * FROM devices",
        Some("2"),
        Some(&token),
    )
    .await;
    assert_eq!(rest.body.as_array().unwrap().len(), 1);
    assert!(rest.headers.get("x-ms-continuation").is_none());
}

/// Scenario: aggregates, module twins, and errors.
#[tokio::test]
async fn aggregates_modules_and_errors() {
    let hub = start().await;
    let http = hub.http();
    for d in ["a", "b", "c"] {
        hub.device(d).await;
    }
    hub.module("a", "m1").await;
    hub.module("b", "m1").await;
    hub.module("b", "m2").await;
    http.send("PATCH", "/twins/a", Some(json!({"tags":{"kind":"x"}})), &[])
        .await
        .expect_status(200);
    http.send("PATCH", "/twins/b", Some(json!({"tags":{"kind":"x"}})), &[])
        .await
        .expect_status(200);

    let count = query(&http, "SELECT COUNT() AS n FROM devices", None, None).await;
    assert_eq!(count.headers["x-ms-item-type"], "raw");
    assert_eq!(count.body, json!([{"n":3}]));
    let grouped = query(
        &http,
        "SELECT tags.kind AS kind, COUNT() AS n FROM devices GROUP BY tags.kind",
        None,
        None,
    )
    .await
    .expect_status(200);
    let groups: Vec<Value> = grouped.as_array().unwrap().clone();
    assert!(groups.contains(&json!({"kind":"x","n":2})), "{grouped}");

    let modules = query(
        &http,
        "SELECT * FROM devices.modules WHERE moduleId = 'm1'",
        None,
        None,
    )
    .await
    .expect_status(200);
    let ids: Vec<(String, String)> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["deviceId"].as_str().unwrap().into(),
                t["moduleId"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(ids, [("a".into(), "m1".into()), ("b".into(), "m1".into())]);

    let bad = query(&http, "SELECT * FRM devices", None, None).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["Message"].as_str().unwrap().contains("position"),
        "{}",
        bad.body
    );
    let bad_token = query(&http, "SELECT * FROM devices", None, Some("garbage")).await;
    assert_eq!(bad_token.status, 400);
    let read_only = hub.http().with_token(common::policy_token("registryRead"));
    assert_eq!(
        read_only
            .send(
                "POST",
                "/devices/query",
                Some(json!({"query":"SELECT * FROM devices"})),
                &[]
            )
            .await
            .status,
        200
    );
}
