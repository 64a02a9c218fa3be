#!/usr/bin/env bash
# CI: the benchmark suite in quick mode. It checks that every scenario runs
# and moves intact data, and saves the JSON results; it asserts no timing.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m bench.load --quick --json bench/results/ci-quick.json
# The cluster setups (real haproxy, redis-server, nodes), tiny sizes: integrity only.
.venv/bin/python -m bench.cluster --quick --json bench/results/ci-cluster-quick.json
.venv/bin/python -m bench.resume --quick --json bench/results/ci-resume-quick.json  # resumable relays: integrity only
FASTRELAY_BENCH_BYTES=$((8 * 1024 * 1024)) .venv/bin/python -m pytest bench/ -q -p no:cacheprovider \
    --benchmark-json=bench/results/ci-pytest-benchmark.json
.venv/bin/python -m bench.tee_probe --quick --json bench/results/ci-tee-probe-quick.json  # fan-out copy, buffered vs splice+tee, no relay: integrity only
.venv/bin/python -m bench.fanout --quick --json bench/results/ci-fanout-quick.json  # fan-out relays (receivers N) and piping-server ?n=N: integrity only
.venv/bin/python -m bench.pacing --quick --json bench/results/ci-pacing-quick.json  # paced relays (max_rate): integrity only
