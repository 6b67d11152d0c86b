"""The notebook as a user gets it back: Run All with papermill (the README's main job, smoke profile, CPU,
offline) must finish, and the executed notebook must stay readable: no cell with more than 60 outputs,
no widget warning, no traceback, under 1 MB."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_gives_a_small_readable_notebook(tmp_path):
    executed = tmp_path / "colab.executed.ipynb"
    env = {**os.environ, "UNIHEAD_PROFILE": "smoke", "UNIHEAD_OUT_DIR": str(tmp_path / "run"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "colab.ipynb"), str(executed),
                           "--cwd", str(ROOT), "-k", "python3"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = json.loads(executed.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [len(c.get("outputs", [])) for c in code]
    assert max(counts) <= 60, counts
    text = executed.read_text()
    assert "IProgress" not in text and "TqdmWarning" not in text
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert executed.stat().st_size < 1_000_000, executed.stat().st_size
    # each model a stage cell trains shows its progress as one output, holding one line per epoch: the stage's, and
    # before a stage that distils its task's single-task model (single_task_teacher_weight) that model's, trained first
    import helpers as H
    cfg = H.make_config("smoke")
    experts = [k > 0 and cfg.single_task_teacher_weight.get(task, 0.0) > 0 for k, task in enumerate(cfg.order)]
    stage_cells = [c for c in code if "run_sequence(cfg, data, upto=" in "".join(c["source"])]
    assert len(stage_cells) == 3
    for cell, task, expert in zip(stage_cells, cfg.order, experts):
        shown = ["".join(o.get("data", {}).get("text/plain", "")) for o in cell["outputs"]
                 if o.get("output_type") == "display_data"]
        assert len(shown) == 1 + expert and all("epoch 1/" in s for s in shown), shown
        assert not expert or shown[0].startswith(f"[single:{task}] epoch 1/"), shown[0][:80]
