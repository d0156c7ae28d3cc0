#!/usr/bin/env bash
# The checks that need a GPU, as one bounded script for a borrowed CUDA machine.
#
# Run from the repository root with the machine's own Python (torch with CUDA already
# installed there; the project is used from the checkout through PYTHONPATH, nothing is
# installed). Writes everything under $OUT (default results/gpu). Each step has its own time
# limit and the JSON files are rewritten after each run, so a step cut short still leaves
# what it finished. Wheels found in .whl/ (py-spy, for native stacks) are installed into a
# private target first.
#
#   OUT=results/gpu tools/gpu_check.sh            # all steps
#   STEPS="env cuda" tools/gpu_check.sh           # some of them
#
# Steps: env (fingerprint), cuda (the serving_cuda scenario through the CLI, and every
# item marked cuda through pytest: serving_cuda and serving_batching:demo_cuda), fork (the fork-hazard scenarios' hazard and fix variants on this build;
# FORK_SCENARIOS names others),
# bench (the serving and IPC load scenarios, BENCH_REPEAT repetitions, default 3, after
# BENCH_WARMUP warm-up runs, default 1; BENCH_SCENARIOS names others). serving_batching's demo_cuda variant is the server overhead in the seed's
# own setting, the model on the GPU.
set -u -o pipefail
OUT=${OUT:-results/gpu}
PY=${PYTHON:-python3}
STEPS=${STEPS:-env cuda fork bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl \
        && export PATH=/tmp/gpu-check-site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
rc=0
for s in $STEPS; do
    case $s in
    env)
        step env
        nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
        timeout 120 "$PY" -m repro env --json >"$OUT/env.json" || rc=1
        "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ("python","torch","transformers","build","cuda","cuda_devices","openmp_runtimes","cpu_count")})' "$OUT/env.json"
        ;;
    cuda)
        step "cuda: python -m repro run serving_cuda"
        timeout 240 "$PY" -m repro run serving_cuda -v --json "$OUT/cuda.json" --report "$OUT/cuda.md" || rc=1
        step "cuda: pytest -m cuda"
        timeout 240 "$PY" -m pytest -p no:cacheprovider -q -m cuda tests/test_scenarios.py 2>&1 | tee "$OUT/pytest-cuda.txt" || rc=1
        ;;
    fork)
        step "fork hazards on this build: ${FORK_SCENARIOS:=fork_after_threads fork_share_lock serving_fork dataloader_workers}"
        # shellcheck disable=SC2086  # a list of scenario names
        timeout "${FORK_LIMIT:-200}" "$PY" -m repro run $FORK_SCENARIOS \
            --json "$OUT/fork.json" --report "$OUT/fork.md" || rc=1
        ;;
    bench)
        step "bench: ${BENCH_SCENARIOS:=serving_batching ipc_transports}"
        # shellcheck disable=SC2086  # a list of scenario names
        timeout "${BENCH_LIMIT:-300}" "$PY" -m repro bench $BENCH_SCENARIOS --repeat "${BENCH_REPEAT:-3}" --warmup "${BENCH_WARMUP:-1}" \
            --json "$OUT/bench.json" --markdown "$OUT/bench.md" || rc=1
        ;;
    *) echo "unknown step $s" >&2; rc=2 ;;
    esac
done
step "done, status $rc"
exit $rc
