#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each, JOBS at a time: `make fuzz` (60 s each, one
# at a time) and the smoke run of `make test` (20 s each, two at a time on two cores).
#
#   scripts/fuzz.sh SECONDS JOBS      (FUZZ_TARGETS="args manifest": only those)
#
# The seeds in fuzz/corpus/TARGET are read, never written: new inputs go to a scratch corpus next
# to the build (FUZZ_TARGET_DIR), which every later run starts from (60 s of every target grows
# it by some 7,000 inputs, 28 MB: too much for the repository). A crash stops with the input's path and
# the command that replays it; fix it and add the input as a regression test (tests/hostile.rs).
#
# Built without a sanitizer and with debug assertions: absorb and every parser it uses are safe
# Rust, so what there is to find is panics, integer overflow, runaway allocation and hangs (each
# input gets 10 s and 2 GiB).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:?seconds per target}
jobs=${2:-1}
toolchain=${FUZZ_TOOLCHAIN:?FUZZ_TOOLCHAIN (set by the Makefile)}
target_dir=${FUZZ_TARGET_DIR:?FUZZ_TARGET_DIR (set by the Makefile)}
flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")
targets=${FUZZ_TARGETS:-$(cargo +"$toolchain" fuzz list)}

cargo +"$toolchain" fuzz build "${flags[@]}"

run_one() {
  local t=$1 scratch="$target_dir/corpus/$1" log="$target_dir/logs/$1.log"
  local flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")
  mkdir -p "$scratch" "$(dirname "$log")" "artifacts/$t"
  if ! cargo +"$toolchain" fuzz run "${flags[@]}" "$t" "$scratch" "corpus/$t" -- \
      -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -dict=fuzz.dict \
      -print_final_stats=1 >"$log" 2>&1; then
    echo "FAIL $t: see $log"
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to" "$log" | head -n 8 | sed 's/^/  /'
    echo "  replay: cd fuzz && cargo +$toolchain fuzz run ${flags[*]} $t artifacts/$t/<file>"
    return 1
  fi
  local runs cov
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'DONE *cov: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  printf 'ok   %-14s %9s inputs in %s s, coverage %s edges, %s in the scratch corpus\n' \
    "$t" "$runs" "$seconds" "$cov" "$(find "$scratch" -type f | wc -l)"
}
export -f run_one
export toolchain target_dir seconds

status=0
# shellcheck disable=SC2086
printf '%s\n' $targets | xargs -P "$jobs" -I{} bash -c 'run_one "$1"' _ {} || status=1

exit $status
