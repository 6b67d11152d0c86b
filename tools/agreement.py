"""How far models' outputs lie from a reference model's on the same images: a check that needs no labels, so
it can be made on images no model of the comparison trained on, and never on val.

The assignment's rule is a paired comparison: each task's final score against its single-task baseline's on the
same 60 images. A method meant to bring a task's outputs closer to its baseline's (distillation from the baseline,
say) is judged here by whether it does, on images outside val:

    # classification's held stage with and without its expert, on 60 train images held out of training
    python tools/agreement.py cls-expert-seed1 --task cls --data_root data_holdout --split val \
        --reference results/experiments/cls-holdout/h-base-keep-seed1/weights.pt \
        results/experiments/cls-holdout/h-s3-default-seed1/weights.pt \
        results/experiments/cls-holdout/h-s3-expert1-seed1/weights.pt --out results/experiments/cls-holdout
    # classification outputs against the ImageNet teacher's (its top-1 is reference_top1)
    python tools/agreement.py cls-teacher-holdout --task cls --data_root data_holdout --split val \
        --reference imagenet results/experiments/cls-holdout/h2-s3-default-seed1/weights.pt --out DIR
    # detection outputs on Imagenette's train images (no detector trained on them), read at detection's size
    # (seg:train: VOC's, whose objects are mostly COCO classes; the method replays them, without detection labels)
    python tools/agreement.py det-expert-seed1 --task det --images cls:train --data_root data \
        --reference runs/quick-seed1/single_task/det/weights.pt A.pt B.pt --out results/experiments/stage2

Classification: share of images whose predicted class is the reference's, mean KL(reference || model) of the
class probabilities, and where the images carry labels top-1 and cross-entropy. Detection: the method's own
detection distillation loss of the model against the reference (heatmap Bernoulli KL over the cells, GIoU to its
confident boxes) and the mean absolute difference of heatmap probabilities. Outputs as scored (flip test as the
reference's config says). Writes <out>/<name>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def image_batches(data: H.TaskData, cfg: H.Config, task: str) -> list[dict]:
    """The split's evaluation batches, read as `task`'s images are: another task's images at that task's size
    (classification images for detection: short side resized to image_size, centre crop; segmentation images for
    detection: square-resized at detection's eval scale)."""
    if data.task != task and data.task == "cls":
        cfg = dataclasses.replace(cfg, cls_image_size=H.eval_side(cfg, task))
    elif data.task != task and {data.task, task} == {"seg", "det"}:  # both square-resized: at the task's scale
        cfg = dataclasses.replace(cfg, eval_scale={**cfg.eval_scale, data.task: cfg.eval_scale.get(task, 1.0)})
    elif data.task != task:
        raise ValueError(f"{task} outputs on {data.task} images: classification images stand for any task's, "
                         "segmentation's and detection's for each other's")
    return list(H.make_loader(data, dataclasses.replace(cfg, num_workers=0), train=False, drop_last=False))


@torch.no_grad()
def task_outputs(model: H.UniHeadNet, batches: list[dict], *, flip_test: bool = False) -> list[dict]:
    """The model's outputs as scored (eval mode), one dict per batch."""
    model.eval()
    return [model.predict(batch["image"], flip_test=flip_test) for batch in batches]


IMAGENET_REFERENCE = "imagenet"  # --reference: the ImageNet teacher instead of a weights file


@torch.no_grad()
def imagenet_outputs(teacher: H.ImageNetTeacher, batches: list[dict], *, flip_test: bool = False) -> list[dict]:
    """The ImageNet teacher's logits of the classes, as a model's classification outputs (`task_outputs`); with the
    flip test the mean of its logits on the image and on its mirror image, as the models' are scored."""
    outputs = []
    for batch in batches:
        x = batch["image"]
        logits = (teacher(x) + teacher(x.flip(-1))) / 2 if flip_test else teacher(x)
        outputs.append({"cls": logits})
    return outputs


def disagreement(outputs: list[dict], reference: list[dict], batches: list[dict], task: str, *,
                 det_kd_conf: float = 0.3) -> dict[str, float]:
    """Distance of a model's `task` outputs from the reference model's (`task_outputs` of each over the batches)."""
    if task == "cls":
        s = torch.cat([o["cls"].float() for o in outputs])
        r = torch.cat([o["cls"].float() for o in reference])
        out = {"images": len(s), "top1_agreement": float((s.argmax(1) == r.argmax(1)).float().mean()),
               "kl_from_reference": float(H.kd_kl(s, r, temperature=1.0))}
        if all("label" in batch for batch in batches):
            y = torch.cat([batch["label"] for batch in batches])
            out.update(top1=float((s.argmax(1) == y).float().mean()), nll=float(F.cross_entropy(s, y)),
                       reference_top1=float((r.argmax(1) == y).float().mean()))
        return out
    if task == "det":
        sizes = [len(batch["image"]) for batch in batches]
        kd = sum(n * float(H.detection_distillation_loss(o, r, det_kd_conf))
                 for n, o, r in zip(sizes, outputs, reference))
        heat = sum(n * float((o["det_heatmap"].float().sigmoid() - r["det_heatmap"].float().sigmoid()).abs().mean())
                   for n, o, r in zip(sizes, outputs, reference))
        return {"images": sum(sizes), "distillation_loss": kd / sum(sizes), "heatmap_abs_diff": heat / sum(sizes)}
    raise ValueError(f"no agreement measure for task {task!r} (cls, det)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="name of the record (<out>/<name>.json)")
    p.add_argument("models", nargs="+", help="weights.pt or final.pt files to compare with the reference")
    p.add_argument("--task", required=True, choices=("cls", "det"), help="whose outputs are compared")
    p.add_argument("--reference", required=True,
                   help="the reference model's weights (e.g. the single-task baseline); with --task cls, 'imagenet': "
                        "the backbone's own pretrained ImageNet classifier (the ImageNet teacher, of the first model's "
                        "config), its logits of the 10 classes")
    p.add_argument("--data_root", required=True)
    p.add_argument("--images", default=None, metavar="TASK:SPLIT",
                   help="whose images (default: the task's own, --split); cls:train reads Imagenette's train images, "
                        "seg:train VOC's")
    p.add_argument("--split", default="val", help="split of the task's own images (with --images: ignored)")
    p.add_argument("--out", default=str(ROOT / "results" / "experiments"))
    args = p.parse_args(argv)
    image_task, split = (args.images.split(":") if args.images else (args.task, args.split))
    if args.images and image_task == args.task and split == "val":
        raise SystemExit("--images names the task's own val: compare on images outside val")
    if args.reference == IMAGENET_REFERENCE and args.task != "cls":
        raise SystemExit("--reference imagenet is the ImageNet classifier: it gives classification outputs only")
    imagenet = args.reference == IMAGENET_REFERENCE
    # the config (sizes, flip test) is the reference's, or with the ImageNet teacher the first model's: loaded once
    first = H.load_checkpoint(args.models[0], "cpu") if imagenet else None
    reference, cfg, _ = first or H.load_checkpoint(args.reference, "cpu")
    data = H.load_all(args.data_root, [image_task], (split,), verbose=False)[image_task][split]
    batches = image_batches(data, cfg, args.task)
    if imagenet:
        reference = H.ImageNetTeacher(cfg.backbone, cfg.backbone_weights, data.class_names)
        reference_outputs = imagenet_outputs(reference, batches, flip_test=cfg.flip_test)
    else:
        reference_outputs = task_outputs(reference, batches, flip_test=cfg.flip_test)  # once, for every model
    rows = []
    for k, path in enumerate(args.models):
        model = first[0] if first and k == 0 else H.load_checkpoint(path, "cpu")[0]
        outputs = task_outputs(model, batches, flip_test=cfg.flip_test)
        row = {"model": path, **disagreement(outputs, reference_outputs, batches, args.task,
                                             det_kd_conf=cfg.det_kd_conf)}
        print(json.dumps(row))
        rows.append(row)
    record = {"name": args.name, "task": args.task, "reference": args.reference, "data_root": args.data_root,
              "images": f"{image_task}:{split}", "flip_test": cfg.flip_test, "date": dt.date.today().isoformat(),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
