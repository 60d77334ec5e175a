#!/usr/bin/env bash
# GPU check (at most 9 minutes: each part has its own timeout): the CIFAR-10 DDPM++ network's training
# step and forward pass at batch 128 in float32 and bfloat16 (networks.py: DSM loss,
# backward, Adam; images/s), then the samplers with that network as score
# (sampling_throughput.py: images/s and NFE/s) and with exact mixture scores
# (samplers.py --quick), all on the accelerator.
#
#     bash experiments/benchmarks/gpu_check.sh            # from the repository root
#     PYTHON=/path/to/python bash experiments/benchmarks/gpu_check.sh
#
# It needs JAX with an accelerator backend, flax, optax, diffrax, numpy, ml_collections
# and absl-py (not grain, tensorflow-datasets or tensorboardX: nothing here reads data),
# and checks them first: a missing one is named with the command that installs it. On a
# machine without internet, `pip download --no-deps -d wheels ml_collections absl-py`
# on one with access, copy `wheels/` into the repository root, and the script installs
# from there (`pip install --no-index --find-links wheels`).
# Set ALLOW_CPU=1 to run it on a CPU anyway (slow: use it only to try the script).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -d wheels ]; then
  "$PY" -c "import ml_collections, absl" 2>/dev/null ||
    "$PY" -m pip install --quiet --no-index --find-links wheels ml_collections absl-py
fi

echo "== What this machine has"
"$PY" - <<'EOF'
import importlib, os, sys

needed = {  # module -> pip name
    "jax": "jax[cuda12]", "flax": "flax", "optax": "optax", "diffrax": "diffrax",
    "numpy": "numpy", "ml_collections": "ml_collections", "absl": "absl-py",
}
missing = []
for module, package in needed.items():
    try:
        found = importlib.import_module(module)
        print(f"  {module:15s} {getattr(found, '__version__', '')}")
    except ImportError:
        missing.append(package)
if missing:
    sys.exit(
        f"Missing: {', '.join(missing)}. Install with `pip install {' '.join(missing)}` "
        "(offline: see the header of this script for wheels/)."
    )
import jax

backend = jax.default_backend()
print(f"  backend {backend}: {jax.devices()}")
if backend == "cpu" and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("JAX sees no accelerator (backend cpu): install jax with CUDA "
             "(`pip install -U 'jax[cuda12]'`), or set ALLOW_CPU=1 to try the script on a CPU.")
EOF

export XLA_PYTHON_CLIENT_PREALLOCATE=false
for dtype in float32 bfloat16; do
  echo "== DDPM++ (CIFAR-10, 61.8M parameters), batch 128, $dtype: training step and forward"
  timeout 150 "$PY" experiments/benchmarks/networks.py --preset ddpmpp --batch 128 \
    --dtype "$dtype" --conv-impl xla --repeats 5 || echo "(networks.py $dtype failed: $?)"
done
for dtype in float32 bfloat16; do
  echo "== Samplers with the DDPM++ score, batch 128, $dtype"
  timeout 90 "$PY" experiments/benchmarks/sampling_throughput.py --batch 128 --dtype "$dtype" ||
    echo "(sampling_throughput.py $dtype failed: $?)"
done
echo "== Samplers with exact scores (2-D mixture)"
timeout 60 "$PY" experiments/benchmarks/samplers.py --quick || echo "(samplers.py failed: $?)"
