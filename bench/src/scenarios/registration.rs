//! Start-up time and registration: how fast a hub comes up and takes a fleet's identities.

use super::Ctx;

use crate::client::Identity;
use crate::proc_stats::{self, Measured};
use crate::report::{Outcome, Report, Row};
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

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
