"""A run's weights before its last stage, recovered from its final.pt, for stage-level experiments and re-runs of
the last stage when the run folder is gone (only the published artifacts and final.pt kept).

    python tools/stage_weights_from_final.py results/quick-seed0/final.pt runs/quick-seed0/full/stage2_det/weights.pt

Exact where the last stage held everything before it (holds_earlier_tasks: the published classification stage):
it grew the neck and head by cfg.grow_neck_head[last task] channels, held the old ones and every other task's output
rows, and its backbone did not learn. So the weights before it are final.pt's with the neck and head cut back
(helpers.cut_neck_head), except the last task's own output rows, which it trained: those are put back to where the
run drew them (the run's initial head, seeded), times --row-factor for the weight decay the first stage applied to
them (the decay of the runs of 2026-12-02: 0.99969709, measured on seed 1, whose stage-2 weights exist), and 0 over
the channels grown by the stages between. final.pt is stored in fp16 or int8 (final_precision): the recovered
weights carry its rounding.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def weights_before_last_stage(final: Path, row_factor: float = 1.0) -> tuple[H.UniHeadNet, H.Config, dict]:
    payload = H.read_checkpoint(final)
    cfg = H.config_from_checkpoint(payload)
    last = cfg.order[-1]
    if not H.holds_earlier_tasks(cfg, last, cfg.order[:-1], True):
        raise SystemExit(f"{final}: its last stage ({last}) did not hold the earlier tasks (see holds_earlier_tasks): "
                         "the weights before it cannot be recovered from final.pt")
    model, _, _ = H.load_checkpoint(final)
    model = model.float()
    H.cut_neck_head(model, model.width - cfg.grow_neck_head[last])
    rows = H.own_output_rows(model, last)
    drawn = H.initial_model(cfg, torch.device("cpu")).head.layers[-1]
    out = model.head.layers[-1]
    with torch.no_grad():
        weight = torch.zeros_like(out.weight[rows])
        weight[:, :drawn.in_channels] = drawn.weight[rows] * row_factor
        out.weight[rows] = weight
        out.bias[rows] = drawn.bias[rows] * row_factor
    return model, cfg, payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("final", type=Path, help="a run's final.pt")
    p.add_argument("out", type=Path, help="where to write the weights before the last stage (a stage's weights.pt)")
    p.add_argument("--row-factor", type=float, default=1.0,
                   help="factor on the last task's initial output rows: the first stage's weight decay on them")
    args = p.parse_args(argv)
    model, cfg, payload = weights_before_last_stage(args.final, args.row_factor)
    H.save_checkpoint(args.out, model, cfg, payload["classes"])
    print(f"wrote {args.out}: width {model.width}, the weights before stage {len(cfg.order)} ({cfg.order[-1]})")


if __name__ == "__main__":
    main()
