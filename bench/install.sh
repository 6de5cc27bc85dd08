# Sourced by bench/gpu.sh and bench/science_gpu.sh (from the repository root, with $PY set): on a machine
# whose Python already has torch with CUDA, goldenpath is installed without touching torch (--no-deps);
# packages the machine lacks are taken from wheels in ./.whl when that folder exists.
if ! "$PY" -c "import goldenpath" 2>/dev/null; then
  if [ -d .whl ]; then "$PY" -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl; fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
