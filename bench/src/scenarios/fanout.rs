//! Service-to-device paths: desired-property fan-out and direct methods.

use super::{connect_all, fd_budget, settle, Ctx};
use crate::client::{parse_method_request, Mqtt};
use crate::report::{Outcome, Report, Row};
use anyhow::Result;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Barrier};
use tokio::task::JoinSet;

pub async fn desired_fanout(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let target = &ctx.emulator;
    let n = fd_budget(target.pid, ctx.sizes.fanout_modules);
    let rounds = ctx.sizes.fanout_rounds.max(1);
    let (conns, connected) = connect_all(ctx, target, n, ctx.sizes.connect_concurrency).await?;
    let base = Instant::now();
    let ns = move || base.elapsed().as_nanos() as u64;
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n * rounds).map(|_| AtomicU64::new(0)).collect());
    let recv: Arc<Vec<AtomicU64>> = Arc::new((0..n * rounds).map(|_| AtomicU64::new(0)).collect());
    let done: Arc<Vec<AtomicUsize>> = Arc::new((0..rounds).map(|_| AtomicUsize::new(0)).collect());
    let progress = Arc::new(tokio::sync::Notify::new());
    // Modules still waiting for pushes; one that fails stops counting.
    let alive = Arc::new(AtomicUsize::new(n));
    let ready = Arc::new(Barrier::new(n + 1));
    // Generous but bounded: the whole scenario may not take longer than this.
    let give_up = Instant::now() + Duration::from_secs(60) + Duration::from_millis(n as u64 * 2);
    let mut modules = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (ready, recv, done, progress, alive) = (
            Arc::clone(&ready),
            Arc::clone(&recv),
            Arc::clone(&done),
            Arc::clone(&progress),
            Arc::clone(&alive),
        );
        let gone = {
            let progress = Arc::clone(&progress);
            move |out: Outcome| -> (Outcome, Option<Mqtt>) {
                alive.fetch_sub(1, Ordering::Relaxed);
                progress.notify_one();
                (out, None)
            }
        };
        modules.spawn(async move {
            let mut out = Outcome::default();
            let mut conn = conn;
            if let Some(mqtt) = conn.as_mut() {
                if let Err(e) = mqtt
                    .subscribe("$iothub/twin/PATCH/properties/desired/#", 1)
                    .await
                {
                    out.error(e);
                    conn = None;
                }
            }
            ready.wait().await;
            let Some(mut mqtt) = conn else {
                return gone(out);
            };
            for round in 1..=rounds {
                let wait = async {
                    loop {
                        if let Packet::Publish(p) = mqtt.read().await? {
                            if !p
                                .topic
                                .starts_with("$iothub/twin/PATCH/properties/desired/")
                            {
                                continue;
                            }
                            let v: Value = serde_json::from_slice(&p.payload)?;
                            if v["bench"]["round"].as_u64() == Some(round as u64) {
                                return Ok::<_, anyhow::Error>(());
                            }
                        }
                    }
                };
                match tokio::time::timeout_at(tokio::time::Instant::from_std(give_up), wait).await {
                    Ok(Ok(())) => {
                        recv[(round - 1) * n + i].store(ns().max(1), Ordering::Relaxed);
                        done[round - 1].fetch_add(1, Ordering::Relaxed);
                        progress.notify_one();
                    }
                    Ok(Err(e)) => {
                        out.error(e);
                        return gone(out);
                    }
                    Err(_) => {
                        out.error(format!("no desired push for round {round}"));
                        return gone(out);
                    }
                }
            }
            (out, Some(mqtt))
        });
    }
    let conns = ctx.sizes.http_conns.clamp(1, n.max(1));
    let mut pool = ctx.http_pool(conns).await?;
    ready.wait().await;
    let meter = ctx.meter(target)?;
    let mut patch_outcome = Outcome::default();
    let mut fanout_ms = Vec::new();
    for round in 1..=rounds {
        let round_start = ns();
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = JoinSet::new();
        for mut http in pool.drain(..) {
            let (next, sent, fleet) =
                (Arc::clone(&next), Arc::clone(&sent), Arc::clone(&ctx.fleet));
            workers.spawn(async move {
                let mut out = Outcome::default();
                let body =
                    json!({"properties": {"desired": {"bench": {"round": round}}}}).to_string();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let id = &fleet[i];
                    let t = Instant::now();
                    sent[(round - 1) * n + i].store(ns().max(1), Ordering::Relaxed);
                    let path = format!("/twins/{}/modules/{}", id.device, id.module);
                    match http
                        .request("PATCH", &path, Some(body.as_bytes()), &[])
                        .await
                    {
                        Ok(r) if r.status == 200 => out.record(t.elapsed()),
                        Ok(r) => out.error(format!("PATCH {}: {}", r.status, r.text())),
                        Err(e) => {
                            out.error(e);
                            break;
                        }
                    }
                }
                (out, http)
            });
        }
        while let Some(joined) = workers.join_next().await {
            let (out, http) = joined?;
            patch_outcome.merge(out);
            pool.push(http);
        }
        // Wait for every live module's push (failed modules stop counting).
        while done[round - 1].load(Ordering::Relaxed) < alive.load(Ordering::Relaxed)
            && Instant::now() < give_up
        {
            let _ = tokio::time::timeout(Duration::from_millis(20), progress.notified()).await;
        }
        let last = (0..n)
            .map(|i| recv[(round - 1) * n + i].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        fanout_ms.push(last.saturating_sub(round_start) as f64 / 1e6);
    }
    let measured = meter.finish()?;
    let mut outcome = Outcome::default();
    while let Some(joined) = modules.join_next().await {
        let (out, mqtt) = joined?;
        outcome.merge(out);
        if let Some(m) = mqtt {
            tokio::spawn(m.disconnect());
        }
    }
    // Push latency: PATCH sent → push received, per module and round.
    outcome.ops = 0;
    outcome.latencies_ns.clear();
    for k in 0..n * rounds {
        let (s, r) = (
            sent[k].load(Ordering::Relaxed),
            recv[k].load(Ordering::Relaxed),
        );
        if s > 0 && r > 0 {
            outcome.ops += 1;
            outcome.latencies_ns.push(r.saturating_sub(s));
        }
    }
    outcome.errors += connected.errors + patch_outcome.errors;
    outcome.error_samples.extend(connected.error_samples);
    outcome
        .error_samples
        .extend(patch_outcome.error_samples.clone());
    let mut sorted = fanout_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let patch_latency = crate::report::Latency::of(patch_outcome.latencies_ns);
    report.push(
        Row::new(
            "desired-fanout",
            "desired-fanout",
            target.name,
            n,
            outcome,
            &measured,
        )
        .extra("rounds", rounds as u64)
        .extra("http_conns", conns as u64)
        .extra("fanout_ms", fanout_ms)
        .extra("fanout_ms_median", median)
        .extra(
            "rest_patch_p50_ms",
            patch_latency.as_ref().map_or(0.0, |l| l.p50_us / 1000.0),
        )
        .extra(
            "rest_patch_p99_ms",
            patch_latency.as_ref().map_or(0.0, |l| l.p99_us / 1000.0),
        ),
    );
    settle(ctx).await;
    Ok(())
}

pub async fn methods(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let target = &ctx.emulator;
    let m = fd_budget(target.pid, ctx.sizes.method_clients).max(1);
    let (conns, connected) = connect_all(ctx, target, m, ctx.sizes.connect_concurrency).await?;
    let ready = Arc::new(Barrier::new(m + 1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut devices = JoinSet::new();
    for conn in conns {
        let ready = Arc::clone(&ready);
        let mut stop_rx = stop_rx.clone();
        devices.spawn(async move {
            let mut out = Outcome::default();
            let mut conn = conn;
            if let Some(mqtt) = conn.as_mut() {
                if let Err(e) = mqtt.subscribe("$iothub/methods/POST/#", 1).await {
                    out.error(e);
                    conn = None;
                }
            }
            ready.wait().await;
            let Some(mut mqtt) = conn else {
                return (out, None);
            };
            loop {
                let packet = tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => break,
                    p = mqtt.read() => p,
                };
                match packet {
                    Ok(Packet::Publish(p)) => {
                        if let Some(rid) = parse_method_request(&p.topic) {
                            let topic = format!("$iothub/methods/res/200/?$rid={rid}");
                            if let Err(e) = mqtt
                                .publish(&topic, br#"{"echo":true}"#, QoS::AtMostOnce, 0)
                                .await
                            {
                                out.error(e);
                                return (out, None);
                            }
                            out.ops += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        out.error(e);
                        return (out, None);
                    }
                }
            }
            (out, Some(mqtt))
        });
    }
    let conns = ctx.sizes.http_conns.clamp(1, m);
    let pool = ctx.http_pool(conns).await?;
    ready.wait().await;
    let meter = ctx.meter(target)?;
    let deadline = Instant::now() + ctx.sizes.duration;
    let mut callers = JoinSet::new();
    for (w, mut http) in pool.into_iter().enumerate() {
        let fleet = Arc::clone(&ctx.fleet);
        callers.spawn(async move {
            let mut out = Outcome::default();
            let mut k = 0usize;
            while Instant::now() < deadline {
                let id = &fleet[(w + k * conns) % m];
                k += 1;
                let body = json!({"methodName": "echo", "payload": {"n": k}, "responseTimeoutInSeconds": 10})
                    .to_string();
                let path = format!("/twins/{}/modules/{}/methods", id.device, id.module);
                let t = Instant::now();
                match http.request("POST", &path, Some(body.as_bytes()), &[]).await {
                    Ok(r) if r.status == 200 => {
                        let status = r.json().ok().and_then(|v| v["status"].as_u64());
                        if status == Some(200) {
                            out.record(t.elapsed());
                        } else {
                            out.error(format!("method answer {}", r.text()));
                        }
                    }
                    Ok(r) => out.error(format!("POST methods {}: {}", r.status, r.text())),
                    Err(e) => {
                        out.error(e);
                        break;
                    }
                }
            }
            out
        });
    }
    let mut outcome = Outcome::default();
    while let Some(joined) = callers.join_next().await {
        outcome.merge(joined?);
    }
    let measured = meter.finish()?;
    let _ = stop_tx.send(true);
    let mut answered = 0;
    while let Some(joined) = devices.join_next().await {
        let (out, mqtt) = joined?;
        answered += out.ops;
        outcome.errors += out.errors;
        outcome.error_samples.extend(out.error_samples);
        if let Some(mqtt) = mqtt {
            tokio::spawn(mqtt.disconnect());
        }
    }
    outcome.errors += connected.errors;
    outcome.error_samples.extend(connected.error_samples);
    report.push(
        Row::new(
            "methods",
            "module-method",
            target.name,
            conns,
            outcome,
            &measured,
        )
        .extra("modules", m as u64)
        .extra("answered_by_modules", answered),
    );
    settle(ctx).await;
    Ok(())
}
