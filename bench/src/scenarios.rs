//! The scenarios. Each one connects what it needs (not measured), then measures one or more
//! closed-loop phases between two [`Meter`] readings of the server, and pushes a [`Row`] per
//! phase. Every loop is bounded by an operation count or a deadline, and every wait by a timeout.

use crate::client::{
    parse_method_request, parse_twin_response, Endpoint, Http, Identity, Mqtt, SourceAddrs,
    OP_TIMEOUT,
};
use crate::proc_stats::{self, Measured, Meter};
use crate::report::{Outcome, Report, Row};
use anyhow::{anyhow, bail, Context, Result};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Barrier, Semaphore};
use tokio::task::JoinSet;

/// Every scenario, in run order (`startup` runs before the long-lived emulator starts).
pub const ALL: [&str; 11] = [
    "startup",
    "register",
    "connect",
    "idle",
    "twin-get",
    "twin-patch",
    "telemetry",
    "desired-fanout",
    "methods",
    "rest",
    "query",
];

/// Sizes of every scenario.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub clients: Vec<usize>,
    /// Requests per second per client of the paced twin phases (0: none).
    pub paced_rate: f64,
    pub duration: Duration,
    pub payload_bytes: usize,
    /// Reported properties each twin-patch client writes before it is measured.
    pub reported_props: usize,
    pub connect_clients: usize,
    pub connect_concurrency: usize,
    pub idle_clients: usize,
    pub idle_hold: Duration,
    pub settle: Duration,
    pub fanout_modules: usize,
    pub fanout_rounds: usize,
    pub method_clients: usize,
    pub http_conns: usize,
    pub rest_ops: usize,
    pub query_twins: usize,
    pub query_reps: usize,
    pub startup_runs: usize,
}

impl Sizes {
    /// How many module identities the MQTT scenarios need.
    pub fn fleet(&self, selected: &[String]) -> usize {
        let on = |s: &str| selected.iter().any(|x| x == s);
        let mut n = 0;
        if on("connect") {
            n = n.max(self.connect_clients);
        }
        if on("idle") {
            n = n.max(self.idle_clients);
        }
        if on("twin-get") || on("twin-patch") || on("telemetry") {
            n = n.max(self.clients.iter().copied().max().unwrap_or(0));
        }
        if on("desired-fanout") {
            n = n.max(self.fanout_modules);
        }
        if on("methods") {
            n = n.max(self.method_clients);
        }
        n
    }
}

/// A server under test.
pub struct Target {
    pub name: &'static str,
    pub pid: u32,
    pub mqtt: Endpoint,
}

/// Everything the scenarios share.
pub struct Ctx {
    pub emulator: Target,
    pub responder: Option<Target>,
    pub https: Endpoint,
    pub token: Arc<str>,
    pub sources: Arc<SourceAddrs>,
    pub clk_tck: u64,
    pub sizes: Sizes,
    pub fleet: Arc<Vec<Identity>>,
}

impl Ctx {
    fn meter(&self, target: &Target) -> Result<Meter> {
        Meter::start(target.pid, self.clk_tck)
    }

    /// The targets an MQTT round-trip scenario runs against: the emulator, then the responder.
    fn targets(&self) -> Vec<&Target> {
        std::iter::once(&self.emulator)
            .chain(self.responder.as_ref())
            .collect()
    }

    async fn http_pool(&self, n: usize) -> Result<Vec<Http>> {
        let mut pool = Vec::with_capacity(n);
        for _ in 0..n {
            pool.push(Http::connect(&self.https, &self.sources, Arc::clone(&self.token)).await?);
        }
        Ok(pool)
    }
}

fn settle(ctx: &Ctx) -> tokio::time::Sleep {
    tokio::time::sleep(ctx.sizes.settle)
}

// ----- startup -----

/// Starts the emulator `runs` times on fresh ports (CA already present after the first run) and
/// times spawn → `iothub-emulator ready`.
pub fn startup(
    emulator: &std::path::Path,
    certs_dir: &std::path::Path,
    runs: usize,
    report: &mut Report,
) -> Result<()> {
    let mut outcome = Outcome::default();
    let mut first_ms = None;
    let started = Instant::now();
    for run in 0..runs.max(1) {
        let mut command = std::process::Command::new(emulator);
        command
            .args(["--hostname", "localhost", "--bind", "127.0.0.1"])
            .args(["--https-port", &proc_stats::free_port()?.to_string()])
            .args(["--mqtt-port", &proc_stats::free_port()?.to_string()])
            .args(["--amqp-port", &proc_stats::free_port()?.to_string()])
            .arg("--certs-dir")
            .arg(certs_dir)
            .env("RUST_LOG", "iothub_emulator=warn");
        match proc_stats::ServerProcess::spawn(
            "emulator",
            command,
            "iothub-emulator ready",
            Duration::from_secs(30),
            None,
        ) {
            Ok(mut process) => {
                let t = process.startup;
                process.stop();
                if run == 0 && runs > 1 {
                    // The first start also creates the CA; it is reported apart.
                    first_ms = Some(t.as_secs_f64() * 1000.0);
                } else {
                    outcome.record(t);
                }
            }
            Err(e) => outcome.error(e),
        }
    }
    let measured = Measured {
        seconds: started.elapsed().as_secs_f64(),
        server_cpu_us: 0,
        loader_cpu_us: 0,
        rss_before_kib: 0,
        rss_after_kib: 0,
    };
    let mut row = Row::new("startup", "startup", "emulator", 1, outcome, &measured);
    row.server_cpu_us_per_op = None;
    row.loader_cpu_us_per_op = None;
    row.throughput_per_s = None;
    if let Some(ms) = first_ms {
        row = row.extra("first_start_with_ca_creation_ms", ms);
    }
    report.push(row);
    Ok(())
}

// ----- registration -----

/// Registers `n` devices with one module each through the REST API (PUT device, PUT module),
/// taking each module's generated key from the response.
pub async fn register(ctx: &mut Ctx, n: usize, report: &mut Report) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let conns = ctx.sizes.http_conns.clamp(1, n);
    let pool = ctx.http_pool(conns).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let meter = ctx.meter(&ctx.emulator)?;
    let mut set = JoinSet::new();
    for mut http in pool {
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut out = Outcome::default();
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let device = format!("bench-{i:06}");
                let t = Instant::now();
                let result = async {
                    let body = json!({"deviceId": device}).to_string();
                    let r = http
                        .request(
                            "PUT",
                            &format!("/devices/{device}"),
                            Some(body.as_bytes()),
                            &[],
                        )
                        .await?;
                    if r.status != 200 {
                        bail!("PUT device: {} {}", r.status, r.text());
                    }
                    let body = json!({"deviceId": device, "moduleId": "m"}).to_string();
                    let r = http
                        .request(
                            "PUT",
                            &format!("/devices/{device}/modules/m"),
                            Some(body.as_bytes()),
                            &[],
                        )
                        .await?;
                    if r.status != 200 && r.status != 201 {
                        bail!("PUT module: {} {}", r.status, r.text());
                    }
                    let key = r.json()?["authentication"]["symmetricKey"]["primaryKey"]
                        .as_str()
                        .ok_or_else(|| anyhow!("no primaryKey in the module"))?
                        .to_owned();
                    Ok(key)
                }
                .await;
                match result {
                    Ok(key) => {
                        // Two requests per identity; the latency is that of the pair.
                        out.record(t.elapsed());
                        out.ops += 1;
                        ids.push((
                            i,
                            Identity {
                                device,
                                module: "m".into(),
                                key,
                            },
                        ));
                    }
                    Err(e) => {
                        out.error(e);
                        break;
                    }
                }
            }
            (out, ids)
        });
    }
    let mut outcome = Outcome::default();
    let mut fleet: Vec<Option<Identity>> = vec![None; n];
    while let Some(joined) = set.join_next().await {
        let (out, ids) = joined?;
        outcome.merge(out);
        for (i, id) in ids {
            fleet[i] = Some(id);
        }
    }
    let measured = meter.finish()?;
    let errors = outcome.errors;
    let samples = outcome.error_samples.clone();
    report.push(
        Row::new(
            "register",
            "put-device+module",
            "emulator",
            conns,
            outcome,
            &measured,
        )
        .extra("identities", n as u64),
    );
    if errors > 0 {
        bail!("registration failed: {samples:?}");
    }
    ctx.fleet = Arc::new(fleet.into_iter().flatten().collect());
    Ok(())
}

// ----- connecting -----

/// Connects fleet members `0..n` to `target`, `concurrency` at a time; returns the connections
/// (in fleet order, `None` where it failed) and the connect latencies.
async fn connect_all(
    ctx: &Ctx,
    target: &Target,
    n: usize,
    concurrency: usize,
) -> Result<(Vec<Option<Mqtt>>, Outcome)> {
    if n > ctx.fleet.len() {
        bail!("{n} clients needed, {} registered", ctx.fleet.len());
    }
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let expiry = crate::client::expiry_in(6 * 3600);
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let fleet = Arc::clone(&ctx.fleet);
        let endpoint = target.mqtt.clone();
        let sources = Arc::clone(&ctx.sources);
        set.spawn(async move {
            let _permit = permit;
            let id = &fleet[i];
            let t = Instant::now();
            let result = match id.token(expiry) {
                Ok(token) => Mqtt::connect(&endpoint, &sources, id, &token).await,
                Err(e) => Err(e),
            };
            (i, result, t.elapsed())
        });
    }
    let mut conns: Vec<Option<Mqtt>> = (0..n).map(|_| None).collect();
    let mut outcome = Outcome::default();
    while let Some(joined) = set.join_next().await {
        let (i, result, elapsed) = joined?;
        match result {
            Ok(mqtt) => {
                outcome.record(elapsed);
                conns[i] = Some(mqtt);
            }
            Err(e) => outcome.error(format!("{}: {e:#}", ctx.fleet[i].client_id())),
        }
    }
    Ok((conns, outcome))
}

/// Disconnects everything, concurrently, and gives the server a moment to clean up.
async fn disconnect_all(ctx: &Ctx, conns: Vec<Mqtt>) {
    let mut set = JoinSet::new();
    for c in conns {
        set.spawn(c.disconnect());
    }
    while set.join_next().await.is_some() {}
    settle(ctx).await;
}

/// The open-file budget for `n` simultaneous connections to the server `pid`.
fn fd_budget(pid: u32, wanted: usize) -> usize {
    let soft = |p: &str| proc_stats::nofile_limits(p).map_or(u64::MAX, |l| l.0);
    let budget = soft("self").min(soft(&pid.to_string())).saturating_sub(300);
    wanted.min(usize::try_from(budget).unwrap_or(usize::MAX))
}

// ----- connect storm -----

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

// ----- idle -----

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

// ----- twin GET / reported PATCH / telemetry round trips -----

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
fn payload(bytes: usize) -> Vec<u8> {
    let base = r#"{"bench":{"seq":1,"pad":""}}"#.len();
    let pad = "x".repeat(bytes.saturating_sub(base));
    json!({"bench": {"seq": 1, "pad": pad}})
        .to_string()
        .into_bytes()
}

/// `n` reported properties of about 40 bytes each, none of them the measured patch's `bench`.
fn reported_fill(n: usize) -> Vec<u8> {
    let props: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("p{i:04}"), json!("x".repeat(32))))
        .collect();
    Value::Object(props).to_string().into_bytes()
}

async fn wait_twin(mqtt: &mut Mqtt, rid: &str, expect: u16) -> Result<()> {
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

async fn one_op(mqtt: &mut Mqtt, op: MqttOp, seq: u64, topic: &str, body: &[u8]) -> Result<()> {
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
async fn round_trip_phase(
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
        let topic = ctx.fleet[i].events_topic();
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

// ----- desired-property fan-out -----

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

// ----- direct methods -----

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

// ----- REST -----

/// How long a closed-loop HTTP phase runs.
#[derive(Clone, Copy)]
enum Bound {
    Ops(usize),
    For(Duration),
}

/// One request of a phase: method, path, body, extra headers, expected status.
struct Req {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, &'static str)>,
    expect: u16,
}

type MakeReq = Arc<dyn Fn(usize) -> Req + Send + Sync>;

/// Runs one closed-loop phase over `pool` (the connections come back in `pool`).
async fn http_phase(
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

// ----- query -----

const REGIONS: [&str; 3] = ["eu", "us", "asia"];

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

/// Fails when the server died during a scenario.
pub fn check_alive(pid: u32, name: &str) -> Result<()> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("the {name} (pid {pid}) is gone"))?;
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    if matches!(state, Some('Z' | 'X')) {
        bail!("the {name} (pid {pid}) exited");
    }
    Ok(())
}
