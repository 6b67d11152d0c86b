"""The training engine, end to end on the synthetic smoke profile: artifacts, forgetting matrix, resume,
replay limit, frozen teacher, frozen BatchNorm statistics, naive-versus-method, and eval.py."""
import csv
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers as H

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Stage 1 alone first (an interrupted run), then the whole pipeline in the same folder (the resume)."""
    out = tmp_path_factory.mktemp("smoke_run")
    cfg = H.make_config("smoke", out_dir=str(out))
    data = H.prepare_data(cfg, verbose=False)
    first = H.run_sequence(cfg, data, upto=1)
    stage1 = H.stage_dir(cfg, cfg.strategy, 0)
    snapshot = {"row": first["matrix"][0], "weights": sha(stage1 / "weights.pt"),
                "log": (stage1 / "log.csv").read_text(), "mtime": (stage1 / "weights.pt").stat().st_mtime_ns}
    results = H.run_pipeline(cfg, data)
    resources = H.write_run_artifacts(cfg, results, data)
    return {"cfg": cfg, "data": data, "results": results, "first": snapshot, "resources": resources, "out": out}


def test_smoke_pipeline_writes_every_artifact(smoke_run):
    out, cfg, results = smoke_run["out"], smoke_run["cfg"], smoke_run["results"]
    for name in ("config.json", "metrics.json", "forgetting.csv", "final.pt", "final_metrics.json",
                 "resources.json", "report.md"):
        assert (out / name).is_file(), name
    for fig, suffix in H.FIGURES.items():
        assert (out / "figures" / f"{fig}{suffix}").stat().st_size > 1000, fig
    for strategy in ("full", "naive"):
        for k in range(3):
            d = H.stage_dir(cfg, strategy, k)
            assert {"done.json", "weights.pt", "log.csv"} <= {p.name for p in d.iterdir()}, d
            assert not (d / "last.pt").exists()  # mid-stage checkpoints are removed once a stage is done
    for task in ("det", "cls"):
        assert (out / "single_task" / task / "done.json").is_file()
    # a full forgetting matrix of finite metrics for both strategies
    for strategy in ("full", "naive"):
        matrix = results["strategies"][strategy]["matrix"]
        assert len(matrix) == 3
        for row in matrix:
            for key in ("det.map", "det.map50", "seg.miou", "cls.top1"):
                assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (strategy, key, row[key])
    rows = list(csv.DictReader(open(out / "forgetting.csv")))
    assert len(rows) == 6 and {r["strategy"] for r in rows} == {"full", "naive"}
    summary = results["summary"]
    assert len(summary) == 6 and all(isinstance(r["pass_rel"], bool) for r in summary)
    for r in summary:  # the drops are computed from the matrix and the baselines, not typed
        m = results["strategies"][r["strategy"]]["matrix"]
        k = cfg.order.index(r["task"])
        assert r["stage_end"] == m[k][r["metric"]] and r["final"] == m[-1][r["metric"]]
        base = results["single_task"][r["task"]]["value"]
        assert r["single_task_baseline"] == base
        assert r["drop_abs_points"] == pytest.approx(100 * (base - r["final"]))
        assert r["pass_abs"] == (100 * (base - r["final"]) <= 5 + 1e-5) and r["bonus"] == (r["final"] >= base - 1e-7)
        if base:
            assert r["drop_rel_pct"] == pytest.approx(100 * (base - r["final"]) / base)
            assert r["pass_rel"] == (r["drop_rel_pct"] <= 5 + 1e-5)
    assert set(results["single_task"]) == set(H.TASKS)
    first = cfg.order[0]  # the first task's baseline is stage 1 itself
    assert results["single_task"][first]["value"] == results["strategies"]["full"]["matrix"][0][H.TASK_METRIC[first]]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["meta"]["profile"] == "smoke" and saved["meta"]["synthetic"] is True
    report = (out / "report.md").read_text()
    assert "SMOKE RUN ON SYNTHETIC DATA" in report and "R[stage][task]" not in report.split("## Forgetting")[0]
    assert f"{results['strategies']['full']['matrix'][-1]['seg.miou']:.4f}" in report


def test_final_weights_are_self_describing(smoke_run):
    payload = torch.load(smoke_run["out"] / "final.pt", map_location="cpu", weights_only=False)
    assert payload["format"] == "unihead-v1"
    assert payload["classes"]["det"] == smoke_run["data"]["det"]["train"].class_names
    assert payload["classes"]["cls"] == smoke_run["data"]["cls"]["train"].class_names
    assert payload["config"]["profile"] == "smoke"
    model, cfg, _ = H.load_checkpoint(smoke_run["out"] / "final.pt")
    m = H.evaluate(model, {t: smoke_run["data"][t]["val"] for t in H.TASKS}, cfg)
    assert m["seg.miou"] == pytest.approx(smoke_run["results"]["strategies"]["full"]["matrix"][-1]["seg.miou"])


def test_resume_skips_finished_stage_and_keeps_its_results(smoke_run):
    cfg, first = smoke_run["cfg"], smoke_run["first"]
    stage1 = H.stage_dir(cfg, cfg.strategy, 0)
    assert sha(stage1 / "weights.pt") == first["weights"]
    assert (stage1 / "weights.pt").stat().st_mtime_ns == first["mtime"]
    assert (stage1 / "log.csv").read_text() == first["log"]
    assert smoke_run["results"]["strategies"]["full"]["matrix"][0] == first["row"]
    # the naive sequence shares stage 1 rather than training it again
    assert smoke_run["results"]["strategies"]["naive"]["matrix"][0] == first["row"]


def test_resume_inside_a_stage(tmp_path, synthetic_root):
    cfg = H.make_config("smoke", out_dir=str(tmp_path), epochs={"seg": 2}, checkpoint_every=1)
    data = H.load_all(synthetic_root, verbose=False)
    for td in data.values():
        td["train"].samples = td["train"].samples[:8]
    model = H.initial_model(cfg)
    H.train_stage(model, "seg", data, cfg, tmp_path / "s", seed=1)
    ckpt = torch.load(tmp_path / "s" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "config", "history"} <= set(ckpt)
    # a new process would start from here: the run continues at epoch 2 and keeps epoch 1's log row
    resumed = H.train_stage(H.initial_model(cfg), "seg", data, cfg, tmp_path / "s", seed=1)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == ckpt["history"][0]


def test_replay_never_exceeds_the_limit(synthetic_root):
    data = H.load_all(synthetic_root, verbose=False)
    cfg = H.make_config("smoke", replay_per_task=10, batch_size=4)
    sampler = H.ReplaySampler({t: data[t]["train"] for t in ("seg", "det")}, ("seg", "det"), cfg, seed=0)
    for _ in range(5):
        batches = sampler.next()
        assert set(batches) == {"seg", "det"}
        assert all(b["image"].shape[0] <= 10 for b in batches.values())
    with pytest.raises(ValueError, match="at most 10"):
        H.make_config("smoke", replay_per_task=11)
    off = H.ReplaySampler({"seg": data["seg"]["train"]}, ("seg",), H.make_config("smoke", replay_per_task=0), seed=0)
    assert off.next() == {}


def test_loss_weights_scale_exactly_the_terms_they_name(synthetic_root):
    """task_weight scales the stage's own loss only; kd_current_weight (of the stage's task) scales distillation on
    the current images only (replay terms keep their weight); replay_weight (of the stage's task) scales the replayed
    tasks' own losses only (their distillation keeps kd_weight). Same weights, same batches: the ratios are exact."""
    data = H.load_all(synthetic_root, verbose=False)
    base = H.make_config("smoke", replay_per_task=2, batch_size=2, later_backbone_lr_scale={"cls": 1.0})  # not held
    model = H.initial_model(base).eval()  # eval: no drop-connect, so two forward passes agree
    teacher = H.freeze_teacher(H.initial_model(base, torch.device("cpu")))
    torch.manual_seed(0)
    with torch.no_grad():  # a teacher that differs from the student, so every distillation term is > 0
        for p in teacher.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(H.make_loader(data["cls"]["train"], base, train=False)))
    replay = {t: next(iter(H.make_loader(data[t]["train"], base, train=False, batch_size=2))) for t in ("seg", "det")}
    def terms(**kw):
        cfg = H.Config(**{**base.to_dict(), **kw})
        with torch.no_grad():
            terms = H.training_step_loss(model, "cls", batch, cfg, replay=replay, earlier=["seg", "det"], teacher=teacher,
                                         task_weight=H.own_loss_weight(cfg, "cls", ["seg", "det"], True))
            return {k: float(v) for k, v in terms.items()}
    plain = terms(task_weight={"seg": 1.0, "det": 1.0, "cls": 1.0}, kd_current_weight={"seg": 1.0, "det": 1.0, "cls": 1.0})
    # the factor of the stage being trained (cls) applies; another stage's (det 0) does not
    weighted = terms(task_weight={"seg": 1.0, "det": 1.0, "cls": 3.0}, kd_current_weight={"seg": 1.0, "det": 0.0, "cls": 0.25})
    assert plain["kd_seg"] > 0 and plain["kd_det"] > 0 and plain["cls"] > 0
    assert weighted["cls"] == pytest.approx(3 * plain["cls"], rel=1e-5)
    for k in ("kd_seg", "kd_det"):
        assert weighted[k] == pytest.approx(0.25 * plain[k], rel=1e-5)
    for k in (k for k in plain if k.startswith("replay_")):
        assert weighted[k] == pytest.approx(plain[k], rel=1e-5), k
    ones = {"seg": 1.0, "det": 1.0, "cls": 1.0}
    unit = terms(task_weight=ones, kd_current_weight=ones, replay_weight=ones)
    replayed = terms(task_weight=ones, kd_current_weight=ones,
                     replay_weight={"seg": 0.0, "det": 0.0, "cls": 2.0})  # the cls stage's factor acts, not the others'
    labelled = [k for k in unit if k.startswith("replay_") and not k.startswith("replay_kd_")]
    assert {"replay_seg", "replay_det_heatmap", "replay_det_box"} <= set(labelled)
    for k in unit:
        assert replayed[k] == pytest.approx((2 if k in labelled else 1) * unit[k], rel=1e-5), k
    # at 0 the stage's own images get no distillation term (and no teacher pass); replay keeps all of its terms
    sides = []  # the input side of each teacher pass: classification images are smaller than the replayed ones
    hook = teacher.register_forward_hook(lambda module, args, output: sides.append(args[0].shape[-1]))
    terms(kd_current_weight={"seg": 1.0, "det": 1.0, "cls": 0.25})
    with_kd, sides[:] = list(sides), []
    released = terms(task_weight={"seg": 1.0, "det": 1.0, "cls": 3.0}, kd_current_weight={"seg": 1.0, "det": 1.0, "cls": 0.0})
    hook.remove()
    assert not any(k in released for k in ("kd_seg", "kd_det")) and released["cls"] == pytest.approx(weighted["cls"], rel=1e-6)
    assert {k: v for k, v in released.items() if k.startswith("replay_")} == pytest.approx(
        {k: v for k, v in plain.items() if k.startswith("replay_")}, rel=1e-6)
    assert with_kd == [base.cls_image_size, base.image_size, base.image_size]
    assert sides == [base.image_size, base.image_size]  # the two replay batches only


def test_task_weight_acts_only_in_the_methods_later_stages(synthetic_root):
    """A single-task baseline, the first stage and naive fine-tuning have no replay or distillation term to weigh
    their loss against: they train at 1 whatever task_weight says, so tuning the method never moves a baseline."""
    cfg = H.make_config("smoke", task_weight={"seg": 2.0, "det": 3.0, "cls": 4.0}, later_backbone_lr_scale={"cls": 1.0})
    held = H.make_config("smoke", task_weight={"seg": 2.0, "det": 3.0, "cls": 4.0})  # its cls stage holds seg and det
    assert H.holds_earlier_tasks(held, "cls", ["seg", "det"], True)
    assert H.own_loss_weight(held, "cls", ["seg", "det"], True) == 1.0  # nothing else to weigh against
    assert H.own_loss_weight(cfg, "det", [], False) == 1.0  # single-task baseline
    assert H.own_loss_weight(cfg, "seg", [], True) == 1.0  # the method's first stage
    assert H.own_loss_weight(cfg, "det", ["seg"], False) == 1.0  # naive fine-tuning
    assert H.own_loss_weight(cfg, "det", ["seg"], True) == 3.0  # the method's detection stage
    assert H.own_loss_weight(cfg, "cls", ["seg", "det"], True) == 4.0
    data = H.load_all(synthetic_root, verbose=False)
    model = H.initial_model(cfg, torch.device("cpu"))
    assert H.make_stage(model, "det", data, cfg).task_weight == 1.0
    teacher = H.freeze_teacher(H.initial_model(cfg, torch.device("cpu")))
    assert H.make_stage(model, "det", data, cfg, earlier=["seg"], teacher=teacher, replay=True).task_weight == 3.0


def test_detection_stage_distils_the_single_task_detector_trained_once(tmp_path, synthetic_root, monkeypatch):
    """With a single-task teacher for detection, the method's stage 2 trains with the single-task detector as its
    expert (trained first, since the method runs before the baselines), and the baselines then load it instead of
    training it again; stage 1, stage 3 and naive fine-tuning train without one."""
    cfg = H.make_config("smoke", out_dir=str(tmp_path), epochs={"seg": 1, "det": 1, "cls": 1},
                        single_task_teacher_weight={"det": 3.0})
    data = H.load_all(synthetic_root, verbose=False)
    for td in data.values():
        td["train"].samples = td["train"].samples[:8]
    calls, real = [], H.train_stage
    monkeypatch.setattr(H, "train_stage", lambda *a, **k: calls.append((k["label"], k.get("expert"))) or real(*a, **k))
    results = H.run_pipeline(cfg, data)
    labels = [label for label, _ in calls]
    assert labels == ["full:stage1_seg", "single:det", "full:stage2_det", "full:stage3_cls", "single:cls",
                      "naive:stage2_det", "naive:stage3_cls"]
    expert = dict(calls)["full:stage2_det"]
    assert all(e is None for label, e in calls if label != "full:stage2_det")
    saved = H.load_checkpoint(tmp_path / "single_task" / "det" / "weights.pt")[0].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in expert.state_dict().items())
    log = (tmp_path / "full" / "stage2_det" / "log.csv").read_text().splitlines()[0].split(",")
    assert "expert_det" in log
    assert results["single_task"]["det"]["value"] == json.loads(
        (tmp_path / "single_task" / "det" / "done.json").read_text())["val"]["det.map"]
    # the expert's training is part of the method's cost, and the report discloses the teacher
    seconds = H.training_seconds(results, cfg)
    method = sum(s["seconds"] for s in results["strategies"]["full"]["stages"])
    assert seconds["method_with_experts"] == pytest.approx(method + results["single_task"]["det"]["seconds"])
    assert any("Single-task teacher (disclosed)" in line for line in H._method_extras(cfg.to_dict()))
    without = H.make_config("smoke", single_task_teacher_weight={"det": 0.0})  # detection's is on by default
    assert not any("Single-task teacher" in line for line in H._method_extras(without.to_dict()))
    assert "method_with_experts" not in H.training_seconds(results, without)


def test_run_pipeline_takes_the_detection_classes_from_its_data(tmp_path):
    """A config made after the data was loaded (det_classes None) records the data's classes; a config that
    names other classes is refused before any training."""
    data = H.prepare_data(H.make_config("smoke", out_dir=str(tmp_path / "data")), verbose=False)
    classes = list(data["det"]["train"].class_names)
    wrong = H.make_config("smoke", out_dir=str(tmp_path / "wrong"), det_classes=classes[::-1])
    with pytest.raises(ValueError, match="differ from the data"):
        H.run_pipeline(wrong, data)
    assert not (tmp_path / "wrong" / "config.json").exists()


def test_teacher_never_changes_and_frozen_bn_statistics_do_not_move(smoke_run, tmp_path):
    cfg, data = smoke_run["cfg"], smoke_run["data"]
    model = H.initial_model(cfg)
    model.load_state_dict(torch.load(H.stage_dir(cfg, "full", 0) / "weights.pt", weights_only=False)["model"])
    teacher = H.freeze_teacher(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    short = H.Config(**{**cfg.to_dict(), "epochs": {**cfg.epochs, "det": 1}})
    H.train_stage(model, "det", data, short, tmp_path / "det", earlier=["seg"], teacher=teacher, replay=True)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    moved = [k for k, v in model.backbone.state_dict().items() if "running" in k and not torch.equal(bn_before[k], v)]
    assert bn_before and not moved
    # and across the real pipeline: the backbone's BatchNorm buffers are identical after every stage (the last
    # stage's weights as the final model stores them: statistics in fp16), and those of the neck's and head's channels after every
    # stage but the first, which trained them (a stage that adds channels gives only its fresh ones live statistics:
    # freeze_old_channels holds the old ones)
    stages = [torch.load(H.stage_dir(cfg, "full", k) / "weights.pt", weights_only=False)["model"] for k in range(3)]
    init = H.initial_model(cfg).state_dict()
    as_stored = lambda k, v: v.half().float() if k == 2 and cfg.final_precision != "fp32" else v  # noqa: E731
    for key in (k for k in init if k.startswith("backbone.") and "running" in k):
        assert all(torch.equal(as_stored(k, init[key]), s[key]) for k, s in enumerate(stages)), key
    head_stats = [k for k in init if k.startswith(("neck.", "head.")) and "running" in k]
    assert head_stats and cfg.norm == "bn"
    grown = [k for k in (1, 2) if H.grows_neck_head(cfg, cfg.order[k], cfg.order[:k], replay=True)]
    assert grown == [1, 2] and set(cfg.freeze_old_channels) == {"neck", "head"}  # smoke grows both, holds old channels
    for key in head_stats:
        assert not torch.equal(init[key], stages[0][key]), key  # stage 1 trained them
        for k in grown:
            kept = stages[k][key][tuple(slice(0, n) for n in stages[k - 1][key].shape)]  # the channels it started with
            assert torch.equal(as_stored(k, stages[k - 1][key]), kept), (key, k)  # as the stage before left them
            assert len(stages[k][key]) - len(kept) == cfg.grow_neck_head[cfg.order[k]]  # and the fresh ones
    # while the weights did train
    assert not torch.equal(init["head.layers.2.weight"], stages[2]["head.layers.2.weight"])


def test_naive_fine_tuning_forgets_more_than_the_method(smoke_run):
    summary = smoke_run["results"]["summary"]
    def forgetting(strategy):  # mean absolute drop of the tasks learned before the last stage
        rows = [r for r in summary if r["strategy"] == strategy and r["task"] != smoke_run["cfg"].order[-1]]
        return sum(r["stage_end_drop_abs_points"] for r in rows) / len(rows)
    assert forgetting("naive") > forgetting("full") + 1.0, summary


def run_eval(*args):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_eval_py_prints_metrics_and_its_predictions_rescore_to_the_same_numbers(smoke_run, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    out = smoke_run["out"]
    root = out / "synthetic_data"
    proc = run_eval("--weights", out / "final.pt", "--data_root", root, "--tasks", "all", "--device", "cpu",
                    "--out", tmp_path / "m.json", "--save-predictions", tmp_path / "pred")
    assert proc.returncode == 0, proc.stderr
    for label in ("mAP@[.5:.95]", "mAP@0.5", "mIoU", "Top-1", "flip test on"):
        assert label in proc.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("det.map", "det.map50", "seg.miou", "cls.top1"):
        assert m[key] == pytest.approx(final[key]), key
    assert m["classes"]["det"] == smoke_run["data"]["det"]["train"].class_names
    # detections.json scored by plain pycocotools against the dataset's own JSON (crowd kept, classes by name)
    gt_json = json.loads((root / "mini_coco_det" / "val" / "labels.json").read_text())
    keep = {c["id"] for c in gt_json["categories"] if c["name"] in m["classes"]["det"]}
    gt_json["annotations"] = [a for a in gt_json["annotations"] if a["category_id"] in keep]
    gt_json["categories"] = [c for c in gt_json["categories"] if c["id"] in keep]
    gt = COCO()
    gt.dataset = gt_json
    gt.createIndex()
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert dets and all(d["category_id"] in keep for d in dets)
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] == pytest.approx(m["det.map"]) and ev.stats[1] == pytest.approx(m["det.map50"])
    # segmentation PNGs at original size scored with a plain confusion matrix
    cm = np.zeros((21, 21), dtype=np.int64)
    for png in sorted((tmp_path / "pred" / "segmentation").glob("*.png")):
        pred = np.array(Image.open(png))
        truth = np.array(Image.open(root / "mini_voc_seg" / "val" / png.name))
        assert pred.shape == truth.shape
        valid = truth != 255
        np.add.at(cm, (truth[valid], pred[valid]), 1)
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    assert np.mean(inter[union > 0] / union[union > 0]) == pytest.approx(m["seg.miou"])
    # classification.csv against the folder names
    rows = list(csv.DictReader(open(tmp_path / "pred" / "classification.csv")))
    names = dict(zip(sorted(H.IMAGENETTE_CLASSES), H.IMAGENETTE_CLASSES.values()))
    correct = [names[r["file"].split("/")[0]] == r["predicted_class"] for r in rows]
    assert len(rows) == len(smoke_run["data"]["cls"]["val"]) and np.mean(correct) == pytest.approx(m["cls.top1"])


def test_eval_py_subset_of_tasks(smoke_run, tmp_path):
    proc = run_eval("--weights", smoke_run["out"] / "final.pt", "--data_root", smoke_run["out"] / "synthetic_data",
                    "--tasks", "det,seg", "--device", "cpu", "--out", tmp_path / "m.json", "--no-flip-test")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert "det.map" in m and "seg.miou" in m and "cls.top1" not in m and "Top-1" not in proc.stdout
    assert "flip test off" in proc.stdout  # one pass: the run itself scored with the flip test


def test_eval_py_score_threshold_keeps_only_higher_detections(smoke_run, tmp_path):
    """--score-thresh overrides the checkpoint's: the detections kept at 0.3 are exactly those scored above 0.3
    at 0 (the same peaks, NMS per class is unchanged by dropping lower ones), and the JSON says what scored it."""
    weights, root = smoke_run["out"] / "final.pt", smoke_run["out"] / "synthetic_data"
    kept = {}
    for thresh in ("0", "0.3"):
        proc = run_eval("--weights", weights, "--data_root", root, "--tasks", "det", "--device", "cpu",
                        "--score-thresh", thresh, "--out", tmp_path / f"m{thresh}.json",
                        "--save-predictions", tmp_path / f"p{thresh}")
        assert proc.returncode == 0, proc.stderr
        assert f"score threshold {float(thresh):g}" in proc.stdout
        assert json.loads((tmp_path / f"m{thresh}.json").read_text())["scored_with"]["score_thresh"] == float(thresh)
        kept[thresh] = json.loads((tmp_path / f"p{thresh}" / "detections.json").read_text())
    key = lambda d: (d["image_id"], d["category_id"], tuple(round(v, 3) for v in d["bbox"]), round(d["score"], 6))
    above = sorted(key(d) for d in kept["0"] if d["score"] > 0.3)
    assert above and len(above) < len(kept["0"])  # the threshold acts on this model
    assert sorted(key(d) for d in kept["0.3"]) == above


EVAL_FAILURES = (["missing", "not_a_checkpoint", "bad_root", "bad_tasks", "missing_split", "unwritable_out",
                  "unwritable_predictions", "bad_device", "bad_score_thresh"]
                 + ([] if torch.cuda.is_available() else ["no_cuda"]))


@pytest.mark.parametrize("case", EVAL_FAILURES)
def test_eval_py_fails_with_one_line_and_status_2(smoke_run, tmp_path, case):
    weights, root = smoke_run["out"] / "final.pt", smoke_run["out"] / "synthetic_data"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    args = {"missing": ["--weights", tmp_path / "nope.pt", "--data_root", root],
            "not_a_checkpoint": ["--weights", tmp_path / "junk.pt", "--data_root", root],
            "bad_root": ["--weights", weights, "--data_root", tmp_path / "nowhere"],
            "bad_tasks": ["--weights", weights, "--data_root", root, "--tasks", "det,depth"],
            "missing_split": ["--weights", weights, "--data_root", root, "--split", "test"],
            # a folder that is a file: cannot be written, found before any evaluation
            "unwritable_out": ["--weights", weights, "--data_root", root, "--out", tmp_path / "junk.pt" / "m.json"],
            "unwritable_predictions": ["--weights", weights, "--data_root", root,
                                       "--save-predictions", tmp_path / "junk.pt" / "preds"],
            "bad_device": ["--weights", weights, "--data_root", root, "--device", "tpu9"],
            "bad_score_thresh": ["--weights", weights, "--data_root", root, "--score-thresh", "1.5"],
            "no_cuda": ["--weights", weights, "--data_root", root, "--device", "cuda"]}[case]
    proc = run_eval(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert "mAP" not in proc.stdout  # nothing was evaluated


def test_eval_py_names_checkpoint_classes_missing_from_the_split(smoke_run, tmp_path):
    """A split without a category for one of the checkpoint's detection classes: one line names it and
    says it is left out of the mAP; --strict-classes makes it an error (status 2)."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(smoke_run["out"] / "synthetic_data", root)
    path = root / "mini_coco_det" / "val" / "labels.json"
    coco = json.loads(path.read_text())
    dog = next(c["id"] for c in coco["categories"] if c["name"] == "dog")
    coco["categories"] = [c for c in coco["categories"] if c["id"] != dog]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != dog]
    path.write_text(json.dumps(coco))
    proc = run_eval("--weights", smoke_run["out"] / "final.pt", "--data_root", root, "--tasks", "det", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in proc.stderr.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "dog" in notes[0] and "mAP" in notes[0]
    strict = run_eval("--weights", smoke_run["out"] / "final.pt", "--data_root", root, "--tasks", "det",
                      "--device", "cpu", "--strict-classes")
    assert strict.returncode == 2 and "dog" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1


def test_config_precedence(monkeypatch):
    monkeypatch.setenv("UNIHEAD_EPOCHS", '{"det": 40}')
    monkeypatch.setenv("UNIHEAD_BATCH_SIZE", "3")
    cfg = H.make_config("quick")
    assert cfg.epochs == {**H.PROFILES["quick"]["epochs"], "det": 40} and cfg.batch_size == 3
    assert H.make_config("quick", batch_size=5).batch_size == 5  # keyword beats environment
    with pytest.raises(ValueError, match="unknown config field"):
        H.make_config("quick", no_such_field=1)
    if not torch.cuda.is_available():
        monkeypatch.delenv("UNIHEAD_PROFILE", raising=False)
        assert H.make_config().profile == "smoke"


def test_device_description_names_the_threads_torch_uses():
    """Run records carry it: two runs sharing a 2-core CPU say '1 of 2', and their times read accordingly."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert H.describe_device("cpu") == f"CPU ({H.cpu_model()}, {threads} of {os.cpu_count()} threads used)"
    finally:
        torch.set_num_threads(before)


def test_cpu_model_is_read_from_cpuinfo_and_falls_back_to_the_architecture():
    """Machines of one kind (2 cores) differ in speed: run records name the CPU model, not only "x86_64"."""
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13 64-Core Processor\nflags\t: fpu\n"
    assert H.cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert H.cpu_model("processor\t: 0\nmodel name\t:\n") == (platform.processor() or platform.machine())
    assert H.cpu_model("") == (platform.processor() or platform.machine())


def test_native_bf16_is_read_from_the_cpu_flags():
    """cpu_bf16 "auto" trains in bf16 only where the CPU computes it in hardware (emulated bf16 is slower)."""
    flags = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu sse avx512f avx512_bf16 avx512_vnni\n"
    assert H.cpu_has_native_bf16(flags)
    assert H.cpu_has_native_bf16("flags\t: fpu amx_tile amx_bf16\n")
    assert not H.cpu_has_native_bf16("flags\t: fpu sse avx2 avx512f avx512bw\n")
    assert not H.cpu_has_native_bf16("model name\t: x86_64\n")  # no flags line
    assert not H.cpu_has_native_bf16("")


def test_training_precision_follows_cpu_bf16_and_amp(monkeypatch):
    """On a CPU: "on" bf16, "off" fp32, "auto" as the flags say; on CUDA fp16 with amp whatever cpu_bf16 says;
    an unknown value is refused with its name."""
    for native in (True, False):
        monkeypatch.setattr(H, "cpu_has_native_bf16", lambda cpuinfo=None, native=native: native)
        assert H.training_precision("cpu", H.make_config("smoke", cpu_bf16="on")) == "bf16"
        assert H.training_precision("cpu", H.make_config("smoke", cpu_bf16="off")) == "fp32"
        assert H.training_precision("cpu", H.make_config("smoke", cpu_bf16="auto")) == ("bf16" if native else "fp32")
    assert H.training_precision("cuda", H.make_config("smoke", cpu_bf16="on")) == "fp16"
    assert H.training_precision("cuda", H.make_config("smoke", amp=False)) == "fp32"
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="cpu_bf16 must be 'on', 'off' or 'auto', not 'yes'"):
            H.training_precision(device, H.make_config("smoke", cpu_bf16="yes"))


def test_recorded_precision_reads_the_field_and_dates_older_cpu_runs_to_fp32():
    """The report's schedule line: the run's own record; a CPU run from before the field trained in fp32 (the only
    way then); anything else without the field is 'not recorded', never guessed."""
    assert H.recorded_precision({"device": "CPU (AMD EPYC, 2 of 2 threads used)", "precision": "bf16"}) == "bf16"
    assert H.recorded_precision({"device": "CPU (x86_64, 2 of 2 threads used)"}) == "fp32"
    assert H.recorded_precision({"device": "Tesla T4"}) == "not recorded"
    assert H.recorded_precision({}) == "not recorded"


def test_one_value_for_a_per_task_field_sets_every_task(monkeypatch):
    """A per-task dict field given one value (keyword, environment, or an older checkpoint that stored one figure
    where the field is now per task) holds that value for every task; a checkpoint's JSON lists come back as the
    tuples the config declares."""
    assert H.make_config("smoke", task_weight=2.5).task_weight == {"seg": 2.5, "det": 2.5, "cls": 2.5}
    monkeypatch.setenv("UNIHEAD_KD_CURRENT_WEIGHT", "0.5")
    assert H.make_config("smoke").kd_current_weight == {"seg": 0.5, "det": 0.5, "cls": 0.5}
    stored = {**H.make_config("quick").to_dict(), "kd_current_weight": 0.25, "order": ["seg", "det", "cls"],
              "redraw_neck_head": ["det"]}
    cfg = H.config_from_checkpoint({"config": stored, "classes": {"det": ["a", "b"]}})
    assert cfg.kd_current_weight == {"seg": 0.25, "det": 0.25, "cls": 0.25}
    assert cfg.order == ("seg", "det", "cls") and cfg.redraw_neck_head == ("det",) and cfg.det_classes == ["a", "b"]
    assert cfg.profile == "quick" and cfg.image_size == H.PROFILES["quick"]["image_size"]


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    main = [l for l in readme if l.rstrip().endswith("# main job")]
    tests = [l for l in readme if l.rstrip().endswith("# tests")]
    assert len(main) == 1 and len(tests) == 1 and "colab.ipynb" in main[0] and "pytest" in tests[0]
    assert readme.index(main[0]) < 5  # the README starts with them
    assert "'# tests$' README.md" in (ROOT / ".ci" / "run").read_text()


def test_publish_copies_artifacts_and_regenerates_report_and_readme(smoke_run, tmp_path):
    import re
    import shutil
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)
    report = H.publish_run(smoke_run["out"], tmp_path / "results" / "smoke", tmp_path / "report.md",
                           seed_runs=[(smoke_run["out"], tmp_path / "results" / "smoke-again")], readme=readme,
                           with_weights=True)
    published = tmp_path / "results" / "smoke"
    # the final weights only (fp16, scored as stored), never stage checkpoints or data
    assert [p.name for p in published.rglob("*.pt")] == ["final.pt"] and not (published / "synthetic_data").exists()
    assert not list((tmp_path / "results" / "smoke-again").rglob("*.pt"))
    proc = run_eval("--weights", published / "final.pt", "--data_root", smoke_run["out"] / "synthetic_data",
                    "--device", "cpu", "--out", tmp_path / "shipped.json")
    assert proc.returncode == 0, proc.stderr
    shipped = json.loads((tmp_path / "shipped.json").read_text())
    final_row = smoke_run["results"]["strategies"]["full"]["matrix"][-1]
    assert all(shipped[k] == final_row[k] for k in ("det.map", "det.map50", "seg.miou", "cls.top1"))
    assert (published / "metrics.json").is_file() and (published / "full" / "stage1_seg" / "log.csv").is_file()
    text = report.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):  # every figure the report shows exists
        assert (report.parent / link).is_file(), link
    final = json.loads((smoke_run["out"] / "final_metrics.json").read_text())
    assert "## Seeds" in text and f"{final['cls.top1']:.4f}" in text
    block = readme.read_text().split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert f"{final['seg.miou']:.4f}" in block and "smoke" in block
    assert H.trained_on(smoke_run["resources"]) in block  # the devices its training records name
    assert H.trained_on({"device": "CPU (x)", "train_devices": {"method": ["B", "A"], "naive_ablation": ["A"]}}) == "A; B"
    assert H.trained_on({"device": "CPU (x)"}) == "CPU (x)"  # a run from before train_devices
    # publishing again replaces the earlier artifacts whole: a file only the earlier run had is gone
    (published / "naive" / "stale.csv").write_text("from an earlier run")
    H.copy_artifacts(smoke_run["out"], published)
    assert not (published / "naive" / "stale.csv").exists() and (published / "metrics.json").is_file()
    # and a folder that is not a run's artifacts is never overwritten
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.md").write_text("keep")
    with pytest.raises(ValueError, match="holds no run artifacts"):
        H.copy_artifacts(smoke_run["out"], other)
    assert (other / "mine.md").read_text() == "keep"


def test_training_time_totals_name_every_run(smoke_run):
    """resources.json's totals are the sums of the runs they name, recomputed here from metrics.json, and the
    report prints each of them."""
    results, res, cfg = smoke_run["results"], smoke_run["resources"], smoke_run["cfg"]
    method = sum(s["seconds"] for s in results["strategies"]["full"]["stages"])
    naive = sum(s["seconds"] for s in results["strategies"]["naive"]["stages"][1:])  # stage 1 is shared
    single = sum(v["seconds"] for t, v in results["single_task"].items() if t != cfg.order[0])  # first: stage 1
    expected = {"method": method, "naive_ablation": naive, "single_task_baselines": single,
                "all": method + naive + single,
                # detection's stage distils detection alone (on by default): the method's cost with its expert's
                "method_with_experts": method + results["single_task"]["det"]["seconds"]}
    assert cfg.single_task_teacher_weight == {"seg": 0.0, "det": 1.0, "cls": 0.0}
    assert res["train_seconds"] == pytest.approx(expected)
    assert single > 0 and naive > 0
    report = (smoke_run["out"] / "report.md").read_text()
    for value in expected.values():
        assert f"{value / 60:.1f} min" in report


def test_report_names_where_each_group_of_runs_trained(smoke_run, tmp_path):
    """Training may run elsewhere than the latency measurement (another machine, a CPU shared with a second run):
    each group's stage records name their device and number format and the report prints them; a stage trained
    before records named it says 'not recorded' instead of borrowing the latency's device, and one from before
    they named the format gives the device alone."""
    import shutil
    here = H.describe_device("cpu") + ", fp32 training"  # the smoke profile trains in fp32 on any CPU
    assert smoke_run["resources"]["train_devices"] == {"method": [here], "single_task_baselines": [here],
                                                       "naive_ablation": [here]}
    assert f"| naive ablation trained on | {here} |" in (smoke_run["out"] / "report.md").read_text()
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["strategies"]["full"]["stages"][0]["trained_on"]  # stage 1 as an older run recorded it
    metrics["strategies"]["full"]["stages"][2]["trained_on"] = "CPU (x86_64, 1 of 2 threads used)"
    del metrics["strategies"]["full"]["stages"][2]["precision"]  # from before records named the format
    metrics["strategies"]["naive"]["stages"][-1]["precision"] = "bf16"
    devices = H.training_devices(metrics, smoke_run["cfg"])
    assert devices["method"] == sorted(["not recorded", here, "CPU (x86_64, 1 of 2 threads used)"])
    assert devices["naive_ablation"] == sorted([here, here.replace("fp32", "bf16")])
    res = {**json.loads((run / "resources.json").read_text()), "train_devices": devices}
    H.write_json(res, run / "resources.json")
    assert f"| method trained on | {'; '.join(devices['method'])} |" in H.write_report(run, run / "r.md").read_text()
    del res["train_devices"]  # resources.json of a run from before the field
    H.write_json(res, run / "resources.json")
    assert "| training ran on | not recorded" in H.write_report(run, run / "r.md").read_text()


def test_report_without_baselines_says_n_a_not_fail(smoke_run, tmp_path):
    """Without single-task baselines the rule cannot be judged: the report says n/a, never FAIL."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    metrics = json.loads((run / "metrics.json").read_text())
    first = smoke_run["cfg"].order[0]
    metrics["single_task"] = {first: metrics["single_task"][first]}
    metrics["summary"] = H.forgetting_summary(metrics, smoke_run["cfg"])
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = H.write_report(run, run / "report.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| full | ") and "det.map" in l]
    assert rows and "n/a" in rows[0] and "FAIL" not in rows[0]
    assert "cannot say whether it passes" in text


def test_report_names_the_sides_a_run_scored_at_other_than_its_input_side(smoke_run, tmp_path):
    """A run scored with eval_scale above 1 says so in its schedule line, its architecture notes and its latency
    row (timed at the larger side); the default run says none of it."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    plain = H.write_report(run, run / "r.md").read_text()
    assert "scored at" not in plain and "Scored on other image sides" not in plain and "resized to" not in plain
    cfg = json.loads((run / "config.json").read_text())
    H.write_json({**cfg, "image_size": 128, "eval_scale": {"det": 1.25, "seg": 1.0}}, run / "config.json")
    res = json.loads((run / "resources.json").read_text())
    res["latency_512"] = [{**res["latency_512"][0], "size": 640}]
    H.write_json(res, run / "resources.json")
    text = H.write_report(run, run / "r.md").read_text()
    assert "input 128 px (classification" in text and ", scored at 160 px (detection) and 128 px (segmentation);" in text
    assert "- **Scored on other image sides**: 160 px (detection) and 128 px (segmentation)" in text
    assert "| latency, one 512x512 image, batch 1 (resized to 640 px, as the run scores it) |" in text


def test_report_says_when_stages_were_scored_again_from_their_weights(smoke_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    records = sorted(run.rglob("done.json"))
    assert len(records) >= 3 and "stages were trained by an earlier call" not in H.write_report(run, run / "r.md").read_text()
    for path in records[-2:]:  # as run_stage_cached leaves a finished stage it scored again (the first one not)
        H.write_json({**json.loads(path.read_text()), "scored_on": "2026-11-23"}, path)
    H.write_json({k: v for k, v in json.loads(records[0].read_text()).items() if k != "scored_with"}, records[0])
    text = H.write_report(run, run / "r.md").read_text()
    assert f"_2 of its {len(records)} stages were trained by an earlier call and scored again from their saved " \
           "weights on 2026-11-23 (flip_test True," in text


def test_report_gives_the_val_box_count_of_each_rare_detection_class(smoke_run, tmp_path):
    """A class with one val box swings mAP by a whole class's share: the limitations name such classes with
    their counts, taken from the run's data facts."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    metrics = json.loads((run / "metrics.json").read_text())
    det = metrics["meta"]["data"]["det"]
    names = list(det["boxes_per_class"]["val"])
    det["boxes_per_class"]["val"] = {name: (1 if i == 0 else 40) for i, name in enumerate(names)}
    det["few_val_boxes"] = names[:1]
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = H.write_report(run, run / "report.md").read_text()
    line = next(l for l in text.splitlines() if "few val boxes" in l)
    assert f"(under 10: {names[0]} 1)" in line
    assert all(f"{name} 40" not in line for name in names[1:])
    assert f"by up to {1 / smoke_run['cfg'].num_det_classes:.2f}" in line


def test_report_sets_detection_per_class_beside_its_baseline_and_its_val_boxes(smoke_run, tmp_path):
    """Where detection's drop sits: each class's AP for the single-task baseline and the final model with its val box
    count, and the mean over the classes with more than one val box (a one-box class swings mAP by a whole share)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run["out"], run, ignore=shutil.ignore_patterns("*.pt", "synthetic_data"))
    metrics = json.loads((run / "metrics.json").read_text())
    names = list(metrics["meta"]["data"]["det"]["boxes_per_class"]["val"])
    metrics["meta"]["data"]["det"]["boxes_per_class"]["val"] = {n: (1 if i == 0 else 40) for i, n in enumerate(names)}
    (run / "metrics.json").write_text(json.dumps(metrics))
    record = json.loads((run / "single_task" / "det" / "done.json").read_text())
    record["val"]["det.per_class_ap"] = {n: (0.5 if i == 0 else 0.1) for i, n in enumerate(names)}
    record["val"]["det.per_class_ap50"] = {n: (1.0 if i == 0 else 0.2) for i, n in enumerate(names)}
    (run / "single_task" / "det" / "done.json").write_text(json.dumps(record))
    final = json.loads((run / "final_metrics.json").read_text())
    final["det.per_class_ap"] = {n: (0.0 if i == 0 else 0.09) for i, n in enumerate(names)}
    final["det.per_class_ap50"] = {n: (0.0 if i == 0 else 0.3) for i, n in enumerate(names)}
    (run / "final_metrics.json").write_text(json.dumps(final))
    text = H.write_report(run, run / "report.md").read_text()
    assert f"| {names[0]} | 1 | 0.5000 | 0.0000 | 1.0000 | 0.0000 |" in text
    assert f"| {names[1]} | 40 | 0.1000 | 0.0900 | 0.2000 | 0.3000 |" in text
    assert (f"Without the class with one val box ({names[0]}): mAP over the other {len(names) - 1} classes 0.1000 for "
            "the baseline, 0.0900 for the final model (drop 10.0 %)") in text
    record["val"]["det.per_class_ap"][names[1]] = None  # a class with no val box in the baseline's scoring: left out of the mean
    (run / "single_task" / "det" / "done.json").write_text(json.dumps(record))
    text = H.write_report(run, run / "report.md").read_text()
    assert f"| {names[1]} | 40 | n/a | 0.0900 |" in text and f"over the other {len(names) - 2} classes 0.1000" in text
    shutil.rmtree(run / "single_task" / "det")  # no baseline record: no table
    assert "Detection per class (val)" not in H.write_report(run, run / "report.md").read_text()


def test_rule_bootstrap_rescores_the_runs_baselines_and_final_model(smoke_run, tmp_path):
    """tools/rule_bootstrap.py from the run's folder: its per-image scoring of each task's single-task baseline and
    of final.pt, over all val images, gives the figures the pipeline wrote in metrics.json; every draw is scored."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("rule_bootstrap", ROOT / "tools" / "rule_bootstrap.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, results = smoke_run["out"], smoke_run["results"]
    summary = tool.bootstrap_rule(out, "unused: the smoke run's data is synthetic", resamples=10)
    assert json.loads((out / "rule_bootstrap.json").read_text())["tasks"].keys() == set(H.TASKS)
    for task, r in summary["tasks"].items():
        metric = H.TASK_METRIC[task]
        assert r["baseline"] == pytest.approx(results["single_task"][task]["value"], abs=1e-6), task
        assert r["final"] == pytest.approx(results["final"][metric], abs=1e-6), task
        assert r["valid_resamples"] <= 10 and r["drop_rel_pct_p05"] <= r["drop_rel_pct_p95"]
    report = H.write_report(out, tmp_path / "report.md").read_text()  # the report states it when the run has it
    assert "paired bootstrap over the val images (`tools/rule_bootstrap.py`, 10 draws" in report
    assert f"| {H.TASK_METRIC['cls']} | {len(smoke_run['data']['cls']['val'])} |" in report
    # a bootstrap written for another final model (the stages trained again since) is named, not printed
    boot = json.loads((out / "rule_bootstrap.json").read_text())
    boot["tasks"]["seg"]["final"] += 0.01
    (out / "rule_bootstrap.json").write_text(json.dumps(boot))
    stale = H.write_report(out, tmp_path / "stale.md").read_text()
    assert "rule_bootstrap.json was written for another final model (seg.miou" in stale
    assert "share of draws within 5 %" not in stale
    (out / "rule_bootstrap.json").unlink()  # the module's smoke run as it was


def test_the_rule_counts_a_drop_of_exactly_five_points_as_within_despite_float32():
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731  metrics arrive as float32
    cfg = H.Config()  # order seg -> det -> cls
    stage_rows = [{"seg.miou": 0.5, "det.map": 0.0, "cls.top1": 0.0},
                  {"seg.miou": 0.5, "det.map": 0.0400, "cls.top1": 0.0},
                  {"seg.miou": 0.5, "det.map": 0.0400, "cls.top1": f32(52 / 60)}]
    results = {"strategies": {"full": {"matrix": stage_rows}},
               "single_task": {"seg": {"value": 0.5}, "det": {"value": 0.0380}, "cls": {"value": f32(55 / 60)}}}
    assert 100 * (f32(55 / 60) - f32(52 / 60)) > 5  # the float32 rounding the rule must allow
    results["summary"] = H.forgetting_summary(results, cfg)
    rows = {r["task"]: r for r in results["summary"]}
    # classification: 3 of 60 images = exactly 5 points (within, absolute reading), 5.45 % relative (not within)
    assert rows["cls"]["pass_abs"] is True and rows["cls"]["pass_rel"] is False and rows["cls"]["bonus"] is False
    assert rows["seg"]["pass_rel"] and rows["seg"]["bonus"]  # equal to its baseline: the bonus holds
    assert rows["det"]["bonus"] and rows["det"]["drop_rel_pct"] == pytest.approx(-100 * 0.002 / 0.038)
    assert H.rule_outcome(results, cfg.to_dict()) == (False, False)
