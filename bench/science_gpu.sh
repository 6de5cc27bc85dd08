#!/usr/bin/env bash
# The golden-path study at GPU scale (analysis/golden_path.py --gpu), its teacher stream made on the GPU:
# estimated at 4-6 minutes on one H200, not yet measured (made on the CPU, the stream would take about 13;
# the sizing is in the script);
# `--cpu-smoke`: the same path at toy sizes on a CPU (under about a minute on 2 cores).
#
#   bash bench/science_gpu.sh [--cpu-smoke]
#
# Two parts, each under its own time limit (TEACHER_S, POWER_S seconds): the teacher grid (its tables), then
# the power curve. A part cut short keeps its finished runs: running the script again trains only what is
# missing. Tables (summary, family, trend, runs, power, gap .csv, the figures, verdict.md) go to
# $OUT/golden_path_gpu/ when $OUT is set, else analysis/results/golden_path/gpu/ ($WORK/ for the smoke);
# the runs to $WORK (default /tmp/goldenpath-science-gpu), never under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source bench/install.sh
MODE=--gpu
NAME=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=--cpu-smoke; NAME=cpu_smoke; fi
WORK=${WORK:-/tmp/goldenpath-science-gpu}
if [ -n "${OUT:-}" ]; then DEST="$OUT/golden_path_$NAME"
elif [ "$NAME" = gpu ]; then DEST=analysis/results/golden_path/gpu
else DEST="$WORK/golden_path_$NAME"; fi
status=0
timeout "${TEACHER_S:-300}" "$PY" analysis/golden_path.py "$MODE" --datasets teacher --work "$WORK" --out "$DEST" \
  || { status=$?; echo "teacher part: exit $status (run again to continue)"; }
if [ -f "$DEST/family.csv" ]; then
  timeout "${POWER_S:-240}" "$PY" analysis/golden_path.py "$MODE" --datasets power --work "$WORK" --out "$DEST" \
    || { status=$?; echo "power part: exit $status (run again to continue)"; }
fi
exit $status
