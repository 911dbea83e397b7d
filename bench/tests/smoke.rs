//! The load tool runs every scenario end to end at tiny sizes and writes well-formed JSON.
//! No timing assertions: on shared machines only the shape of the output is stable.

use std::path::Path;
use std::process::Command;

/// The bench binary and the emulator binary beside it.
fn binaries() -> (&'static Path, std::path::PathBuf) {
    let bench = Path::new(env!("CARGO_BIN_EXE_iothub-bench"));
    // The emulator is another package of the workspace: `cargo test --workspace` (the test
    // command) builds its binary into the same directory as this one.
    let emulator = bench.with_file_name(format!("iothub-emulator{}", std::env::consts::EXE_SUFFIX));
    assert!(
        emulator.exists(),
        "{} is missing: run `cargo build --workspace` first",
        emulator.display()
    );
    (bench, emulator)
}

#[test]
fn bench_smoke_runs_every_scenario() {
    let dir = std::env::temp_dir().join(format!("iothub-bench-smoke-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let markdown_path = dir.join("bench.md");
    let (bench, emulator) = binaries();
    let output = Command::new(bench)
        .arg("--smoke")
        .arg("--emulator")
        .arg(&emulator)
        .arg("--json")
        .arg(&json_path)
        .arg("--markdown")
        .arg(&markdown_path)
        .output()
        .expect("iothub-bench starts");
    assert!(
        output.status.success(),
        "iothub-bench --smoke failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let text = std::fs::read_to_string(&json_path).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let scenarios = report["scenarios"].as_object().expect("a scenarios object");
    for key in [
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
    ] {
        let rows = scenarios
            .get(key)
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("no rows for scenario {key}"));
        assert!(!rows.is_empty(), "{key}");
        for row in rows {
            assert!(row["ops"].as_u64().unwrap() > 0, "{key}: {row}");
            assert_eq!(row["errors"].as_u64(), Some(0), "{key}: {row}");
        }
    }
    // The emulator ÷ responder ratios for the MQTT round trips were measured.
    let ratios = report["ratios"].as_array().unwrap();
    for scenario in ["twin-get", "twin-patch", "telemetry"] {
        assert!(
            ratios
                .iter()
                .any(|r| r["scenario"] == scenario && r["ratio"].as_f64().is_some()),
            "no ratio for {scenario}"
        );
    }
    assert_eq!(report["problems"].as_array().map(Vec::len), Some(0));
    let markdown = std::fs::read_to_string(&markdown_path).unwrap();
    assert!(markdown.contains("| scenario | op |"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The soak runs only when named; at smoke sizes it samples every second for two seconds.
#[test]
fn bench_smoke_soak_samples_rss_fds_and_latency() {
    let dir = std::env::temp_dir().join(format!("iothub-bench-soak-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("soak.json");
    let (bench, emulator) = binaries();
    let output = Command::new(bench)
        .args(["--smoke", "--scenarios", "soak", "--markdown"])
        .arg(dir.join("soak.md"))
        .arg("--emulator")
        .arg(&emulator)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("iothub-bench starts");
    assert!(
        output.status.success(),
        "iothub-bench --smoke --scenarios soak failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let rows = report["scenarios"]["soak"].as_array().expect("soak rows");
    assert_eq!(rows.len(), 2, "one row per interval: {rows:?}");
    for row in rows {
        assert!(row["ops"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
        assert!(row["extra"]["server_fds"].as_u64().unwrap() > 0, "{row}");
        assert!(row["server_rss_after_kib"].as_u64().unwrap() > 0, "{row}");
        assert!(row["latency"]["p99_us"].as_f64().is_some(), "{row}");
    }
    let served: u64 = rows
        .iter()
        .map(|r| r["extra"]["service_ops"].as_u64().unwrap())
        .sum();
    assert!(served > 0, "the service side made calls: {rows:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
