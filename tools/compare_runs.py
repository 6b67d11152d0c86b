"""The method's stages of pipeline runs side by side: a Markdown table of every stage's val metrics (from each
stage's done.json), its training minutes and its last-epoch training loss of the stage's own task, one row per
run and stage. For a whole-pipeline experiment against the run it changes one thing of.

    python tools/compare_runs.py results/quick-seed0 results/experiments/pipeline-x/quick-seed0 --stages 2,3

Each run is named by its folder as given; a stage a run does not have is left out. Nothing is chosen here: the
table states what each run's records hold.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = [("det.map", "mAP"), ("det.map50", "mAP@0.5"), ("seg.miou", "mIoU"), ("cls.top1", "Top-1")]
OWN_LOSS = {"seg": ("seg",), "det": ("det_heatmap", "det_box"), "cls": ("cls",)}


def stage_records(run_dir: Path, strategy: str = "full") -> dict[int, dict]:
    """{stage number: done.json record} of one strategy's finished stages in a run folder."""
    records = {}
    for done in sorted((run_dir / strategy).glob("stage*_*/done.json")):
        number = int(done.parent.name.split("_")[0].removeprefix("stage"))
        records[number] = json.loads(done.read_text())
    return records


def table(run_dirs: list[Path], stages: list[int] | None = None, strategy: str = "full") -> str:
    lines = ["| run | stage | " + " | ".join(t for _, t in METRICS) + " | own train loss, last epoch | minutes |",
             "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | --- | ---: |"]
    for run_dir in run_dirs:
        for number, record in stage_records(run_dir, strategy).items():
            if stages and number not in stages:
                continue
            val, last = record["val"], record["history"][-1]
            loss = ", ".join(f"{k} {last[k]:.3f}" for k in OWN_LOSS[record["task"]] if k in last)
            values = " | ".join(f"{val[k]:.4f}" if val.get(k) is not None else "" for k, _ in METRICS)
            lines.append(f"| {run_dir} | {number} ({record['task']}) | {values} | {loss} | {record['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with <strategy>/stageN_task/done.json)")
    p.add_argument("--stages", default="", help="comma list of stage numbers to show (default: all)")
    p.add_argument("--strategy", default="full")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / args.strategy).is_dir()]
    if missing:
        raise SystemExit(f"no {args.strategy}/ stages in: {', '.join(missing)}")
    print(table(args.runs, [int(s) for s in args.stages.split(",") if s], args.strategy), end="")


if __name__ == "__main__":
    main()
