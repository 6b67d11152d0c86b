"""Hold part of the train split out: a data root whose val is images no model of the run trained on.

    python tools/holdout_split.py --data_root data --out data_holdout            # 40 per task held out
    python tools/holdout_split.py --data_root data --out data_holdout --hold 60 --tasks det

The val split has 60 images per task, and every setting tried against it is a little fitted to them: a
setting that only val favours makes val overstate the hidden test sets. A check that chooses nothing on val
trains on the rest of the train split and scores on the held-out images:

    python tools/experiment.py NAME --task det --profile quick --data_root data_holdout --out DIR

Writes OUT in the layout of the shared data (FiftyOne COCO JSON with `data/`, flat VOC pairs, class folders),
every task found under --data_root (either layout): OUT/<task folder>/train holds the train images minus the
held-out ones, OUT/<task folder>/val the held-out ones, files copied as they are (detection's JSON keeps the
source's categories and ids, its images and annotations split). Which images: the last `hold` in the order the
loaders read the train split (the JSON's image order, the sorted VOC stems), so that a run with
`max_train_images=N-hold` on the source trains on exactly OUT's train images; for classification the last
hold/C of each of the C class folders, so every class is held out alike. The source's own val is not used.
OUT/holdout.json lists the held-out files per task. OUT must not exist yet (or be empty).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def _count_check(n: int, hold: int, where: Path) -> None:
    if not 0 < hold < n:
        raise H.DatasetError(f"{where}: cannot hold out {hold} of its {n} train images (need 0 < hold < {n})")


def split_detection(src: Path, out: Path, hold: int) -> list[str]:
    """The JSON's last `hold` images and their annotations become val, the rest train; returns the held-out files."""
    json_path, image_dirs, _ = H._det_paths(src, "train")
    coco = H._load_coco_json(json_path)
    _, images = H._coco_index(coco, json_path)
    image_dir = H.detection_image_dir(json_path, image_dirs, images)
    _count_check(len(coco["images"]), hold, json_path)
    held = {img["id"] for img in coco["images"][-hold:]}
    for split, keep in (("train", lambda i: i not in held), ("val", lambda i: i in held)):
        dest = out / "mini_coco_det" / split
        part = {**coco, "images": [img for img in coco["images"] if keep(img["id"])],
                "annotations": [a for a in coco["annotations"] if keep(a["image_id"])]}
        (dest / "data").mkdir(parents=True)
        for img in part["images"]:
            shutil.copy2(image_dir / img["file_name"], dest / "data" / img["file_name"])
        (dest / "labels.json").write_text(json.dumps(part))
    return [img["file_name"] for img in coco["images"] if img["id"] in held]


def split_segmentation(src: Path, out: Path, hold: int) -> list[str]:
    """The last `hold` image/mask pairs (sorted stems, or the ImageSets list's order) become val."""
    pairs, _ = H._seg_pairs(src, "train")
    _count_check(len(pairs), hold, src / "mini_voc_seg" / "train")
    for k, (image, mask) in enumerate(pairs):
        if not mask.is_file():
            raise H.DatasetError(f"{mask}: mask file does not exist for image {image.name}")
        dest = out / "mini_voc_seg" / ("val" if k >= len(pairs) - hold else "train")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, dest / image.name)
        shutil.copy2(mask, dest / mask.name)
    return [image.name for image, _ in pairs[-hold:]]


def split_classification(src: Path, out: Path, hold: int) -> list[str]:
    """The last hold/C images (sorted names) of each of the C class folders become val."""
    split_dir = H._require_dir(src / "imagenette_160" / "train", "classification train split")
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not folders or hold % len(folders):
        raise H.DatasetError(f"{split_dir}: hold ({hold}) must be a multiple of its {len(folders)} class folders, "
                             "so that every class is held out alike")
    per_class, held = hold // len(folders), []
    for folder in folders:
        files = H.class_folder_images(folder)
        _count_check(len(files), per_class, folder)
        for k, path in enumerate(files):
            dest = out / "imagenette_160" / ("val" if k >= len(files) - per_class else "train") / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / path.name)
        held += [f"{folder.name}/{p.name}" for p in files[-per_class:]]
    return held


SPLITTERS = {"det": split_detection, "seg": split_segmentation, "cls": split_classification}


def holdout_split(data_root: str | Path, out: str | Path, hold: int = 40, tasks=("det", "seg", "cls")) -> dict:
    """Write OUT (see the module's text) and return what OUT/holdout.json records."""
    src, out = Path(data_root), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    unknown = [t for t in tasks if t not in SPLITTERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks: {list(SPLITTERS)}")
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": str(src.resolve()), "hold": hold,
              "rule": "the last `hold` train images in the loaders' order; classification: the last hold/C of each "
                      "class",
              "held_out": {}}
    for task in tasks:
        record["held_out"][task] = SPLITTERS[task](src, out, hold)
    H.write_json(record, out / "holdout.json")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", required=True, help="the source data root (its train splits are split)")
    parser.add_argument("--out", required=True, help="a new folder for the held-out data root")
    parser.add_argument("--hold", type=int, default=40, help="images held out per task (default 40)")
    parser.add_argument("--tasks", default="det,seg,cls", help="comma-separated tasks (default all three)")
    args = parser.parse_args(argv)
    record = holdout_split(args.data_root, args.out, args.hold, [t for t in args.tasks.split(",") if t])
    for task, files in record["held_out"].items():
        print(f"{task}: {len(files)} train images held out as {args.out}'s val")


if __name__ == "__main__":
    main()
