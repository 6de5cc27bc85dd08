#!/usr/bin/env bash
# The golden-path study at GPU scale (analysis/golden_path.py --gpu), its teacher stream made on the GPU:
# not yet run on a GPU. ~45 kernels per optimizer step (bench/step_ops.py --device-block counts them on a CPU)
# and 74 MFLOP a sample (the CNN at width 128) put the grid's 0.625M steps at 2.5-4.5 minutes, within the
# teacher part's limit; the first slot's progress.csv (below) measures the rate that sizes it
# (analysis/golden_path.py, above GPU =);
# `--cpu-smoke`: the same path at toy sizes on a CPU (under about a minute on 2 cores).
#
#   bash bench/science_gpu.sh [--cpu-smoke]
#
# Two parts, each under its own time limit (TEACHER_S 270, POWER_S 200 seconds; SIGTERM, then a kill 30 s
# later: with the install and the packing, within a device machine's 600 s command): the teacher grid (its
# tables), then the power curve. A part cut short keeps its finished runs: running the script
# again on the same machine trains only what is missing. Whatever the parts did, after each of them
# bench/science_pack.py writes progress.csv (how far each run got, and how fast) and failed.txt (the log tails of failed runs) beside
# the tables (summary, family, trend, runs, power, gap .csv, the figures, verdict.md), in
# analysis/results/golden_path/gpu/ ($WORK/golden_path_cpu_smoke/ for the smoke). With $OUT set (a device
# machine, which returns at most 8 files) they go to $WORK/golden_path_$NAME/ and come back as two files in
# $OUT: science_$NAME.tar.gz (all of them) and science_$NAME.md (the verdict and the progress). The runs stay
# in $WORK (default /tmp/goldenpath-science-gpu), never under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a command killed from outside keeps what it printed
source bench/install.sh
MODE=--gpu
NAME=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=--cpu-smoke; NAME=cpu_smoke; fi
WORK=${WORK:-/tmp/goldenpath-science-gpu}
if [ -n "${OUT:-}" ] || [ "$NAME" != gpu ]; then DEST="$WORK/golden_path_$NAME"
else DEST=analysis/results/golden_path/gpu; fi
pack() { "$PY" bench/science_pack.py "$WORK" "$DEST" ${OUT:+--out "$OUT"} --name "$NAME" || status=$?; }
status=0
timeout -k 30 "${TEACHER_S:-270}" "$PY" analysis/golden_path.py "$MODE" --datasets teacher --work "$WORK" --out "$DEST" \
  || { status=$?; echo "teacher part: exit $status (run again to continue)"; }
pack  # sent back now: a command cut off later keeps this
if [ -f "$DEST/family.csv" ]; then
  timeout -k 30 "${POWER_S:-200}" "$PY" analysis/golden_path.py "$MODE" --datasets power --work "$WORK" --out "$DEST" \
    || { status=$?; echo "power part: exit $status (run again to continue)"; }
  pack
fi
exit $status
