"""Speed and size of the UniHead model on the current device, written to JSON and a Markdown table.

    python benchmarks/benchmark.py                       # CPU or GPU, whichever is here
    python benchmarks/benchmark.py --runs 200 --run-dir runs/full   # also take the pipeline's wall time

Measures, on the model as the method's last stage leaves it (neck and head at their grown width):
parameters per part; inference latency for one 512x512 image (fp32, and AMP on CUDA; with the config's
flip_test, both passes of the flip test, as evaluation runs them), the median of --runs synchronised runs
after warm-up; throughput at --batch; training images/s of each stage's step
(the stage's task plus replay and distillation of the earlier ones and of a single-task expert where the config
has one, as in training); and, with --run-dir,
the training time a finished run recorded. Output: benchmarks/results/<device-slug>.json and the table in
benchmarks/README.md, regenerated from every JSON there. Nothing is extrapolated to other devices.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

HERE = Path(__file__).resolve().parent


def training_throughput(cfg: H.Config, data: dict, steps: int, device: torch.device) -> dict:
    """Images per second of the pipeline's own training step (helpers.train_step: every loss term, backward,
    clipping, AdamW, schedule, EMA) for each stage, with that stage's replay and a teacher to distil from.
    The clock covers the step only; the batches come from the stage's own loaders beforehand."""
    model = H.initial_model(cfg, device)
    teacher = H.freeze_teacher(model)
    out = {}
    for k, task in enumerate(cfg.order):
        earlier = list(cfg.order[:k])
        H.start_stage(model, task, cfg, earlier=earlier, replay=bool(earlier), seed=cfg.seed)  # as the pipeline
        # the untrained starting model stands in for the single-task expert too (the same shape): make_stage keeps
        # it only where cfg.single_task_teacher_weight distils one, so its frozen pass is timed where training has it
        stage = H.make_stage(model, task, data, cfg, earlier=earlier, teacher=teacher if earlier else None,
                             replay=bool(earlier), device=device, expert=teacher)
        batches = (batch for _ in iter(int, 1) for batch in stage.loader)  # the loader, epoch after epoch
        images, elapsed = 0, 0.0
        for i in range(steps + 2):  # two warm-up steps
            batch, replay = H.batch_to_device(next(batches), device, cfg.channels_last), H.next_replay(stage)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            H.train_step(stage, batch, replay)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                elapsed += time.perf_counter() - t0
                images += batch["image"].shape[0] + sum(b["image"].shape[0] for b in replay.values())
        out[task] = {"stage": k + 1, "images_per_s": images / elapsed, "steps": steps,
                     "batch": cfg.batch_size, "replay_per_task": cfg.replay_per_task if earlier else 0}
    return out


def write_table(results_dir: Path, readme: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = ["| device | date | params | passes per image | fp32 ms/img @512 | AMP ms/img @512 | img/s @512 (batch) | train img/s seg / det / cls (size) | pipeline min |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        lat = {l["amp"]: l for l in r["latency_512"]}
        amp = f"{lat[True]['median_ms']:.1f}" if True in lat else "n/a (CPU)"
        tr = r["training"]
        train = " / ".join(f"{tr[t]['images_per_s']:.1f}" for t in ("seg", "det", "cls") if t in tr)
        wall = f"{r['pipeline']['train_seconds']['method'] / 60:.1f}" if r.get("pipeline") else "n/a"
        passes = ("2 (flip test)" if lat[False].get("flip_test") else "1") + (
            f", run at {lat[False]['size']} px" if lat[False].get("size", 512) != 512 else "")
        lines.append(f"| {r['device']} | {r['date']} | {r['parameters']['total']:,} | {passes} | {lat[False]['median_ms']:.1f} | "
                     f"{amp} | {r['throughput']['images_per_s']:.1f} ({r['throughput']['batch']}) | {train} "
                     f"({r['train_image_size']} px) | {wall} |")
    text = readme.read_text() if readme.exists() else ""
    table = "\n".join(lines)
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    text = re.sub(f"{start}.*{end}", f"{start}\n{table}\n{end}", text, flags=re.S) if start in text else \
        text + f"\n{start}\n{table}\n{end}\n"
    readme.write_text(text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, help="config profile for model size and training settings")
    p.add_argument("--backbone", default="efficientnet-lite0", help="backbone (Lite0 needs no download)")
    p.add_argument("--runs", type=int, default=100, help="timed runs behind each latency median (>= 100 to report)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    p.add_argument("--batch", type=int, default=16, help="batch size of the throughput measurement")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per stage")
    p.add_argument("--train-size", type=int, default=None, help="training image size (default: the profile's)")
    p.add_argument("--data-root", default=None, help="real data for the training measurement (default: synthetic)")
    p.add_argument("--run-dir", default=None, help="a finished run whose recorded training time to include")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--readme", default=str(HERE / "README.md"), help="Markdown file whose table is regenerated")
    args = p.parse_args(argv)
    overrides = dict(backbone=args.backbone, image_size=args.train_size, out_dir=str(HERE / "_work"))
    if args.data_root:
        overrides.update(synthetic=False, data_root=args.data_root)
    cfg = H.make_config(args.profile, **overrides)
    device = H.pick_device(cfg)
    model = H.initial_model(cfg, device)
    H.grow_neck_head(model, H.final_width(cfg) - model.width)  # the size of the final model (see grow_neck_head)
    side = H.latency_side(cfg)  # 512, or the larger side the config scores a 512 px image at (eval_scale)
    latency = [H.measure_latency(model, side, 1, device, amp=False, runs=args.runs, warmup=args.warmup,
                                  flip_test=cfg.flip_test)]
    if device.type == "cuda":
        latency.append(H.measure_latency(model, side, 1, device, amp=True, runs=args.runs, warmup=args.warmup,
                                         flip_test=cfg.flip_test))
    throughput = H.measure_latency(model, side, args.batch, device, amp=device.type == "cuda",
                                   runs=max(2, args.runs // 10), warmup=min(args.warmup, 3), flip_test=cfg.flip_test)
    data = H.prepare_data(cfg, verbose=False)
    pipeline = [H.measure_input_pipeline(data[t]["train"], cfg) for t in H.TASKS]
    result = {"device": H.describe_device(device), "date": dt.date.today().isoformat(), "torch": torch.__version__,
              "profile": cfg.profile, "backbone": cfg.backbone, "parameters": H.count_parameters(model),
              "latency_512": latency, "throughput": throughput, "train_image_size": cfg.image_size,
              "input_pipeline": pipeline, "training": training_throughput(cfg, data, args.train_steps, device)}
    if args.run_dir:
        resources = json.loads((Path(args.run_dir) / "resources.json").read_text())
        result["pipeline"] = {k: resources[k] for k in ("train_seconds", "train_seconds_per_stage", "device", "profile")}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()
    out = Path(args.out) if args.out else HERE / "results" / f"{slug}.json"
    H.write_json(result, out)
    write_table(out.parent, Path(args.readme))
    print(json.dumps({k: result[k] for k in ("device", "parameters")}, indent=1))
    for l in latency:
        print(f"latency 512x512 batch 1 {'AMP' if l['amp'] else 'fp32'}: {l['median_ms']:.1f} ms median ({l['runs']} runs)")
    print(f"written {out} and {args.readme}")
    return result


if __name__ == "__main__":
    main()
