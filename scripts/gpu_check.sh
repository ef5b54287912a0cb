#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU: lists what the GPU path needs (CUDA torch, TensorRT,
# onnxruntime-gpu) and what is missing, then runs every GPU check whose prerequisites are present, in order,
# stopping at the first failure with its cause; writes results/<gpu-name>/gpu_check.json.
# It installs nothing by itself (a GPU box may have no registry access); TMPDIFF_GPU_INSTALL=1 installs TensorRT (the
# wheel of torch's CUDA version) and swaps onnxruntime for onnxruntime-gpu.
# Exit codes: 0 every check passed, 1 a check failed, 3 none failed but some were skipped (their prerequisites are
# missing: the run is incomplete), 2 no GPU (one line).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
if [ "${TMPDIFF_GPU_INSTALL:-0}" = "1" ]; then
    # the TensorRT wheel of torch's CUDA major version (tensorrt-cu12 / -cu13): the metapackage of '.[gpu]' takes the
    # CUDA 13 one whatever torch was built with
    # (pinned: plans load only on the TensorRT that built them). A CPU torch has no TensorRT wheel: stop before any
    # install, rather than put CUDA 13 wheels beside it and fail later.
    TRT_REQ="$("$VENV/bin/python" -c 'import sys, torch; from tmpdiff.engines.trt_build import not_installed, tensorrt_requirement as r; print(r(torch.version.cuda) or sys.exit("error: " + not_installed()))')" || exit 2
    "$VENV/bin/python" -m pip install --quiet "$TRT_REQ"
    # onnxruntime-gpu provides the same module as the CPU package: one replaces the other, never both installed. On a
    # re-run the install above has put the CPU package's files back over the GPU package's, and uninstalling it
    # deletes the shared module: the GPU package is reinstalled in full, not found "already satisfied".
    "$VENV/bin/python" -m pip uninstall --quiet --yes onnxruntime
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu==1.31.1"
fi
# --force: a re-run replaces this script's own scratch folder files and its results/<gpu-name>/gpu_check.json
exec tmpdiff doctor --gpu --work "${TMPDIFF_GPU_WORK:-$REPO/gpu-check}" --results "$REPO/results" --force "$@"
