#!/usr/bin/env bash
# Run the README's test command N times while two CPU-bound processes compete for the
# cores, to catch tests that depend on machine speed (sleeps, tight timeouts, races).
#
#   tools/stress_suite.sh [N]                      # N runs of `uv run pytest` (default 5)
#   STRESS_PYTEST_ARGS="tests/test_info.py -q" tools/stress_suite.sh 1
#
# STRESS_PYTEST_ARGS replaces pytest's arguments (default: none, the whole suite, as in
# the README); STRESS_HOGS sets the number of competing processes (default 2). Prints
# pass/fail per run and exits 0 only when every run passed. The competing processes are
# killed on exit, including Ctrl-C.
set -uo pipefail
cd "$(dirname "$0")/.."

runs="${1:-5}"
hogs="${STRESS_HOGS:-2}"
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]] || ! [[ "$hogs" =~ ^[0-9]+$ ]]; then
  echo "error: N (runs) must be a positive integer and STRESS_HOGS a count, got N='$runs' STRESS_HOGS='$hogs'" >&2
  exit 2
fi
read -r -a pytest_args <<< "${STRESS_PYTEST_ARGS:-}"

hog_pids=()
stop_hogs() {
  for pid in "${hog_pids[@]}"; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  hog_pids=()
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$hogs"); do
  python3 -c 'while True: pass' &
  hog_pids+=("$!")
done
echo "stress: $hogs competing CPU-bound processes (pids ${hog_pids[*]:-none}); $runs run(s) of: uv run pytest ${pytest_args[*]}"

passed=0
for i in $(seq "$runs"); do
  start=$SECONDS
  if uv run pytest "${pytest_args[@]}"; then
    status=pass
    passed=$((passed + 1))
  else
    status="FAIL (exit $?)"
  fi
  echo "stress: run $i/$runs: $status in $((SECONDS - start)) s"
done

echo "stress: $passed of $runs runs passed"
[ "$passed" -eq "$runs" ]
