//! The service side over HTTPS: registry REST calls and queries.

use super::Ctx;
use crate::client::Http;
use crate::proc_stats::Measured;
use crate::report::{Outcome, Report, Row};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a closed-loop HTTP phase runs.
#[derive(Clone, Copy)]
pub(super) enum Bound {
    Ops(usize),
    For(Duration),
}

/// One request of a phase: method, path, body, extra headers, expected status.
pub(super) struct Req {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, &'static str)>,
    expect: u16,
}

type MakeReq = Arc<dyn Fn(usize) -> Req + Send + Sync>;

/// Runs one closed-loop phase over `pool` (the connections come back in `pool`).
pub(super) async fn http_phase(
    ctx: &Ctx,
    pool: &mut Vec<Http>,
    bound: Bound,
    make: MakeReq,
) -> Result<(Outcome, Measured)> {
    let next = Arc::new(AtomicUsize::new(0));
    let meter = ctx.meter(&ctx.emulator)?;
    let deadline = match bound {
        Bound::For(d) => Some(Instant::now() + d),
        Bound::Ops(_) => None,
    };
    let mut set = JoinSet::new();
    for mut http in pool.drain(..) {
        let (next, make) = (Arc::clone(&next), Arc::clone(&make));
        let (endpoint, sources, token) = (
            ctx.https.clone(),
            Arc::clone(&ctx.sources),
            Arc::clone(&ctx.token),
        );
        set.spawn(async move {
            let mut out = Outcome::default();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if let Bound::Ops(k) = bound {
                    if i >= k {
                        break;
                    }
                }
                let req = make(i);
                let t = Instant::now();
                match http
                    .request(req.method, &req.path, req.body.as_deref(), &req.headers)
                    .await
                {
                    Ok(r) if r.status == req.expect => out.record(t.elapsed()),
                    Ok(r) => out.error(format!(
                        "{} {}: {} {}",
                        req.method,
                        req.path,
                        r.status,
                        r.text()
                    )),
                    Err(e) => {
                        out.error(e);
                        // The connection is gone: one new one, else this worker stops.
                        match Http::connect(&endpoint, &sources, Arc::clone(&token)).await {
                            Ok(h) => http = h,
                            Err(_) => return (out, None),
                        }
                    }
                }
            }
            (out, Some(http))
        });
    }
    let mut outcome = Outcome::default();
    while let Some(joined) = set.join_next().await {
        let (out, http) = joined?;
        outcome.merge(out);
        pool.extend(http);
    }
    Ok((outcome, meter.finish()?))
}

pub async fn rest(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let conns = ctx.sizes.http_conns.max(1);
    let k = ctx.sizes.rest_ops.max(1);
    let mut pool = ctx.http_pool(conns).await?;
    let id = move |i: usize| format!("rest-{:06}", i % k);
    let phases: Vec<(&str, Bound, MakeReq)> = vec![
        (
            "rest-device-create",
            Bound::Ops(k),
            Arc::new(move |i| Req {
                method: "PUT",
                path: format!("/devices/{}", id(i)),
                body: Some(json!({"deviceId": id(i)}).to_string().into_bytes()),
                headers: vec![],
                expect: 200,
            }),
        ),
        (
            "rest-device-get",
            Bound::For(ctx.sizes.duration),
            Arc::new(move |i| Req {
                method: "GET",
                path: format!("/devices/{}", id(i)),
                body: None,
                headers: vec![],
                expect: 200,
            }),
        ),
        (
            "rest-twin-get",
            Bound::For(ctx.sizes.duration),
            Arc::new(move |i| Req {
                method: "GET",
                path: format!("/twins/{}", id(i)),
                body: None,
                headers: vec![],
                expect: 200,
            }),
        ),
        (
            "rest-twin-patch",
            Bound::For(ctx.sizes.duration),
            Arc::new(move |i| Req {
                method: "PATCH",
                path: format!("/twins/{}", id(i)),
                body: Some(
                    json!({"properties": {"desired": {"bench": i}}})
                        .to_string()
                        .into_bytes(),
                ),
                headers: vec![],
                expect: 200,
            }),
        ),
        (
            "rest-device-delete",
            Bound::Ops(k),
            Arc::new(move |i| Req {
                method: "DELETE",
                path: format!("/devices/{}", id(i)),
                body: None,
                headers: vec![("If-Match", "\"*\"")],
                expect: 204,
            }),
        ),
    ];
    for (name, bound, make) in phases {
        let (outcome, measured) = http_phase(ctx, &mut pool, bound, make).await?;
        report.push(Row::new(
            "rest", name, "emulator", conns, outcome, &measured,
        ));
        if pool.is_empty() {
            bail!("every HTTPS connection failed");
        }
    }
    Ok(())
}

pub(super) const REGIONS: [&str; 3] = ["eu", "us", "asia"];

pub async fn query(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let q = ctx.sizes.query_twins.max(1);
    let conns = ctx.sizes.http_conns.max(1);
    let mut pool = ctx.http_pool(conns).await?;
    // Bulk create: 50 devices and their 50 tag updates per request (the API's cap is 100).
    const PER_REQUEST: usize = 50;
    let requests = q.div_ceil(PER_REQUEST);
    let make: MakeReq = Arc::new(move |r| {
        let ids = (r * PER_REQUEST)..((r + 1) * PER_REQUEST).min(q);
        let mut items: Vec<Value> = ids
            .clone()
            .map(|i| json!({"id": format!("q{i:06}"), "importMode": "create"}))
            .collect();
        items.extend(ids.map(|i| {
            json!({
                "id": format!("q{i:06}"),
                "importMode": "updateTwin",
                "tags": {
                    "x": if i % 1000 == 0 { "y" } else { "z" },
                    "n": i % 100,
                    "region": REGIONS[i % 3],
                }
            })
        }));
        Req {
            method: "POST",
            path: "/devices".into(),
            body: Some(Value::Array(items).to_string().into_bytes()),
            headers: vec![],
            expect: 200,
        }
    });
    let (mut outcome, measured) = http_phase(ctx, &mut pool, Bound::Ops(requests), make).await?;
    // One operation per twin created (the latencies stay per request).
    let created = outcome.ops as usize * PER_REQUEST;
    outcome.ops = created.min(q) as u64;
    report.push(
        Row::new(
            "query",
            "bulk-create",
            "emulator",
            conns,
            outcome,
            &measured,
        )
        .extra("twins_per_request", PER_REQUEST as u64),
    );
    let mut http = pool
        .pop()
        .ok_or_else(|| anyhow!("no HTTPS connection left"))?;
    let stats = http
        .request("GET", "/statistics/devices", None, &[])
        .await?;
    let twins_in_hub = stats.json()?["totalDeviceCount"].as_u64().unwrap_or(0);

    let rare = q.div_ceil(1000);
    let eu = q.div_ceil(3);
    let n7 = (0..q).filter(|i| i % 100 == 7).count();
    let queries: [(&str, String, usize); 4] = [
        (
            "where-rare",
            "SELECT * FROM devices WHERE tags.x = 'y'".into(),
            rare.min(1000),
        ),
        (
            "count",
            "SELECT COUNT() AS n FROM devices WHERE tags.region = 'eu'".into(),
            eu,
        ),
        (
            "where-first-page",
            "SELECT * FROM devices WHERE tags.n = 7".into(),
            n7.min(100),
        ),
        (
            "page-all",
            "SELECT deviceId FROM devices WHERE tags.n < 100".into(),
            q,
        ),
    ];
    for (name, text, expected) in queries {
        let body = json!({"query": text}).to_string();
        let page = if name == "where-first-page" {
            "100"
        } else {
            "1000"
        };
        let meter = ctx.meter(&ctx.emulator)?;
        let mut out = Outcome::default();
        let mut pages = 0u64;
        for _ in 0..ctx.sizes.query_reps.max(1) {
            let t = Instant::now();
            let result = async {
                let mut rows = 0usize;
                let mut continuation: Option<String> = None;
                // Bounded: at most one page per 1000 twins, plus one.
                for _ in 0..=(twins_in_hub as usize / 1000 + 1) {
                    let mut headers = vec![("x-ms-max-item-count", page)];
                    if let Some(c) = continuation.as_deref() {
                        headers.push(("x-ms-continuation", c));
                    }
                    let r = http
                        .request("POST", "/devices/query", Some(body.as_bytes()), &headers)
                        .await?;
                    if r.status != 200 {
                        bail!("query {}: {}", r.status, r.text());
                    }
                    pages += 1;
                    let v = r.json()?;
                    let items = v.as_array().ok_or_else(|| anyhow!("not an array"))?;
                    if name == "count" {
                        rows = items
                            .first()
                            .and_then(|o| o["n"].as_u64())
                            .ok_or_else(|| anyhow!("no count in {v}"))?
                            as usize;
                        break;
                    }
                    rows += items.len();
                    continuation = r.header("x-ms-continuation").map(str::to_owned);
                    if name != "page-all" || continuation.is_none() {
                        break;
                    }
                }
                Ok::<_, anyhow::Error>(rows)
            }
            .await;
            match result {
                Ok(rows) if rows == expected => out.record(t.elapsed()),
                Ok(rows) => out.error(format!("{name}: {rows} rows, expected {expected}")),
                Err(e) => out.error(e.context(name)),
            }
        }
        let measured = meter.finish()?;
        report.push(
            Row::new("query", name, "emulator", 1, out, &measured)
                .extra("query", text)
                .extra("rows", expected as u64)
                .extra(
                    "pages_per_query",
                    pages / ctx.sizes.query_reps.max(1) as u64,
                )
                .extra("twins_in_hub", twins_in_hub),
        );
    }
    Ok(())
}
