//! Results: one [`Row`] per measured phase, latency percentiles, the emulator ÷ responder
//! ratios, the targets with met / not met, and the JSON and Markdown renderings.

use crate::proc_stats::{Machine, Measured};
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Nearest-rank percentiles of samples in nanoseconds; `None` when there are none.
    pub fn of(mut samples_ns: Vec<u64>) -> Option<Self> {
        if samples_ns.is_empty() {
            return None;
        }
        samples_ns.sort_unstable();
        let n = samples_ns.len();
        let at = |q: f64| -> f64 {
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            samples_ns[rank - 1] as f64 / 1000.0
        };
        let sum: u128 = samples_ns.iter().map(|&s| u128::from(s)).sum();
        Some(Self {
            samples: n,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: samples_ns[n - 1] as f64 / 1000.0,
            mean_us: sum as f64 / n as f64 / 1000.0,
        })
    }

    fn numbers(&self) -> [f64; 6] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.mean_us,
        ]
    }
}

/// One measured phase of one scenario against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    /// The operation within the scenario (e.g. `rest-twin-get`, `where-rare`).
    pub op: String,
    /// `emulator` or `responder`.
    pub target: String,
    /// Concurrent clients (MQTT connections or HTTP connections).
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput_per_s: Option<f64>,
    pub latency: Option<Latency>,
    pub server_cpu_ms: f64,
    pub server_cpu_us_per_op: Option<f64>,
    /// What one fully busy server core would sustain at this CPU cost (1e6 ÷ µs per op).
    pub server_one_core_ceiling_per_s: Option<f64>,
    pub loader_cpu_us_per_op: Option<f64>,
    pub server_rss_before_kib: u64,
    pub server_rss_after_kib: u64,
    pub rss_per_conn_kib: Option<f64>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
}

/// What the clients of one phase did: completed operations, failures, latencies.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ops: u64,
    pub errors: u64,
    pub latencies_ns: Vec<u64>,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

impl Outcome {
    pub fn record(&mut self, latency: std::time::Duration) {
        self.ops += 1;
        self.latencies_ns.push(latency.as_nanos() as u64);
    }

    pub fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(format!("{e:#}"));
        }
    }

    pub fn merge(&mut self, other: Outcome) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.latencies_ns.extend(other.latencies_ns);
        for e in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(e);
            }
        }
    }
}

impl Row {
    /// A row from a measurement and what the clients did in it.
    pub fn new(
        scenario: &str,
        op: &str,
        target: &str,
        clients: usize,
        outcome: Outcome,
        measured: &Measured,
    ) -> Self {
        let Outcome {
            ops,
            errors,
            latencies_ns,
            error_samples,
        } = outcome;
        let per_op = |us: u64| (ops > 0).then(|| us as f64 / ops as f64);
        Self {
            scenario: scenario.to_owned(),
            op: op.to_owned(),
            target: target.to_owned(),
            clients,
            ops,
            errors,
            seconds: measured.seconds,
            throughput_per_s: (measured.seconds > 0.0 && ops > 0)
                .then(|| ops as f64 / measured.seconds),
            latency: Latency::of(latencies_ns),
            server_cpu_ms: measured.server_cpu_us as f64 / 1000.0,
            server_cpu_us_per_op: per_op(measured.server_cpu_us),
            server_one_core_ceiling_per_s: per_op(measured.server_cpu_us)
                .filter(|us| *us > 0.0)
                .map(|us| 1e6 / us),
            loader_cpu_us_per_op: per_op(measured.loader_cpu_us),
            server_rss_before_kib: measured.rss_before_kib,
            server_rss_after_kib: measured.rss_after_kib,
            rss_per_conn_kib: None,
            extra: Map::new(),
            error_samples,
        }
    }

    pub fn extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// Every number in the row, to check they are finite.
    fn numbers(&self) -> Vec<f64> {
        let mut all = vec![self.seconds, self.server_cpu_ms];
        all.extend(self.throughput_per_s);
        all.extend(self.server_cpu_us_per_op);
        all.extend(self.server_one_core_ceiling_per_s);
        all.extend(self.loader_cpu_us_per_op);
        all.extend(self.rss_per_conn_kib);
        if let Some(l) = &self.latency {
            all.extend(l.numbers());
        }
        fn walk(v: &Value, out: &mut Vec<f64>) {
            match v {
                Value::Number(n) => out.extend(n.as_f64()),
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                Value::Object(o) => o.values().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        for v in self.extra.values() {
            walk(v, &mut all);
        }
        all
    }
}

/// Emulator ÷ responder server CPU per operation for one scenario and client count.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub scenario: String,
    pub op: String,
    pub clients: usize,
    pub emulator_cpu_us_per_op: f64,
    pub responder_cpu_us_per_op: f64,
    pub ratio: f64,
}

/// One of the targets.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: String,
    pub mode: String,
    pub command: String,
    pub machine: Machine,
    pub emulator: String,
    pub tls: String,
    pub wall_seconds: f64,
    /// Rows by scenario name, in run order.
    pub scenarios: Map<String, Value>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub rows: Vec<Row>,
}

impl Report {
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Fills `scenarios`, `ratios` and `targets` from the rows.
    pub fn finish(&mut self) {
        self.scenarios = Map::new();
        for row in &self.rows {
            let entry = self
                .scenarios
                .entry(row.scenario.clone())
                .or_insert_with(|| Value::Array(vec![]));
            if let Value::Array(list) = entry {
                list.push(serde_json::to_value(row).unwrap_or(Value::Null));
            }
        }
        self.ratios = self.compute_ratios();
        self.targets = self.compute_targets();
    }

    /// Problems that make a smoke run fail: errors, empty phases, non-finite numbers.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for row in &self.rows {
            let name = format!(
                "{}/{}/{} ({} clients)",
                row.scenario, row.op, row.target, row.clients
            );
            if row.errors > 0 {
                problems.push(format!(
                    "{name}: {} errors, e.g. {:?}",
                    row.errors, row.error_samples
                ));
            }
            if row.ops == 0 {
                problems.push(format!("{name}: no operation completed"));
            }
            if row.numbers().iter().any(|n| !n.is_finite()) {
                problems.push(format!("{name}: non-finite number"));
            }
        }
        for r in &self.ratios {
            if !r.ratio.is_finite() {
                problems.push(format!("ratio {} @ {}: not finite", r.scenario, r.clients));
            }
        }
        problems
    }

    fn find(&self, scenario: &str, op: &str, target: &str, clients: Option<usize>) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.scenario == scenario
                && r.op == op
                && r.target == target
                && clients.is_none_or(|c| r.clients == c)
        })
    }

    fn compute_ratios(&self) -> Vec<Ratio> {
        let mut ratios = Vec::new();
        for emu in self.rows.iter().filter(|r| r.target == "emulator") {
            let Some(resp) = self.find(&emu.scenario, &emu.op, "responder", Some(emu.clients))
            else {
                continue;
            };
            if let (Some(e), Some(r)) = (emu.server_cpu_us_per_op, resp.server_cpu_us_per_op) {
                if r > 0.0 {
                    ratios.push(Ratio {
                        scenario: emu.scenario.clone(),
                        op: emu.op.clone(),
                        clients: emu.clients,
                        emulator_cpu_us_per_op: e,
                        responder_cpu_us_per_op: r,
                        ratio: e / r,
                    });
                }
            }
        }
        ratios
    }

    fn compute_targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        // `measured`: (text, met, measured at the target's size).
        let mut add = |name: &str, goal: &str, measured: Option<(String, bool, bool)>| {
            targets.push(Target {
                name: name.to_owned(),
                goal: goal.to_owned(),
                measured: measured.as_ref().map_or_else(
                    || "not measured".to_owned(),
                    |m| {
                        if m.2 {
                            m.0.clone()
                        } else {
                            format!("{} (below the target's size)", m.0)
                        }
                    },
                ),
                met: measured.and_then(|m| m.2.then_some(m.1)),
            });
        };
        // Ratios at 100 clients (or the nearest count measured).
        for scenario in ["twin-patch", "twin-get", "telemetry"] {
            let best = self
                .ratios
                .iter()
                .filter(|r| r.scenario == scenario && r.op == scenario)
                .min_by_key(|r| r.clients.abs_diff(100));
            add(
                &format!("{scenario} CPU vs responder"),
                "≤ 1.5× at 100 clients",
                best.map(|r| {
                    (
                        format!(
                            "{:.2}× ({:.1} vs {:.1} µs/op, {} clients)",
                            r.ratio, r.emulator_cpu_us_per_op, r.responder_cpu_us_per_op, r.clients
                        ),
                        r.ratio <= 1.5,
                        true,
                    )
                }),
            );
        }
        add(
            "connect server CPU",
            "≤ 500 µs per TCP+TLS+CONNECT (ECDSA P-256)",
            self.find("connect", "connect", "emulator", None)
                .and_then(|r| r.server_cpu_us_per_op)
                .map(|us| (format!("{us:.0} µs"), us <= 500.0, true)),
        );
        add(
            "idle RSS per connection",
            "≤ 16 KiB (at 19,000 connections)",
            self.find("idle", "idle", "emulator", None).and_then(|r| {
                r.rss_per_conn_kib.map(|kib| {
                    (
                        format!("{kib:.1} KiB at {} connections", r.clients),
                        kib <= 16.0,
                        r.clients >= 5000,
                    )
                })
            }),
        );
        add(
            "desired fan-out",
            "< 1 s to 10,000 connected modules",
            self.find("desired-fanout", "desired-fanout", "emulator", None)
                .and_then(|r| {
                    let ms = r.extra.get("fanout_ms_median")?.as_f64()?;
                    Some((
                        format!("{ms:.0} ms to {} modules", r.clients),
                        ms < 1000.0,
                        r.clients >= 10_000,
                    ))
                }),
        );
        // Paced phases when present (closed-loop latency at 1,000 clients is 1,000 ÷ throughput).
        let p99_1000 = ["twin-get", "twin-patch"]
            .iter()
            .filter_map(|s| {
                let rows = || {
                    self.rows
                        .iter()
                        .filter(|r| r.scenario == *s && r.target == "emulator")
                };
                let r = rows()
                    .filter(|r| r.op.ends_with("-paced"))
                    .max_by_key(|r| r.clients)
                    .or_else(|| rows().max_by_key(|r| r.clients))?;
                Some((
                    r.op.as_str(),
                    r.clients,
                    r.latency.as_ref()?.p99_us,
                    r.errors,
                ))
            })
            .collect::<Vec<_>>();
        add(
            "twin p99 at 1,000 active clients",
            "< 5 ms, zero errors",
            (!p99_1000.is_empty()).then(|| {
                let text = p99_1000
                    .iter()
                    .map(|(s, c, p99, e)| format!("{s} {:.2} ms @ {c} ({e} errors)", p99 / 1000.0))
                    .collect::<Vec<_>>()
                    .join("; ");
                let met = p99_1000
                    .iter()
                    .all(|(_, _, p99, e)| *p99 < 5000.0 && *e == 0);
                let sized = p99_1000.iter().all(|(_, c, _, _)| *c >= 1000);
                (text, met, sized)
            }),
        );
        add(
            "REST twin GET",
            "≥ 20,000 requests/s",
            self.find("rest", "rest-twin-get", "emulator", None)
                .and_then(|r| {
                    let t = r.throughput_per_s?;
                    let ceiling = r
                        .server_one_core_ceiling_per_s
                        .map_or(String::new(), |c| format!("; 1-core ceiling {c:.0}/s"));
                    Some((format!("{t:.0} req/s{ceiling}"), t >= 20_000.0, true))
                }),
        );
        add(
            "query over 100,000 twins",
            "< 200 ms",
            self.find("query", "where-rare", "emulator", None)
                .and_then(|r| {
                    let twins = r.extra.get("twins_in_hub")?.as_u64()?;
                    let p50 = r.latency.as_ref()?.p50_us / 1000.0;
                    Some((
                        format!("{p50:.0} ms (p50) over {twins} twins"),
                        p50 < 200.0,
                        twins >= 100_000,
                    ))
                }),
        );
        add(
            "start-up to ready",
            "< 100 ms",
            self.find("startup", "startup", "emulator", None)
                .and_then(|r| r.latency.as_ref())
                .map(|l| {
                    (
                        format!("{:.0} ms (p50)", l.p50_us / 1000.0),
                        l.p50_us < 100_000.0,
                        true,
                    )
                }),
        );
        targets
    }

    /// The Markdown rendering: results, ratios, targets.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# iothub-bench results ({})\n", self.mode);
        let _ = writeln!(
            md,
            "Machine: {} CPUs ({}), {} MiB RAM, Linux {}; server pinned to CPU {}, loader to CPU {}{}; open-file limit {}. TLS: {}. Wall time {:.0} s.\n",
            m.nproc,
            m.cpu_model,
            m.mem_total_mib,
            m.kernel,
            m.server_cpus.as_deref().unwrap_or("(none)"),
            m.loader_cpus.as_deref().unwrap_or("(none)"),
            if m.loader_pinned { "" } else { " (loader not pinned)" },
            m.nofile_soft.map_or("?".to_owned(), |n| n.to_string()),
            self.tls,
            self.wall_seconds,
        );
        let _ = writeln!(md, "Command: `{}`\n", self.command);
        md.push_str("| scenario | op | server | clients | ops | errors | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server CPU µs/op | 1-core ceiling ops/s | loader CPU µs/op | server RSS KiB | RSS KiB/conn |\n");
        md.push_str(
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let num =
            |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
        for r in &self.rows {
            let ms = |f: fn(&Latency) -> f64| r.latency.as_ref().map(|l| f(l) / 1000.0);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.op,
                r.target,
                r.clients,
                r.ops,
                r.errors,
                num(r.throughput_per_s, 0),
                num(ms(|l| l.p50_us), 2),
                num(ms(|l| l.p90_us), 2),
                num(ms(|l| l.p99_us), 2),
                num(ms(|l| l.p999_us), 2),
                num(r.server_cpu_us_per_op, 1),
                num(r.server_one_core_ceiling_per_s, 0),
                num(r.loader_cpu_us_per_op, 1),
                r.server_rss_after_kib,
                num(r.rss_per_conn_kib, 1),
            );
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .filter(|r| !r.extra.is_empty())
            .map(|r| {
                format!(
                    "- {}/{}/{} ({} clients): {}",
                    r.scenario,
                    r.op,
                    r.target,
                    r.clients,
                    Value::Object(r.extra.clone())
                )
            })
            .collect();
        if !notes.is_empty() {
            md.push_str("\nDetails:\n\n");
            for n in notes {
                md.push_str(&n);
                md.push('\n');
            }
        }
        if !self.ratios.is_empty() {
            md.push_str("\n## Emulator ÷ responder, server CPU per operation (same run)\n\n");
            md.push_str("| op | clients | emulator µs/op | responder µs/op | ratio |\n|---|---:|---:|---:|---:|\n");
            for r in &self.ratios {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {:.1} | {:.2}× |",
                    r.op, r.clients, r.emulator_cpu_us_per_op, r.responder_cpu_us_per_op, r.ratio
                );
            }
        }
        md.push_str(
            "\n## Targets (issue 8)\n\n| target | goal | measured | met |\n|---|---|---|---|\n",
        );
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(md, "| {} | {} | {} | {} |", t.name, t.goal, t.measured, met);
        }
        if !self.notes.is_empty() {
            md.push_str("\nNotes:\n\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md.push_str("\nA target measured below its size (fewer clients, modules or twins) shows – in 'met'.\n");
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let l = Latency::of((1..=1000).map(|i| i * 1000).collect()).unwrap();
        assert_eq!(l.p50_us, 500.0);
        assert_eq!(l.p90_us, 900.0);
        assert_eq!(l.p99_us, 990.0);
        assert_eq!(l.p999_us, 999.0);
        assert_eq!(l.max_us, 1000.0);
        assert!(Latency::of(vec![]).is_none());
    }
}
