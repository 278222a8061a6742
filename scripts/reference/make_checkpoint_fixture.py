#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Train anomalib 2.7.0's Patchflow briefly and record its checkpoint and predictions.

Run it by hand from the repository root after ``scripts/setup.sh`` and
``scripts/reference/make_fixtures.py`` (which creates the reference environment):

    python3 scripts/reference/make_checkpoint_fixture.py

It re-runs itself with ``data/reference-venv/bin/python``, builds a small folder
dataset from the committed textures in ``tests/data``, trains anomalib's ``Patchflow``
with anomalib's ``Engine`` for one epoch on the CPU, and writes to
``tests/fixtures/anomalib/``:

* ``patchflow_lite0.ckpt``: the Lightning checkpoint, as ``Engine.fit`` leaves it;
* ``images/*.png``: the images scored below, 128x128 crops of the textures;
* ``expected.json``: anomalib's raw and normalised image scores, labels and the
  post-processor statistics for those images;
* ``expected_maps.safetensors``: anomalib's raw and normalised anomaly maps
  (1, 64, 64) for each image.

Nothing is downloaded. The backbone is built with ``pre_trained=False`` and then
loaded with the ImageNet EfficientNet-Lite0 weights that ``scripts/setup.sh`` converts
to ``data/weights/tf_efficientnet_lite0.safetensors``, so the scores are those of a
meaningful backbone.

Dataset
-------
All crops are 128x128 pixels of the 512x512 grey textures, taken at fixed positions,
so the dataset is the same on every run:

* normal (training): ``grass.png`` crops with their top-left corner at every
  multiple of 64 from 0 to 384 in both axes whose (row + column) index is even,
  25 crops;
* normal (test): the other grass crops at those positions, 24 crops, of which the
  first 8 in row-major order are used;
* abnormal (test): the next 8 grass test crops in row-major order, each with a
  48x48 square pasted at offset (40, 40) from the same position in ``brick.png``
  (even indices) or ``gravel.png`` (odd indices), with the square as ground-truth
  mask.

Validation uses the test set (``val_split_mode="same_as_test"``), so the
post-processor's threshold and min/max statistics come from those 16 images.

Training and scoring
--------------------
The pre-processor resizes to 64x64 with antialiasing and normalises with mean and
std 0.5, the normalisation that the Lite0 weights were trained with. Training runs
one epoch with batch size 8, seed 0 and anomalib's default optimiser (Adam, lr 1e-3,
weight decay 1e-4).

The scored images are the third and fourth normal test crops, the first two abnormal
crops (one per texture) and a plain brick crop at the last test position. Each is
decoded as anomalib's datasets do (PIL, RGB, float32 in [0, 1]), run through the
model's pre-processor and ``model.model`` for the raw outputs, and through
``model.post_processor`` for the normalised outputs and the labels.
``Engine.predict`` on the same files is checked to give the same normalised values.
The script stops before writing anything when an image scores within
``LABEL_MARGIN`` of the threshold, where comparing labels would be fragile.

With the seed set before the model is built, runs on one machine give the same
values. The checkpoint's bytes still differ between runs, because Lightning stores
the temporary paths of the run in it. Another CPU or other library versions can change
the weights, so commit the checkpoint and the expected outputs of one run together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXTURES = REPO / "tests" / "data"
OUT_DIR = REPO / "tests" / "fixtures" / "anomalib"
CHECKPOINT_NAME = "patchflow_lite0.ckpt"
WEIGHTS = REPO / "data" / "weights" / "tf_efficientnet_lite0.safetensors"
# make_fixtures.py writes this file into the environment after a complete install.
INSTALLED_MARKER = "patchflow-reference-installed"

CROP = 128
STEP = 64
PATCH = 48
PATCH_OFFSET = 40
INPUT_SIZE = [64, 64]
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]
EPOCHS = 1
BATCH_SIZE = 8
SEED = 0
NORMAL_TEST_COUNT = 8
ABNORMAL_COUNT = 8
# Smallest allowed |raw score - image threshold| of a scored image. The Rust tests
# allow 1e-4 between raw scores, so a score closer to the threshold than this could
# flip its label without either side being wrong.
LABEL_MARGIN = 1e-3


def in_venv(venv_dir: Path) -> bool:
    return Path(sys.prefix).resolve() == venv_dir.resolve()


def reexec_in_venv(venv_dir: Path) -> None:
    """Re-run this script with the reference environment's Python."""
    python = venv_dir / "bin" / "python"
    if not (venv_dir / INSTALLED_MARKER).is_file():
        raise SystemExit(
            f"reference environment {venv_dir} is missing or incomplete: create it with "
            "python3 scripts/reference/make_fixtures.py first")
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- dataset --------------------------------------------------------------------------

def grass_positions() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Return the (top, left) corners of the training and test grass crops."""
    train, test = [], []
    count = (512 - CROP) // STEP + 1
    for row in range(count):
        for col in range(count):
            (train if (row + col) % 2 == 0 else test).append((row * STEP, col * STEP))
    return train, test


def crop(image, top: int, left: int):
    return image.crop((left, top, left + CROP, top + CROP))


def build_dataset(root: Path) -> dict[str, Path]:
    """Write the folder dataset under ``root`` and return the files scored later."""
    from PIL import Image

    grass = Image.open(TEXTURES / "grass.png").convert("L")
    defects = [Image.open(TEXTURES / name).convert("L") for name in ("brick.png", "gravel.png")]
    brick = defects[0]
    train, test = grass_positions()
    for name in ("train/good", "test/good", "test/defect", "mask/defect"):
        (root / name).mkdir(parents=True)

    for index, (top, left) in enumerate(train):
        crop(grass, top, left).save(root / "train" / "good" / f"grass_{index:02d}.png")
    normal_test = test[:NORMAL_TEST_COUNT]
    for index, (top, left) in enumerate(normal_test):
        crop(grass, top, left).save(root / "test" / "good" / f"grass_{index:02d}.png")
    abnormal = test[NORMAL_TEST_COUNT:NORMAL_TEST_COUNT + ABNORMAL_COUNT]
    for index, (top, left) in enumerate(abnormal):
        image = crop(grass, top, left)
        source = crop(defects[index % 2], top, left)
        box = (PATCH_OFFSET, PATCH_OFFSET, PATCH_OFFSET + PATCH, PATCH_OFFSET + PATCH)
        image.paste(source.crop(box), box[:2])
        mask = Image.new("L", (CROP, CROP), 0)
        mask.paste(255, box)
        image.save(root / "test" / "defect" / f"defect_{index:02d}.png")
        mask.save(root / "mask" / "defect" / f"defect_{index:02d}.png")

    top, left = test[-1]
    crop(brick, top, left).save(root / "brick.png")
    return {
        "normal_0.png": root / "test" / "good" / "grass_02.png",
        "normal_1.png": root / "test" / "good" / "grass_03.png",
        "defect_brick.png": root / "test" / "defect" / "defect_00.png",
        "defect_gravel.png": root / "test" / "defect" / "defect_01.png",
        "brick.png": root / "brick.png",
    }


# --- model ----------------------------------------------------------------------------

def build_model():
    import torch
    from anomalib.models import Patchflow
    from anomalib.pre_processing import PreProcessor
    from safetensors.torch import load_file
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize(INPUT_SIZE, antialias=True), Normalize(mean=MEAN, std=STD)])
    model = Patchflow(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        pre_processor=PreProcessor(transform=transform),
        visualizer=False,
    )
    extractor = model.model.feature_extractor.feature_extractor
    weights = load_file(str(WEIGHTS))
    missing, unexpected = extractor.load_state_dict(weights, strict=False)
    # The converted file has the classifier head, which the features-only model lacks.
    head = {"conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean",
            "bn2.running_var", "classifier.weight", "classifier.bias"}
    if missing or set(unexpected) - head:
        raise SystemExit(f"backbone weights do not fit: missing {missing}, "
                         f"unexpected {sorted(set(unexpected) - head)}")
    with torch.no_grad():
        for parameter in extractor.parameters():
            if not parameter.isfinite().all():
                raise SystemExit("backbone weights contain NaN or infinite values")
    return model


def train(model, dataset: Path, work: Path) -> Path:
    from anomalib.data import Folder
    from anomalib.engine import Engine
    datamodule = Folder(
        name="grass",
        root=dataset,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        mask_dir="mask/defect",
        train_batch_size=BATCH_SIZE,
        eval_batch_size=BATCH_SIZE,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=SEED,
    )
    engine = Engine(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        default_root_dir=work,
        logger=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    engine.fit(model=model, datamodule=datamodule)
    path = work / CHECKPOINT_NAME
    engine.trainer.save_checkpoint(path)
    return path


def load_image(path: Path):
    """Decode an image as anomalib's datasets do: RGB, float32 CHW in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def predict(model, images: dict[str, Path]) -> tuple[list[dict], dict]:
    import torch
    from anomalib.data import InferenceBatch

    model.eval()
    rows, maps = [], {}
    with torch.no_grad():
        for name, path in images.items():
            x = model.pre_processor.transform(load_image(path))[None]
            raw = model.model(x)
            post = model.post_processor(InferenceBatch(pred_score=raw.pred_score,
                                                       anomaly_map=raw.anomaly_map))
            rows.append({
                "image": name,
                "raw_score": float(raw.pred_score.reshape(-1)[0]),
                "normalized_score": float(post.pred_score.reshape(-1)[0]),
                "label": bool(post.pred_label.reshape(-1)[0]),
            })
            stem = name.removesuffix(".png")
            maps[f"{stem}.raw"] = raw.anomaly_map[0].contiguous()
            maps[f"{stem}.normalized"] = post.anomaly_map[0].contiguous()
    return rows, maps


def check_engine_predict(model, folder: Path, rows: list[dict], maps: dict) -> None:
    """Check that Engine.predict on the image files gives the recorded values."""
    import torch
    from anomalib.engine import Engine

    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    default_root_dir=folder / "predict")
    batches = engine.predict(model=model, data_path=folder / "images")
    seen = 0
    for batch in batches:
        for path, score, label, anomaly_map in zip(batch.image_path, batch.pred_score,
                                                   batch.pred_label, batch.anomaly_map):
            name = Path(path).name
            row = next(r for r in rows if r["image"] == name)
            expected_map = maps[f"{name.removesuffix('.png')}.normalized"]
            if abs(float(score) - row["normalized_score"]) > 1e-6 \
                    or bool(label) != row["label"] \
                    or not torch.allclose(anomaly_map.reshape(expected_map.shape),
                                          expected_map, atol=1e-6):
                raise SystemExit(f"Engine.predict disagrees on {name}: score {float(score)}, "
                                 f"label {bool(label)}, recorded {row}")
            seen += 1
    if seen != len(rows):
        raise SystemExit(f"Engine.predict returned {seen} images, expected {len(rows)}")


def check_label_margins(model, rows: list[dict]) -> None:
    """Print the scores and stop if one lies too close to the image threshold."""
    threshold = model.post_processor.image_threshold.item()
    for row in rows:
        margin = row["raw_score"] - threshold
        print(f"{row['image']:<18} raw {row['raw_score']:.7f} normalised "
              f"{row['normalized_score']:.6f} label {row['label']} "
              f"(raw - threshold {margin:+.2e})")
        if abs(margin) < LABEL_MARGIN:
            raise SystemExit(f"{row['image']} scores within {LABEL_MARGIN} of the threshold, "
                             "so its label is not a stable test: change the scored images")


def statistics(model) -> dict:
    post = model.post_processor
    values = {
        "image_threshold": post._image_threshold,
        "pixel_threshold": post._pixel_threshold,
        "image_min": post.image_min,
        "image_max": post.image_max,
        "pixel_min": post.pixel_min,
        "pixel_max": post.pixel_max,
    }
    # JSON has no NaN literal, so NaN is written as the string "nan".
    return {k: "nan" if v.isnan() else float(v) for k, v in values.items()}


def versions() -> dict:
    import anomalib
    import lightning
    import timm
    import torch
    import torchvision

    return {
        "anomalib": anomalib.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=REPO / "data" / "reference-venv",
                        help="reference environment to run in (default: data/reference-venv)")
    parser.add_argument("--no-venv", action="store_true",
                        help="run in the current interpreter, which must have anomalib 2.7.0")
    args = parser.parse_args()
    if not args.no_venv and not in_venv(args.venv):
        reexec_in_venv(args.venv)
    if not WEIGHTS.is_file():
        raise SystemExit(f"{WEIGHTS} not found: run scripts/setup.sh first")

    import warnings

    import torch
    from safetensors.torch import save_file

    try:
        import anomalib.engine  # noqa: F401
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"anomalib's Engine needs the package {error.name!r}, which reference "
            "environments made before it was added to requirements.txt lack; install it "
            f"with {sys.executable} -m pip install -r scripts/reference/requirements.txt"
        ) from error
    from lightning.pytorch import seed_everything

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scored = build_dataset(work / "dataset")
        # Before the model exists, because building it draws the flow's permutation and
        # initial weights from the global generator.
        seed_everything(SEED, workers=True)
        model = build_model()
        checkpoint = train(model, work / "dataset", work)
        rows, maps = predict(model, scored)
        check_label_margins(model, rows)

        OUT_DIR.mkdir(parents=True, exist_ok=True)
        image_dir = OUT_DIR / "images"
        if image_dir.exists():
            shutil.rmtree(image_dir)
        image_dir.mkdir()
        for name, path in scored.items():
            shutil.copyfile(path, image_dir / name)
        shutil.copyfile(checkpoint, OUT_DIR / CHECKPOINT_NAME)
        shutil.copytree(image_dir, work / "images")
        check_engine_predict(model, work, rows, maps)

    stats = statistics(model)
    print("post-processor statistics:", json.dumps(stats))
    doc = {
        "source": "anomalib 2.7.0 Patchflow trained by scripts/reference/make_checkpoint_fixture.py",
        "checkpoint": CHECKPOINT_NAME,
        "input_size": INPUT_SIZE,
        "mean": MEAN,
        "std": STD,
        "epochs": EPOCHS,
        "statistics": stats,
        "predictions": rows,
        "versions": versions(),
    }
    (OUT_DIR / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")
    save_file(maps, str(OUT_DIR / "expected_maps.safetensors"))
    size = (OUT_DIR / CHECKPOINT_NAME).stat().st_size
    print(f"wrote {OUT_DIR.relative_to(REPO)}: checkpoint {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
