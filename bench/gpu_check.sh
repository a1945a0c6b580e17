#!/usr/bin/env bash
# GPU check (issue 16.7): a short study of each task on CUDA -- classification (densenet121) with
# and without DP-SGD, U-Net 2D and 3D segmentation, the GAN -- and the same studies on the CPU
# (2 rounds). `medfed simulate` where Ray is installed; else (the device machine) the same study
# through the real ServerApp loop and ClientApp handlers in one process. Prints per study: seconds
# per round (round 1 apart), the speedup of CUDA over the CPU, peak GPU memory (torch, nvidia-smi).
# About 5-7 minutes on one H200 (CPU references left after 270 s are skipped); fails at once
# without CUDA. Details: bench/gpu_check.py.
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]              CUDA + CPU references (default runs/gpu-check)
#        GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh   dry run without a GPU: CPU only, 2 rounds x 2 steps
#        bash bench/gpu_check.sh fetch-wheels           here, before a device run: the wheels the device
#                                                       machine lacks, into .whl/gpu-check (ignored by git)
# On a machine without medfed installed (the device machine: python3 with torch only) the wheels in
# .whl/gpu-check go to /tmp/gpu-check-site and medfed is imported from this checkout.
# Extra flags for `gpu_check.py run` go in GPU_CHECK_ARGS, e.g. GPU_CHECK_ARGS="--studies generation".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
if [ "${1:-}" = "fetch-wheels" ]; then
  exec "$PY" bench/gpu_check.py fetch-wheels --dest .whl/gpu-check
fi
OUT="${1:-runs/gpu-check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
# shellcheck disable=SC2206
EXTRA=(${GPU_CHECK_ARGS:-})

if ! "$PY" -c "import monai, opacus, flwr.app" 2> /dev/null; then
  if ! ls .whl/gpu-check/*.whl > /dev/null 2>&1; then
    echo "FAIL: $PY lacks medfed's dependencies and .whl/gpu-check has no wheels: run" \
         "'bash bench/gpu_check.sh fetch-wheels' where pip works, and carry .whl/gpu-check" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site .whl/gpu-check/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import medfed.common.cli" 2> /dev/null; then  # not installed: this checkout, as the wheel lays it out
  mkdir -p /tmp/gpu-check-src/medfed
  for part in client common server simulations; do ln -sfn "$ROOT/$part" "/tmp/gpu-check-src/medfed/$part"; done
  export PYTHONPATH="/tmp/gpu-check-src${PYTHONPATH:+:$PYTHONPATH}"
fi

case "$DEVICE" in
  cuda)
    if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
      echo "FAIL: no CUDA device: nvidia-smi is missing or lists no GPU (GPU_CHECK_DEVICE=cpu for a dry run)" >&2
      exit 2
    fi
    nvidia-smi -L
    exec "$PY" bench/gpu_check.py run --devices cuda cpu --out "$OUT" "${EXTRA[@]}"
    ;;
  cpu)
    exec "$PY" bench/gpu_check.py run --devices cpu --rounds 2 --local-steps 2 --out "$OUT" "${EXTRA[@]}"
    ;;
  *)
    echo "FAIL: GPU_CHECK_DEVICE=$DEVICE: use cuda (default) or cpu" >&2
    exit 2
    ;;
esac
