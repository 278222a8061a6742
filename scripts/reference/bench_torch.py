#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Time anomalib 2.7.0's PyTorch PatchflowModel the way `patchflow bench` times ours.

Run it with the reference environment's Python (see README.md beside this file), one
measurement per process:

    data/reference-venv/bin/python scripts/reference/bench_torch.py \\
        --config lite0 --batch 1 --threads 2

`patchflow bench --torch-python data/reference-venv/bin/python` calls it for every
combination it measures. The model is built with ``pre_trained=False`` (speed does not
depend on the weights), in eval mode, under ``torch.inference_mode()``, with
``torch.set_num_threads(threads)``. It prints one JSON object with the same fields as
`patchflow bench --single`: median and 95th percentile batch time, images per second,
the backbone, fusion and flow split, and the process's peak RSS (``VmHWM``).
"""

import argparse
import json
import math
import sys
import time

CONFIGS = {
    "lite0": {"backbone": "tf_efficientnet_lite0", "input_size": (256, 256)},
    "b5": {"backbone": "tf_efficientnet_b5", "input_size": (768, 768)},
    "resnet18": {"backbone": "resnet18", "input_size": (256, 256)},
}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def median(values):
    """Return the element at index n / 2 of the sorted values, as the Rust benchmark does."""
    return sorted(values)[len(values) // 2]


def percentile(values, p):
    """Return the nearest-rank percentile, as the Rust benchmark does."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p * len(ordered))))
    return ordered[rank - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    args = ap.parse_args()

    import torch
    from anomalib.models.image.patchflow.torch_model import PatchflowModel

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cfg = CONFIGS[args.config]
    model = PatchflowModel(input_size=cfg["input_size"], backbone=cfg["backbone"], pre_trained=False).eval()
    h, w = cfg["input_size"]
    # The same deterministic pattern as the Rust benchmark's input.
    n = args.batch * 3 * h * w
    x = (torch.arange(n, dtype=torch.int64) * 7919 % 1000).to(torch.float32).div(500.0).sub(1.0)
    x = x.reshape(args.batch, 3, h, w)

    total, backbone, fusion, flow = [], [], [], []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        started = time.perf_counter()
        for i in range(max(1, args.iterations)):
            if i >= 3 and time.perf_counter() - started > args.max_seconds:
                break
            t0 = time.perf_counter()
            features = model._extract_cnn_features(x)
            t1 = time.perf_counter()
            fused = model._fuse_features(features)
            t2 = time.perf_counter()
            z, _ = model.flow(model.feature_adaptor(fused))
            # The map and score as PatchflowModel.forward computes them in eval mode.
            torch.amax(model.anomaly_map_generator(z), dim=(-2, -1))
            t3 = time.perf_counter()
            ms = lambda a, b: (b - a) * 1e3  # noqa: E731
            total.append(ms(t0, t3))
            backbone.append(ms(t0, t1))
            fusion.append(ms(t1, t2))
            flow.append(ms(t2, t3))

    p50 = median(total)
    result = {
        "config": args.config,
        "input": [h, w],
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "iterations": len(total),
        "p50_ms": p50,
        "p95_ms": percentile(total, 0.95),
        "images_per_second": args.batch * 1e3 / p50,
        "backbone_ms": median(backbone),
        "fusion_ms": median(fusion),
        "flow_ms": median(flow),
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
