#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Sets up the machine and runs the demo end to end on real solar-cell images. It
# trains a model on good ELPV cells and measures image AUROC on held-out good and
# defective cells. Then it starts a mosquitto broker on a free loopback port and runs
# configs/demo.toml, a video of held-out cells through patchflowscore. The video is
# written with the heatmap overlay to demo-output/overlay.avi while the scores go to
# the broker.
#
# Outputs in demo-output/: overlay.avi, overlays/*.png, predict.jsonl, eval.txt,
# eval.json, eval-plots/*.png, snapshots/*.jpg (the frames that raised and peaked each
# alarm event), mqtt.log (every message the broker delivered), train.log, run.log.
# Environment: DEMO_EPOCHS (default 10), DEMO_RETRAIN=1 to train again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# shellcheck source=scripts/fetch-wheel.sh
source scripts/fetch-wheel.sh
elpv_wheel=$(fetch_wheel elpv-dataset 1.0.0.post1 elpv_dataset-1.0.0.post1-py3-none-any.whl \
  85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c)

pf=./target/release/patchflow
demo=data/demo
out=demo-output
mkdir -p "$out"
rm -rf "$out/overlays" "$out/eval-plots" "$out/overlay.avi" "$out/mqtt.log" "$out/snapshots"

if [ ! -d "$demo/video" ]; then
  python3 scripts/prepare_elpv.py --wheel "$elpv_wheel" --out "$demo" --type mono \
    --train 200 --test 100 --video-frames 60
fi

if [ ! -s "$demo/model.safetensors" ] || [ "${DEMO_RETRAIN:-0}" = 1 ]; then
  echo "training on $demo/train (this takes several minutes on 2 cores)..."
  "$pf" train --images "$demo/train" --backbone data/weights/tf_efficientnet_lite0.safetensors \
    --output "$demo/model.safetensors" --epochs "${DEMO_EPOCHS:-10}" 2>&1 | tee "$out/train.log"
fi

echo "evaluating on held-out cells..."
"$pf" eval --model "$demo/model.safetensors" --good "$demo/test/good" \
  --anomalous "$demo/test/defective" --report "$out/eval.json" --plots "$out/eval-plots" \
  | tee "$out/eval.txt"
"$pf" predict --model "$demo/model.safetensors" --output-dir "$out/overlays" \
  $(ls "$demo"/test/good/*.png | head -3) $(ls "$demo"/test/defective/*.png | head -3) > "$out/predict.jsonl"

# A private broker on a free loopback port, and a subscriber that logs every message.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
broker_dir=$(mktemp -d)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$broker_dir/mosquitto.conf"
mosquitto -c "$broker_dir/mosquitto.conf" > "$broker_dir/mosquitto.log" 2>&1 &
broker_pid=$!
cleanup() {
  kill "${sub_pid:-}" 2>/dev/null || true
  kill "$broker_pid" 2>/dev/null || true
  rm -rf "$broker_dir"
}
trap cleanup EXIT
for _ in $(seq 50); do
  mosquitto_pub -h 127.0.0.1 -p "$port" -t patchflow/probe -n 2>/dev/null && break
  sleep 0.1
done
stdbuf -oL mosquitto_sub -h 127.0.0.1 -p "$port" -t 'patchflow/#' -v > "$out/mqtt.log" &
sub_pid=$!
sleep 0.5

echo "running configs/demo.toml with the broker on 127.0.0.1:$port..."
PATCHFLOW_MQTT_URL="mqtt://127.0.0.1:$port" "$pf" run configs/demo.toml 2>&1 | tee "$out/run.log"
sleep 1

frames=$(grep -c '/score ' "$out/mqtt.log" || true)
anomalous=$(grep '/score ' "$out/mqtt.log" | grep -c '"is_anomalous":true' || true)
events=$(grep -c '^patchflow/events ' "$out/mqtt.log" || true)
echo
echo "demo done:"
sed 's/^/  /' "$out/eval.txt"
echo "  $out/overlay.avi: $(du -h "$out/overlay.avi" | cut -f1) of video with the heatmap overlay"
echo "  $out/overlays/: $(ls "$out/overlays" | wc -l) overlay PNGs of test cells"
echo "  $out/snapshots/: $(ls "$out/snapshots" | wc -l) JPEG snapshots of alarm events"
echo "  $out/mqtt.log: $frames score messages ($anomalous anomalous) and $events event messages; first score:"
grep -m1 '/score ' "$out/mqtt.log" | sed 's/^/    /'
