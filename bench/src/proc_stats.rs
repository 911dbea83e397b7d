//! Process accounting from `/proc` (CPU time and RSS of the server under test and of the loader
//! itself), machine facts for the report, and the child processes the tool starts: the emulator
//! and the trivial responder, each stopped by pid when dropped.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/{pid}/stat` times, read once with `getconf CLK_TCK`.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime + stime of a process (all its threads, dead ones included), in microseconds.
pub fn cpu_us(pid: u32, clk_tck: u64) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
    };
    let ticks = field(11)? + field(12)?;
    Ok(ticks * 1_000_000 / clk_tck)
}

/// Resident set size in KiB (`VmRSS` of `/proc/{pid}/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// How many file descriptors the process has open (entries of `/proc/{pid}/fd`).
pub fn fd_count(pid: u32) -> Result<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?;
    Ok(dir.count() as u64)
}

/// The (soft, hard) open-file limits of a process, from `/proc/{pid}/limits`.
pub fn nofile_limits(pid: &str) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let parse = |s: Option<&str>| -> Option<u64> {
        match s? {
            "unlimited" => Some(u64::MAX),
            v => v.parse().ok(),
        }
    };
    Some((parse(it.next())?, parse(it.next())?))
}

/// Whether a command exists on `PATH`.
pub fn have_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Raises this process's soft open-file limit to its hard limit with the `prlimit` command (the
/// crate forbids `unsafe`, so no direct `setrlimit`). Children inherit the raised limit.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile() -> Option<u64> {
    let (soft, hard) = nofile_limits("self")?;
    if soft < hard && have_command("prlimit") {
        let limit = if hard == u64::MAX {
            "unlimited".to_owned()
        } else {
            hard.to_string()
        };
        let _ = Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={limit}:{limit}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    nofile_limits("self").map(|(soft, _)| soft)
}

/// Pins every thread of this process (call it before any other thread exists, so later threads
/// inherit it) to `cpus` with the `taskset` command. Returns whether it worked.
pub fn pin_self(cpus: &str) -> bool {
    have_command("taskset")
        && Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Facts about the machine, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub clk_tck: u64,
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    pub server_cpus: Option<String>,
    pub loader_cpus: Option<String>,
    pub loader_pinned: bool,
}

impl Machine {
    pub fn probe(nproc: usize, clk_tck: u64) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let limits = nofile_limits("self");
        Self {
            nproc,
            cpu_model,
            mem_total_mib,
            kernel,
            clk_tck,
            nofile_soft: limits.map(|l| l.0),
            nofile_hard: limits.map(|l| l.1),
            server_cpus: None,
            loader_cpus: None,
            loader_pinned: false,
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A child server process (emulator or responder), stopped by pid when dropped.
pub struct ServerProcess {
    pub pid: u32,
    child: Child,
    /// Wall time from spawn to the ready line.
    pub startup: Duration,
    pub log: Option<PathBuf>,
}

impl ServerProcess {
    /// Spawns `command` (stdout piped) and waits up to `wait` for a stdout line containing
    /// `ready_marker`; the rest of stdout is drained by a thread so the child never blocks.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        ready_marker: &'static str,
        wait: Duration,
        log: Option<PathBuf>,
    ) -> Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        match &log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                command.stderr(file);
            }
            None => {
                command.stderr(Stdio::null());
            }
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the {name}: {command:?}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut ready_sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !ready_sent && line.contains(ready_marker) {
                    ready_sent = true;
                    let _ = tx.send(line);
                }
            }
        });
        let mut process = Self {
            pid,
            child,
            startup: Duration::ZERO,
            log,
        };
        match rx.recv_timeout(wait) {
            Ok(_) => {
                process.startup = started.elapsed();
                Ok(process)
            }
            Err(_) => {
                let status = process.child.try_wait().ok().flatten();
                let tail = process.log_tail();
                process.stop();
                bail!(
                    "the {name} did not print {ready_marker:?} within {wait:?} (exit status {status:?}); log tail:\n{tail}"
                )
            }
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.log
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            })
            .unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM by pid (the `kill` command), then SIGKILL after 3 s.
    pub fn stop(&mut self) {
        if !self.alive() {
            let _ = self.child.wait();
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !self.alive() {
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A temporary directory removed when dropped (unless kept).
pub struct TempDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep: false })
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A before/after reading of the server and the loader around one measured phase.
pub struct Meter {
    pid: u32,
    clk_tck: u64,
    started: Instant,
    server_cpu: u64,
    loader_cpu: u64,
    pub rss_before_kib: u64,
}

/// What a [`Meter`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub seconds: f64,
    pub server_cpu_us: u64,
    pub loader_cpu_us: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

impl Meter {
    pub fn start(pid: u32, clk_tck: u64) -> Result<Self> {
        let self_pid = std::process::id();
        Ok(Self {
            pid,
            clk_tck,
            rss_before_kib: rss_kib(pid)?,
            server_cpu: cpu_us(pid, clk_tck)?,
            loader_cpu: cpu_us(self_pid, clk_tck)?,
            started: Instant::now(),
        })
    }

    pub fn finish(&self) -> Result<Measured> {
        let seconds = self.started.elapsed().as_secs_f64();
        let server_cpu = cpu_us(self.pid, self.clk_tck)?;
        let loader_cpu = cpu_us(std::process::id(), self.clk_tck)?;
        Ok(Measured {
            seconds,
            server_cpu_us: server_cpu.saturating_sub(self.server_cpu),
            loader_cpu_us: loader_cpu.saturating_sub(self.loader_cpu),
            rss_before_kib: self.rss_before_kib,
            rss_after_kib: rss_kib(self.pid)?,
        })
    }
}
