//! The soak (issue 14): a connected fleet doing paced twin reads, reported patches and
//! telemetry while the service calls methods and patches desired properties, for a long time.
//! Every interval it records one row: the devices' operations and p99, the service's, and the
//! server's RSS, open file descriptors and CPU. Flat RSS and fds and zero errors are the goal.
//! Not part of the default run (it is long); `docs/reliability.md` has the figures.

use super::{connect_all, disconnect_all, fd_budget, Ctx};
use crate::client::{parse_method_request, parse_twin_response, Http, Mqtt, OP_TIMEOUT};
use crate::proc_stats;
use crate::report::{Latency, Outcome, Report, Row};
use anyhow::Result;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Barrier};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// What the fleet and the service did since the last sample.
#[derive(Default)]
struct Tally {
    device: Mutex<Outcome>,
    service: Mutex<Outcome>,
    desired_pushes: AtomicU64,
    methods_answered: AtomicU64,
}

impl Tally {
    fn device(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.device.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn service(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.service.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn take(m: &Mutex<Outcome>) -> Outcome {
        std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The operation a module is waiting for an answer to.
enum Pending {
    Twin {
        rid: u64,
        expect: u16,
        sent: Instant,
    },
    Telemetry {
        pkid: u16,
        sent: Instant,
    },
}

impl Pending {
    fn sent(&self) -> Instant {
        match self {
            Self::Twin { sent, .. } | Self::Telemetry { sent, .. } => *sent,
        }
    }
}

pub async fn soak(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let target = &ctx.emulator;
    let n = fd_budget(target.pid, ctx.sizes.soak_modules).max(1);
    let (conns, connected) = connect_all(ctx, target, n, ctx.sizes.connect_concurrency).await?;
    // The service calls only modules that connected (a failed connect is already an error).
    let online: Arc<Vec<usize>> = Arc::new(
        conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|_| i))
            .collect(),
    );
    if online.is_empty() {
        anyhow::bail!("no soak module connected: {:?}", connected.error_samples);
    }
    let tally = Arc::new(Tally::default());
    tally.device(|o| o.merge(connected));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ready = Arc::new(Barrier::new(n + 1));
    let period = Duration::from_secs_f64(1.0 / ctx.sizes.soak_rate.max(0.001));
    let payload = super::mqtt::payload(ctx.sizes.payload_bytes);
    let mut modules = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (tally, ready, stop_rx) = (Arc::clone(&tally), Arc::clone(&ready), stop_rx.clone());
        let topic = ctx.fleet[i].events_topic();
        let payload = payload.clone();
        // Spread the modules' first operations over one period.
        let offset = period.mul_f64((i % 1000) as f64 / 1000.0);
        modules.spawn(async move {
            let mut conn = conn;
            if let Some(mqtt) = conn.as_mut() {
                for (k, filter) in [
                    "$iothub/twin/res/#",
                    "$iothub/methods/POST/#",
                    "$iothub/twin/PATCH/properties/desired/#",
                ]
                .into_iter()
                .enumerate()
                {
                    if let Err(e) = mqtt.subscribe(filter, k as u16 + 1).await {
                        tally.device(|o| o.error(e));
                        conn = None;
                        break;
                    }
                }
            }
            ready.wait().await;
            match conn {
                Some(mqtt) => module(mqtt, &topic, &payload, period, offset, &tally, stop_rx).await,
                None => None,
            }
        });
    }
    let pool = ctx.http_pool(ctx.sizes.http_conns.clamp(1, n)).await?;
    ready.wait().await;
    let mut service = JoinSet::new();
    let workers = pool.len();
    let service_period =
        Duration::from_secs_f64(workers as f64 / ctx.sizes.soak_service_rate.max(0.001));
    for (w, http) in pool.into_iter().enumerate() {
        let (tally, stop_rx, fleet) = (Arc::clone(&tally), stop_rx.clone(), Arc::clone(&ctx.fleet));
        let online = Arc::clone(&online);
        service.spawn(async move {
            let pick = move |k: usize| {
                let id = &fleet[online[(w + k * workers * 7919) % online.len()]];
                (id.device.clone(), id.module.clone())
            };
            service_worker(http, pick, service_period, &tally, stop_rx).await;
        });
    }

    let end = Instant::now() + ctx.sizes.soak_duration;
    let mut interval = 0u64;
    let mut meter = ctx.meter(target)?;
    let mut samples = Vec::new();
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(ctx.sizes.soak_interval.min(left)).await;
        interval += 1;
        let measured = meter.finish()?;
        meter = ctx.meter(target)?;
        let device = Tally::take(&tally.device);
        let service_ops = Tally::take(&tally.service);
        let service_latency = Latency::of(service_ops.latencies_ns.clone());
        let fds = proc_stats::fd_count(target.pid)?;
        let mut outcome = device;
        outcome.errors += service_ops.errors;
        outcome.error_samples.extend(service_ops.error_samples);
        let row = Row::new("soak", "mixed", target.name, n, outcome, &measured)
            .extra("interval", interval)
            .extra(
                "minutes",
                (interval as f64 * ctx.sizes.soak_interval.as_secs_f64()) / 60.0,
            )
            .extra("server_fds", fds)
            .extra("service_ops", service_ops.ops)
            .extra(
                "service_p99_ms",
                service_latency.as_ref().map_or(0.0, |l| l.p99_us / 1000.0),
            )
            .extra(
                "desired_pushes",
                tally.desired_pushes.swap(0, Ordering::Relaxed),
            )
            .extra(
                "methods_answered",
                tally.methods_answered.swap(0, Ordering::Relaxed),
            );
        samples.push((measured.rss_after_kib, fds));
        eprintln!(
            "iothub-bench: soak interval {interval}: {} device ops, p99 {:.2} ms, {} errors, rss {} KiB, {} fds",
            row.ops,
            row.latency.as_ref().map_or(0.0, |l| l.p99_us / 1000.0),
            row.errors,
            measured.rss_after_kib,
            fds
        );
        report.push(row);
        super::check_alive(target.pid, target.name)?;
    }
    let _ = stop_tx.send(true);
    while service.join_next().await.is_some() {}
    let mut open = Vec::new();
    while let Some(joined) = modules.join_next().await {
        if let Some(mqtt) = joined? {
            open.push(mqtt);
        }
    }
    disconnect_all(ctx, open).await;
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        report.notes.push(format!(
            "soak: {n} modules for {:.0} s: RSS {} → {} KiB (max {}), fds {} → {}",
            ctx.sizes.soak_duration.as_secs_f64(),
            first.0,
            last.0,
            samples.iter().map(|s| s.0).max().unwrap_or(0),
            first.1,
            last.1
        ));
    }
    Ok(())
}

/// One module: a paced cycle of twin GET, reported PATCH and telemetry (QoS 1), one at a time,
/// answering every method request. Returns the connection if it is still healthy.
async fn module(
    mut mqtt: Mqtt,
    topic: &str,
    payload: &[u8],
    period: Duration,
    offset: Duration,
    tally: &Tally,
    mut stop_rx: watch::Receiver<bool>,
) -> Option<Mqtt> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pending: Option<Pending> = None;
    let mut seq = 0u64;
    loop {
        let event = tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => None,
            _ = tick.tick() => Some(None),
            p = mqtt.read() => Some(Some(p)),
        };
        let packet = match event {
            None => return Some(mqtt),
            Some(Some(packet)) => packet,
            Some(None) => {
                if let Some(p) = &pending {
                    if p.sent().elapsed() < OP_TIMEOUT {
                        continue;
                    }
                    tally.device(|o| o.error("no answer within the operation timeout"));
                }
                seq += 1;
                let sent = Instant::now();
                let result = match seq % 3 {
                    0 => {
                        pending = Some(Pending::Twin {
                            rid: seq,
                            expect: 200,
                            sent,
                        });
                        mqtt.publish(
                            &format!("$iothub/twin/GET/?$rid={seq}"),
                            b"",
                            QoS::AtMostOnce,
                            0,
                        )
                        .await
                    }
                    1 => {
                        pending = Some(Pending::Twin {
                            rid: seq,
                            expect: 204,
                            sent,
                        });
                        let body = json!({"soak": {"seq": seq}}).to_string();
                        mqtt.publish(
                            &format!("$iothub/twin/PATCH/properties/reported/?$rid={seq}"),
                            body.as_bytes(),
                            QoS::AtMostOnce,
                            0,
                        )
                        .await
                    }
                    _ => {
                        let pkid = (seq % 65_000) as u16 + 1;
                        pending = Some(Pending::Telemetry { pkid, sent });
                        mqtt.publish(topic, payload, QoS::AtLeastOnce, pkid).await
                    }
                };
                if let Err(e) = result {
                    tally.device(|o| o.error(e));
                    return None;
                }
                continue;
            }
        };
        match packet {
            Ok(Packet::Publish(p)) => {
                if let Some((status, rid)) = parse_twin_response(&p.topic) {
                    if let Some(Pending::Twin {
                        rid: want,
                        expect,
                        sent,
                    }) = &pending
                    {
                        if rid.parse::<u64>().ok() == Some(*want) {
                            let (expect, sent) = (*expect, *sent);
                            pending = None;
                            if status == expect {
                                tally.device(|o| o.record(sent.elapsed()));
                            } else {
                                let body = String::from_utf8_lossy(&p.payload).into_owned();
                                tally.device(|o| o.error(format!("twin status {status}: {body}")));
                            }
                        }
                    }
                } else if let Some(rid) = parse_method_request(&p.topic) {
                    let reply = format!("$iothub/methods/res/200/?$rid={rid}");
                    if let Err(e) = mqtt
                        .publish(&reply, br#"{"soak":true}"#, QoS::AtMostOnce, 0)
                        .await
                    {
                        tally.device(|o| o.error(e));
                        return None;
                    }
                    tally.methods_answered.fetch_add(1, Ordering::Relaxed);
                } else if p
                    .topic
                    .starts_with("$iothub/twin/PATCH/properties/desired/")
                {
                    tally.desired_pushes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Packet::PubAck(ack)) => {
                if let Some(Pending::Telemetry { pkid, sent }) = &pending {
                    if ack.pkid == *pkid {
                        let sent = *sent;
                        pending = None;
                        tally.device(|o| o.record(sent.elapsed()));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tally.device(|o| o.error(e));
                return None;
            }
        }
    }
}

/// One service connection: alternately a direct method and a desired-property patch on a
/// module, paced at `period`.
async fn service_worker(
    mut http: Http,
    pick: impl Fn(usize) -> (String, String),
    period: Duration,
    tally: &Tally,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for k in 0usize.. {
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let (device, module) = pick(k);
        let t = Instant::now();
        let result = if k % 2 == 0 {
            let body =
                json!({"methodName": "soak", "payload": {"k": k}, "responseTimeoutInSeconds": 10})
                    .to_string();
            let path = format!("/twins/{device}/modules/{module}/methods");
            http.request("POST", &path, Some(body.as_bytes()), &[])
                .await
                .map(|r| {
                    let status = r.json().ok().and_then(|v| v["status"].as_u64());
                    (r.status == 200 && status == Some(200))
                        .then_some(())
                        .ok_or_else(|| format!("POST {path}: {} {}", r.status, r.text()))
                })
        } else {
            let body = json!({"properties": {"desired": {"soak": k}}}).to_string();
            let path = format!("/twins/{device}/modules/{module}");
            http.request("PATCH", &path, Some(body.as_bytes()), &[("If-Match", "*")])
                .await
                .map(|r| {
                    (r.status == 200)
                        .then_some(())
                        .ok_or_else(|| format!("PATCH {path}: {} {}", r.status, r.text()))
                })
        };
        match result {
            Ok(Ok(())) => tally.service(|o| o.record(t.elapsed())),
            Ok(Err(e)) => tally.service(|o| o.error(e)),
            Err(e) => {
                tally.service(|o| o.error(e));
                return;
            }
        }
    }
}
