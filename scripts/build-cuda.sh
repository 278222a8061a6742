#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Builds the CUDA variant of the CLI and the GStreamer plugin into target/cuda, apart
# from the CPU build in target/release.
#
# candle links the CUDA libraries (libcuda, libcublas, libcurand, libnvrtc) at load
# time, so a CUDA build does not load where they are missing. Keeping it in its own
# folder leaves the CPU plugin loadable everywhere: point GST_PLUGIN_PATH at
# target/cuda/release on GPU machines and at target/release elsewhere.
#
# The CUDA compiler comes from the system toolkit when `nvcc` is on PATH, otherwise
# from PyPI (nvidia-cuda-nvcc, -runtime and -cccl) into data/cuda-venv. Linking needs
# the NVIDIA driver's libcuda.so, which no PyPI package ships; without it,
# `CHECK_ONLY=1` compiles everything (CUDA kernels included) without linking.
#
# Environment: CUDA_COMPUTE_CAP (default 90, the H100/H200), CHECK_ONLY=1.
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if ! command -v nvcc >/dev/null; then
    venv=data/cuda-venv
    if [[ ! -x $venv/bin/python ]]; then
        echo "installing nvcc from PyPI into $venv (about 400 MB)..."
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
    fi
    root=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu1*)
    if [[ ! -x $root/bin/nvcc ]]; then
        echo "nvcc not found under $root (the layout of the PyPI wheels may have changed): install the CUDA toolkit and put nvcc on PATH" >&2
        exit 2
    fi
    export PATH=$PWD/$root/bin:$PATH CUDA_HOME=$PWD/$root CUDA_PATH=$PWD/$root
    # cudarc reads the toolkit version from nvcc and supports versions up to 13.4, so a
    # newer nvcc from PyPI builds against the 13.4 interface.
    version=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    read -r major minor <<<"$version"
    if ((major > 13 || (major == 13 && minor > 4))); then
        export CUDARC_CUDA_VERSION=13040
    fi
fi

echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1); compute capability $CUDA_COMPUTE_CAP"
if [[ ${CHECK_ONLY:-0} == 1 ]]; then
    cargo check --release --workspace --features patchflow/cuda --target-dir target/cuda
else
    cargo build --release --workspace --features patchflow/cuda --target-dir target/cuda
    echo "built target/cuda/release/patchflow and target/cuda/release/libgstpatchflow.so"
fi
