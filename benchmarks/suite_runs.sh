#!/usr/bin/env bash
# The README's test command run RUNS times in a row, each line: run, load, exit status, seconds, summary.
#   bash benchmarks/suite_runs.sh 5            # an idle machine
#   bash benchmarks/suite_runs.sh 10 --loaded  # a second process keeps one core busy meanwhile
#   FP32_CPU=1 bash benchmarks/suite_runs.sh 1 # as on a CPU without AVX512-BF16/AMX (needs root: hides the flags)
set -u
cd "$(dirname "$0")/.."
runs=${1:-1}
busy_pid=""
if [ "${2:-}" = "--loaded" ]; then
  python -c "while True: pass" &
  busy_pid=$!
  trap 'kill $busy_pid 2>/dev/null' EXIT
fi
command="python -m pytest -q -p no:cacheprovider"
if [ "${FP32_CPU:-0}" = "1" ]; then  # /proc/cpuinfo without the bf16 flags, in a mount namespace of its own
  sed -e 's/ avx512_bf16//g' -e 's/ amx_bf16//g' /proc/cpuinfo > /tmp/cpuinfo-fp32
  command="unshare -m sh -c 'mount --bind /tmp/cpuinfo-fp32 /proc/cpuinfo && $command'"
fi
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  load=$(cut -d' ' -f1 /proc/loadavg)
  eval "$command" > "/tmp/suite_run_$start.log" 2>&1
  status=$?
  summary=$(tail -1 "/tmp/suite_run_$start.log")
  echo "run $i: load $load, exit $status, $(( $(date +%s) - start )) s, $summary"
done
