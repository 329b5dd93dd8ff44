#!/usr/bin/env bash
# Run the README's test command N times while two CPU-bound processes compete for the
# cores, to catch tests that depend on machine speed (sleeps, tight timeouts, races).
#
#   tools/stress_suite.sh [N]                      # N runs of `uv run pytest` (default 5)
#   STRESS_PYTEST_ARGS="tests/test_info.py -q" tools/stress_suite.sh 1
#   STRESS_PARALLEL=1 tools/stress_suite.sh 5      # the 5 runs at once: each also competes with the other 4
#
# STRESS_PYTEST_ARGS replaces pytest's arguments (default: none, the whole suite, as in
# the README); STRESS_HOGS sets the number of competing processes (default 2);
# STRESS_PARALLEL=1 starts every run at once (more load than the hogs alone, and on a
# 2-core machine the N runs end sooner than one after another), each with its own pytest
# temporary directory and its log in runs/stress/run-K.log. Prints pass/fail per run and
# exits 0 only when every run passed. The competing processes are killed on exit,
# including Ctrl-C.
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
run_pids=()
stop_hogs() {
  for pid in "${run_pids[@]}"; do
    pkill -P "$pid" 2>/dev/null
    kill "$pid" 2>/dev/null
  done
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
if [ "${STRESS_PARALLEL:-0}" = 1 ]; then
  # Node clients are installed by the first test that needs them: do it once, up front,
  # so the parallel runs do not race to install them into the same folder.
  uv run pytest -q tests/test_http_openai.py tests/test_runtime_e2e.py -k node >/dev/null 2>&1
  mkdir -p runs/stress
  for i in $(seq "$runs"); do
    base="$(mktemp -d)"
    uv run pytest -p no:cacheprovider --basetemp "$base/t" "${pytest_args[@]}" > "runs/stress/run-$i.log" 2>&1 &
    run_pids+=("$!")
  done
  start=$SECONDS
  for i in $(seq "$runs"); do
    if wait "${run_pids[$((i - 1))]}"; then
      status=pass
      passed=$((passed + 1))
    else
      status="FAIL (exit $?; see runs/stress/run-$i.log)"
    fi
    echo "stress: run $i/$runs: $status ($(tail -n 1 "runs/stress/run-$i.log")) at $((SECONDS - start)) s"
  done
  echo "stress: $passed of $runs runs passed"
  [ "$passed" -eq "$runs" ]
  exit
fi
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
