"""The reviewers' command: score a UniHead checkpoint on a data split.

    python eval.py --weights runs/full/final.pt --data_root data --tasks all
    python eval.py --weights final.pt --data_root data --tasks det,seg --split test --out metrics.json
    python eval.py --weights final.pt --data_root data --save-predictions preds/

Prints mAP@[.5:.95], mAP@0.5, mIoU and Top-1. The checkpoint carries its config and class lists, so
nothing else is needed. A missing or incompatible checkpoint or a bad data root ends with a one-line
error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import helpers as H


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint written by a run (final.pt)")
    p.add_argument("--data_root", "--data-root", default="data",
                   help="folder holding mini_coco_det/, mini_voc_seg/, imagenette_160/")
    p.add_argument("--tasks", default="all", help="'all' or a comma list of det,seg,cls")
    p.add_argument("--split", default="val", help="split folder to score (val, test, ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--out", default=None, help="write metrics JSON here (keys det.map, det.map50, seg.miou, cls.top1, ...)")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="write detections.json (COCO results), segmentation/*.png, classification.csv")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tasks = list(H.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in H.TASKS]
    if unknown or not tasks:
        fail(f"--tasks {args.tasks!r}: unknown task(s) {unknown}; use all or a comma list of {','.join(H.TASKS)}")
    device = H.pick_device(H.Config(device=args.device))
    try:
        model, cfg, payload = H.load_checkpoint(args.weights, device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if args.batch_size:
        cfg.batch_size = args.batch_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = {t: H.load_task(args.data_root, t, args.split, payload["det_classes"], strict_classes=False)
                    for t in tasks}
    except H.DatasetError as exc:
        fail(f"bad data root: {exc}")
    t0 = time.time()
    metrics = H.evaluate(model, data, cfg, device, tasks, keep_predictions=bool(args.save_predictions))
    predictions = metrics.pop("predictions", None)
    print(f"UniHead checkpoint {args.weights} | split {args.split} | {H.describe_device(device)} | "
          f"{time.time() - t0:.1f} s")
    names = {"det.map": "mAP@[.5:.95]", "det.map50": "mAP@0.5", "seg.miou": "mIoU", "cls.top1": "Top-1"}
    for key, value in H.headline(metrics).items():
        print(f"{names[key]:>14}: {value:.4f}")
    result = {**metrics, "split": args.split, "weights": str(args.weights),
              "det_classes": payload["det_classes"], "seg_classes": payload["seg_classes"],
              "cls_classes": payload["cls_classes"]}
    if args.out:
        H.write_json(result, Path(args.out))
        print(f"metrics written to {args.out}")
    if args.save_predictions:
        written = H.save_predictions(predictions, data, args.save_predictions)
        print("predictions written: " + ", ".join(str(p) for p in written.values()))
    return result


if __name__ == "__main__":
    main()
