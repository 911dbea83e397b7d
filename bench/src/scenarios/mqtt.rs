//! Device-side MQTT: the connect storm, idle connections, and twin GET / reported PATCH / telemetry round trips.

use super::{connect_all, disconnect_all, fd_budget, settle, Ctx, Target};

use crate::client::{parse_twin_response, Mqtt, OP_TIMEOUT};
use crate::proc_stats::{self};
use crate::report::{Outcome, Report, Row};
use anyhow::{bail, Result};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Barrier};
use tokio::task::JoinSet;

pub async fn connect(ctx: &Ctx, report: &mut Report) -> Result<()> {
    for target in ctx.targets() {
        let n = fd_budget(target.pid, ctx.sizes.connect_clients);
        let meter = ctx.meter(target)?;
        let (conns, outcome) = connect_all(ctx, target, n, ctx.sizes.connect_concurrency).await?;
        let measured = meter.finish()?;
        report.push(
            Row::new("connect", "connect", target.name, n, outcome, &measured)
                .extra("concurrency", ctx.sizes.connect_concurrency as u64),
        );
        disconnect_all(ctx, conns.into_iter().flatten().collect()).await;
    }
    Ok(())
}

pub async fn idle(ctx: &Ctx, report: &mut Report) -> Result<()> {
    for target in ctx.targets() {
        let n = fd_budget(target.pid, ctx.sizes.idle_clients);
        settle(ctx).await;
        let meter = ctx.meter(target)?;
        let (conns, outcome) = connect_all(ctx, target, n, ctx.sizes.connect_concurrency).await?;
        let connected = conns.iter().filter(|c| c.is_some()).count();
        settle(ctx).await;
        let measured = meter.finish()?;
        // Idle cost: server CPU while nothing happens.
        let hold = ctx.meter(target)?;
        tokio::time::sleep(ctx.sizes.idle_hold).await;
        let held = hold.finish()?;
        let conns: Vec<Mqtt> = conns.into_iter().flatten().collect();
        disconnect_all(ctx, conns).await;
        settle(ctx).await;
        let rss_closed = proc_stats::rss_kib(target.pid)?;
        let mut row = Row::new("idle", "idle", target.name, connected, outcome, &measured)
            .extra("requested", ctx.sizes.idle_clients as u64)
            .extra(
                "idle_server_cpu_ms_per_s",
                held.server_cpu_us as f64 / 1000.0 / held.seconds.max(1e-9),
            )
            .extra("rss_after_close_kib", rss_closed)
            .extra("source_addresses_used", ctx.sources.used() as u64);
        if connected > 0 {
            row.rss_per_conn_kib = Some(
                measured
                    .rss_after_kib
                    .saturating_sub(measured.rss_before_kib) as f64
                    / connected as f64,
            );
        }
        report.push(row);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttOp {
    TwinGet,
    TwinPatch,
    Telemetry,
}

impl MqttOp {
    pub fn name(self) -> &'static str {
        match self {
            Self::TwinGet => "twin-get",
            Self::TwinPatch => "twin-patch",
            Self::Telemetry => "telemetry",
        }
    }
}

/// A JSON object of about `bytes` bytes.
pub(super) fn payload(bytes: usize) -> Vec<u8> {
    let base = r#"{"bench":{"seq":1,"pad":""}}"#.len();
    let pad = "x".repeat(bytes.saturating_sub(base));
    json!({"bench": {"seq": 1, "pad": pad}})
        .to_string()
        .into_bytes()
}

/// `n` reported properties of about 40 bytes each, none of them the measured patch's `bench`.
pub(super) fn reported_fill(n: usize) -> Vec<u8> {
    let props: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("p{i:04}"), json!("x".repeat(32))))
        .collect();
    Value::Object(props).to_string().into_bytes()
}

pub(super) async fn wait_twin(mqtt: &mut Mqtt, rid: &str, expect: u16) -> Result<()> {
    loop {
        if let Packet::Publish(p) = mqtt.read().await? {
            if let Some((status, r)) = parse_twin_response(&p.topic) {
                if r == rid {
                    if status == expect {
                        return Ok(());
                    }
                    bail!(
                        "twin status {status}: {}",
                        String::from_utf8_lossy(&p.payload)
                    );
                }
            }
        }
    }
}

pub(super) async fn one_op(
    mqtt: &mut Mqtt,
    op: MqttOp,
    seq: u64,
    topic: &str,
    body: &[u8],
) -> Result<()> {
    match op {
        MqttOp::TwinGet => {
            let rid = seq.to_string();
            mqtt.publish(
                &format!("$iothub/twin/GET/?$rid={rid}"),
                b" ",
                QoS::AtMostOnce,
                0,
            )
            .await?;
            wait_twin(mqtt, &rid, 200).await
        }
        MqttOp::TwinPatch => {
            let rid = seq.to_string();
            mqtt.publish(
                &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                body,
                QoS::AtMostOnce,
                0,
            )
            .await?;
            wait_twin(mqtt, &rid, 204).await
        }
        MqttOp::Telemetry => {
            let pkid = (seq % 65_535 + 1) as u16;
            mqtt.publish(topic, body, QoS::AtLeastOnce, pkid).await?;
            loop {
                if let Packet::PubAck(ack) = mqtt.read().await? {
                    if ack.pkid == pkid {
                        return Ok(());
                    }
                }
            }
        }
    }
}

pub async fn round_trips(ctx: &Ctx, op: MqttOp, report: &mut Report) -> Result<()> {
    for &clients in &ctx.sizes.clients {
        for target in ctx.targets() {
            let row = round_trip_phase(ctx, target, op, clients, None).await?;
            report.push(row);
        }
    }
    // Latency under a steady load well below capacity: every client sends `paced_rate` requests
    // per second (closed-loop latencies at 1,000 clients are 1,000 ÷ throughput by Little's law).
    let max = ctx.sizes.clients.iter().copied().max().unwrap_or(0);
    if ctx.sizes.paced_rate > 0.0 && max > 0 && op != MqttOp::Telemetry {
        let interval = Duration::from_secs_f64(1.0 / ctx.sizes.paced_rate);
        for target in ctx.targets() {
            let row = round_trip_phase(ctx, target, op, max, Some(interval)).await?;
            report.push(row);
        }
    }
    Ok(())
}

/// One phase of `clients` connections doing `op` back to back (or once per `pace`).
pub(super) async fn round_trip_phase(
    ctx: &Ctx,
    target: &Target,
    op: MqttOp,
    clients: usize,
    pace: Option<Duration>,
) -> Result<Row> {
    let clients = fd_budget(target.pid, clients);
    let (conns, connected) =
        connect_all(ctx, target, clients, ctx.sizes.connect_concurrency).await?;
    let body = Arc::new(payload(ctx.sizes.payload_bytes));
    let fill = (op == MqttOp::TwinPatch && ctx.sizes.reported_props > 0)
        .then(|| Arc::new(reported_fill(ctx.sizes.reported_props)));
    let ready = Arc::new(Barrier::new(clients + 1));
    let (start_tx, start_rx) = watch::channel::<Option<(Instant, Instant)>>(None);
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let ready = Arc::clone(&ready);
        let mut start_rx = start_rx.clone();
        let body = Arc::clone(&body);
        let fill = fill.clone();
        let topic = format!(
            "{}{}",
            ctx.fleet[i].events_topic(),
            ctx.sizes.telemetry_properties
        );
        set.spawn(async move {
            let mut out = Outcome::default();
            let mut conn = conn;
            if let Some(mqtt) = conn.as_mut() {
                if op != MqttOp::Telemetry {
                    // As the SDKs do before their first twin request.
                    if let Err(e) = mqtt.subscribe("$iothub/twin/res/#", 1).await {
                        out.error(e);
                        conn = None;
                    }
                }
            }
            if let (Some(mqtt), Some(fill)) = (conn.as_mut(), fill) {
                // Not measured: fills the reported section the measured patches land in.
                if let Err(e) = one_op(mqtt, MqttOp::TwinPatch, 0, "", &fill).await {
                    out.error(e.context("reported-props fill"));
                    conn = None;
                }
            }
            ready.wait().await;
            let (start, deadline) = match start_rx.wait_for(Option::is_some).await {
                Ok(d) => d.unwrap_or_else(|| (Instant::now(), Instant::now())),
                Err(_) => return (out, conn),
            };
            let Some(mqtt) = conn.as_mut() else {
                return (out, conn);
            };
            // Paced clients start staggered over one interval.
            let mut next = pace.map(|p| start + p.mul_f64(i as f64 / clients as f64));
            let mut seq = 0u64;
            loop {
                if let Some(at) = next {
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                seq += 1;
                let t = Instant::now();
                match tokio::time::timeout(OP_TIMEOUT, one_op(mqtt, op, seq, &topic, &body)).await {
                    Ok(Ok(())) => out.record(t.elapsed()),
                    Ok(Err(e)) => {
                        out.error(e);
                        return (out, None);
                    }
                    Err(_) => {
                        out.error(format!("{} timed out", op.name()));
                        return (out, None);
                    }
                }
                if let (Some(at), Some(p)) = (next, pace) {
                    // Missed slots are skipped, not caught up.
                    next = Some((at + p).max(Instant::now()));
                }
            }
            (out, conn)
        });
    }
    ready.wait().await;
    let meter = ctx.meter(target)?;
    let now = Instant::now();
    let _ = start_tx.send(Some((now, now + ctx.sizes.duration)));
    let mut outcome = Outcome::default();
    let mut back = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (out, conn) = joined?;
        outcome.merge(out);
        back.extend(conn);
    }
    let measured = meter.finish()?;
    // Failed connections count as errors of the phase.
    outcome.errors += connected.errors;
    outcome.error_samples.extend(connected.error_samples);
    let name = match pace {
        Some(_) => format!("{}-paced", op.name()),
        None => op.name().to_owned(),
    };
    let mut row = Row::new(op.name(), &name, target.name, clients, outcome, &measured);
    if op != MqttOp::TwinGet {
        row = row.extra("payload_bytes", body.len() as u64);
    }
    if fill.is_some() {
        row = row.extra("reported_props", ctx.sizes.reported_props as u64);
    }
    if pace.is_some() {
        row = row.extra("rate_per_client_hz", ctx.sizes.paced_rate);
    }
    disconnect_all(ctx, back).await;
    Ok(row)
}
