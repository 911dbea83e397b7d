//! Counters and latency histograms for `/_emulator/metrics`, in Prometheus' text format.
//!
//! Everything is an atomic: recording a sample never takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    /// Cumulative counts are computed when rendering; each slot counts samples in its bucket
    /// (the last slot is +Inf).
    slots: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.slots[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.slots[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.slots[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.trim_end_matches(','))
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(
            out,
            "{name}_count{braces} {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

/// A device-side twin or message operation, for counting and timing.
#[derive(Debug, Clone, Copy)]
pub enum DeviceOp {
    TwinGet,
    ReportedPatch,
    Telemetry,
    MethodResponse,
}

/// The hub's metrics.
#[derive(Default)]
pub struct Metrics {
    pub mqtt_connections_accepted: AtomicU64,
    pub mqtt_connections_refused: AtomicU64,
    pub amqp_connections: AtomicU64,
    pub desired_pushes: AtomicU64,
    pub c2d_delivered: AtomicU64,
    pub c2d_completed: AtomicU64,
    pub methods_invoked: AtomicU64,
    device_ops: [Histogram; 4],
    http_requests: [Histogram; 5],
}

impl Metrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn device_op(&self, op: DeviceOp, elapsed: Duration) {
        self.device_ops[op as usize].observe(elapsed);
    }

    /// Records one HTTP request by status class (1xx..5xx).
    pub fn http_request(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.http_requests[class].observe(elapsed);
    }

    /// Prometheus text exposition. `connected` and `telemetry` come from their owners.
    pub fn render(&self, connected: usize, telemetry_total: u64, telemetry_dropped: u64) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP iothub_connected_identities Devices and modules connected now.\n# TYPE iothub_connected_identities gauge\niothub_connected_identities {connected}"
        );
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "iothub_mqtt_connections_accepted_total",
            "MQTT connections accepted.",
            load(&self.mqtt_connections_accepted),
        );
        counter(
            &mut out,
            "iothub_mqtt_connections_refused_total",
            "MQTT connections refused at CONNECT.",
            load(&self.mqtt_connections_refused),
        );
        counter(
            &mut out,
            "iothub_amqp_connections_total",
            "AMQP connections opened.",
            load(&self.amqp_connections),
        );
        counter(
            &mut out,
            "iothub_telemetry_messages_total",
            "Device-to-cloud messages accepted.",
            telemetry_total,
        );
        counter(
            &mut out,
            "iothub_telemetry_dropped_total",
            "Messages dropped from the full telemetry log.",
            telemetry_dropped,
        );
        counter(
            &mut out,
            "iothub_desired_pushes_total",
            "Desired-property patches pushed to devices.",
            load(&self.desired_pushes),
        );
        counter(
            &mut out,
            "iothub_c2d_delivered_total",
            "Cloud-to-device messages sent to devices.",
            load(&self.c2d_delivered),
        );
        counter(
            &mut out,
            "iothub_c2d_completed_total",
            "Cloud-to-device messages completed by devices.",
            load(&self.c2d_completed),
        );
        counter(
            &mut out,
            "iothub_methods_invoked_total",
            "Direct-method calls made.",
            load(&self.methods_invoked),
        );
        let _ = writeln!(out, "# HELP iothub_device_operation_seconds Device operations handled, by kind.\n# TYPE iothub_device_operation_seconds histogram");
        for (i, op) in ["twin_get", "reported_patch", "telemetry", "method_response"]
            .iter()
            .enumerate()
        {
            self.device_ops[i].render(
                &mut out,
                "iothub_device_operation_seconds",
                &format!("operation=\"{op}\","),
            );
        }
        let _ = writeln!(out, "# HELP iothub_http_request_seconds HTTPS requests, by status class.\n# TYPE iothub_http_request_seconds histogram");
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            self.http_requests[i].render(
                &mut out,
                "iothub_http_request_seconds",
                &format!("status=\"{class}\","),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.device_op(DeviceOp::TwinGet, Duration::from_micros(300));
        m.device_op(DeviceOp::TwinGet, Duration::from_millis(3));
        m.http_request(404, Duration::from_millis(1));
        Metrics::count(&m.methods_invoked);
        let text = m.render(2, 7, 1);
        assert!(text.contains("iothub_connected_identities 2"));
        assert!(text.contains("iothub_telemetry_messages_total 7"));
        assert!(text.contains("iothub_methods_invoked_total 1"));
        assert!(text.contains(
            "iothub_device_operation_seconds_bucket{operation=\"twin_get\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "iothub_device_operation_seconds_bucket{operation=\"twin_get\",le=\"0.005\"} 2"
        ));
        assert!(text.contains("iothub_device_operation_seconds_count{operation=\"twin_get\"} 2"));
        assert!(text.contains("iothub_http_request_seconds_count{status=\"4xx\"} 1"));
    }
}
