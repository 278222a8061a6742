#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Record scikit-learn's and anomalib's metric values for tests/metrics.rs.

Run it with the reference environment's Python (see README.md beside this file):

    data/reference-venv/bin/python scripts/reference/make_metric_fixture.py

It draws seeded random score and label sets and writes them, with the reference
values, to ``tests/fixtures/metrics.json``. Every score is a multiple of 1/1024 (or of
2^-20), so it is exact in float32 and float64 and both sides rank the same values.

Image cases store:

- ``roc_auc``: scikit-learn 1.9.1 ``roc_auc_score`` (null with one class);
- ``f1_at_half``: ``f1_score(labels, scores > 0.5, zero_division=0)``;
- ``adaptive_threshold`` and ``adaptive_f1``: the threshold that maximises
  ``2PR / (P + R + 1e-10)`` (NaN as 0, first argmax over ascending thresholds) on
  ``precision_recall_curve``, and that F1. With one class, anomalib's fallback: the
  highest score without anomalous samples, the lowest without normal ones;
- ``anomalib_threshold``: anomalib 2.7.0's own ``F1AdaptiveThreshold`` (float32) on the
  same data, as a cross-check.

The pixel case stores the anomaly maps (as integers k for k/1024) and masks of four
images, and the values above computed over all their pixels. It also stores AUPRO
computed two ways. ``aupro`` comes from the float64 computation in
``reference_aupro`` below, with 8-connected regions from ``skimage.measure.label``.
``anomalib_aupro`` comes from anomalib's ``AUPRO`` class with ``fpr_limit=0.3``
(float32, OpenCV's connected components). The script stops if the two disagree by
more than 1e-5.
"""

import json
from pathlib import Path

import numpy as np
import torch
from anomalib.metrics.aupro import _AUPRO
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold
from skimage.measure import label as label_regions
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

FPR_LIMIT = 0.3
SEED = 20240611


def adaptive_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return the F1-maximising threshold of ``score >= threshold`` and its F1."""
    if not labels.any():
        return float(scores.max()), 0.0
    if labels.all():
        # Everything at or above the lowest score: precision 1 and recall 1.
        return float(scores.min()), 2.0 / (2.0 + 1e-10)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / (precision + recall + 1e-10)
    f1 = np.nan_to_num(f1, nan=0.0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def anomalib_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    metric = _F1AdaptiveThreshold()
    metric.update(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels.astype(np.int64)))
    return float(metric.compute())


def binary_values(scores: np.ndarray, labels: np.ndarray) -> dict:
    both = labels.any() and not labels.all()
    threshold, f1 = adaptive_threshold(scores, labels)
    return {
        "roc_auc": float(roc_auc_score(labels, scores)) if both else None,
        "f1_at_half": float(f1_score(labels, scores > 0.5, zero_division=0)),
        "adaptive_threshold": threshold,
        "adaptive_f1": f1,
        "anomalib_threshold": anomalib_threshold(scores, labels),
    }


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Compute AUPRO in float64.

    The curve has the mean per-region overlap against the background FPR at every
    distinct threshold from the top, starts at (0, 0) and is cut at ``fpr_limit`` by
    linear interpolation. The result is its trapezoid area divided by the cut's FPR.
    """
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled = label_regions(mask, connectivity=2)
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += int(labelled.max())
    scores = maps.reshape(-1)
    regions = regions.reshape(-1)
    sizes = np.bincount(regions, minlength=count + 1).astype(np.float64)
    background = regions == 0
    weight = np.where(background, 0.0, 1.0 / sizes[regions])

    order = np.argsort(-scores, kind="stable")
    scores, background, weight = scores[order], background[order], weight[order]
    fpr = np.cumsum(background) / background.sum()
    pro = np.minimum(np.cumsum(weight) / count, 1.0)
    last_of_value = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[last_of_value]])
    pro = np.concatenate([[0.0], pro[last_of_value]])

    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    xs, ys = list(fpr[:cut]), list(pro[:cut])
    if xs[-1] < fpr_limit and cut < len(fpr):
        x1, x2, y1, y2 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        xs.append(fpr_limit)
        ys.append(y1 + (y2 - y1) * (fpr_limit - x1) / (x2 - x1))
    return float(np.trapezoid(ys, xs) / xs[-1])


def anomalib_aupro(maps: np.ndarray, masks: np.ndarray) -> float:
    metric = _AUPRO(fpr_limit=FPR_LIMIT)
    metric.update(torch.tensor(maps, dtype=torch.float32), torch.tensor(masks.astype(np.int64)))
    return float(metric.compute())


def image_case(name: str, scores: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "name": name,
        "scores": [float(s) for s in scores],
        "labels": [bool(v) for v in labels],
        **binary_values(scores, labels),
    }


def image_cases(rng: np.random.Generator) -> list[dict]:
    cases = []
    labels = rng.random(60) < 0.4
    cases.append(image_case("ties_on_eighths", rng.integers(0, 9, 60) / 8, labels))
    labels = rng.random(80) < 0.5
    scores = rng.integers(0, 2**20, 80) / 2**20 + labels * (205 / 1024)
    cases.append(image_case("continuous_shifted", np.minimum(scores, 1.0), labels))
    labels = np.zeros(40, dtype=bool)
    labels[rng.choice(40, 4, replace=False)] = True
    cases.append(image_case("few_anomalous", rng.integers(0, 1024, 40) / 1024, labels))
    cases.append(image_case("all_equal", np.full(10, 0.5), rng.random(10) < 0.5))
    cases.append(image_case("only_normal", rng.integers(0, 1024, 12) / 1024, np.zeros(12, dtype=bool)))
    cases.append(image_case("only_anomalous", rng.integers(0, 1024, 12) / 1024, np.ones(12, dtype=bool)))
    return cases


def pixel_masks() -> np.ndarray:
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 3:9, 4:12] = True  # a rectangle
    masks[0, 20:26, 20:23] = True  # a bar
    masks[0, 26, 23] = True  # touches the bar only at a corner: same region
    masks[0, 12, 28] = True  # a single pixel
    masks[1, 0:10, 25:32] = True  # at the border
    masks[1, 18:28, 3:13] = True  # a ring with a hole
    masks[1, 21:25, 6:10] = False
    # masks[2] stays empty: a good image
    masks[3, 10:20, 10:20] = np.eye(10, dtype=bool) | np.eye(10, dtype=bool)[::-1]  # an X
    return masks


def pixel_case(rng: np.random.Generator) -> dict:
    masks = pixel_masks()
    # Noise, raised inside the defects, then quantised to 1/1024 so that ties occur.
    maps = rng.normal(0.35, 0.12, masks.shape) + masks * rng.uniform(0.0, 0.4, masks.shape)
    units = np.clip(np.round(maps * 1024), 0, 1024).astype(np.int64)
    maps = units / 1024
    scores, labels = maps.reshape(-1), masks.reshape(-1)
    aupro = reference_aupro(maps, masks, FPR_LIMIT)
    from_anomalib = anomalib_aupro(maps, masks)
    if abs(aupro - from_anomalib) > 1e-5:
        raise SystemExit(f"AUPRO disagrees: reference {aupro}, anomalib {from_anomalib}")
    return {
        "name": "pixel_regions",
        "shape": list(masks.shape),
        "map_1024": units.reshape(-1).tolist(),
        "mask": masks.reshape(-1).astype(int).tolist(),
        "fpr_limit": FPR_LIMIT,
        "aupro": aupro,
        "anomalib_aupro": from_anomalib,
        **binary_values(scores, labels),
    }


def main() -> None:
    rng = np.random.default_rng(SEED)
    cases = image_cases(rng)
    for case in cases:
        if abs(case["anomalib_threshold"] - case["adaptive_threshold"]) > 1e-6:
            print(f"note: {case['name']}: anomalib threshold {case['anomalib_threshold']} "
                  f"differs from {case['adaptive_threshold']}")
    doc = {
        "source": "scikit-learn 1.9.1 roc_auc_score, f1_score, precision_recall_curve; "
        "anomalib 2.7.0 F1AdaptiveThreshold and AUPRO; see scripts/reference/make_metric_fixture.py",
        "seed": SEED,
        "image_cases": cases,
        "pixel_case": pixel_case(rng),
    }
    out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "metrics.json"
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    pixel = doc["pixel_case"]
    print(f"wrote {len(cases)} image cases and a {pixel['shape']} pixel case to {out} "
          f"({out.stat().st_size} bytes); AUPRO {pixel['aupro']:.6f}, "
          f"anomalib {pixel['anomalib_aupro']:.6f}")


if __name__ == "__main__":
    main()
