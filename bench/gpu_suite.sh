#!/usr/bin/env bash
# histolight GPU benchmark suite (issue #17): under 8 minutes on one GPU, install included.
#
#   bash bench/gpu_suite.sh                        # install, then every part of bench/gpu_suite.py on cuda
#   bash bench/gpu_suite.sh --only tiled norm      # arguments go to bench/gpu_suite.py
#   bash bench/gpu_suite.sh --device cpu --tiny    # smoke test of every part, anywhere (~10-30 s on 2 cores)
#
# Parts (bench/gpu_suite.py): segmentation training step throughput with and without AMP, tiled inference MP/s
# (against one forward pass), stain normalizers img/s (torch, batched), feature extraction tiles/s with the share of
# time spent waiting for the tile loader, tile-classifier training img/s (float32 and AMP). Each part prints its
# figures; the JSON summary goes to $OUT/gpu_suite.json when OUT is set (and to --json PATH).
#
# Machine: a fresh GPU machine with its own torch (a CUDA build) and no network. Run from the repository root.
# Install, without touching that torch:
#   1. the wheels in .whl/ at the repository root, if any: `pip install --no-index --no-deps .whl/*.whl` -- the
#      pure-Python packages the suite needs that such a machine lacks. Prepare the folder on a machine with network
#      (same Python version), e.g.:
#        pip download --no-deps -d .whl lightning lightning-utilities torchmetrics timm segmentation-models-pytorch \
#            huggingface-hub omegaconf antlr4-python3-runtime hydra-core tqdm fsspec packaging typing-extensions
#      Binary packages (numpy, opencv-python-headless, pandas, pyarrow, simplejpeg, crc32c, safetensors, pillow,
#      pyyaml) must be on the machine already, or be wheels built for its platform and Python, in .whl/ too.
#      .whl/ is not git-ignored, so the device tool carries it with the working tree (else: carry=[".whl"]).
#   2. the project itself: `pip install --no-deps -e .`
# Then the modules the suite imports are checked (missing ones are listed; a part that needs one fails alone and
# the others still run), and bench/gpu_suite.py runs. Exit status: 0 when every part ran, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
t0=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "== installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ (no index, no deps)"
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
fi
if ! "$PY" -c "import histolight" 2> /dev/null; then
    echo "== pip install --no-deps -e ."
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || "$PY" -m pip install -q --no-deps -e .
fi
echo "== imports"
"$PY" - << 'EOF'
import importlib
need = ["torch", "numpy", "cv2", "pandas", "pyarrow", "simplejpeg", "crc32c", "lightning", "torchmetrics", "timm",
        "segmentation_models_pytorch", "safetensors", "tqdm", "histolight"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{m} ({type(e).__name__}: {e})")
print("missing: " + "; ".join(missing) if missing else "all present")
EOF
echo "== install and checks: $(( $(date +%s) - t0 )) s"
exec "$PY" bench/gpu_suite.py "$@"
