"""One training stage as a measured experiment: the unit of the ablations behind the recipe.

    # single-task detection from the ImageNet backbone, quick profile, one factor changed
    python tools/experiment.py det-light-aug --task det --set augment='{"det": "light"}'
    # a later stage from saved weights, with replay and distillation of the earlier tasks
    python tools/experiment.py s3-lpft --task cls --init runs/quick/full/stage2_det/weights.pt --earlier seg,det
    # a later stage with parts of the saved weights put back to their initial state (of backbone, neck, head)
    python tools/experiment.py s2-fresh-head --task det --init runs/quick/full/stage1_seg/weights.pt --earlier seg --reset neck,head
    # saved weights scored again, no training: detection read at 1.25 x image_size (scoring settings only)
    python tools/experiment.py final-det125 --task det --score-only results/quick-seed0/final.pt \
        --set eval_scale='{"det": 1.25}'
    # the table of every experiment in a folder
    python tools/experiment.py --table results/experiments/det

Each run writes <out>/<name>.json (overrides, the whole config, device, date, commit, the val metrics of the
last epoch with per-class AP50, train images/s: a speed figure only when nothing else ran) and
<out>/<name>/log.csv. Nothing is chosen on val: the
stage's last epoch is what is scored. --set takes config fields as key=JSON (strings may be bare).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def images_per_step(cfg: H.Config, task: str, earlier: list[str], replay: bool) -> int:
    """Training images one step reads: the batch, plus the replayed ones where the stage replays (a stage that
    holds every earlier task does not)."""
    replays = replay and bool(earlier) and not H.holds_earlier_tasks(cfg, task, earlier, replay)
    return cfg.batch_size + (cfg.replay_per_task * len(earlier) if replays else 0)


def run(args: argparse.Namespace) -> dict:
    if args.expert and not (args.init and args.earlier and not args.naive):
        raise SystemExit("--expert needs --init and --earlier (and no --naive): the expert is distilled in the "
                         "method's later stages only")
    if args.reset and not args.init:
        raise SystemExit("--reset needs --init: without it every part already starts in its initial state")
    overrides = parse_overrides(args.set)
    cfg = H.make_config(args.profile, data_root=args.data_root, seed=args.seed,
                        out_dir=str(Path(args.out) / args.name), **overrides)
    if args.expert and not cfg.single_task_teacher_weight.get(args.task, 0.0) > 0:
        raise SystemExit(f"--expert needs a weight for it: --set single_task_teacher_weight='{{\"{args.task}\": 3}}' "
                         f"(the {args.profile} profile's is {cfg.single_task_teacher_weight.get(args.task, 0.0)})")
    data = H.prepare_data(cfg, verbose=False)
    device = H.pick_device(cfg)
    model = H.initial_model(cfg, device)
    earlier = [t for t in args.earlier.split(",") if t]
    teacher, replay = None, bool(earlier) and not args.naive  # naive: earlier tasks are only scored
    if args.init:
        width = H.read_checkpoint(args.init).get("width", model.width)
        if width != model.width:  # an earlier stage grew the neck and head: the same start, grown alike
            H.grow_neck_head(model, width - model.width)
        H.load_weights(model, args.init)
        teacher = H.freeze_teacher(model) if replay else None  # the earlier stage's model, before any reset
        H.reset_to_initial(model, cfg, [p for p in args.reset.split(",") if p])
    # redrawn and grown as the pipeline's run_stage_cached starts the stage
    H.start_stage(model, args.task, cfg, earlier=earlier, replay=replay, seed=cfg.seed + args.seed_offset)
    stage_dir = Path(cfg.out_dir)
    for stale in ("last.pt", "log.csv"):
        (stage_dir / stale).unlink(missing_ok=True)
    t0 = time.time()
    expert = H.freeze_teacher(H.load_checkpoint(args.expert, device)[0]) if args.expert else None
    record = H.train_stage(model, args.task, data, cfg, stage_dir, earlier=earlier, teacher=teacher,
                           replay=replay, device=device, lr_scale=cfg.lr_scale[args.task],
                           seed=cfg.seed + args.seed_offset, label=args.name, expert=expert)
    wall = time.time() - t0
    tasks = [args.task] + earlier
    metrics = H.evaluate(model, {t: data[t]["val"] for t in tasks}, cfg, device, tasks=tasks)
    train_seconds = sum(r["train_seconds"] for r in record["history"])
    steps = len(record["history"]) * len(H.make_loader(data[args.task]["train"], cfg, train=True))
    result = {"name": args.name, "task": args.task, "init": args.init, "reset": args.reset, "earlier": earlier,
              "expert": args.expert,
              "overrides": overrides,
              "profile": cfg.profile, "seed": cfg.seed, "device": H.describe_device(device),
              "precision": record["precision"], "date": dt.date.today().isoformat(), "commit": git_commit(),
              "config": cfg.to_dict(),
              "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)},
              "naive": args.naive,
              "train_images_per_s": steps * images_per_step(cfg, args.task, earlier, replay) / train_seconds,
              "train_seconds": train_seconds, "wall_seconds": wall, "history": record["history"]}
    H.write_json(result, Path(args.out) / f"{args.name}.json")
    if args.keep_weights:
        H.save_checkpoint(stage_dir / "weights.pt", model, cfg, H.data_classes(data))
    print(json.dumps({"name": args.name, **H.headline(metrics)}))
    return result


def score_only(args: argparse.Namespace) -> dict:
    """Saved weights scored on val with --set overriding only how they are scored (eval_scale, flip_test, ...) or
    stored (final_precision: the weights rounded as final.pt would hold them): a record like a trained one, its
    training config the checkpoint's and no history."""
    model, cfg, payload = H.load_checkpoint(args.score_only)
    if args.backbone_from:  # where a stage's forgetting lives: these weights on another checkpoint's backbone
        donor = H.read_checkpoint(args.backbone_from)["model"]  # its weights only: no second model to build
        model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in donor.items()
                                        if k.startswith("backbone.")})
    overrides = parse_overrides(args.set)
    unknown = sorted(set(overrides) - set(H.SCORING_FIELDS) - {"final_precision"})
    if unknown:
        raise SystemExit(f"--score-only changes how weights are scored, not trained: {unknown} are training fields")
    if "final_precision" in overrides:  # the weights as a final.pt at that precision would store them
        H.round_to_storage(model, overrides["final_precision"])
    fields = cfg.to_dict()
    H._layer(fields, {**overrides, "data_root": args.data_root})  # as make_config layers them: partial dicts too
    cfg = H.Config(**fields)
    tasks = [args.task] + [t for t in args.earlier.split(",") if t]
    data = {t: H.load_task(args.data_root, t, "val", payload["classes"][t]) for t in tasks}
    metrics = H.evaluate(model, data, cfg, tasks=tasks)
    result = {"name": args.name, "task": args.task, "init": args.score_only, "reset": "", "earlier": tasks[1:],
              "expert": None, "overrides": overrides, "scored_only": True, "data_root": args.data_root,
              "backbone_from": args.backbone_from,
              "scored_with": H.scoring_settings(cfg, tasks),
              "profile": cfg.profile, "seed": cfg.seed, "device": H.describe_device(next(model.parameters()).device),
              "date": dt.date.today().isoformat(), "commit": git_commit(), "config": cfg.to_dict(),
              "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)}, "history": []}
    H.write_json(result, Path(args.out) / f"{args.name}.json")
    print(json.dumps({"name": args.name, **H.headline(metrics)}))
    return result


COLUMNS = [("det.map", "mAP"), ("det.map50", "mAP@0.5"), ("seg.miou", "mIoU"), ("cls.top1", "Top-1")]


def watched_tail(record: dict, key: str, n: int = 3) -> float | None:
    """Mean of the stage's own metric over its last n watched evaluations: a less noisy reading of where a
    recipe ends on 60 val images than the last epoch alone (nothing is chosen by it)."""
    values = [h[key] for h in record["history"] if h.get(key) is not None][-n:]
    return sum(values) / len(values) if values else None


def folder_records(folder: Path) -> list[dict]:
    """Every JSON record in the folder: experiments (with 'metrics') and agreement records (with 'rows')."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def agreement_table(records: list[dict]) -> str:
    """A folder's agreement records (`folder_records`; tools/agreement.py): each model's distance from a reference
    model's outputs on images outside val; '' when it has none."""
    lines = []
    for r in (r for r in records if "rows" in r):
        keys = [k for k in r["rows"][0] if k not in ("model", "images")]
        lines += [f"Agreement `{r['name']}` ({r['task']} outputs against {r['reference']}, {r['rows'][0]['images']} "
                  f"images {r['images']} of {r['data_root']}, {r['date']}):", "",
                  "| model | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        lines += [f"| {row['model']} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |" for row in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    """The Markdown table of a folder's experiment records (`folder_records`)."""
    rows = [r for r in records if "metrics" in r]
    rows.sort(key=lambda r: (r["task"], r.get("date", ""), r["name"]))
    present = [(k, t) for k, t in COLUMNS if any(k in r["metrics"] for r in rows)]
    lines = ["| experiment | changes | seed | " + " | ".join(t for _, t in present)
             + " | own metric, mean of last 3 watched | device | date | commit |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in present) + " | ---: | --- | --- | --- |"]
    for r in rows:
        changes = ", ".join([f"{k}={json.dumps(v)}" for k, v in r["overrides"].items()]
                            + (["no replay or distillation (naive)"] if r.get("naive") else [])
                            + ([f"{r['reset']} reset to the initial state"] if r.get("reset") else [])
                            + (["expert: the seed's single-task model"] if r.get("expert") else [])
                            + ([f"no training: {r['init']} scored"
                                + (f" with the backbone of {r['backbone_from']}" if r.get("backbone_from") else "")
                                + (f" on {r['data_root']}'s val" if "data_root" in r else "")]
                               if r.get("scored_only") else [])
                            ) or "(profile defaults)"
        values = " | ".join(f"{r['metrics'][k]:.4f}" if r["metrics"].get(k) is not None else "" for k, _ in present)
        tail = watched_tail(r, H.TASK_METRIC[r["task"]])
        lines.append(f"| {r['name']} | {changes} | {r['seed']} | {values} | {'' if tail is None else f'{tail:.4f}'} | "
                     f"{r['device']} | {r['date']} | {r.get('commit', '')} |")
    return "\n".join(lines) + "\n"


SECTIONS = {  # subfolder of results/experiments -> what its experiments compare
    "cls-holdout": "Classification's stage on a held backbone, checked on train images held out of training, not on "
                   "val (tools/holdout_split.py --hold 60 --tasks cls: trained on 180 Imagenette train images, scored "
                   "on the other 60, 6 per class; 2026-12-02, seeds 0 and 1): h-base-*: classification alone; "
                   "h-s3-*: the method's stage 3 from the stage-2 weights of runs/quick-seed0 or -seed1. The rule, "
                   "written before the results: a variant replaces the default (64 fresh channels, ImageNet teacher "
                   "at 0.5) only if its stage 3 scores at least two images more. teacher1: the ImageNet teacher at "
                   "weight 1 in both (alone "
                   "0.983 against 0.950, stage 3 0.900 either way: the gap widens); grow96: 96 fresh channels (0.917 "
                   "against 0.900: one image). Neither adopted. Seed 1 (its stage-2 weights trained on an AMD EPYC): "
                   "alone 0.983, stage 3 0.933, grow96 0.917: the held stage costs three held-out images in both seeds "
                   "(as it costs three val images), and 96 channels gain one in seed 0 and lose one in seed 1. "
                   "Segmentation and detection are the stage-2 figures in every row: a held stage cannot move them. "
                   "Then (2026-12-02, AMD EPYC, same rule): the held stage's schedule. Seed 1 from its stage-2 weights: "
                   "30 epochs instead of 12 (ep30) 0.967 against 0.933, two images: adopted (held_stage_epochs); the "
                   "learning rate x3 (lr3) 0.933 and 224 px images (224) 0.950 not. Seed 0's run folder was gone: "
                   "hr-*-seed0 start from its stage-2 weights recovered from results/quick-seed0/final.pt "
                   "(tools/stage_weights_from_final.py; seed 1's recovered the same way match its saved ones to fp16 "
                   "rounding, and hr-s3-seed0's segmentation and detection are the published final row exactly): the "
                   "default 0.883 (0.900 on the Intel Xeon from the original weights: one image of hardware rounding), "
                   "30 epochs 0.983, six images more. Classification alone for 30 epochs (h-base-ep30-seed1) scores "
                   "0.983, as at 12: the baselines keep 12 epochs, only the held stage, which fits fresh channels on "
                   "fixed features, trains longer. The published runs re-ran that stage at 30 epochs (2026-12-06, "
                   "another AMD EPYC; seed 0 from the recovered weights, seed 1 trained again whole): val top-1 "
                   "0.867 in both seeds, as at 12 epochs. Then (2026-12-07, AMD EPYC) distillation from classification alone "
                   "(the expert, single_task_teacher_weight cls 1) in the held stage, which cannot move the earlier "
                   "tasks: the rule, written before, judges by what it is for, outputs closer to the expert's on the "
                   "held-out images (tools/agreement.py, below: KL from the expert lower). h-base-keep-seed1: "
                   "classification alone on the 180 (the expert, weights kept), 0.983; h-s3-default-seed1 and "
                   "h-s3-expert1-seed1: the held stage from seed 1's stage-2 weights of 2026-12-06 without and with "
                   "it: 0.967 both, the same two images wrong, KL from the expert 0.078 against 0.081: not adopted. "
                   "Then (2026-12-07, AMD EPYC) the ImageNet teacher's weight in the held stage only (the baseline "
                   "keeps 0.5), from the stage-2 weights of the pipelines published that night: the teacher, "
                   "untrained, classifies the 60 held-out images without a miss (imagenet-teacher-holdout, below; "
                   "classification alone 59, the held stage 57-58), so the held stage may gain by leaning on it. The "
                   "rule, written before: the weight with the lowest held-out cross-entropy (nll, below) if 10 % "
                   "under 0.5's with top-1 not lower, confirmed on the other seed. Seed 1 (h2-s3-default, -teacher2, "
                   "-teacher4): nll 0.141 / 0.118 / 0.113, top-1 0.950 each; seed 0 (default, teacher4): 0.157 / "
                   "0.117, 0.967 both: weight 4 adopted (held_stage_cls_teacher_weight). Top-1 did not move on these "
                   "images, so the lower cross-entropy may be calibration as much as ranking; the pipelines' held "
                   "stages trained again with it gave val top-1 0.900 / 0.883 (seeds 0 / 1) against 0.900 / 0.867. "
                   "imagenet-teacher-val: the teacher and the published models on val, read after the choice. Then 60 "
                   "held-stage epochs instead of 30 at weight 4 (teacher4-ep60; rule written before: held-out nll 10 % "
                   "under the 30-epoch run's in seed 1 and lower in seed 0, top-1 not lower in either; "
                   "cls-teacher-epochs): seed 1 nll 0.113 -> 0.106 with top-1 0.950 -> 0.933, seed 0 0.117 -> 0.054 "
                   "with 0.967 -> 0.983: not adopted.",
    "det": "Single-task detection, quick profile (256 px unless stated), 20 epochs: the project's recipe, a plain "
           "reference recipe, the reference with one factor reverted, then additions on top of the base recipe. "
           "e14-320-seed0: 320 px for 14 epochs instead of 256 px for 20, about the same training time (10.5 against "
           "10.9 min alone on the 2-core CPU; the profile's single-task detection of seed 0 scores 0.0278 / 0.0759 "
           "at 256 px, results/quick-seed0 at 04d6cfb).",
    "det384": "Single-task detection at 384 px, 20 epochs (issue 10's criterion: mAP@0.5 >= 0.12 and mAP >= 0.04 in "
              "each of two seeds): the recipe of the day (seed0, seed1), then one factor changed on it: the neck's and "
              "head's learning rate and the backbone's doubled (lr2x), the backbone's stochastic depth off (dc0). flip-seed0, "
              "flip-seed1: the recipe of 2026-11-23 (flip test at evaluation, the default since 185e3c9), the two seeds "
              "trained at the same time with one PyTorch thread each. bf16-384-seed0, bf16-384-seed1: the same, "
              "trained in bf16 autocast on an AMD EPYC with avx512_bf16 (cpu_bf16 'auto' as it was then by default; "
              "from a worktree of a67973f carrying the cpu_bf16 change as it landed; evaluation in fp32 as before).",
    "isolate": "Later stages that hold every earlier task (quick profile, 384 px, seed 0, 2026-12-02; holds_earlier_tasks: "
               "fresh channels, the old ones of neck and head held, later_backbone_lr_scale 0, no replay or "
               "distillation), from the stage-1 weights of runs/quick-seed0 (mIoU 0.5077): s2-iso128-*: detection on "
               "128 fresh channels and a held backbone, run in training mode (stochastic depth on) and as in "
               "evaluation (evalbb, the default since); detection alone from the ImageNet weights scored 0.0405 / "
               "0.1243 (results/quick-seed0 single_task): a held backbone costs detection 43 %, so detection's stage "
               "trains it. s2-free128-seed0: the other end, detection's stage with the old channels held and its "
               "backbone free (no replay, no distillation, its loss at 1): mAP 0.0327, and segmentation falls to "
               "0.415 through the backbone alone; the method's stage 2 (replay and distillation of segmentation, "
               "detection's loss at 3; runs/quick-seed0, 2026-12-02) ends at 0.0294 with mIoU 0.503. "
               "s3-iso64-*: classification on 64 fresh channels and a held backbone from "
               "s2-iso128-evalbb's weights: segmentation and detection bit for bit as before it (the same figures); "
               "top-1 0.883 at the profile's 12 epochs, 0.850 at 30 epochs (e30) and at 3x the learning rate (lr3), "
               "against 0.917 for classification alone (results/quick-seed0 single_task). s2-free128-seed1, "
               "s2-free128-imagenetbb-seed1 (2026-12-06, AMD EPYC): the same free stage from seed 1's stage-1 weights "
               "of that day (mIoU 0.4777), and with the ImageNet backbone put back (--reset backbone): mAP / mAP@0.5 "
               "0.0208 / 0.064 and 0.0267 / 0.070 against 0.0466 / 0.138 for detection alone, at the same train loss: "
               "the segmentation-trained backbone costs some of detection, the grown neck and head with the held "
               "segmentation channels most of it (see stage2 s2-isolated-*). s2-ownpath-free-seed1 (2026-12-06, the "
               "path of its own, reads_old_channels det false, the default since 5d3dab3): the same free stage from "
               "the same weights: mAP / mAP@0.5 0.0824 / 0.203 against 0.0333 / 0.096 for the method's stage 2 with "
               "replay and distillation (runs/quick-seed1), segmentation down to 0.445 (stage 1 0.4777); half of that "
               "mAP is the one val box of suitcase (AP 0.5, AP50 1.0): over the other nine classes 0.0360 / 0.115, "
               "against 0.0331 / 0.100 for the method's stage 2 and 0.0332 / 0.116 for detection alone.",
    "storage": "How final.pt's storage (final_precision) moves the scores: seed 1's stage-2 weights of 2026-12-06 "
               "(runs/quick-seed1, detection on a path of its own) rounded as a final.pt at each precision would hold "
               "them and scored (--score-only --set final_precision=...; AMD EPYC): int8-neck-head keeps detection "
               "within 0.0002 mAP of fp16, all int8 (the backbone too) costs 7 %: int8-neck-head is the default since "
               "0337abd (9.2 MB for the 6.61M-parameter final model, 13.4 MB in plain fp16).",
    "seg": "Single-task segmentation (stage 1), quick profile at 256 px, 20 epochs: augmentation.",
    "stage2": "Detection as stage 2 after segmentation (from the same stage-1 weights, 256 px): the method's levers; "
              "seg.miou is the earlier task kept. s2-noprobe-seed1 (2026-12-02, 384 px, the recipe of that day): "
              "from the stage-1 weights of runs/quick-seed1 without the 3-epoch probe of detection's own outputs: "
              "mAP / mAP@0.5 / mIoU 0.0159 / 0.055 / 0.492 against 0.0296 / 0.079 / 0.496 for the same seed's "
              "stage 2 with the probe (results/quick-seed1): the probe stays. s2-default-seed1, s2-ep30-seed1 "
              "(2026-12-06, another AMD EPYC, 06421e3): from the stage-1 weights of seed 1's pipeline trained again "
              "that day (mIoU 0.4777), the recipe as it is and detection's stage at 30 epochs instead of 20: mAP / "
              "mAP@0.5 / mIoU 0.0217 / 0.070 / 0.495 and 0.0235 / 0.078 / 0.507; that pipeline's own stage 2 (same "
              "weights and recipe, another random state) scored 0.0260 / 0.078 / 0.492, and detection alone "
              "0.0466 / 0.138. Both stages stop rising at mAP@0.5 0.07-0.08 from about epoch 8-16 while detection "
              "alone climbs to its last epoch: a longer schedule is not what detection's stage lacks; not adopted. "
              "s2-isolated-seed1, s2-isolated-fresh-noprobe-seed1 (2026-12-06, the same weights): detection's fresh "
              "channels and output rows no longer read the held segmentation channels (reads_old_channels det false); "
              "its output rows zero-started and probed 3 epochs first (the code of that hour), or drawn afresh "
              "without a probe (adopted): mAP / mAP@0.5 / mIoU 0.0360 / 0.125 / 0.483 and 0.0339 / 0.103 / 0.507 "
              "against 0.0217 / 0.070 / 0.495, both still rising in their last epochs like detection alone. "
              "s2-kdcur0-seed1 (2026-12-06 night, 675f2f7's defaults: the path of its own): the same stage without "
              "segmentation's distillation on detection's own images (replay and its distillation kept): 0.0303 / "
              "0.104 / 0.507 against 0.0333 / 0.096 / 0.486 for the pipeline's stage 2 from the same weights; over "
              "the nine classes with more than one val box (suitcase has one) 0.0292 / 0.094 against 0.0331 / 0.100: "
              "detection gains nothing, not adopted. s2-expert1-seed1 (2026-12-07, the same weights, the defaults of "
              "f9039b9): detection's outputs distilled from seed 1's detection alone (the expert, "
              "single_task_teacher_weight det 1) on its own images. The rule, written before the run: adopted if its "
              "detection outputs lie at least 10 % closer to the expert's than the pipeline's stage 2 of 2026-12-06 "
              "does (runs/quick-seed1/full/stage2_det/weights.pt in the tables below; that run folder's stage 2 has "
              "since been trained again with the expert) on "
              "Imagenette's 240 train images, which no detector trained on (tools/agreement.py; agreement tables "
              "below; VOC's train images, replayed without detection labels, as a second reading): distillation "
              "loss against the expert 42.1 -> 18.8 (VOC 17.4 -> 8.3), heatmap |dp| 0.0063 -> 0.0041: adopted. Val, "
              "read after: mAP / mAP@0.5 / mIoU 0.0604 / 0.142 / 0.489 against 0.0333 / 0.096 / 0.486 for the "
              "pipeline's stage 2 and 0.0466 / 0.138 for detection alone; over the nine classes with more than one val "
              "box 0.0487 against 0.0331 and 0.0332 (suitcase's one box: AP 0.167, as alone).",
    "stage3": "Classification as stage 3 (from the same stage-2 weights): the method's levers; seg.miou and det.map "
              "are the earlier tasks kept. s3-*: from an earlier stage-2 model of seed 0; s0-*, s1-*: from the "
              "stage-2 weights of that seed published before grow_neck_head (method-default-before-grow in stage2-start; s1-method reproduces the published seed-1 stage 3 of "
              "its day: the same losses epoch by epoch; its final row differs in the fourth decimal because final.pt "
              "is scored in fp16), except s0-replay8-*: from the stage-2 weights of the whole-pipeline run "
              "pipeline-replay8 (8 replay images per earlier task in stages 2 and 3), and s0-tw3-*: from those of "
              "pipeline-task-weight-det3 (detection's own loss weighted 3 in stage 2), and s0-grow64-tw3: stage 3 of the notebook "
              "run whose stage 2 is stage2-start/method-grow64-tw3 (64 fresh channels and detection's loss weighted 3; "
              "s1-grow64-tw3 likewise from method-grow64-tw3-seed1; both reuse the single-task baselines trained "
              "at detection weight 1). s0-wise*, s1-wise*: no training, the "
              "stage-3 weights published then moved back towards their stage-2 weights by WiSE-FT (helpers.wise_mix, "
              "classification's output channels kept) and scored. s0-, s1-replayw2: from the stage-2 weights of the "
              "published runs of e921999 (results/quick-seed0, -seed1; 64 fresh channels, detection weighted 3), "
              "the replayed tasks' own losses weighted 2 in this stage, the two seeds at the same time with one "
              "thread each as those runs' stage 3 (the reference at weight 1 is their final row as published until "
              "4a6e23c, which replaced it with the notebook's re-run of this stage at 2; final.pt is scored in fp16, "
              "these in fp32). s0-, s1-replayw2-kddet05: the same with detection's distillation on the replayed "
              "images at half weight (kd_weight det 0.5, which acts only in this stage). s0-, s1-replayw4: the "
              "same start and threads, the replayed tasks' own losses weighted 4 instead of 2. s3-320-bf16on-seed0, "
              "s3-320-bf16off-seed0: from the stage-2 weights of the 320 px pipeline of seed 0 (pipeline-alone "
              "quick320-seed0-epyc-bf16; stage-2 end mAP 0.0305 / mAP@0.5 0.0962 / mIoU 0.4688), training in bf16 "
              "and in fp32 (cpu_bf16 on / off), side by side with one thread each, from a worktree of 7ca5bf7. "
              "s3-320-cls224-seed0, s3-320-kddet2-seed0: the same start in bf16, classification's images at 224 px "
              "instead of 160, and detection's distillation on its replayed images at 2 (kd_weight det), side by side "
              "with one thread each, from a worktree of 97eba6d. s3-384-replaycls1-seed*: from the stage-2 weights "
              "of the published 384 px runs (2026-11-24, 475f0b1, bf16), the replayed tasks' labels at weight 1 "
              "instead of 2: mAP / mAP@0.5 / mIoU / top-1 0.0280 / 0.098 / 0.502 / 0.933 and 0.0409 / 0.121 / 0.481 "
              "/ 0.883 against the published 0.0266 / 0.095 / 0.504 / 0.917 and 0.0394 / 0.123 / 0.484 / 0.867 (stage-"
              "2 end mAP 0.0361 / 0.0387): seed 0's detection still loses 22 % in this stage; within a val image or "
              "0.0015 mAP of 2, and the held-out check preferred 2 (holdout-replay hs3-replaycls1): not changed.",
    "stage2-start": "Why detection as stage 2 learns slower than detection alone: detection from the published seed-0 "
                    "stage-1 weights (256 px, 20 epochs) with parts of them put back to the initial state (the "
                    "ImageNet backbone; the neck and head drawn with the seed; all three reset is detection alone). "
                    "live-*: naive (no replay, no distillation), the neck's and head's BatchNorm statistics live; "
                    "method-*: the method's stage 2 (replay, distillation from the stage-1 model, probe), to compare "
                    "with the method's stage 2 as it was published before grow_neck_head (method-default-before-grow, "
                    "seed 0, and -seed1, from the seed-1 stage-1 weights); method-grow64 (and -seed1): detection's "
                    "stage adds 64 fresh channels to the neck and head (the default since; the published runs' "
                    "stage 2); method-grow64-tw3 (and -seed1): that and detection's own loss weighted 3 (their stage 3: "
                    "stage3/s0-, s1-grow64-tw3); "
                    "method-neckhead-fresh with a fresh neck and head; method-redraw-kd0, method-kd0 and "
                    "method-redraw-tw3 were run by the notebook (with and without redraw_neck_head, no distillation "
                    "on the detection images or detection's own loss weighted 3; their records are converted from "
                    "the stage's done.json).",
    "stage-chain": "Stages from their own start, both seeds, each pair at the same time with one PyTorch thread each "
                   "(AMD EPYC 2-core CPU, 2026-11-23, the recipe of b42df27): s1-seg-seed0, -seed1: stage 1 "
                   "(segmentation) from the ImageNet weights; s2-e20-*, s2-e30-*: the method's stage 2 (detection, "
                   "replay and distillation of segmentation, 64 fresh channels, probe) from that seed's stage 1, for "
                   "the profile's 20 epochs and for 30 (is the stage short of epochs? its val mAP of seed 0 still "
                   "rose at epoch 20 in results/quick-seed0 at 04d6cfb); s3-kddet1-*, s3-kddet2-*: the method's stage"
                   " 3 (classification) from that seed's s2-e20 weights, detection's distillation on the replayed "
                   "images at the profile's weight 1 and at 2 (does stage 3 lose detection for want of it?). The "
                   "single-task baselines to read them against: results/quick-seed0, -seed1 at 04d6cfb (mAP 0.0278, "
                   "0.0250 at 20 epochs; seed 0 trained alone again on this CPU: 0.0266, "
                   "results/experiments/pipeline-alone); alone-e30-*: detection alone (the single-task baseline's "
                   "seed and recipe) for 30 epochs, the baseline that s2-e30 would be held to. s2-segreplay2-*: "
                   "s2-e20 with the replayed segmentation labels weighted 2 (replay_weight det 2; from the stage-1 "
                   "weights of the quick runs published on 2026-11-23, bit for bit s1-seg-*), trained from the tree "
                   "of 04d6cfb (the record names 1f28592, the commit when it ended) while eval_scale det 1.25 was the"
                   " default, so its own record scores detection at 320 px; -det100: the same weights scored at 256 "
                   "px like every other row (mAP 0.0181 / 0.0211 against s2-e20's 0.0230 / 0.0227, mIoU 0.489 / 0.494"
                   " against 0.466 / 0.465): segmentation kept, detection pays. s3-after-segreplay2-*: the method's "
                   "stage 3 from those weights (fp32, not rounded to fp16 as a final.pt): mAP 0.0244 / 0.0260, mIoU "
                   "0.488 / 0.462, top-1 0.883 / 0.900 against the published runs' single-task 0.0223 / 0.0194, "
                   "stage-1 0.503 / 0.446 and 0.900 / 0.917: every task within 5 % in both seeds, where the "
                   "published runs (replay 1) fail seed 0's segmentation; made the default at 0077d57 and run as whole "
                   "pipelines (pipeline-segreplay2), then withdrawn: on train images held out of training it scored "
                   "no better than 1 (holdout-replay).",
    "freeze-old": "Does segmentation keep better when detection's stage trains only fresh channels "
                  "(freeze_old_channels, helpers.Config)? Stage-chain's s2-e20-seed0 lost mIoU 0.503 -> 0.466 in its "
                  "stage 2; swap-*: no training, the published stage-1 weights on that stage's backbone score 0.502 "
                  "(the backbone's move costs segmentation almost nothing) and its neck and head on the stage-1 "
                  "backbone 0.472: the loss lives in the neck and head. The method's stage 2 from the published "
                  "stage-1 weights (as stage-chain's s2-e20-*, which scored 0.0230 / 0.0718 / 0.4655 and 0.0227 / "
                  "0.0755 / 0.4653), two at a time with one PyTorch thread each (AMD EPYC, 2026-11-24): s2-freeze-*: "
                  "the neck's and head's old channels held, 64 fresh (the records' true is the option's first form, "
                  "both parts); s2-freezeneck-seed0: the neck's alone; s2-freeze-grow128-seed0: both with 128 fresh "
                  "channels, which the whole pipelines of both seeds then ran (pipeline-freeze-grow128, stage 2 bit "
                  "for bit this record). s3-growcls32-freeze-*: classification's stage from those pipelines' stage-2 "
                  "weights with 32 fresh channels and every old channel held (their own stage 3, with the whole neck "
                  "and head training: 0.0180 / 0.0686 / 0.5078 / 0.900 and 0.0228 / 0.0810 / 0.4540 / 0.933). hs2-, "
                  "hs3-*: the same on the held-out split of holdout-replay (200 train images per task, 40 held out; "
                  "from its hs1-seg-* weights), read against its hs2-segreplay1-*, hs3-after-segreplay1-* (the "
                  "profile's recipe) and hbase-*: final mAP 0.0112 / 0.0130 -> 0.0096 / 0.0105, mIoU 0.279 / 0.286 -> "
                  "0.256 / 0.268, top-1 0.950 / 0.975 -> 0.925 / 0.950, largest drop 1.6 / 0.0 % -> 9.7 / 4.0 % (seg): "
                  "not adopted (freeze_old_channels stays off).",
    "holdout-replay": "Is replay_weight det 2 (the replayed segmentation labels weighted 2 in the detection stage) "
                      "better than 1 on images that are neither val nor trained on? tools/holdout_split.py: the "
                      "first 200 train images of each task train, the last 40 (classification: 4 per class) score; "
                      "the whole chain on them, both seeds, two at a time with one PyTorch thread each (AMD EPYC, "
                      "2026-11-24, the recipe of 0077d57, replay_weight given explicitly): hs1-seg: stage 1; "
                      "hs2-segreplay2 / -segreplay1: the method's stage 2 from it at replay 2 / 1; hs3-after-*: "
                      "stage 3 from each; hbase-det, hbase-cls: the single-task baselines on the same 200 images "
                      "(stage 1 is segmentation's). Largest drop against them: seed 0 2.6 % (cls) at 2, 1.6 % (seg) at"
                      " 1; seed 1 2.6 % (cls) at 2, none at 1 (every figure at or above its baseline). On val the "
                      "same change kept segmentation better (stage-chain s2-segreplay2-*, pipeline-segreplay2); here "
                      "segmentation moved +0.004 / -0.004 and detection's mAP and top-1 were lower in both seeds: "
                      "not adopted. Two defaults chosen on val checked the same way: hs3-replaycls1: stage 3 with the "
                      "replayed labels at 1 instead of the default 2 (from hs2-segreplay1): largest drop 4.4 % (seg) / "
                      "2.6 % against 1.6 / 0.0 % at 2; hs2-taskweight1, hs3-after-taskweight1: detection's own loss at 1 "
                      "instead of 3 in its stage: final mAP 0.0088 / 0.0104 against 0.0112 / 0.0130, largest drop "
                      "14.5 % (det) / 2.6 % against 1.6 / 0.0 %: both defaults confirmed. The held-out images score "
                      "lower than val (stage 1 mIoU 0.28 against 0.50 / 0.45; the published stage-1 weights, which "
                      "trained on them, score 0.64): a harder set, and models trained on 200 images. hbase-det384: "
                      "detection alone at 384 px in bf16 (2026-11-24, 475f0b1, the rule written before any 384 px "
                      "result: adopt if it beats hbase-det in both seeds): mAP / mAP@0.5 0.0153 / 0.048 and 0.0143 / "
                      "0.056 against 0.0102 / 0.033 and 0.0083 / 0.027 at 256 px: the quick profile's 384 px.",
    "eval-scale": "Saved weights scored again with detection's (or segmentation's) images resized to 1.0 / 1.25 / 1.5 "
                  "x the training side (eval_scale; --score-only, no training; the first 17 records from the working "
                  "tree of ae8591d, where --score-only was not yet committed). s2-256-seed*: the stage-2 weights of "
                  "stage-chain's s2-e20-seed* (256 px); final-256-seed0: the results/quick-seed0/final.pt published "
                  "until 2026-11-23; *-320-seed0: the single-task detector, stage-2 and final weights of "
                  "pipeline-alone's quick320-seed0-epyc-bf16 (320 px: 1.25 gives 384 px). On val, detection at 1.25 "
                  "scored above 1.0 in all six, 1.5 fell back, segmentation lost at 1.25. The check on other images: "
                  "detection trained alone on the first 200 train images (quick profile, 256 px, seeds 0 / 1, trained "
                  "after the six readings) and scored on the last 40 train images, which it never saw (heldout40-*, "
                  "scored on a folder of those 40: mAP down in seed 0, up in seed 1, mAP@0.5 flat), and on val "
                  "(train200-*: up in seed 0, down in seed 1). The val gain is a property of the 60 val images: "
                  "eval_scale stays 1.0 (weights of the last six in /tmp, not kept).",
    "width192": "Capacity: neck and head 192 channels instead of 128 (quick profile, seed 0, 256 px): stage 1 "
                "(segmentation), the method's stage 2 from it, and detection alone, to compare with the published "
                "seed-0 run's stage 1, stage 2 and single-task detection (results/quick-seed0 as published when "
                "they ran).",
}


def write_readme(root: Path) -> Path:
    """results/experiments/README.md: every subfolder's table, generated from its records."""
    lines = ["# Experiments behind the recipe", "",
             "Generated by `python tools/experiment.py --readme results/experiments` from the JSON records in each "
             "folder (config, device, date, commit, val metrics of the last epoch; nothing is chosen on val). The "
             "val sets have 60 images: differences of a few thousandths of mAP are within seed noise. 'changes' are "
             "against the profile's defaults at the commit that ran the experiment (the defaults have since taken "
             "the winners: p-project is the recipe before this work).", ""]
    # a folder of stage records gets a table; a folder of a whole notebook run with one change (no stage records)
    # is listed by its own README, which says what changed and how to compare
    records, runs = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(sub.glob("*.json")):
            records.append(sub)
        elif (sub / "README.md").is_file():
            runs.append(sub)
    for sub in records:
        folder = folder_records(sub)  # read once for both tables
        lines += [f"## {sub.name}", "", SECTIONS.get(sub.name, ""), "", table(folder), ""]
        agreements = agreement_table(folder)
        if agreements:
            lines.append(agreements)
    if runs:
        lines += ["## Whole pipeline runs", "", "The notebook run with one change against a published run; each "
                  "folder's README says what changed, where its artifacts are and what came of it.", ""]
        for sub in runs:
            title = next((line.lstrip("# ").strip() for line in (sub / "README.md").read_text().splitlines()
                          if line.startswith("#")), sub.name)
            lines.append(f"- [{sub.name}]({sub.name}/README.md): {title}")
        lines.append("")
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="experiment name (file name of its record)")
    p.add_argument("--task", choices=H.TASKS, help="the task this stage trains")
    p.add_argument("--profile", default="quick")
    p.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-offset", type=int, default=1000,
                   help="added to the seed for the stage's draws (1000: as the single-task baselines)")
    p.add_argument("--init", default=None, help="weights.pt to start from (default: the ImageNet backbone)")
    p.add_argument("--reset", default="", metavar="PARTS",
                   help="with --init: comma list of parts (backbone, neck, head) put back to their initial state")
    p.add_argument("--earlier", default="", help="comma list of earlier tasks: replay and distillation of them")
    p.add_argument("--expert", default=None, metavar="WEIGHTS",
                   help="the task's single-task model (weights.pt or final.pt), distilled at single_task_teacher_weight")
    p.add_argument("--naive", action="store_true", help="earlier tasks only scored: no replay, no distillation")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="config override")
    p.add_argument("--out", default=str(ROOT / "results" / "experiments"))
    p.add_argument("--keep-weights", action="store_true", help="also save the stage's weights.pt")
    p.add_argument("--score-only", metavar="WEIGHTS", default=None,
                   help="no training: score these weights on val (--task and --earlier: which tasks; --set: only "
                        "scoring fields such as eval_scale or flip_test, and final_precision: the weights rounded as "
                        "final.pt would store them)")
    p.add_argument("--backbone-from", metavar="WEIGHTS", default=None,
                   help="with --score-only: the backbone's weights and statistics taken from this checkpoint instead "
                        "(neck and head as in --score-only's): does a stage's forgetting live in the backbone?")
    p.add_argument("--table", metavar="DIR", help="print the Markdown table of the experiments in DIR and exit")
    p.add_argument("--readme", metavar="ROOT", help="write ROOT/README.md with the table of every subfolder and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(folder_records(Path(args.table))), end="")
        return
    if args.readme:
        print(write_readme(Path(args.readme)))
        return
    if not args.name or not args.task:
        p.error("an experiment needs a name and --task")
    if args.backbone_from and not args.score_only:
        p.error("--backbone-from goes with --score-only")
    if args.score_only:
        score_only(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
