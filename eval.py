"""The reviewers' command: score a UniHead checkpoint on a data split.

    python eval.py --weights runs/full/final.pt --data_root data --tasks all
    python eval.py --weights final.pt --data_root data --tasks det,seg --split test --out metrics.json
    python eval.py --weights final.pt --data_root data --save-predictions preds/
    python eval.py --weights final.pt --data_root data --tasks det --score-thresh 0.001

Prints mAP@[.5:.95], mAP@0.5, mIoU and Top-1. The checkpoint carries its config and class lists, so
nothing else is needed. Every problem found before the evaluation (a missing or incompatible checkpoint,
a bad data root, an unknown task, a device that is not there, an --out that cannot be written, a score
threshold outside [0, 1)) ends with a one-line error and exit status 2. Detection classes of the checkpoint
that the split has no category for are named in one line and left out of the mAP (or, with
--strict-classes, end the run with status 2).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

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
    p.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                   help="average the outputs on each image and its mirror image (default: as the checkpoint's run "
                        "scored it, its config's flip_test)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="detection peaks at or below this score are dropped before NMS (default: the checkpoint's "
                        "config, score_thresh; 0 keeps the best 2 x max_dets peaks of each image)")
    p.add_argument("--strict-classes", action="store_true",
                   help="fail (status 2) when the split lacks a detection class of the checkpoint")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_device(name: str) -> torch.device:
    try:
        device = H.pick_device(H.Config(device=name))
    except RuntimeError as exc:
        fail(f"--device {name!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name!r}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_writable(path: str | None, what: str) -> None:
    """Fail now, not after the evaluation, when `path` cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir() and what == "--out":
        fail(f"{what} {path}: is a folder; give a file name")
    folder = target if what == "--save-predictions" else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".eval-write-test-{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"{what} {path}: cannot be written ({exc.strerror or exc})")


def load_data(args, tasks: list[str], payload: dict) -> dict:
    """The split of each task, labelled with the checkpoint's class lists; missing detection classes are
    named in one line (or fail with --strict-classes)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            data = {t: H.load_task(args.data_root, t, args.split, payload["classes"][t], strict=args.strict_classes)
                    for t in tasks}
    except H.DatasetError as exc:
        fail(f"bad data root: {exc}")
    for w in caught:
        if "no category named" in str(w.message):
            print(f"note: {w.message}", file=sys.stderr)
    return data


def main(argv=None) -> dict:
    args = parse_args(argv)
    tasks = list(H.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in H.TASKS]
    if unknown or not tasks:
        fail(f"--tasks {args.tasks!r}: unknown task(s) {unknown}; use all or a comma list of {','.join(H.TASKS)}")
    if args.score_thresh is not None and not 0.0 <= args.score_thresh < 1.0:
        fail(f"--score-thresh {args.score_thresh}: a detection score threshold is in [0, 1)")
    device = check_device(args.device)
    check_writable(args.out, "--out")
    check_writable(args.save_predictions, "--save-predictions")
    try:
        model, cfg, payload = H.load_checkpoint(args.weights, device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.flip_test is not None:
        cfg.flip_test = args.flip_test
    if args.score_thresh is not None:
        cfg.score_thresh = args.score_thresh
    data = load_data(args, tasks, payload)
    t0 = time.time()
    metrics = H.evaluate(model, data, cfg, device, tasks=tasks, keep_predictions=bool(args.save_predictions))
    predictions = metrics.pop("predictions", None)
    sides = H.scoring_settings(cfg, tasks)["eval_sides"]
    print(f"UniHead checkpoint {args.weights} | split {args.split} | {H.describe_device(device)} | "
          f"flip test {'on' if cfg.flip_test else 'off'}"
          f"{''.join(f' | {t} images at {side} px' for t, side in sides.items())}"
          f"{f' | score threshold {cfg.score_thresh:g}' if 'det' in tasks else ''} | {time.time() - t0:.1f} s")
    names = {"det.map": "mAP@[.5:.95]", "det.map50": "mAP@0.5", "seg.miou": "mIoU", "cls.top1": "Top-1"}
    for key, value in H.headline(metrics).items():
        print(f"{names[key]:>14}: {value:.4f}")
    result = {**metrics, "split": args.split, "weights": str(args.weights), "classes": payload["classes"],
              "scored_with": H.scoring_settings(cfg, tasks)}
    if args.out:
        H.write_json(result, Path(args.out))
        print(f"metrics written to {args.out}")
    if args.save_predictions:
        written = H.save_predictions(predictions, args.save_predictions)
        print("predictions written: " + ", ".join(str(p) for p in written.values()))
    return result


if __name__ == "__main__":
    main()
