"""How sure is a run's verdict under the 5 % rule? A paired bootstrap over the val images.

    python tools/rule_bootstrap.py runs/quick-seed0 --data_root data            # 500 resamples
    python tools/rule_bootstrap.py runs/quick-seed0 --data_root data --resamples 200 --seed 1

The reviewers' hidden test sets have 60 images per task, like val: a PASS or FAIL on 60 images is one draw.
Each resample draws the task's val images with replacement, the same draw for the final model and for the
task's single-task baseline (a paired comparison), and scores both with the project's own metrics (COCOeval,
confusion-matrix mIoU, top-1). The spread of the relative drop, and how often it stays within 5 %, say how far
the verdict is from the other side. Needs the run's folder as training left it: final.pt, the first stage's
weights (the first task's baseline) and single_task/<task>/weights.pt. Writes <run>/rule_bootstrap.json and
prints a table. It chooses nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def baseline_weights(run: Path, cfg: H.Config, task: str) -> Path:
    """Where a run keeps the task's single-task baseline: stage 1 itself for the first task."""
    if task == cfg.order[0]:
        return run / cfg.strategy / f"stage1_{task}" / "weights.pt"
    return run / "single_task" / task / "weights.pt"


def per_image_scores(model: H.UniHeadNet, task: str, val: H.TaskData, cfg: H.Config) -> list:
    """What each val image contributes to the task's metric, in the order of val.samples: detection's COCO
    results of the image, segmentation's confusion matrix, classification's 1 (right) or 0."""
    predictions = H.evaluate(model, {task: val}, cfg, tasks=[task], keep_predictions=True)["predictions"][task]
    position = {s["file"]: i for i, s in enumerate(val.samples)}
    if task == "det":
        by_image = {s["image_id"]: [] for s in val.samples}
        for result in predictions:
            by_image[result["image_id"]].append(result)
        return [by_image[s["image_id"]] for s in val.samples]
    if task == "seg":
        matrices = [None] * len(val.samples)
        for file, pred in predictions:
            matrices[position[file]] = H.confusion_matrix(pred, val.samples[position[file]]["mask"])
        return matrices
    right = [0] * len(val.samples)
    for file, name in predictions:
        right[position[file]] = int(val.class_names[val.samples[position[file]]["label"]] == name)
    return right


def score_draw(task: str, val: H.TaskData, contributions: list, draw: np.ndarray) -> float:
    """The task's metric over the drawn images (an image drawn twice counts twice)."""
    if task == "seg":
        return H.segmentation_metrics(sum(contributions[i] for i in draw), val.class_names)["miou"]
    if task == "cls":
        return float(np.mean([contributions[i] for i in draw]))
    gt = copy.deepcopy({k: v for k, v in val.coco_gt.items() if k not in ("images", "annotations")})
    gt["images"], gt["annotations"], results = [], [], []
    by_image: dict = {}
    for a in val.coco_gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    info = {im["id"]: im for im in val.coco_gt["images"]}
    for new_id, i in enumerate(draw.tolist(), start=1):  # a drawn copy is a new image: its own id
        old_id = val.samples[i]["image_id"]
        gt["images"].append({**info[old_id], "id": new_id})
        gt["annotations"] += [{**a, "image_id": new_id, "id": len(gt["annotations"]) + k + 1}
                              for k, a in enumerate(by_image.get(old_id, []))]
        results += [{**r, "image_id": new_id} for r in contributions[i]]
    return H.detection_metrics(gt, results, val.class_names)["map"]


def bootstrap_rule(run: Path, data_root: str, resamples: int = 500, seed: int = 0) -> dict:
    final, cfg, _ = H.load_checkpoint(run / "final.pt")
    cfg.data_root, cfg.download, cfg.num_workers = data_root, False, 0
    data = H.prepare_data(cfg, splits=("val",), verbose=False)
    rng = np.random.default_rng(seed)
    out = {"run": str(run), "resamples": resamples, "seed": seed, "tasks": {}}
    for task in cfg.order:
        val = data[task]["val"]
        base_model, _, _ = H.load_checkpoint(baseline_weights(run, cfg, task))
        final_parts = per_image_scores(final, task, val, cfg)
        base_parts = per_image_scores(base_model, task, val, cfg)
        everything = np.arange(len(val.samples))
        base_value, final_value = (score_draw(task, val, p, everything) for p in (base_parts, final_parts))
        drops = []
        for _ in range(resamples):
            draw = rng.integers(0, len(val.samples), len(val.samples))
            b, f = score_draw(task, val, base_parts, draw), score_draw(task, val, final_parts, draw)
            drops.append(100 * (b - f) / b if b > 0 else float("nan"))
        drops = np.array([d for d in drops if np.isfinite(d)])
        out["tasks"][task] = {"metric": H.TASK_METRIC[task], "images": len(val.samples), "baseline": base_value,
                              "final": final_value, "drop_rel_pct": 100 * (base_value - final_value) / base_value,
                              "drop_rel_pct_p05": float(np.percentile(drops, 5)),
                              "drop_rel_pct_p95": float(np.percentile(drops, 95)),
                              "share_within_5pct": float(np.mean(H.within_rule(drops))), "valid_resamples": int(drops.size)}
    H.write_json(out, run / "rule_bootstrap.json")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's folder as training left it (final.pt and stage weights)")
    parser.add_argument("--data_root", default="data", help="holds mini_coco_det/, mini_voc_seg/, imagenette_160/")
    parser.add_argument("--resamples", type=int, default=500, help="bootstrap draws of the val images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    out = bootstrap_rule(args.run, args.data_root, args.resamples, args.seed)
    print(f"{out['run']}: paired bootstrap, {out['resamples']} draws of the val images")
    print("task | metric | baseline | final | drop (rel.) | 90 % interval of the drop | share of draws within 5 %")
    for task, r in out["tasks"].items():
        print(f"{task} | {r['metric']} | {r['baseline']:.4f} | {r['final']:.4f} | {r['drop_rel_pct']:.1f} % | "
              f"{r['drop_rel_pct_p05']:.1f} to {r['drop_rel_pct_p95']:.1f} % | {r['share_within_5pct']:.2f}")


if __name__ == "__main__":
    main()
