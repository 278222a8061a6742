#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Lay out the ELPV solar-cell images for the demo.

Reads the `elpv-dataset` wheel (PyPI, CC-BY-NC-SA-4.0: used at run time, never
committed) and writes, for one cell type:

  OUT/train/                 good cells to train on
  OUT/test/good/             held-out good cells
  OUT/test/defective/        cells with defect probability 1.0
  OUT/video/%05d.png         a frame sequence of held-out good and defective cells
  OUT/video/frames.csv       frame number, source image and ground truth of each frame

Only the Python standard library is used. The selection is deterministic for a seed.
"""

import argparse
import csv
import io
import random
import sys
import zipfile
from pathlib import Path

PREFIX = "elpv_dataset/data/"


def read_labels(wheel: zipfile.ZipFile):
    """Return (path, defect probability, type) rows of labels.csv."""
    text = wheel.read(PREFIX + "labels.csv").decode("utf-8")
    rows = []
    for line in io.StringIO(text):
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def copy(wheel: zipfile.ZipFile, member: str, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(wheel.read(PREFIX + member))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, type=Path, help="elpv_dataset-*.whl")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--type", default="mono", choices=["mono", "poly"], help="cell type")
    ap.add_argument("--train", type=int, default=200, help="good cells to train on")
    ap.add_argument("--test", type=int, default=100, help="good and defective cells each for evaluation")
    ap.add_argument("--video-frames", type=int, default=60, help="frames in the demo video")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with zipfile.ZipFile(args.wheel) as wheel:
        rows = [r for r in read_labels(wheel) if r[2] == args.type]
        good = sorted(r[0] for r in rows if r[1] == 0.0)
        defective = sorted(r[0] for r in rows if r[1] == 1.0)
        rng = random.Random(args.seed)
        rng.shuffle(good)
        rng.shuffle(defective)
        if len(good) < args.train + args.test or len(defective) < args.test:
            print(
                f"error: {args.type} has {len(good)} good and {len(defective)} defective cells; "
                f"asked for {args.train}+{args.test} good and {args.test} defective",
                file=sys.stderr,
            )
            return 2
        train, test_good = good[: args.train], good[args.train : args.train + args.test]
        test_bad = defective[: args.test]

        for member in train:
            copy(wheel, member, args.out / "train" / Path(member).name)
        for member in test_good:
            copy(wheel, member, args.out / "test" / "good" / Path(member).name)
        for member in test_bad:
            copy(wheel, member, args.out / "test" / "defective" / Path(member).name)

        # The video shows runs of good cells with a few defective cells in between,
        # as a line camera would: 4 good, then 2 defective, repeated.
        frames = []
        gi = di = 0
        while len(frames) < args.video_frames:
            for _ in range(4):
                frames.append((test_good[gi % len(test_good)], "good"))
                gi += 1
            for _ in range(2):
                frames.append((test_bad[di % len(test_bad)], "defective"))
                di += 1
        frames = frames[: args.video_frames]
        video = args.out / "video"
        video.mkdir(parents=True, exist_ok=True)
        with open(video / "frames.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["frame", "image", "truth"])
            for i, (member, truth) in enumerate(frames):
                copy(wheel, member, video / f"{i:05d}.png")
                writer.writerow([i, Path(member).name, truth])

    print(
        f"ELPV {args.type}: {len(train)} train, {len(test_good)} good + {len(test_bad)} defective test, "
        f"{len(frames)} video frames in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
