#!/usr/bin/env bash
# Runs the cargo-fuzz targets under fuzz/ (docs/reliability.md, "Fuzzing").
#
#   scripts/fuzz.sh                 every target for 30 s (a smoke run)
#   SECONDS_EACH=3600 scripts/fuzz.sh twin_patch query   one hour each for two targets
#   RUNS=10000000 scripts/fuzz.sh sas_token              ten million executions
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target's corpus
# lives in fuzz/corpus/<target>/ (not committed); a crash is written to fuzz/artifacts/<target>/
# and stops the run with a non-zero exit. The last "#N DONE" line of each log is the number of
# executions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
SECONDS_EACH="${SECONDS_EACH:-30}"
if [[ -n "${RUNS:-}" ]]; then limit=(-runs="$RUNS"); else limit=(-max_total_time="$SECONDS_EACH"); fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "==> $t: ${limit[*]}"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- "${limit[@]}" -rss_limit_mb=4096 \
    -print_final_stats=1 > "logs/$t.log" 2>&1 || { tail -40 "logs/$t.log"; exit 1; }
  grep -E "^#[0-9]+\s+DONE|stat::number_of_executed_units" "logs/$t.log" | tail -2
done
