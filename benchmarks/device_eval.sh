#!/usr/bin/env bash
# The full-strength evaluation (`python evaluate.py --config configs/cifar10_quick.py`: 1,000
# test images, every defense under every attack at full length) on a lent GPU, in calls of the
# device tool's `run` that each end before its limit and resume where the last stopped.
#
# The training split (five 28 MB files) is larger than what one call can carry (64 MiB), so the
# checkpoint is trained here on the CPU and travels, with the test split, as one archive of
# what evaluate.py reads (no optimizer states or purified test images). Prepare here:
#
#   python train.py --config configs/cifar10_quick.py                 # about 45 min on 2 cores
#   bash benchmarks/device_eval.sh --pack                             # -> .devrun/ (ignored)
#
# then run there (carry [".whl", ".devrun"]; .whl as in benchmarks/device_run.sh's header):
#
#   DEADLINE=540 bash benchmarks/device_eval.sh                       # timeout_s 570
#
# Every finished (defense, attack, epsilon) cell is saved as the evaluation goes; whatever is
# finished when DEADLINE comes goes back in $OUT/evaluation.tgz, with the log and, once every
# cell is done, results.md and results.json. Back here, `bash benchmarks/device_eval.sh --unpack
# <files_at>` puts the cells into runs/cifar10_quick/evaluation/ and re-packs .devrun/, so the
# next call (a warm machine keeps them anyway) or a later session goes on from there;
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
