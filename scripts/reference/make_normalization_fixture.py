#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Record anomalib 2.7.0's score normalisation on edge cases for tests/normalization.rs.

Run it with the reference environment's Python (see README.md beside this file):

    data/reference-venv/bin/python scripts/reference/make_normalization_fixture.py

It calls anomalib's own ``PostProcessor._normalize`` (the min-max normalisation around
the threshold applied at test and predict time) and its label rule
``normalised > 1 - sensitivity`` with the default sensitivity 0.5, on float32 tensors,
and writes ``tests/fixtures/normalization.json``. Non-finite floats are written as the
strings "nan", "inf" and "-inf", because JSON has no literal for them.
"""

import json
import math
from pathlib import Path

import torch
from anomalib.post_processing.post_processor import PostProcessor

NAN = float("nan")
INF = float("inf")

# (value, threshold, min, max)
CASES = [
    (-0.5, -0.5, -0.9, -0.1),
    (-0.4, -0.5, -0.9, -0.1),
    (-0.6, -0.5, -0.9, -0.1),
    (-0.95132273, -0.88056, -0.967343, -0.872217),
    (-0.36431766, -0.88056, -0.967343, -0.872217),
    (10.0, 0.0, -1.0, 1.0),
    (-10.0, 0.0, -1.0, 1.0),
    (0.3, NAN, 0.0, 1.0),
    (0.9, NAN, 0.0, 1.0),
    (0.3, 0.2, NAN, 1.0),
    (0.3, 0.2, 0.0, NAN),
    (0.3, 0.2, 0.5, 0.5),
    (0.1, 0.2, 0.5, 0.5),
    (0.2, 0.2, 0.5, 0.5),
    (NAN, 0.2, 0.0, 1.0),
    (NAN, 0.2, 0.5, 0.5),
    (INF, 0.2, 0.0, 1.0),
    (-INF, 0.2, 0.0, 1.0),
    (0.2, 0.2, 0.0, 1.0),
    (0.2000001, 0.2, 0.0, 1.0),
]


def encode(x: float):
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def main() -> None:
    rows = []
    for value, threshold, lo, hi in CASES:
        t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        normalized = PostProcessor._normalize(t([value]), t(lo), t(hi), t(threshold))
        label = bool((normalized > 0.5).item())
        rows.append({
            "value": encode(float(t(value))),
            "threshold": encode(float(t(threshold))),
            "min": encode(float(t(lo))),
            "max": encode(float(t(hi))),
            "normalized": encode(float(normalized.item())),
            "label": label,
        })
    out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "normalization.json"
    doc = {"source": "anomalib 2.7.0 PostProcessor._normalize, float32; label = normalized > 0.5", "cases": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(rows)} cases to {out}")


if __name__ == "__main__":
    main()
