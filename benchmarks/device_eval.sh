#!/usr/bin/env bash
# The full-strength evaluation (`python evaluate.py --config configs/cifar10_quick.py`: 1,000
# test images, every defense under every attack at full length) on a GPU machine that runs jobs
# under a time limit, in calls that each end before the limit and resume where the last stopped.
#
# Only what evaluate.py reads travels to the GPU machine: the checkpoint, trained on a CPU
# machine, and the test split, as one archive (no optimizer states, purified test images or
# training split). Prepare on the CPU machine:
#
#   python train.py --config configs/cifar10_quick.py                 # about 45 min on 2 cores
#   bash benchmarks/device_eval.sh --pack                             # -> .devrun/ (ignored)
#
# copy .whl/ and .devrun/ to the GPU machine (.whl as in benchmarks/device_run.sh's header),
# then run there:
#
#   DEADLINE=540 bash benchmarks/device_eval.sh                       # under a 570 s limit
#
# Every finished (defense, attack, epsilon) cell is saved as the evaluation goes; whatever is
# finished when DEADLINE comes goes back in $OUT/evaluation.tgz, with the log and, once every
# cell is done, results.md and results.json. On the CPU machine, `bash benchmarks/device_eval.sh
# --unpack <folder with evaluation.tgz>` puts the cells into runs/cifar10_quick/evaluation/ and
# re-packs .devrun/, so the next call goes on from there;
# `python evaluate.py --config configs/cifar10_quick.py --saved` prints what is saved.
set -u
CONFIG=${CONFIG:-configs/cifar10_quick.py}  # (CONFIG=configs/smoke.py WORKDIR=runs/smoke: a check)
WORKDIR=${WORKDIR:-runs/cifar10_quick}
PACK=.devrun/workdir.tgz
EVAL="python3 evaluate.py --config $CONFIG --config.workdir=$WORKDIR"
# What evaluate.py reads: each stage's final parameters and statistics, the clusters and the
# dictionaries, the DONE.json records; not the training checkpoints' optimizer states.
pack() {
    [ -f "$WORKDIR/purify/DONE.json" ] || { echo "error: $WORKDIR has not run every stage:" \
        "run python train.py --config $CONFIG first"; exit 1; }
    mkdir -p .devrun
    install -m 644 ../shared/data/cifar10/test.npz .devrun/test.npz || exit 1
    tar -czf "$PACK.tmp" --exclude="$WORKDIR/*/ckpt" "$WORKDIR" && mv "$PACK.tmp" "$PACK" \
        || { rm -f "$PACK.tmp"; exit 1; }
    du -sh .devrun
}
case "${1:-}" in
    --pack) pack; exit ;;
    --unpack)
        [ -f "${2:-}/evaluation.tgz" ] || { echo "error: no evaluation.tgz in '${2:-}'"; exit 1; }
        tar -xzf "$2/evaluation.tgz" && pack; exit ;;
    "") ;;
    *) echo "error: unknown argument '$1' (expected --pack, --unpack DIR or none)"; exit 2 ;;
esac

OUT=${OUT:-/tmp/srdjax-eval}
DEADLINE=${DEADLINE:-540}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SRDJAX_DATA_DIR=$PWD/.devrun
. benchmarks/device_wheels.sh
# A warm machine keeps the workdir of the call before, with its newer cells: unpack only once.
[ -d "$WORKDIR/robust" ] || tar -xzf "$PACK" || exit 1
nvidia-smi -L
LEFT=$((DEADLINE - ($(date +%s) - START) - 20))  # 20 s to pack what is saved
timeout "$LEFT" $EVAL 2>&1 \
    | tee "$OUT/evaluate.log" | tr '\r' '\n' | grep -v -E "(batch|it|step)/s|s/(batch|it|step)" \
    | tail -n 60
echo "evaluate.py: rc ${PIPESTATUS[0]} after $(($(date +%s) - START)) s"
tar -czf "$OUT/evaluation.tgz" "$WORKDIR/evaluation"
for f in results.md results.json robust_vs_eps.png; do
    [ -f "$WORKDIR/evaluation/$f" ] && cp "$WORKDIR/evaluation/$f" "$OUT/"
done
$EVAL --saved 2>&1 | tail -n 40
