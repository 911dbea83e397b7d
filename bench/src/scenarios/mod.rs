//! The scenarios. Each one connects what it needs (not measured), then measures one or more
//! closed-loop phases between two [`Meter`] readings of the server, and pushes a [`Row`] per
//! phase. Every loop is bounded by an operation count or a deadline, and every wait by a timeout.

use crate::client::{Endpoint, Http, Identity, Mqtt, SourceAddrs};
use crate::proc_stats::{self, Meter};
use crate::report::Outcome;
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod fanout;
mod mqtt;
mod registration;
mod rest;
mod soak;

pub use fanout::{desired_fanout, methods};
pub use mqtt::{connect, idle, round_trips, MqttOp};
pub use registration::{register, startup};
pub use rest::{query, rest};
pub use soak::soak;

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

/// Scenarios that run only when named (`--scenarios soak`): they are long.
pub const EXTRA: [&str; 1] = ["soak"];

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
    pub soak_modules: usize,
    pub soak_duration: Duration,
    pub soak_interval: Duration,
    /// Operations per second per soak module.
    pub soak_rate: f64,
    /// Service operations per second in all (methods and desired patches, alternately).
    pub soak_service_rate: f64,
    /// Appended to the telemetry topic (a URL-encoded property bag; empty for none).
    pub telemetry_properties: String,
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
        if on("soak") {
            n = n.max(self.soak_modules);
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

/// Connects fleet members `0..n` to `target`, `concurrency` at a time; returns the connections
/// (in fleet order, `None` where it failed) and the connect latencies.
pub(super) async fn connect_all(
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
pub(super) async fn disconnect_all(ctx: &Ctx, conns: Vec<Mqtt>) {
    let mut set = JoinSet::new();
    for c in conns {
        set.spawn(c.disconnect());
    }
    while set.join_next().await.is_some() {}
    settle(ctx).await;
}

/// The open-file budget for `n` simultaneous connections to the server `pid`.
pub(super) fn fd_budget(pid: u32, wanted: usize) -> usize {
    let soft = |p: &str| proc_stats::nofile_limits(p).map_or(u64::MAX, |l| l.0);
    let budget = soft("self").min(soft(&pid.to_string())).saturating_sub(300);
    wanted.min(usize::try_from(budget).unwrap_or(usize::MAX))
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
