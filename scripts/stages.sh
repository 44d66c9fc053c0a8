#!/usr/bin/env bash
# Runs `make STAGE` for each stage in turn (stopping at the first that fails) and prints how long
# each took, so the slowest stage of `make test` is visible at the end of every CI log.
#   scripts/stages.sh MAKE STAGE...
set -uo pipefail
make=$1; shift
times=() status=0 start_all=$(date +%s)
for stage in "$@"; do
  start=$(date +%s)
  echo "== stage $stage"
  "$make" --no-print-directory "$stage"
  status=$?
  times+=("$(printf '%-14s %5d s' "$stage" $(( $(date +%s) - start )))$([ $status = 0 ] || echo '  FAILED')")
  [ $status = 0 ] || break
done
echo "== stage times ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
printf '%s\n' "${times[@]}"
printf '%-14s %5d s\n' total $(( $(date +%s) - start_all ))
exit $status
