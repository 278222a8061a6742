#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Measures detection quality with pixel-level ground truth. It builds a synthetic
# defect set from the committed CC0 brick texture: cracks, stains and pasted gravel
# painted onto held-out crops, with masks (see examples/synthetic_defects.rs). Then it
# trains the default Lite0 model on the good crops and runs `patchflow eval` on the
# MVTec-layout test set.
#
# Outputs in demo-output/brick/: eval.txt, eval.json, plots/*.png, train.log.
# Environment: BRICK_EPOCHS (default 10), BRICK_RETRAIN=1 to train again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

pf=./target/release/patchflow
data=data/brick
out=demo-output/brick
mkdir -p "$out"
rm -rf "$out/plots"

if [ ! -d "$data/test" ]; then
  cargo run --release --locked --example synthetic_defects -- tests/data/brick.png "$data"
fi

if [ ! -s "$data/model.safetensors" ] || [ "${BRICK_RETRAIN:-0}" = 1 ]; then
  echo "training on $data/train/good (this takes several minutes on 2 cores)..."
  "$pf" train --images "$data/train/good" --backbone data/weights/tf_efficientnet_lite0.safetensors \
    --output "$data/model.safetensors" --epochs "${BRICK_EPOCHS:-10}" 2>&1 | tee "$out/train.log"
fi

"$pf" eval --model "$data/model.safetensors" --dataset "$data" --report "$out/eval.json" \
  --plots "$out/plots" | tee "$out/eval.txt"
