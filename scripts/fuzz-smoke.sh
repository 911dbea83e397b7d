#!/usr/bin/env bash
# The CI fuzz smoke (docs/reliability.md, "Fuzzing"): every fuzz target under fuzz/, built on
# the stable toolchain with the instrumentation cargo-fuzz adds (SanitizerCoverage for
# libFuzzer; no sanitizer, which needs nightly), then run for SECONDS_EACH seconds (15) from
# an empty corpus. A crash, panic or out-of-memory fails the run and leaves the input in
# fuzz/artifacts/<target>/. The long campaigns run by hand with scripts/fuzz.sh (nightly,
# AddressSanitizer).
#
#   scripts/fuzz-smoke.sh                  every target, 15 s each
#   SECONDS_EACH=60 scripts/fuzz-smoke.sh query twin_patch
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
SECONDS_EACH="${SECONDS_EACH:-15}"
TARGET="$(rustc -vV | sed -n 's/^host: //p')"
# cargo-fuzz's instrumentation flags. With --target, RUSTFLAGS reach only the fuzzed code, not
# build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --locked --quiet --profile smoke --target "$TARGET" "${bins[@]}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  if ! "target/$TARGET/smoke/$t" "$work/$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 > "logs/smoke-$t.log" 2>&1; then
    tail -40 "logs/smoke-$t.log"
    echo "fuzz smoke: $t failed (log fuzz/logs/smoke-$t.log, input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  echo "fuzz smoke: $t: $(grep -E 'stat::number_of_executed_units' "logs/smoke-$t.log" | awk '{print $2}') executions in ${SECONDS_EACH} s, no crash"
done
