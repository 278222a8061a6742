#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Sustained frame rate of the patchflowscore element in a real pipeline: test source,
# conversion, scoring of every frame, heatmap overlay, conversion, fakesink.
#
# Usage: scripts/bench-element.sh [MODEL] [SIZES]
#   MODEL  model file (default data/demo/model.safetensors, made by scripts/demo.sh)
#   SIZES  WIDTHxHEIGHT list (default "256x256 1280x720")
# Environment: SHORT and LONG frame counts (default 50 and 250), RUNS (default 3),
# EXTRA element properties (e.g. EXTRA="threads=1").
#
# Each size runs SHORT and LONG frames RUNS times. Start-up and model loading cancel
# out in the difference, so fps = (LONG - SHORT) / (median LONG time - median SHORT time).
set -euo pipefail
cd "$(dirname "$0")/.."

model=${1:-data/demo/model.safetensors}
sizes=${2:-"256x256 1280x720"}
short=${SHORT:-50}
long=${LONG:-250}
runs=${RUNS:-3}
extra=${EXTRA:-}

for count in "$short" "$long" "$runs"; do
    if [[ ! $count =~ ^[0-9]+$ ]]; then
        echo "SHORT, LONG and RUNS must be whole numbers, got SHORT=$short LONG=$long RUNS=$runs" >&2
        exit 2
    fi
done
if ((short < 1 || long <= short || runs < 1)); then
    echo "need 1 <= SHORT < LONG and RUNS >= 1, got SHORT=$short LONG=$long RUNS=$runs" >&2
    exit 2
fi
for size in $sizes; do
    if [[ ! $size =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]]; then
        echo "invalid size \"$size\": expected WIDTHxHEIGHT, e.g. 1280x720" >&2
        exit 2
    fi
done
if [[ ! -f $model ]]; then
    echo "model $model not found: run scripts/demo.sh first or pass a model file" >&2
    exit 2
fi
if [[ ! -f target/release/libgstpatchflow.so ]]; then
    echo "target/release/libgstpatchflow.so not found: run cargo build --release --workspace first" >&2
    exit 2
fi
export GST_PLUGIN_PATH=$PWD/target/release

# Prints the median wall-clock seconds of RUNS runs of N frames at WxH. Exits the
# script with the pipeline's output when a run fails, so that no rate is printed
# for a pipeline that did not play.
median_seconds() {
    local frames=$1 width=$2 height=$3 start end log times=()
    log=$(mktemp)
    for _ in $(seq "$runs"); do
        start=$(date +%s.%N)
        # shellcheck disable=SC2086 # $extra holds several element properties
        if ! gst-launch-1.0 -q videotestsrc num-buffers="$frames" \
            ! "video/x-raw,width=$width,height=$height,framerate=30/1" \
            ! videoconvert ! patchflowscore model="$model" $extra \
            ! videoconvert ! fakesink sync=false >"$log" 2>&1; then
            echo "the ${width}x${height} pipeline failed:" >&2
            cat "$log" >&2
            rm -f "$log"
            exit 1
        fi
        end=$(date +%s.%N)
        times+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')")
    done
    rm -f "$log"
    printf '%s\n' "${times[@]}" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

echo "| source | frames | seconds (median of $runs) | sustained fps |"
echo "| --- | ---: | ---: | ---: |"
for size in $sizes; do
    width=${size%x*}
    height=${size#*x}
    t_short=$(median_seconds "$short" "$width" "$height")
    t_long=$(median_seconds "$long" "$width" "$height")
    fps=$(awk -v n="$((long - short))" -v a="$t_short" -v b="$t_long" 'BEGIN { print n / (b - a) }')
    printf '| %s | %d - %d | %.2f - %.2f | %.1f |\n' \
        "$size" "$long" "$short" "$t_long" "$t_short" "$fps"
done
