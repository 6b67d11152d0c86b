"""Data layer: loaders in both layouts read back exactly what was written; every malformed input raises a
DatasetError naming the file; train/val overlap is a warning; joint transforms keep boxes and masks
aligned; the download helper fails with manual instructions; the real mini-datasets (when present) have
the documented counts and classes."""
from __future__ import annotations

import collections
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers as H
from conftest import SHARED_DATA, requires_shared_data

LAYOUTS = ("shared", "course")


# --------------------------------------------------------------------------------------------------
# paths of the synthetic set in each layout (as documented in make_synthetic_dataset)
# --------------------------------------------------------------------------------------------------
def det_json(root: Path, layout: str, split: str) -> Path:
    base = root / "mini_coco_det"
    return base / split / "labels.json" if layout == "shared" else base / "annotations" / f"instances_{split}2017.json"


def det_image_dir(root: Path, layout: str, split: str) -> Path:
    base = root / "mini_coco_det"
    return base / split / "data" if layout == "shared" else base / f"{split}2017"


def seg_dirs(root: Path, layout: str, split: str) -> tuple[Path, Path]:
    base = root / "mini_voc_seg" / split
    return (base, base) if layout == "shared" else (base / "JPEGImages", base / "SegmentationClass")


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def as_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def non_crowd_counts(coco: dict) -> collections.Counter:
    id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
    return collections.Counter(id_to_name[a["category_id"]] for a in coco["annotations"] if not a.get("iscrowd", 0))


@pytest.fixture(params=LAYOUTS)
def syn(request, synthetic_root, synthetic_course_root):
    """(layout, root) of the synthetic dataset, once per layout."""
    return request.param, (synthetic_root if request.param == "shared" else synthetic_course_root)


# --------------------------------------------------------------------------------------------------
# loaders read what was written
# --------------------------------------------------------------------------------------------------
def test_detection_loader_reads_what_was_written(syn):
    layout, root = syn
    data = H.load_all(root, tasks=["det"], verbose=False)
    train_coco = json.loads(det_json(root, layout, "train").read_text())
    counts = non_crowd_counts(train_coco)
    # the synthetic set's premise: the two distractors are rarer than every one of the ten classes
    assert {"kite", "clock"} <= set(counts)
    assert min(counts[n] for n in H.SYNTHETIC_DET_CLASSES) > max(counts["kite"], counts["clock"])
    class_names = data["det"]["train"].class_names
    assert set(class_names) == set(H.SYNTHETIC_DET_CLASSES)  # distractors not selected by default
    assert class_names == sorted(counts, key=lambda n: (-counts[n], n))[:10]  # most boxes first, ties by name
    assert data["det"]["val"].class_names == class_names  # val reuses train's classes, by name
    assert data["det"]["train"].layout == ("fiftyone" if layout == "shared" else "coco")

    ids_by_split = {}
    for split in ("train", "val"):
        td = data["det"][split]
        coco = json.loads(det_json(root, layout, split).read_text())
        id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
        name_to_id = {v: k for k, v in id_to_name.items()}
        ids_by_split[split] = name_to_id
        assert td.category_ids == [name_to_id[n] for n in class_names]  # this split's own ids
        assert [c["name"] for c in td.coco_gt["categories"]] == class_names
        assert [c["id"] for c in td.coco_gt["categories"]] == td.category_ids
        by_file = {s["file"]: s for s in td.samples}
        assert sorted(by_file) == sorted(img["file_name"] for img in coco["images"])
        crowd_seen = 0
        for img in coco["images"]:
            s = by_file[img["file_name"]]
            assert s["image_id"] == img["id"]
            assert tuple(s["image"].shape) == (3, img["height"], img["width"])
            np.testing.assert_array_equal(as_hwc(s["image"]), pil_rgb(det_image_dir(root, layout, split) / img["file_name"]))
            expected_boxes, expected_labels = [], []
            for ann in coco["annotations"]:
                name = id_to_name[ann["category_id"]]
                if ann["image_id"] != img["id"] or name not in class_names:
                    continue
                x, y, w, h = ann["bbox"]
                if ann["iscrowd"]:
                    crowd_seen += 1
                    crowd_xyxy = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
                    # in coco_gt (COCOeval needs it) ...
                    assert any(g["iscrowd"] == 1 and g["image_id"] == img["id"] and g["bbox"] == [x, y, w, h]
                               and g["category_id"] == ann["category_id"] for g in td.coco_gt["annotations"])
                    # ... but never a training target
                    assert not any(torch.allclose(b, crowd_xyxy) for b in s["boxes"])
                    continue
                expected_boxes.append([x, y, x + w, y + h])
                expected_labels.append(class_names.index(name))
            np.testing.assert_allclose(s["boxes"].numpy(), np.array(expected_boxes, dtype=np.float32).reshape(-1, 4))
            assert s["labels"].tolist() == expected_labels
        assert crowd_seen == 1  # the synthetic set has one crowd box per split
        # coco_gt holds every annotation of the selected classes, crowd included, with the split's ids
        n_selected = sum(id_to_name[a["category_id"]] in class_names for a in coco["annotations"])
        assert len(td.coco_gt["annotations"]) == n_selected
        assert all(g["category_id"] in td.category_ids for g in td.coco_gt["annotations"])
    # the same name has different ids in train and val: matching by name is actually exercised
    assert any(ids_by_split["train"][n] != ids_by_split["val"][n] for n in class_names)


def test_detection_explicit_class_names_are_honoured(syn):
    layout, root = syn
    wanted = ["kite", "person"]
    td = H.load_detection_split(root, "train", classes=wanted)
    assert td.class_names == wanted
    coco = json.loads(det_json(root, layout, "train").read_text())
    id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
    expected = collections.Counter(id_to_name[a["category_id"]] for a in coco["annotations"]
                                   if not a["iscrowd"] and id_to_name[a["category_id"]] in wanted)
    got = collections.Counter(wanted[int(l)] for s in td.samples for l in s["labels"])
    assert got == expected and expected["kite"] > 0 and expected["person"] > 0
    assert {c["name"] for c in td.coco_gt["categories"]} == set(wanted)


def test_segmentation_loader_reads_what_was_written(syn):
    layout, root = syn
    for split in ("train", "val"):
        td = H.load_segmentation_split(root, split)
        assert td.layout == ("flat" if layout == "shared" else "voc")
        assert td.class_names == H.VOC_CLASSES
        image_dir, mask_dir = seg_dirs(root, layout, split)
        stems = sorted(p.stem for p in image_dir.glob("*.jpg"))
        assert [Path(s["file"]).stem for s in td.samples] == stems and stems
        for s in td.samples:
            stem = Path(s["file"]).stem
            with Image.open(mask_dir / f"{stem}.png") as im:
                assert im.mode == "P"
                indices = np.array(im)
            assert s["mask"].dtype == torch.uint8
            np.testing.assert_array_equal(s["mask"].numpy(), indices)
            assert (s["mask"] == 255).any()  # VOC borders survive as 255, not as a palette colour
            assert set(np.unique(indices).tolist()) <= set(H.SYNTHETIC_SEG_CLASSES) | {0, 255}
            np.testing.assert_array_equal(as_hwc(s["image"]), pil_rgb(image_dir / s["file"]))


def test_classification_loader_labels_follow_canonical_wnid_order(syn):
    layout, root = syn
    wnids = sorted(H.IMAGENETTE_CLASSES)
    for split in ("train", "val"):
        td = H.load_classification_split(root, split)
        assert td.class_names == [H.IMAGENETTE_CLASSES[w] for w in wnids]
        assert td.class_names[0] == "tench" and td.class_names[-1] == "parachute"
        split_dir = root / "imagenette_160" / split
        n_files = sum(1 for p in split_dir.rglob("*") if p.is_file())
        assert len(td) == n_files
        for s in td.samples:
            folder, name = s["file"].split("/")
            wnid = name.split("_")[0]  # the synthetic files are named <wnid>_<split><k>
            if layout == "shared":
                assert folder == wnid
            else:  # numbered folders map to the same Imagenette names
                assert folder == str(wnids.index(wnid))
            assert s["label"] == wnids.index(wnid)
            assert td.class_names[s["label"]] == H.IMAGENETTE_CLASSES[wnid]
            np.testing.assert_array_equal(as_hwc(s["image"]), pil_rgb(split_dir / folder / name))


def test_both_layouts_give_the_same_classes(synthetic_root, synthetic_course_root):
    a = H.check_dataset(synthetic_root)
    b = H.check_dataset(synthetic_course_root)
    for task in H.TASKS:
        assert a[task]["classes"] == b[task]["classes"]
        assert a[task]["counts"] == b[task]["counts"]
    assert a["det"]["counts"] == {"train": 32, "val": 12} and a["seg"]["counts"] == {"train": 32, "val": 12}
    assert a["cls"]["counts"] == {"train": 30, "val": 10}  # n // 10 images in each of ten folders
    assert (a["seg"]["layout"], b["seg"]["layout"]) == ("flat", "voc")


def test_rgb_colour_mask_reads_back_to_the_same_indices(synthetic_root, tmp_path):
    src = synthetic_root / "mini_voc_seg" / "train" / "train_0000.png"
    with Image.open(src) as im:
        indices = np.array(im)
        rgb = im.convert("RGB")
    assert (indices == 255).any() and len(np.unique(indices)) >= 3
    path = tmp_path / "rgb.png"
    rgb.save(path)
    with Image.open(path) as im:
        assert im.mode == "RGB"
    np.testing.assert_array_equal(H.read_mask(path).numpy(), indices)
    # and through the loader: swap the palette mask of a copied dataset for its RGB rendering
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "mini_voc_seg", root / "mini_voc_seg")
    rgb.save(root / "mini_voc_seg" / "train" / "train_0000.png")
    td = H.load_segmentation_split(root, "train")
    sample = next(s for s in td.samples if s["file"] == "train_0000.jpg")
    np.testing.assert_array_equal(sample["mask"].numpy(), indices)


def test_rgb_mask_with_a_colour_outside_the_palette_is_refused(tmp_path):
    path = tmp_path / "odd.png"
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[2, 2] = (1, 2, 3)
    Image.fromarray(array).save(path)
    with pytest.raises(H.DatasetError, match="odd.png"):
        H.read_mask(path)


def test_voc_palette_known_colours():
    palette = H.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    # VOC's documented colours: background, aeroplane, person, border
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]


# --------------------------------------------------------------------------------------------------
# malformed inputs: DatasetError naming the offending file or folder
# --------------------------------------------------------------------------------------------------
def _rewrite_json(path: Path, change) -> None:
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def _det_json(root):
    return root / "mini_coco_det" / "train" / "labels.json"


def _break_missing_split(root):
    shutil.rmtree(root / "mini_coco_det" / "val")
    return ("det", "val"), str(root / "mini_coco_det" / "val")


def _break_missing_seg_split(root):
    shutil.rmtree(root / "mini_voc_seg" / "val")
    return ("seg", "val"), str(root / "mini_voc_seg" / "val")


def _break_missing_cls_split(root):
    shutil.rmtree(root / "imagenette_160" / "train")
    return ("cls", "train"), str(root / "imagenette_160" / "train")


def _break_missing_dataset(root):
    shutil.rmtree(root / "imagenette_160")
    return ("cls", "train"), "imagenette_160"


def _break_truncated_jpeg(root):
    path = root / "mini_coco_det" / "train" / "data" / "train_0003.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ("det", "train"), "train_0003.jpg"


def _break_not_an_image(root):
    (root / "mini_voc_seg" / "val" / "val_0002.jpg").write_text("this is not a JPEG file\n" * 10)
    return ("seg", "val"), "val_0002.jpg"


def _break_mask_size(root):
    path = root / "mini_voc_seg" / "train" / "train_0001.png"
    with Image.open(path) as im:
        im.load()
        bigger = im.resize((im.width + 3, im.height), Image.NEAREST)
    bigger.save(path)
    return ("seg", "train"), "train_0001.png"


def _break_mask_value(root):
    path = root / "mini_voc_seg" / "train" / "train_0004.png"
    with Image.open(path) as im:
        array = np.array(im)
        palette = im.getpalette()
    array[0, 0] = 30
    out = Image.fromarray(array, mode="P")
    out.putpalette(palette)
    out.save(path)
    return ("seg", "train"), "train_0004.png"


def _break_json_missing_annotations(root):
    _rewrite_json(_det_json(root), lambda c: c.pop("annotations"))
    return ("det", "train"), "labels.json"


def _break_json_empty_annotations(root):
    _rewrite_json(_det_json(root), lambda c: c.update(annotations=[]))
    return ("det", "train"), "labels.json"


def _break_json_names_missing_image(root):
    _rewrite_json(_det_json(root), lambda c: c["images"][-1].update(file_name="missing_0099.jpg"))
    return ("det", "train"), "missing_0099.jpg"


def _break_json_names_missing_first_image(root):
    _rewrite_json(_det_json(root), lambda c: c["images"][0].update(file_name="missing_0000.jpg"))
    return ("det", "train"), "missing_0000.jpg"


def _break_zero_width_box(root):
    coco = json.loads(_det_json(root).read_text())
    ann = [a for a in coco["annotations"] if not a["iscrowd"]][-1]
    ann["bbox"][2] = 0
    _det_json(root).write_text(json.dumps(coco))
    file_name = next(i["file_name"] for i in coco["images"] if i["id"] == ann["image_id"])
    return ("det", "train"), file_name


def _break_empty_class_folder(root):
    folder = root / "imagenette_160" / "val" / "n03000684"
    for p in folder.iterdir():
        p.unlink()
    return ("cls", "val"), "n03000684"


BREAKERS = {
    "missing_det_split": _break_missing_split,
    "missing_seg_split": _break_missing_seg_split,
    "missing_cls_split": _break_missing_cls_split,
    "missing_dataset_folder": _break_missing_dataset,
    "truncated_jpeg": _break_truncated_jpeg,
    "not_an_image": _break_not_an_image,
    "mask_size_differs": _break_mask_size,
    "mask_value_30": _break_mask_value,
    "json_missing_annotations": _break_json_missing_annotations,
    "json_empty_annotations": _break_json_empty_annotations,
    "json_names_missing_image": _break_json_names_missing_image,
    "json_names_missing_first_image": _break_json_names_missing_first_image,
    "zero_width_box": _break_zero_width_box,
    "empty_class_folder": _break_empty_class_folder,
}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A smaller synthetic set (shared layout) to copy and break; intact, it passes check_dataset."""
    root = H.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_small"), layout="shared", n_train=10, n_val=5)
    H.check_dataset(root)
    return root


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_raises_dataset_error_naming_the_file(case, small_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    (task, split), offending = BREAKERS[case](root)
    with pytest.raises(H.DatasetError) as info:
        H.load_task(root, task, split)
    assert offending in str(info.value)
    with pytest.raises(H.DatasetError) as info:
        H.check_dataset(root)
    assert offending in str(info.value)


def test_unknown_class_name_requested(synthetic_root):
    with pytest.raises(H.DatasetError, match="unicorn"):
        H.load_task(synthetic_root, "det", "train", classes=["person", "unicorn"])
    with pytest.raises(H.DatasetError, match="unicorn"):
        H.check_dataset(synthetic_root, classes={"det": ["unicorn"]})


def test_selected_class_missing_from_val_gets_no_ground_truth(small_root, tmp_path):
    """FiftyOne keeps only the categories that occur in a split: a class chosen on train may be absent from
    val. Loading val for evaluation then warns, gives the class an unused id and no ground truth (NaN AP)."""
    root = tmp_path / "data"
    shutil.copytree(small_root / "mini_coco_det", root / "mini_coco_det")
    path = root / "mini_coco_det" / "val" / "labels.json"
    coco = json.loads(path.read_text())
    dog = next(c["id"] for c in coco["categories"] if c["name"] == "dog")
    coco["categories"] = [c for c in coco["categories"] if c["id"] != dog]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != dog]
    path.write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="dog"):
        data = H.load_all(root, tasks=["det"], verbose=False)
    train, val = data["det"]["train"], data["det"]["val"]
    assert "dog" in train.class_names and val.class_names == train.class_names
    k = val.class_names.index("dog")
    others = [c["id"] for c in coco["categories"]]
    assert val.category_ids[k] not in others and len(set(val.category_ids)) == len(val.category_ids)
    assert not any(g["category_id"] == val.category_ids[k] for g in val.coco_gt["annotations"])
    results = [{"image_id": g["image_id"], "category_id": g["category_id"], "bbox": g["bbox"], "score": 1.0}
               for g in val.coco_gt["annotations"] if not g["iscrowd"]]
    m = H.detection_metrics(val.coco_gt, results, val.class_names)
    assert m["map"] == pytest.approx(1.0)  # the class without ground truth does not count
    # NaN AP for exactly as many classes as have no (non-crowd) ground truth in this small val split, dog
    # among them (which name carries which value: see the catIds-order test in test_model_metrics)
    with_gt = {g["category_id"] for g in val.coco_gt["annotations"] if not g["iscrowd"]}
    no_gt = [n for n, c in zip(val.class_names, val.category_ids) if c not in with_gt]
    assert "dog" in no_gt
    assert sum(bool(np.isnan(v)) for v in m["per_class_ap"].values()) == len(no_gt)
    # asked for explicitly (strict, the default), the missing class is an error naming it
    with pytest.raises(H.DatasetError, match="dog"):
        H.load_detection_split(root, "val", classes=train.class_names)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(H.DatasetError, match="nothing.jpg"):
        H.read_image(tmp_path / "nothing.jpg")


def test_train_val_overlap_is_a_warning(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    seg = root / "mini_voc_seg"
    for suffix in (".jpg", ".png"):
        shutil.copy(seg / "train" / f"train_0000{suffix}", seg / "val" / f"train_0000{suffix}")
    with pytest.warns(UserWarning, match="train_0000.jpg"):
        summary = H.check_dataset(root)
    assert summary["seg"]["overlap"] == ["train_0000.jpg"]
    assert summary["seg"]["counts"] == {"train": 32, "val": 13}
    assert summary["det"]["overlap"] == [] and summary["cls"]["overlap"] == []


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def _det_item(image: torch.Tensor, boxes: list[list[float]], labels: list[int], mask: torch.Tensor | None = None):
    from torchvision import tv_tensors
    h, w = image.shape[1:]
    item = {"image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels)}
    if mask is not None:
        item["mask"] = tv_tensors.Mask(mask)
    return item


def test_eval_transform_scales_boxes_exactly_and_back():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8, generator=g)
    box = [10.0, 20.0, 50.0, 60.0]
    out = H.dense_transform(64, train=False, sanitize_boxes=True)(_det_item(image, [box], [3]))
    assert tuple(out["image"].shape) == (3, 64, 64) and out["image"].dtype == torch.float32
    expected = torch.tensor([[10 * 64 / 100, 20 * 64 / 80, 50 * 64 / 100, 60 * 64 / 80]])  # 6.4, 16, 32, 48
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), expected, atol=1e-4, rtol=0)
    assert out["labels"].tolist() == [3]
    back = H.boxes_to_original(out["boxes"].as_subclass(torch.Tensor), (64, 64), (80, 100))
    torch.testing.assert_close(back, torch.tensor([box]), atol=1e-4, rtol=0)


def test_boxes_to_original_clamps_to_the_image():
    boxes = torch.tensor([[-4.0, -2.0, 70.0, 66.0]])
    out = H.boxes_to_original(boxes, (64, 64), (32, 128))
    assert out.tolist() == [[0.0, 0.0, 128.0, 32.0]]


def test_eval_transform_resizes_masks_with_nearest_labels():
    mask = torch.zeros(80, 100, dtype=torch.uint8)
    mask[20:60, 10:50] = 7
    mask[20:60, 50] = 255
    from torchvision import tv_tensors
    out = H.dense_transform(64, train=False)({"image": tv_tensors.Image(torch.zeros(3, 80, 100, dtype=torch.uint8)),
                                                    "mask": tv_tensors.Mask(mask)})
    assert tuple(out["mask"].shape) == (64, 64)
    assert set(out["mask"].unique().tolist()) == {0, 7, 255}  # no interpolated values


def test_horizontal_flip_moves_box_and_mask_together():
    from torchvision.transforms import v2
    image = torch.zeros(3, 80, 100, dtype=torch.uint8)
    mask = torch.zeros(80, 100, dtype=torch.uint8)
    mask[20:60, 10:50] = 7
    out = v2.RandomHorizontalFlip(p=1.0)(_det_item(image, [[10, 20, 50, 60]], [1], mask))
    assert out["boxes"].as_subclass(torch.Tensor).tolist() == [[50.0, 20.0, 90.0, 60.0]]
    flipped = out["mask"].as_subclass(torch.Tensor)
    assert torch.equal(flipped, torch.flip(mask, dims=[-1]))
    ys, xs = torch.nonzero(flipped == 7, as_tuple=True)
    assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == [50, 20, 90, 60]


def _mask_rect(mask: torch.Tensor, label: int) -> list[int] | None:
    ys, xs = torch.nonzero(mask == label, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("augment", ["strong", "light"])
@pytest.mark.parametrize("task", ["det", "seg"])
def test_training_transform_keeps_boxes_and_masks_aligned(task, augment):
    """Objects are rectangles, so each object's mask region IS its box: after the random zoom-out, crop,
    resize and flip ("strong") or scale jitter, crop or pad and flip ("light"), the mask region's bounding
    rectangle must still be the transformed box."""
    h, w, size = 96, 128, 64
    boxes = [[8, 10, 56, 70], [70, 40, 120, 90]]  # asymmetric, so a flip moves them
    labels = [7, 12]
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for (x1, y1, x2, y2), lab in zip(boxes, labels):
        mask[y1:y2, x1:x2] = lab
        image[:, y1:y2, x1:x2] = 40 * (lab % 5) + 50
    transform = H.dense_transform(size, train=True, augment=augment, sanitize_boxes=task == "det")
    compared, flipped, results = 0, 0, set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(_det_item(image, boxes, labels, mask))
        out_mask = out["mask"].as_subclass(torch.Tensor)
        assert tuple(out_mask.shape) == (size, size) and tuple(out["image"].shape) == (3, size, size)
        assert set(out_mask.unique().tolist()) <= {0, 7, 12, 255}  # zoom-out and padding fill the mask with 255
        out_boxes = out["boxes"].as_subclass(torch.Tensor)
        out_labels = out["labels"].tolist()
        assert len(out_boxes) == len(out_labels)
        results.add(tuple(round(v, 1) for v in out_boxes.flatten().tolist()))
        for lab in labels:
            rect = _mask_rect(out_mask, lab)
            if lab not in out_labels:  # only the det transform drops boxes (SanitizeBoundingBoxes, < 2 px)
                assert task == "det"
                assert rect is None or min(rect[2] - rect[0], rect[3] - rect[1]) <= 3
                continue
            box = out_boxes[out_labels.index(lab)].tolist()
            if min(box[2] - box[0], box[3] - box[1]) < 1:  # cropped away: the mask has (almost) nothing left
                assert rect is None or min(rect[2] - rect[0], rect[3] - rect[1]) <= 2
                continue
            assert rect is not None, (seed, lab, box)
            assert max(abs(a - b) for a, b in zip(rect, box)) <= 2.0, (seed, lab, box, rect)
            compared += 1
        # the left object started left of the right one; after a flip it is on the right
        if all(lab in out_labels for lab in labels):
            b7, b12 = out_boxes[out_labels.index(7)], out_boxes[out_labels.index(12)]
            flipped += int(b7[0] > b12[0])
    assert compared >= 12  # most objects survive the crops and were checked
    assert flipped >= 1  # the random flip was exercised
    assert len(results) >= 10  # the seeds give different augmentations


def test_light_augmentation_pads_with_the_mean_and_ignore():
    """Scaled below the input size, an image is padded with the backbone's mean colour (0 after
    normalisation) and its mask with 255 (ignore): the padding is neither a colour nor a class."""
    from torchvision import tv_tensors
    image = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    mask = torch.ones(64, 64, dtype=torch.uint8)
    transform = H.dense_transform(64, train=True, augment="light", scale_jitter=(0.5, 0.5),
                                  backbone="efficientnet-lite0")
    torch.manual_seed(0)
    out = transform({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)})
    pad = out["mask"].as_subclass(torch.Tensor) == 255
    assert 0.7 < pad.float().mean() < 0.8  # a 32x32 image in a 64x64 canvas: 3/4 of it padding
    padded_pixels = out["image"][:, pad]
    assert padded_pixels.abs().max() < 0.01  # the mean colour normalises to 0
    assert (out["image"][:, ~pad] > 0.3).all()  # white, however the brightness jitter fell


def test_task_dataset_and_collate_shapes(synthetic_root):
    data = H.load_all(synthetic_root, verbose=False)
    cfg = H.make_config("smoke", image_size=96, cls_image_size=64)
    for task, size in (("det", 96), ("seg", 96), ("cls", 64)):
        ds = H.TaskDataset(data[task]["train"], cfg, train=True, indices=range(3))
        batch = H.collate([ds[i] for i in range(3)], ragged=H.TASK_TABLE[task].ragged)
        assert tuple(batch["image"].shape) == (3, 3, size, size)
        assert batch["index"].tolist() == [0, 1, 2]
        assert batch["orig_size"] == [tuple(data[task]["train"].samples[i]["image"].shape[1:]) for i in range(3)]
        if task == "det":
            assert tuple(batch["heatmap"].shape) == (3, 10, size // 8, size // 8)
            assert tuple(batch["box_target"].shape) == (3, 4, size // 8, size // 8)
            assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 3
        elif task == "seg":
            assert tuple(batch["mask"].shape) == (3, size, size) and batch["mask"].dtype == torch.int64
        else:
            assert batch["label"].tolist() == [data["cls"]["train"].samples[i]["label"] for i in range(3)]


def test_evaluation_images_are_resized_to_each_tasks_scored_side(synthetic_root):
    """eval_scale: detection scores its images at image_size x 1.25 (rounded down to a multiple of 32),
    segmentation at image_size; training keeps image_size either way."""
    data = H.load_all(synthetic_root, tasks=["det", "seg"], verbose=False)
    cfg = H.make_config("smoke", image_size=128, eval_scale={"det": 1.25, "seg": 1.0})
    assert (H.eval_side(cfg, "det"), H.eval_side(cfg, "seg")) == (160, 128)
    larger = {"det": 1.25}
    assert H.eval_side(H.make_config("quick", image_size=256, eval_scale=larger), "det") == 320
    assert H.eval_side(H.make_config("quick", image_size=256, eval_scale=larger), "seg") == 256  # seg keeps its 1.0
    assert H.eval_side(H.make_config("quick", eval_scale=larger), "det") == 480  # the profile's 384 px
    assert H.eval_side(H.make_config("quick", image_size=320, eval_scale=larger), "det") == 384  # 400: never above
    assert H.eval_side(H.make_config("full", eval_scale=larger), "det") == 640
    assert H.eval_side(H.make_config("smoke", eval_scale=larger), "det") == 96  # 120 rounds down
    assert H.eval_side(H.make_config("quick"), "det") == 384  # the default scores at the training side
    for task, scored in (("det", 160), ("seg", 128)):
        for train, side in ((True, 128), (False, scored)):
            sample = H.TaskDataset(data[task]["val"], cfg, train=train, indices=[0])[0]
            assert tuple(sample["image"].shape[-2:]) == (side, side), (task, train)
    assert H.scoring_settings(cfg, ["seg", "cls"])["eval_sides"] == {"seg": 128}
    assert H.latency_side(H.make_config("quick", eval_scale=larger)) == 512  # its 320 px is below 512
    assert H.latency_side(H.make_config("full", eval_scale=larger)) == 640
    assert H.latency_side(H.make_config("full")) == 512


def test_repeat_factors_known_answer():
    """LVIS repeat factors: classes in images [0,1], [0], [0], [2]; f = 3/4, 1/4, 1/4 at t = 0.5 gives
    r = 1, sqrt(2), sqrt(2); each image takes its largest r."""
    labels = [[0, 1], [0], [0], [2]]
    td = H.TaskData("det", "train", [{"labels": torch.tensor(l)} for l in labels], ["a", "b", "c"], "coco")
    assert H.repeat_factors(td, 0.5) == pytest.approx([2 ** 0.5, 1.0, 1.0, 2 ** 0.5])
    cfg = H.make_config("smoke", det_sampling="repeat_factor", repeat_thresh=0.5)
    assert H.TASK_TABLE["det"].sampling_weights(td, cfg) == pytest.approx([2 ** 0.5, 1.0, 1.0, 2 ** 0.5])
    assert H.TASK_TABLE["det"].sampling_weights(td, H.make_config("smoke")) is None


def test_classification_labels_follow_the_given_class_list(synthetic_root, tmp_path):
    """With a checkpoint's class list, a split lacking a class folder keeps every other label right;
    strict loading refuses it, and a folder of an unknown class is always refused."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "imagenette_160", root / "imagenette_160")
    classes = H.load_classification_split(root, "val").class_names
    shutil.rmtree(root / "imagenette_160" / "val" / "n01440764")  # tench, label 0
    td = H.load_classification_split(root, "val", classes, strict=False)
    assert td.class_names == classes
    assert all(classes[s["label"]] == H.IMAGENETTE_CLASSES[s["file"].split("/")[0]] for s in td.samples)
    assert min(s["label"] for s in td.samples) == 1
    with pytest.raises(H.DatasetError, match="tench"):
        H.load_classification_split(root, "val", classes, strict=True)
    with pytest.raises(H.DatasetError, match="n02102040"):
        H.load_classification_split(root, "val", [c for c in classes if c != "English springer"], strict=False)


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------
def test_download_failure_explains_the_manual_steps(tmp_path, monkeypatch):
    gdown = pytest.importorskip("gdown")
    calls = []

    def fail(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(gdown, "download", fail)
    with pytest.raises(RuntimeError) as info:
        H.download_data(tmp_path / "data")
    message = str(info.value)
    assert "Manual steps" in message and H.COURSE_ZIP_DRIVE_ID in message
    assert "ConnectionError" in message and "network unreachable" in message
    assert len(calls) == 1 and calls[0].get("id") == H.COURSE_ZIP_DRIVE_ID


def test_download_gdown_returning_nothing_is_an_error(tmp_path, monkeypatch):
    gdown = pytest.importorskip("gdown")
    monkeypatch.setattr(gdown, "download", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="Manual steps"):
        H.download_data(tmp_path / "data", drive_id="abc123")


def test_download_skipped_when_the_folders_exist(tmp_path, monkeypatch):
    gdown = pytest.importorskip("gdown")
    calls = []
    monkeypatch.setattr(gdown, "download", lambda *a, **k: calls.append(k))
    for name in H.dataset_folders():
        (tmp_path / name).mkdir()
    assert H.download_data(tmp_path) == tmp_path
    assert calls == []


def test_download_unpacks_nested_zip(tmp_path, monkeypatch):
    gdown = pytest.importorskip("gdown")

    def fake_download(id, output, quiet):  # noqa: A002 - gdown's keyword
        with zipfile.ZipFile(output, "w") as zf:
            for name in H.dataset_folders():
                zf.writestr(f"course/data/{name}/train/marker.txt", name)
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    root = H.download_data(tmp_path / "data")
    for name in H.dataset_folders():
        assert (root / name / "train" / "marker.txt").read_text() == name
    assert not (root / "course_data.zip").exists() and not (root / "_unzipped").exists()


# --------------------------------------------------------------------------------------------------
# the real mini-datasets (development machines only)
# --------------------------------------------------------------------------------------------------
@requires_shared_data
def test_real_datasets_counts_classes_and_overlap():
    with pytest.warns(UserWarning, match="000000323751.jpg"):
        summary = H.check_dataset(SHARED_DATA)
    for task in H.TASKS:
        assert summary[task]["counts"] == {"train": 240, "val": 60}, task
    # detection classes from our own count of the train JSON: non-crowd boxes, most first, ties by name
    train = json.loads((SHARED_DATA / "mini_coco_det" / "train" / "labels.json").read_text())
    counts = non_crowd_counts(train)
    expected = sorted(counts, key=lambda n: (-counts[n], n))[:10]
    # the eleventh class has strictly fewer boxes than the tenth: the set of ten is unambiguous
    assert counts[expected[-1]] > sorted(counts.values(), reverse=True)[10]
    classes = summary["det"]["classes"]
    assert classes == expected
    assert classes[0] == "person"
    assert set(classes) == {"person", "car", "book", "chair", "bottle", "cup", "bowl", "suitcase", "backpack", "handbag"}
    assert sum(a.get("iscrowd", 0) for a in train["annotations"]) > 0
    assert summary["det"]["boxes"]["train"] == sum(counts[n] for n in classes)
    assert summary["det"]["layout"] == "fiftyone"
    assert len(summary["det"]["overlap"]) == 5 and "000000323751.jpg" in summary["det"]["overlap"]
    assert summary["seg"]["overlap"] == [] and summary["cls"]["overlap"] == []
    assert summary["cls"]["classes"] == [H.IMAGENETTE_CLASSES[w] for w in sorted(H.IMAGENETTE_CLASSES)]
    assert summary["seg"]["layout"] == "flat"


# --------------------------------------------------------------------------------------------------
# tools/holdout_split.py: train images held out as a val split no model of the run trains on
# --------------------------------------------------------------------------------------------------
def _holdout_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("holdout_split", Path(H.__file__).parent / "tools" / "holdout_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_holdout_split_moves_the_last_train_images_to_val_with_their_labels(syn, tmp_path):
    layout, root = syn
    record = _holdout_tool().holdout_split(root, tmp_path / "held", hold=10)
    for task in ("det", "seg", "cls"):
        source = H.load_task(root, task, "train")
        train = H.load_task(tmp_path / "held", task, "train", source.class_names)
        val = H.load_task(tmp_path / "held", task, "val", source.class_names)
        by_file = {s["file"]: s for s in source.samples}
        assert len(train) + len(val) == len(source) and len(val) == 10
        assert {s["file"] for s in train.samples}.isdisjoint(s["file"] for s in val.samples)
        assert sorted(record["held_out"][task]) == sorted(s["file"] for s in val.samples)
        if task != "cls":  # the last ten in the loader's order, the rest in the same order
            assert [s["file"] for s in val.samples] == [s["file"] for s in source.samples[-10:]]
            assert [s["file"] for s in train.samples] == [s["file"] for s in source.samples[:-10]]
        else:  # one of each class (3 per class in train): every class held out alike
            assert sorted(s["label"] for s in val.samples) == list(range(10))
        for s in train.samples + val.samples:  # every image keeps its pixels and labels
            original = by_file[s["file"]]
            assert torch.equal(s["image"], original["image"])
            for key in ("boxes", "labels", "mask", "label"):
                if key in s:
                    assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(original[key])), (task, key)
    det_source = H.load_task(root, "det", "train")
    det_val = H.load_task(tmp_path / "held", "det", "val", det_source.class_names)
    held_ids = {s["image_id"] for s in det_source.samples[-10:]}
    assert len(det_val.coco_gt["annotations"]) == sum(
        1 for a in json.loads(det_json(root, layout, "train").read_text())["annotations"]
        if a["image_id"] in held_ids and a["category_id"] in det_val.category_ids)  # COCOeval's ground truth moves
    # with its images (crowd too)


def test_holdout_split_refuses_what_it_cannot_do(synthetic_root, tmp_path):
    tool = _holdout_tool()
    with pytest.raises(H.DatasetError, match=r"labels\.json: cannot hold out 32 of its 32"):
        tool.holdout_split(synthetic_root, tmp_path / "a", hold=32, tasks=["det"])
    with pytest.raises(H.DatasetError, match="must be a multiple of its 10 class folders"):
        tool.holdout_split(synthetic_root, tmp_path / "b", hold=15, tasks=["cls"])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        tool.holdout_split(synthetic_root, tmp_path / "c", hold=4)
