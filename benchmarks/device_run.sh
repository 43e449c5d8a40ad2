#!/usr/bin/env bash
# The GPU checks, as one job on a GPU machine that runs jobs under a time limit:
#
#   bash benchmarks/device_run.sh            # writes logs and JSON to $OUT (else /tmp/srdjax-gpu)
#
# Steps, most wanted first, each under its own time limit and all under DEADLINE seconds
# (default 570), so one that fails or hangs costs only its own share: the machine's
# versions; purify throughput at 32 px over several OMP chunk sizes, with each step's time;
# OMP against scikit-learn (on the machine's CPUs); the numeric tests of clustering, OMP,
# dictionaries, purification and attacks on the GPU; purify at 64 and 128 px; k-means against
# scikit-learn; ResNet-18 training-step times of configs/cifar10.py. Every step's full output
# goes to $OUT/log.txt and its tail to stdout. Prepared on a CPU machine for a GPU machine
# without network access, ml_collections or data (copy both folders there with the clone; keep
# them out of git through .git/info/exclude):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections==1.1.0
#   mkdir -p .devdata/cifar10 && cp ../shared/data/cifar10/test.npz .devdata/cifar10/
set -u
OUT=${OUT:-/tmp/srdjax-gpu}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 SRDJAX_COMPILATION_CACHE=off
. benchmarks/device_wheels.sh
[ -f .devdata/cifar10/test.npz ] && export SRDJAX_DATA_DIR=$PWD/.devdata/cifar10

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((DEADLINE - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then echo "== $name: skipped, ${left} s left"; return; fi
    echo "== $name (limit ${limit} s): $*"
    echo "== $name (limit ${limit} s): $*" >>"$OUT/log.txt"
    t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.part" 2>&1
    rc=$?
    cat "$OUT/$name.part" >>"$OUT/log.txt"
    grep -v "^\s*$" "$OUT/$name.part" | grep -v "Warning\|warn(" | tail -n 14
    rm -f "$OUT/$name.part"
    echo "   -> rc $rc after $(($(date +%s) - t0)) s"
}

step env 40 sh -c 'nvidia-smi -L; python3 -c "
import jax, flax, optax, orbax.checkpoint as o, chex, sklearn, numpy
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"chex\", chex.__version__, \"sklearn\", sklearn.__version__, \"numpy\", numpy.__version__)
print(jax.devices(), jax.devices()[0].device_kind)"'
step purify32 170 python3 benchmarks/purify.py --sizes 32 --batch 8192 --repeats 5 \
    --image-chunks 0,2048,8192 --parts --out "$OUT/purify32.json"
step omp 100 python3 benchmarks/omp.py --n 100000 --sklearn-repeats 1 --out "$OUT/omp.json"
# (not the tests that need the smoke run's training split, or purify.py's subprocesses)
step tests 130 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -v -n 6 -rfE \
    -p no:cacheprovider -k "not smoke_run and not checkpoint_missing and not purify_py" \
    tests/test_kmeans.py tests/test_omp.py tests/test_clusters.py tests/test_dictionary.py \
    tests/test_purifier.py tests/test_attacks.py
step purify_hi 90 python3 benchmarks/purify.py --sizes 64,128 --batch 8192 --repeats 3 \
    --out "$OUT/purify_hi.json"
step kmeans 100 python3 benchmarks/kmeans.py --devices 1 --adaptive --out "$OUT/kmeans.json"
step train_speed 90 python3 benchmarks/train_speed.py --config configs/cifar10.py --steps 20 \
    --robust-steps 3 --out "$OUT/train_speed.json"
echo "== done in $(($(date +%s) - START)) s"
