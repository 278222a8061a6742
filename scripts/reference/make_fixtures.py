#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Generate the PatchFlow parity fixtures under tests/fixtures/parity/ with anomalib 2.7.0.

Run it by hand from the repository root: ``python3 scripts/reference/make_fixtures.py``.
It creates a throw-away virtual environment (``data/reference-venv`` by default) with
torch, timm, FrEIA and anomalib, and re-runs itself inside it. For each case it builds
anomalib's ``PatchflowModel`` with ``pre_trained=False``, fills every state-dict entry
with the deterministic generator below and saves the inputs and outputs.
Weights are never saved: ``tests/parity.rs`` regenerates them with the Rust twin of the
generator, ``patchflow::model::synthetic``.

Deterministic weight generator
------------------------------
Every tensor is named as in a patchflow model file: ``backbone.<timm key>``,
``feature_adaptor.{weight,bias}`` and ``flow.module_list.{k}.<key>``. anomalib's
``feature_extractor.feature_extractor.<timm key>`` maps to ``backbone.<timm key>``; the
adaptor and flow keys are the same in both.

For a tensor named ``name`` with ``n`` elements (row-major index ``i``):

* ``seed = FNV-1a-64(UTF-8 bytes of name)`` (offset basis 0xcbf29ce484222325,
  prime 0x100000001b3);
* ``key_i = splitmix64(seed ^ (i * 0x9E3779B97F4A7C15 mod 2^64))``, where
  ``splitmix64(x)`` is ``z = x + 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) *
  0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)``, all
  modulo 2^64;
* ``u_i = (key_i >> 40) / 2^24``, a 24-bit fraction in [0, 1) that float32 holds exactly;
* ``value_i = float32(lo + (hi - lo) * u_i)``, computed in float64.

``(lo, hi)`` depends on the tensor (first match wins):

=====================================  ==========================================
tensor                                 range
=====================================  ==========================================
``*.w_perm``                           permutation matrix, see below
``*.global_scale``                     [8, 12], so g = 0.2 ln(1 + e^(gs/2)) is in
                                       [0.80, 1.20] instead of the initial 1
``*.global_offset``                    [-0.1, 0.1]
``*.running_mean``                     [-0.1, 0.1]
``*.running_var``                      [0.5, 1.5]
``*.se.conv_expand.bias``              [1, 3]
``*.cls_token``, ``*.pos_embed``       [-1, 1]
other 1-D ``*.weight`` (BatchNorm,     [0.5, 1.5]
LayerNorm) and 1-D ``*.gamma``
(LayerScale)
other 1-D ``*.bias``                   [-0.1, 0.1]
``backbone.layer*.conv2.weight``,      +-sqrt(1 / fan_in)
``backbone.layer*.conv3.weight``,
``backbone.blocks.{s}.{i}.conv_pwl
.weight`` and ``backbone.blocks.0.{i}
.conv_pw.weight`` for i >= 1
``backbone.*.weight`` except           +-sqrt(6 / fan_in)
``*.conv_pwl.weight``,
``*.downsample.0.weight``,
``*.attn.qkv.weight``,
``*.attn.proj.weight`` and
``*.mlp.fc2.weight``
any other weight (2-D or 4-D)          +-sqrt(3 / fan_in)
=====================================  ==========================================

with ``fan_in`` the product of all dimensions but the first. Most backbone
convolutions feed an activation that removes about half of the signal power, so they
use Kaiming-uniform bounds. The inverted-residual projections (``conv_pwl``), the
adaptor and the flow subnet keep unit gain. The squeeze-excite gate bias keeps the
gate near sigmoid(2) ~ 0.88 instead of 0.5, which would halve the output of every SE
block. With unit gain everywhere the B0 features shrink to about 0.1 and the map
crowds near -1, and with Kaiming bounds on ``conv_pwl`` too they grow to about 100
and the map saturates at 0. With the ranges above the features stay O(1) to O(10).

EfficientNet blocks other than the first of a stage add their branch to the input.
The last convolution of that branch (``conv_pwl``, or ``conv_pw`` in the
depthwise-separable stage 0) uses +-sqrt(1 / fan_in). Without that rule the
tf_efficientnet_b5 features, with up to 9 such blocks in a stage, reach about 360 on
a 64x48 input and the map saturates at 0. With it they stay below about 6.

The ResNet rules (``layer*`` and ``downsample`` names, which no EfficientNet tensor
has) exist because generated running statistics do not normalise anything. With
Kaiming bounds on every convolution, each residual block adds a branch as large as
its input, and the wide_resnet50_2 features reach about 3.5e4 on a 64x64 input. The
small bound on the residual branch's later convolutions and unit gain on the
projection shortcut keep the ResNet-18, -34 and wide ResNet-50 features at most
about 40 (measured on a 96x64 random input).

DINOv2 ViT tensors (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.*`` with ``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp`` and ``ls2``,
and ``norm``) use the rules above as follows. The class token and the position
embedding lie in [-1, 1], so the position embedding is a large part of every token:
resampling it bilinearly instead of bicubically changes the ViT-S fixture features
by up to 0.9. LayerNorm scales and LayerScale share the BatchNorm scale range, and
LayerNorm biases the bias range. The linear layers that feed no activation
(``attn.qkv``, ``attn.proj``, ``mlp.fc2``) keep unit gain, and ``mlp.fc1`` (before
GELU) and the patch embedding use Kaiming bounds. The ViT features are outputs of the
final LayerNorm, so they stay O(1): at most about 5.4 in absolute value on the
committed fixtures.

On the committed fixtures the map lies between about -0.99 and -0.03.

``w_perm`` of shape (C, C, 1, 1) is the permutation ``perm`` that sorts ``key_0 ..
key_{C-1}`` of its own name in ascending order (stable): ``w_perm[i, perm[i]] = 1``.
anomalib's ``w_perm_inv`` is its transpose and every ``num_batches_tracked`` is 0.
Neither is part of a patchflow model file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OUT_DIR = REPO / "tests" / "fixtures" / "parity"
IMAGES = REPO / "tests" / "data"
ANOMALIB = "anomalib==2.7.0"
# Written into the venv after a complete install, so an interrupted install is redone.
INSTALLED_MARKER = "patchflow-reference-installed"

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

# Model cases. `images` are files under tests/data, one per batch item, resized with
# `resize` (anomalib's Lightning path `antialias`, or its exported-model path
# `bilinear`) and normalised. Sizes are (height, width).
MODEL_CASES = [
    {
        "name": "lite0_64",
        "backbone": "tf_efficientnet_lite0",
        "input_size": [64, 64],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 128,
        "flow_hidden_dim": 128,
        "resize": "antialias",
        "norm": HALF,
        "images": ["coffee.png"],
    },
    {
        # Two images in one batch: per-item log-determinants and the batch-mean loss.
        "name": "b0_64_batch2",
        "backbone": "tf_efficientnet_b0",
        "input_size": [64, 64],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 128,
        "flow_hidden_dim": 128,
        "resize": "antialias",
        "norm": IMAGENET,
        "images": ["chelsea.png", "gravel.png"],
    },
    {
        # Non-square input with odd sizes inside the backbone (24x16 -> ... -> 3x2 -> 2x1),
        # an even pooling window (the pooled map grows by one pixel), two flow steps
        # and an odd flow width (33 = 17 passive + 16 active channels).
        "name": "b0_96x64",
        "backbone": "tf_efficientnet_b0",
        "input_size": [96, 64],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 4,
        "flow_steps": 2,
        "flow_feature_dim": 33,
        "flow_hidden_dim": 24,
        "resize": "bilinear",
        "norm": IMAGENET,
        "images": ["chelsea.png"],
    },
    {
        # A non-square crop (top 12, left 8) and a 7x8 flow grid. The map is padded
        # with -1 back to the input size.
        "name": "lite0_crop",
        "backbone": "tf_efficientnet_lite0",
        "input_size": [80, 80],
        "crop_size": [56, 64],
        "num_scales": 2,
        "patch_size": 5,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "antialias",
        "norm": HALF,
        "images": ["coffee.png"],
    },
    {
        # timm ResNet-18 (BasicBlock, symmetric padding, max-pool stem) on a
        # non-square input with odd sizes inside: layer2 is 10x6, 5x3 and 3x2 at the
        # three scales, layer4 3x2, 2x1 and 1x1.
        "name": "resnet18_80x48",
        "backbone": "resnet18",
        "input_size": [80, 48],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 128,
        "flow_hidden_dim": 128,
        "resize": "antialias",
        "norm": IMAGENET,
        "images": ["chelsea.png"],
    },
    {
        # timm wide_resnet50_2 (Bottleneck, width x2). The fused features have
        # 2 x 3584 channels, so the input is small to keep the fixture small.
        "name": "wide_resnet50_2_32",
        "backbone": "wide_resnet50_2",
        "input_size": [32, 32],
        "crop_size": None,
        "num_scales": 2,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "bilinear",
        "norm": IMAGENET,
        "images": ["gravel.png"],
    },
    {
        # timm ResNet-34 (BasicBlock, 3-4-6-3 blocks).
        "name": "resnet34_64",
        "backbone": "resnet34",
        "input_size": [64, 64],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "bilinear",
        "norm": IMAGENET,
        "images": ["coffee.png"],
    },
    {
        # timm ResNet-50 (Bottleneck, width x1) on a non-square input.
        "name": "resnet50_48x64",
        "backbone": "resnet50",
        "input_size": [48, 64],
        "crop_size": None,
        "num_scales": 2,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "antialias",
        "norm": IMAGENET,
        "images": ["chelsea.png"],
    },
    {
        # anomalib's default backbone, tf_efficientnet_b5 (squeeze-excite in every
        # block, BatchNorm eps 1e-3), at a small non-square size: blocks.6 is 2x2, 1x1
        # and 1x1 at the three scales.
        "name": "b5_64x48",
        "backbone": "tf_efficientnet_b5",
        "input_size": [64, 48],
        "crop_size": None,
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "antialias",
        "norm": IMAGENET,
        "images": ["gravel.png"],
    },
    {
        # DINOv2 ViT-S/14 at a size that is no multiple of 14: anomalib floors 60x46 to
        # 56x42 and centre-crops (top 2, left 2). The grids are 4x3 and, from a 28x14
        # input, 2x1, so the 37x37 position embedding is resampled to 4, 3, 2 and 1.
        "name": "dinov2_small_60x46",
        "backbone": "vit_small_patch14_dinov2",
        "input_size": [60, 46],
        "crop_size": None,
        "num_scales": 2,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 64,
        "flow_hidden_dim": 64,
        "resize": "antialias",
        "norm": IMAGENET,
        "images": ["chelsea.png"],
    },
    {
        # DINOv2 ViT-B/14 with a crop_size that is no multiple of 14: 58x60 is floored
        # to 56x56, and the three scales run at 56, 28 and 14 pixels (grids 4, 2, 1).
        "name": "dinov2_base_crop",
        "backbone": "vit_base_patch14_dinov2",
        "input_size": [64, 64],
        "crop_size": [58, 60],
        "num_scales": 3,
        "patch_size": 3,
        "flow_steps": 1,
        "flow_feature_dim": 32,
        "flow_hidden_dim": 32,
        "resize": "bilinear",
        "norm": IMAGENET,
        "images": ["coffee.png"],
    },
]

# Pre-processing only: a 451x300 RGB photo to other sizes with both resize paths,
# including one size that downscales one axis and upscales the other.
RESIZE_CASES = [
    {"name": "chelsea_64_antialias", "image": "chelsea.png", "size": [64, 64],
     "resize": "antialias", "norm": IMAGENET},
    {"name": "chelsea_64_bilinear", "image": "chelsea.png", "size": [64, 64],
     "resize": "bilinear", "norm": HALF},
    {"name": "chelsea_24x500_antialias", "image": "chelsea.png", "size": [24, 500],
     "resize": "antialias", "norm": IMAGENET},
    {"name": "chelsea_24x500_bilinear", "image": "chelsea.png", "size": [24, 500],
     "resize": "bilinear", "norm": IMAGENET},
]

# Tensors whose first generated values go into the fixture metadata, so that a
# mismatch between the Python and Rust generators shows up as such.
SAMPLED_TENSORS = [
    "backbone.conv_stem.weight",
    "backbone.blocks.1.0.bn1.running_var",
    "backbone.blocks.1.0.se.conv_expand.bias",
    "backbone.blocks.6.0.conv_pwl.weight",
    "backbone.blocks.1.1.conv_pwl.weight",
    "backbone.blocks.0.1.conv_pw.weight",
    "backbone.conv1.weight",
    "backbone.layer1.0.conv2.weight",
    "backbone.layer2.0.downsample.0.weight",
    "backbone.layer3.0.conv3.weight",
    "backbone.cls_token",
    "backbone.pos_embed",
    "backbone.blocks.0.norm1.weight",
    "backbone.blocks.0.attn.qkv.weight",
    "backbone.blocks.0.ls1.gamma",
    "backbone.blocks.0.mlp.fc1.weight",
    "backbone.blocks.0.mlp.fc2.weight",
    "feature_adaptor.bias",
    "flow.module_list.0.global_scale",
    "flow.module_list.0.subnet.2.weight",
]
SAMPLE_COUNT = 6


# --- virtual environment --------------------------------------------------------------

def in_venv(venv_dir: Path) -> bool:
    return Path(sys.prefix).resolve() == venv_dir.resolve()


def ensure_venv(venv_dir: Path) -> None:
    """Create and fill the reference venv if needed, then re-run this script in it."""
    python = venv_dir / "bin" / "python"
    if not (venv_dir / INSTALLED_MARKER).is_file():
        print(f"creating the reference environment in {venv_dir} (about 6 GB)...", flush=True)
        if not python.exists():
            venv.create(venv_dir, with_pip=True, symlinks=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
        subprocess.run([*pip, "--no-deps", ANOMALIB], check=True)
        (venv_dir / INSTALLED_MARKER).write_text("ok\n")
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- deterministic generator ----------------------------------------------------------

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def element_keys(name: str, n: int):
    """Return the 64-bit keys ``splitmix64(seed ^ (i * GOLDEN))`` for i in 0..n."""
    import numpy as np

    u64 = np.uint64
    # numpy wraps uint64 array arithmetic modulo 2^64, as the generator requires.
    x = u64(fnv1a64(name)) ^ (np.arange(n, dtype=u64) * u64(GOLDEN))
    z = x + u64(GOLDEN)
    z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
    return z ^ (z >> u64(31))


# Backbone weights that feed no activation and keep unit gain.
UNIT_GAIN_SUFFIXES = (
    ".conv_pwl.weight",
    ".downsample.0.weight",
    ".attn.qkv.weight",
    ".attn.proj.weight",
    ".mlp.fc2.weight",
)


# The last convolution of an EfficientNet residual branch: the projection of every
# inverted-residual block, or the pointwise convolution of every depthwise-separable
# block in stage 0, except the first block of a stage, which has no skip connection.
EFFICIENTNET_RESIDUAL_PROJECTION = re.compile(
    r"backbone\.blocks\.(?:\d+\.[1-9]\d*\.conv_pwl|0\.[1-9]\d*\.conv_pw)\.weight")


def value_range(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Return the (lo, hi) range of a tensor, as the table in the module docstring."""
    if name.endswith(".global_scale"):
        return 8.0, 12.0
    if name.endswith((".global_offset", ".running_mean")):
        return -0.1, 0.1
    if name.endswith(".running_var"):
        return 0.5, 1.5
    if name.endswith(".se.conv_expand.bias"):
        return 1.0, 3.0
    if name.endswith((".cls_token", ".pos_embed")):
        return -1.0, 1.0
    if len(shape) == 1 and name.endswith((".weight", ".gamma")):
        return 0.5, 1.5
    if len(shape) == 1 and name.endswith(".bias"):
        return -0.1, 0.1
    if len(shape) < 2 or not name.endswith(".weight"):
        raise ValueError(f"no generator rule for tensor {name} with shape {shape}")
    fan_in = math.prod(shape[1:])
    resnet_branch = name.startswith("backbone.layer") and name.endswith(
        (".conv2.weight", ".conv3.weight"))
    if resnet_branch or EFFICIENTNET_RESIDUAL_PROJECTION.fullmatch(name):
        gain = 1.0
    elif name.startswith("backbone.") and not name.endswith(UNIT_GAIN_SUFFIXES):
        gain = 6.0
    else:
        gain = 3.0
    bound = math.sqrt(gain / fan_in)
    return -bound, bound


def synthetic_tensor(name: str, shape: tuple[int, ...]):
    """Return the generated float32 array for one tensor."""
    import numpy as np

    if name.endswith(".w_perm"):
        c = shape[0]
        perm = np.argsort(element_keys(name, c), kind="stable")
        w = np.zeros((c, c), dtype=np.float32)
        w[np.arange(c), perm] = 1.0
        return w.reshape(shape)
    lo, hi = value_range(name, shape)
    n = math.prod(shape)
    u = (element_keys(name, n) >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (lo + (hi - lo) * u).astype(np.float32).reshape(shape)


def our_name(anomalib_key: str) -> str:
    prefix = "feature_extractor.feature_extractor."
    if anomalib_key.startswith(prefix):
        return "backbone." + anomalib_key[len(prefix):]
    return anomalib_key


def fill_state_dict(model) -> dict[str, list[int]]:
    """Load generated values into every state-dict entry and return our names and shapes."""
    import torch

    state = model.state_dict()
    filled = {}
    shapes = {}
    for key, tensor in state.items():
        if key.endswith(".num_batches_tracked"):
            filled[key] = torch.zeros_like(tensor)
        elif key.endswith(".w_perm_inv"):
            continue
        else:
            name = our_name(key)
            shape = tuple(tensor.shape)
            filled[key] = torch.from_numpy(synthetic_tensor(name, shape))
            shapes[name] = list(shape)
    for key in state:
        if key.endswith(".w_perm_inv"):
            filled[key] = filled[key[: -len("_inv")]].transpose(0, 1).contiguous()
    model.load_state_dict(filled, strict=True)
    return dict(sorted(shapes.items()))


# --- pre-processing -------------------------------------------------------------------

def load_image(file: str):
    """Decode an image as anomalib does: RGB, float32 CHW in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = np.asarray(Image.open(IMAGES / file).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def transform(size: list[int], resize: str, norm: dict):
    """Build anomalib's pre-processing transform for one resize path.

    ``antialias`` is the transform of ``Patchflow.configure_pre_processor`` (torchvision
    v2 ``Resize(antialias=True)`` + ``Normalize``), which the Lightning pipeline runs;
    ``bilinear`` is the same transform after anomalib's ``get_exportable_transform``,
    as exported models run it.
    """
    from anomalib.pre_processing.utils.transform import get_exportable_transform
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    lightning = Compose([Resize(size, antialias=True), Normalize(**norm)])
    if resize == "antialias":
        return lightning
    if resize == "bilinear":
        return get_exportable_transform(lightning)
    raise ValueError(f"unknown resize path {resize!r}")


# --- fixtures -------------------------------------------------------------------------

def model_config_json(case: dict) -> str:
    """Return the case as patchflow's ModelConfig JSON."""
    return json.dumps({
        "backbone": case["backbone"],
        "input_size": case["input_size"],
        "crop_size": case["crop_size"],
        "num_scales": case["num_scales"],
        "patch_size": case["patch_size"],
        "flow_steps": case["flow_steps"],
        "flow_feature_dim": case["flow_feature_dim"],
        "flow_hidden_dim": case["flow_hidden_dim"],
        "preprocess": {"resize": case["resize"], **case["norm"]},
    })


def generator_samples(shapes: dict[str, list[int]]) -> str:
    samples = {}
    for name in SAMPLED_TENSORS:
        if name in shapes:
            values = synthetic_tensor(name, tuple(shapes[name])).reshape(-1)[:SAMPLE_COUNT]
            # float(f32) is exact in float64, so JSON round-trips the float32 value.
            samples[name] = [float(v) for v in values]
    return json.dumps(samples)


def generator_permutations(shapes: dict[str, list[int]]) -> str:
    """Return the generated permutation of every flow block, ``perm[i] = argmax_j w[i, j]``."""
    perms = {}
    for name, shape in shapes.items():
        if name.endswith(".w_perm"):
            w = synthetic_tensor(name, tuple(shape)).reshape(shape[0], shape[1])
            perms[name] = [int(j) for j in w.argmax(axis=1)]
    return json.dumps(perms)


def versions() -> str:
    import anomalib
    import timm
    import torch
    import torchvision

    return json.dumps({
        "anomalib": anomalib.__version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    })


def describe(name: str, t) -> None:
    t = t.double()
    finite = bool(t.isfinite().all())
    print(f"  {name:<14} shape {tuple(t.shape)!s:<20} min {t.min().item():+.4g} "
          f"max {t.max().item():+.4g} std {t.std().item() if t.numel() > 1 else 0.0:.4g}"
          + ("" if finite else "  NOT FINITE"))
    if not finite:
        raise SystemExit(f"{name} has NaN or infinite values")


def make_model_case(case: dict) -> tuple[dict, dict]:
    import torch
    from anomalib.models.image.patchflow.loss import PatchflowLoss
    from anomalib.models.image.patchflow.torch_model import PatchflowModel

    model = PatchflowModel(
        input_size=tuple(case["input_size"]),
        backbone=case["backbone"],
        pre_trained=False,
        flow_steps=case["flow_steps"],
        flow_feature_dim=case["flow_feature_dim"],
        num_scales=case["num_scales"],
        patch_size=case["patch_size"],
        flow_hidden_dim=case["flow_hidden_dim"],
        crop_size=tuple(case["crop_size"]) if case["crop_size"] else None,
    )
    shapes = fill_state_dict(model)
    model.eval()

    prep = transform(case["input_size"], case["resize"], case["norm"])
    x = torch.stack([prep(load_image(f)) for f in case["images"]])

    with torch.no_grad():
        # The same steps as PatchflowModel.forward, kept apart to save each stage. For
        # DINOv2 the model switches cropping on itself, with the size floored to 14.
        cropped = x
        if model.crop_size is not None:
            ch, cw = model.crop_size
            top = (x.shape[2] - ch) // 2
            left = (x.shape[3] - cw) // 2
            cropped = x[:, :, top:top + ch, left:left + cw]
        if model.is_dinov2:
            features = model._extract_dinov2_features(cropped)
        else:
            features = model._extract_cnn_features(cropped)
        fused = model._fuse_features(features)
        adapted = model.feature_adaptor(fused)
        z, logdet = model.flow(adapted)
        loss = PatchflowLoss()(z, logdet)
        out = model(x)

    tensors = {"input": x}
    tensors.update({f"features.{i}": f for i, f in enumerate(features)})
    # The fused and adapted features are left out: they are large, and the features
    # before them and z after them pin them down.
    tensors.update({
        "z": z,
        "logdet": logdet,
        "loss": loss.reshape(1),
        "anomaly_map": out.anomaly_map,
        "score": out.pred_score.reshape(-1),
    })
    print(f"{case['name']}: {case['backbone']} input {case['input_size']} "
          f"crop {case['crop_size']} (model crop {model.crop_size}), {len(shapes)} tensors")
    for name, t in tensors.items():
        describe(name, t)
    describe("fused", fused)
    describe("adapted", adapted)
    half_mean_z2 = 0.5 * (z.double() ** 2).mean(dim=1)
    print(f"  0.5 mean_c z^2 from {half_mean_z2.min().item():.4g} to "
          f"{half_mean_z2.max().item():.4g}")

    metadata = {
        "config": model_config_json(case),
        "images": json.dumps(case["images"]),
        "tensor_shapes": json.dumps(shapes),
        "generator_samples": generator_samples(shapes),
        "generator_permutations": generator_permutations(shapes),
        "versions": versions(),
    }
    return tensors, metadata


def make_resize_case(case: dict) -> tuple[dict, dict]:
    prep = transform(case["size"], case["resize"], case["norm"])
    image = load_image(case["image"])
    out = prep(image)[None]
    print(f"{case['name']}: {case['image']} {tuple(image.shape[1:])} -> {case['size']}")
    describe("output", out)
    metadata = {
        "image": case["image"],
        "size": json.dumps(case["size"]),
        "preprocess": json.dumps({"resize": case["resize"], **case["norm"]}),
        "versions": versions(),
    }
    return {"output": out}, metadata


def save(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=REPO / "data" / "reference-venv",
                        help="virtual environment to create and run in "
                             "(default: data/reference-venv)")
    parser.add_argument("--no-venv", action="store_true",
                        help="run in the current interpreter, which must have the "
                             "packages of requirements.txt and anomalib 2.7.0")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="write only this case (repeatable; 'resize' for the "
                             "pre-processing cases); default: every case")
    args = parser.parse_args()
    known = {case["name"] for case in MODEL_CASES} | {"resize"}
    unknown = sorted(set(args.case) - known)
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not args.no_venv and not in_venv(args.venv):
        ensure_venv(args.venv)

    import warnings

    import torch

    # anomalib warns about deprecated DINOv2 modules on import; they are not used here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_grad_enabled(False)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for case in MODEL_CASES:
        if args.case and case["name"] not in args.case:
            continue
        tensors, metadata = make_model_case(case)
        save(OUT_DIR / f"{case['name']}.safetensors", tensors, metadata)
    if not args.case or "resize" in args.case:
        resize_tensors = {}
        resize_meta = {"versions": versions()}
        for case in RESIZE_CASES:
            tensors, metadata = make_resize_case(case)
            resize_tensors[case["name"]] = tensors["output"]
            resize_meta[case["name"]] = json.dumps(
                {k: json.loads(v) if k in ("size", "preprocess") else v
                 for k, v in metadata.items() if k != "versions"})
        save(OUT_DIR / "resize.safetensors", resize_tensors, resize_meta)
    total = sum(p.stat().st_size for p in OUT_DIR.glob("*.safetensors"))
    print(f"wrote {OUT_DIR.relative_to(REPO)}: {total / 1e6:.2f} MB in total")


if __name__ == "__main__":
    main()
