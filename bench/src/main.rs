//! `iothub-bench`: the load tool of issue 8. It starts the emulator (and a trivial MQTT
//! responder as a yardstick) on free loopback ports, registers a fleet through the REST API,
//! connects it over MQTT/TLS with real SAS tokens and runs closed-loop scenarios, reading the
//! servers' CPU time and RSS from `/proc/{pid}` around every measured phase. Results go out as
//! JSON and as a Markdown table; `docs/performance.md` has the numbers and how to read them.
//!
//! Modules: [`client`] (MQTT and HTTP/1.1 clients over tokio-rustls), [`scenarios`],
//! [`report`] (percentiles, ratios, targets, rendering), [`proc_stats`] (`/proc`, child
//! processes, pinning), [`responder`] (the trivial responder, run as `iothub-bench responder`).

mod client;
mod proc_stats;
mod report;
mod responder;
mod scenarios;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use proc_stats::{Machine, ServerProcess, TempDir};
use report::Report;
use scenarios::{Ctx, MqttOp, Sizes, Target};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load and benchmark tool for iothub-emulator: starts the emulator, drives it like a device
/// fleet and service apps do, and reports server CPU per operation, throughput, latency
/// percentiles and memory per connection.
#[derive(Debug, Parser)]
#[command(name = "iothub-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the trivial MQTT/TLS responder used as a yardstick (started by the tool itself).
    Responder(responder::ResponderArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The iothub-emulator binary [default: target/release/iothub-emulator, else target/debug/].
    #[arg(long)]
    emulator: Option<PathBuf>,
    /// Tiny sizes (10 clients, 1 s per phase, query over 1,000 twins); exits non-zero if any
    /// scenario had errors or produced non-finite numbers.
    #[arg(long)]
    smoke: bool,
    /// Scenarios to run, comma-separated [default: all but soak]: startup, register, connect,
    /// idle, twin-get, twin-patch, telemetry, desired-fanout, methods, rest, query; and soak
    /// (long, only when named).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Client counts for twin-get, twin-patch and telemetry [default: 1,100,1000].
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Requests per second per client of an extra paced twin-get / twin-patch phase at the
    /// largest client count, for latency under steady load (0 turns it off) [default: 10].
    #[arg(long)]
    paced_rate: Option<f64>,
    /// Seconds per closed-loop phase [default: 5].
    #[arg(long)]
    duration: Option<f64>,
    /// Size of reported-patch and telemetry payloads [default: 64].
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// A property bag appended to the telemetry topic, URL-encoded as the SDKs write it (e.g.
    /// `$.ct=application%2Fjson&$.ce=utf-8&level=info`), so that routing conditions have
    /// properties and a JSON body to read [default: none].
    #[arg(long)]
    telemetry_properties: Option<String>,
    /// A config file for the emulator (its `--config`), e.g. `bench/routes-10.toml` to measure
    /// telemetry with routes.
    #[arg(long)]
    emulator_config: Option<PathBuf>,
    /// Reported properties (of about 40 bytes each) every twin-patch client writes once before
    /// the measured phase, so that each measured patch lands in a section that large [default: 0].
    #[arg(long)]
    reported_props: Option<usize>,
    /// Connections in the connect storm [default: 2000].
    #[arg(long)]
    connect_clients: Option<usize>,
    /// Connection attempts in flight at once (all scenarios) [default: 64].
    #[arg(long)]
    connect_concurrency: Option<usize>,
    /// Connections held open by the idle scenario [default: 5000; capped by open-file limits].
    #[arg(long)]
    idle_clients: Option<usize>,
    /// Seconds the idle connections are held while the server's idle CPU is measured [default: 5].
    #[arg(long)]
    idle_hold: Option<f64>,
    /// Connected modules whose desired properties the service patches [default: 1000].
    #[arg(long)]
    fanout_modules: Option<usize>,
    /// Fan-out rounds (the median is reported) [default: 3].
    #[arg(long)]
    fanout_rounds: Option<usize>,
    /// Modules answering direct methods [default: 100].
    #[arg(long)]
    method_clients: Option<usize>,
    /// HTTPS keep-alive connections of the service side [default: 16].
    #[arg(long)]
    http_conns: Option<usize>,
    /// Devices created (then deleted) by the rest scenario [default: 5000].
    #[arg(long)]
    rest_ops: Option<usize>,
    /// Twins created for the query scenario [default: 100000].
    #[arg(long)]
    query_twins: Option<usize>,
    /// Repetitions of each query [default: 5].
    #[arg(long)]
    query_reps: Option<usize>,
    /// Emulator starts timed by the startup scenario [default: 5].
    #[arg(long)]
    startup_runs: Option<usize>,
    /// Connected modules of the soak scenario [default: 10000].
    #[arg(long)]
    soak_modules: Option<usize>,
    /// Seconds the soak runs [default: 3600].
    #[arg(long)]
    soak_duration: Option<f64>,
    /// Seconds between two soak samples (RSS, fds, p99) [default: 60].
    #[arg(long)]
    soak_interval: Option<f64>,
    /// Operations per second per soak module (twin GET, reported PATCH, telemetry in turn)
    /// [default: 0.1].
    #[arg(long)]
    soak_rate: Option<f64>,
    /// Service operations per second of the soak in all (direct methods and desired patches
    /// in turn) [default: 20].
    #[arg(long)]
    soak_service_rate: Option<f64>,
    /// Skip the trivial responder (no emulator ÷ responder ratios).
    #[arg(long)]
    no_responder: bool,
    /// Do not pin the servers and the loader to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Offer only TLS 1.2 (as the Python device SDK does) instead of 1.3.
    #[arg(long)]
    tls12: bool,
    /// RUST_LOG for the emulator (its log goes to a file in the temporary directory).
    #[arg(long, default_value = "iothub_emulator=info")]
    emulator_log: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown report here instead of stdout.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Give up after this many seconds in all [default: 300 with --smoke, else 3600; plus the
    /// soak's duration].
    #[arg(long)]
    timeout: Option<u64>,
    /// Keep the temporary directory (certificates, emulator log).
    #[arg(long)]
    keep_tmp: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Responder(args)) = cli.command {
        return match responder::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iothub-bench responder: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(cli.run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("iothub-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn sizes(a: &RunArgs) -> Sizes {
    let smoke = a.smoke;
    let pick = |v: Option<usize>, s: usize, f: usize| v.unwrap_or(if smoke { s } else { f });
    let secs = |v: Option<f64>, s: f64, f: f64| {
        Duration::from_secs_f64(v.unwrap_or(if smoke { s } else { f }).max(0.01))
    };
    let clients = if !a.clients.is_empty() {
        a.clients.clone()
    } else if smoke {
        vec![1, 10]
    } else {
        vec![1, 100, 1000]
    };
    Sizes {
        clients,
        paced_rate: a.paced_rate.unwrap_or(if smoke { 5.0 } else { 10.0 }),
        duration: secs(a.duration, 1.0, 5.0),
        payload_bytes: pick(a.payload_bytes, 64, 64),
        reported_props: pick(a.reported_props, 0, 0),
        connect_clients: pick(a.connect_clients, 10, 2000),
        connect_concurrency: pick(a.connect_concurrency, 10, 64),
        idle_clients: pick(a.idle_clients, 10, 5000),
        idle_hold: secs(a.idle_hold, 0.5, 5.0),
        settle: Duration::from_millis(if smoke { 100 } else { 500 }),
        fanout_modules: pick(a.fanout_modules, 10, 1000),
        fanout_rounds: pick(a.fanout_rounds, 1, 3),
        method_clients: pick(a.method_clients, 10, 100),
        http_conns: pick(a.http_conns, 4, 16),
        rest_ops: pick(a.rest_ops, 100, 5000),
        query_twins: pick(a.query_twins, 1000, 100_000),
        query_reps: pick(a.query_reps, 2, 5),
        startup_runs: pick(a.startup_runs, 2, 5),
        soak_modules: pick(a.soak_modules, 10, 10_000),
        soak_duration: secs(a.soak_duration, 2.0, 3600.0),
        soak_interval: secs(a.soak_interval, 1.0, 60.0),
        soak_rate: a.soak_rate.unwrap_or(if smoke { 2.0 } else { 0.1 }),
        soak_service_rate: a
            .soak_service_rate
            .unwrap_or(if smoke { 4.0 } else { 20.0 }),
        telemetry_properties: a.telemetry_properties.clone().unwrap_or_default(),
    }
}

/// `--emulator`, else target/release/iothub-emulator, else target/debug/iothub-emulator
/// (relative to the working directory, then next to this binary).
fn emulator_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--emulator {}: no such file", p.display());
        }
        return Ok(p.to_owned());
    }
    let mut candidates = vec![
        PathBuf::from("target/release/iothub-emulator"),
        PathBuf::from("target/debug/iothub-emulator"),
    ];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.to_owned()))
    {
        candidates.push(dir.join("iothub-emulator"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("no iothub-emulator binary found; build it (cargo build --release) or pass --emulator PATH"))
}

/// A command that runs `program` pinned to `cpus` when pinning is on.
fn pinned(program: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn run(args: RunArgs) -> Result<bool> {
    let wall = Instant::now();
    let sizes = sizes(&args);
    let selected: Vec<String> = if args.scenarios.is_empty() {
        scenarios::ALL.iter().map(|s| (*s).to_owned()).collect()
    } else {
        for s in &args.scenarios {
            if !scenarios::ALL.contains(&s.as_str()) && !scenarios::EXTRA.contains(&s.as_str()) {
                bail!(
                    "unknown scenario {s:?}; known: {}, {}",
                    scenarios::ALL.join(", "),
                    scenarios::EXTRA.join(", ")
                );
            }
        }
        args.scenarios.clone()
    };
    let on = |s: &str| selected.iter().any(|x| x == s);

    // Pin before the runtime exists, so every loader thread inherits the mask.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (server_cpus, loader_cpus) =
        if !args.no_pin && nproc >= 2 && proc_stats::have_command("taskset") {
            let loader = if nproc == 2 {
                "1".to_owned()
            } else {
                format!("1-{}", nproc - 1)
            };
            (Some("0".to_owned()), Some(loader))
        } else {
            (None, None)
        };
    let loader_pinned = loader_cpus.as_deref().is_some_and(proc_stats::pin_self);
    proc_stats::raise_nofile();
    let clk_tck = proc_stats::clock_ticks();
    let mut machine = Machine::probe(nproc, clk_tck);
    machine.server_cpus = server_cpus.clone();
    machine.loader_cpus = loader_cpus.clone();
    machine.loader_pinned = loader_pinned;

    let emulator = emulator_path(args.emulator.as_deref())?;
    let mut tmp = TempDir::new("iothub-bench")?;
    tmp.keep = args.keep_tmp;
    let mut report = Report {
        tool: format!("iothub-bench {}", env!("CARGO_PKG_VERSION")),
        mode: if args.smoke { "smoke" } else { "full" }.to_owned(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        emulator: emulator.display().to_string(),
        tls: if args.tls12 { "TLS 1.2" } else { "TLS 1.3" }.to_owned()
            + ", ECDSA P-256 server certificates, no session resumption",
        wall_seconds: 0.0,
        scenarios: Default::default(),
        ratios: vec![],
        targets: vec![],
        notes: vec![],
        rows: vec![],
    };
    if emulator.components().any(|c| c.as_os_str() == "debug") {
        report
            .notes
            .push("the emulator is a debug build: numbers are not representative".into());
    }
    if server_cpus.is_none() {
        report.notes.push(
            "servers and loader not pinned (fewer than 2 CPUs, no taskset, or --no-pin)".into(),
        );
    } else if !loader_pinned {
        report
            .notes
            .push("the loader could not pin itself (taskset -p failed)".into());
    }
    eprintln!(
        "iothub-bench: emulator {}, temporary files in {}",
        emulator.display(),
        tmp.path.display()
    );

    let mut failures = Vec::new();
    if on("startup") {
        eprintln!("iothub-bench: startup");
        if let Err(e) = scenarios::startup(
            &emulator,
            &tmp.join("startup-certs"),
            sizes.startup_runs,
            &mut report,
        ) {
            failures.push(format!("startup: {e:#}"));
        }
    }

    // The emulator under test, pinned to the server CPU.
    let https_port = proc_stats::free_port()?;
    let mqtt_port = proc_stats::free_port()?;
    let certs = tmp.join("certs");
    let mut command = pinned(&emulator, server_cpus.as_deref());
    command
        .args(["--hostname", "localhost", "--bind", "127.0.0.1"])
        .args(["--https-port", &https_port.to_string()])
        .args(["--mqtt-port", &mqtt_port.to_string()])
        .args(["--amqp-port", &proc_stats::free_port()?.to_string()])
        .arg("--certs-dir")
        .arg(&certs)
        .env("RUST_LOG", &args.emulator_log);
    if let Some(config) = &args.emulator_config {
        command.arg("--config").arg(config);
    }
    // The emulator caps connections per listener from its open-file limit (about 9,300 MQTT
    // connections at 20,000 fds); a fleet larger than that is asked for explicitly.
    let fleet = sizes.fleet(&selected).max(sizes.idle_clients);
    if fleet > 8000 {
        command.args(["--max-connections", &(fleet + 1000).to_string()]);
    }
    let emu_process = ServerProcess::spawn(
        "emulator",
        command,
        "iothub-emulator ready",
        Duration::from_secs(30),
        Some(tmp.join("emulator.log")),
    )?;
    let ca_pem =
        std::fs::read_to_string(certs.join("ca.pem")).context("reading the emulator's ca.pem")?;

    let needs_responder = !args.no_responder
        && ["connect", "idle", "twin-get", "twin-patch", "telemetry"]
            .iter()
            .any(|s| on(s));
    let responder_process = if needs_responder {
        let exe = std::env::current_exe()?;
        let ca_out = tmp.join("responder-ca.pem");
        let port = proc_stats::free_port()?;
        let mut command = pinned(&exe, server_cpus.as_deref());
        command
            .arg("responder")
            .args(["--port", &port.to_string()])
            .arg("--ca-out")
            .arg(&ca_out);
        let process = ServerProcess::spawn(
            "responder",
            command,
            responder::READY,
            Duration::from_secs(30),
            Some(tmp.join("responder.log")),
        )?;
        Some((process, ca_out, port))
    } else {
        None
    };

    let soak = if on("soak") {
        sizes.soak_duration
    } else {
        Duration::ZERO
    };
    let timeout = args.timeout.map_or_else(
        || Duration::from_secs(if args.smoke { 300 } else { 3600 }) + soak,
        Duration::from_secs,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let emu_tls = tokio_rustls::TlsConnector::from(client::tls_config(&ca_pem, args.tls12)?);
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let responder = match &responder_process {
            Some((p, ca_out, port)) => {
                let port = *port;
                let pem = std::fs::read_to_string(ca_out)?;
                Some(Target {
                    name: "responder",
                    pid: p.pid,
                    mqtt: client::Endpoint {
                        addr: loopback(port),
                        tls: tokio_rustls::TlsConnector::from(client::tls_config(&pem, args.tls12)?),
                    },
                })
            }
            None => None,
        };
        let mut ctx = Ctx {
            emulator: Target {
                name: "emulator",
                pid: emu_process.pid,
                mqtt: client::Endpoint {
                    addr: loopback(mqtt_port),
                    tls: emu_tls.clone(),
                },
            },
            responder,
            https: client::Endpoint {
                addr: loopback(https_port),
                tls: emu_tls,
            },
            token: Arc::from(client::owner_token()?),
            sources: Arc::new(client::SourceAddrs::default()),
            clk_tck,
            sizes: sizes.clone(),
            fleet: Arc::new(vec![]),
        };
        let all = async {
            let fleet = sizes.fleet(&selected);
            if fleet > 0 || on("register") {
                eprintln!("iothub-bench: register {fleet} modules");
                scenarios::register(&mut ctx, fleet.max(1), &mut report).await?;
            }
            for name in &selected {
                let name = name.as_str();
                if matches!(name, "startup" | "register") {
                    continue;
                }
                eprintln!("iothub-bench: {name}");
                let result = match name {
                    "connect" => scenarios::connect(&ctx, &mut report).await,
                    "idle" => scenarios::idle(&ctx, &mut report).await,
                    "twin-get" => scenarios::round_trips(&ctx, MqttOp::TwinGet, &mut report).await,
                    "twin-patch" => scenarios::round_trips(&ctx, MqttOp::TwinPatch, &mut report).await,
                    "telemetry" => scenarios::round_trips(&ctx, MqttOp::Telemetry, &mut report).await,
                    "desired-fanout" => scenarios::desired_fanout(&ctx, &mut report).await,
                    "methods" => scenarios::methods(&ctx, &mut report).await,
                    "rest" => scenarios::rest(&ctx, &mut report).await,
                    "query" => scenarios::query(&ctx, &mut report).await,
                    "soak" => scenarios::soak(&ctx, &mut report).await,
                    _ => unreachable!("names are checked"),
                };
                if let Err(e) = result {
                    eprintln!("iothub-bench: {name} failed: {e:#}");
                    failures.push(format!("{name}: {e:#}"));
                }
                scenarios::check_alive(ctx.emulator.pid, "emulator")?;
                if let Some(r) = &ctx.responder {
                    scenarios::check_alive(r.pid, "responder")?;
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, all) => r.map_err(|_| anyhow!("gave up after {timeout:?}"))?,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // Stop every connection, then the servers (also on error).
    runtime.shutdown_timeout(Duration::from_secs(2));
    let emulator_log = emu_process.log_tail();
    drop(emu_process);
    drop(responder_process);
    if let Err(e) = outcome {
        failures.push(format!("{e:#}"));
        eprintln!("iothub-bench: {e:#}\nemulator log tail:\n{emulator_log}");
    }

    report.wall_seconds = wall.elapsed().as_secs_f64();
    report
        .notes
        .extend(failures.iter().map(|f| format!("FAILED: {f}")));
    report.finish();
    let mut problems = failures.clone();
    problems.extend(report.problems());
    let markdown = report.markdown();
    match &args.markdown {
        Some(path) => std::fs::write(path, &markdown)
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{markdown}"),
    }
    if let Some(path) = &args.json {
        let mut value = serde_json::to_value(&report)?;
        value["problems"] = serde_json::json!(problems);
        std::fs::write(path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if problems.is_empty() {
        Ok(true)
    } else {
        eprintln!("iothub-bench: {} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
        Ok(false)
    }
}
