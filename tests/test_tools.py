"""tools/experiment.py, the unit of the ablations: a stage runs as a measured experiment (from the ImageNet
backbone, or from saved weights with earlier tasks), its record says what changed, and the table reads it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "experiment.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_experiment_records_a_stage_and_a_later_stage_from_its_weights(tmp_path):
    common = ["--profile", "smoke", "--out", tmp_path]
    first = run_tool("seg-one", "--task", "seg", "--set", 'epochs={"seg": 1}', "--keep-weights", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    later = run_tool("det-after-seg", "--task", "det", "--init", tmp_path / "seg-one" / "weights.pt", "--earlier", "seg",
                     "--set", 'epochs={"det": 1}', "--set", "box_loss_weight=5", *common)
    assert later.returncode == 0, later.stderr[-2000:]
    record = json.loads((tmp_path / "det-after-seg.json").read_text())
    assert record["overrides"] == {"epochs": {"det": 1}, "box_loss_weight": 5}
    assert record["config"]["box_loss_weight"] == 5 and record["earlier"] == ["seg"]
    assert {"det.map", "det.map50", "seg.miou"} <= set(record["metrics"])  # the earlier task is scored too
    assert len(record["history"]) == 1 and (tmp_path / "det-after-seg" / "log.csv").is_file()
    table = run_tool("--table", tmp_path)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert len(lines) == 4 and any(line.startswith("| det-after-seg | ") and "box_loss_weight=5" in line for line in lines)
    assert f"{record['metrics']['det.map']:.4f}" in table.stdout


def test_reset_puts_the_backbone_back_to_imagenet_and_keeps_neck_and_head(tmp_path):
    """--reset backbone (helpers.reset_to_initial): the loaded backbone goes back to the ImageNet weights that
    initial_model starts from, the trained neck and head stay; an unknown part and --reset without --init are
    refused."""
    import torch
    import helpers as H

    cfg = H.make_config("smoke")
    initial = {k: v.clone() for k, v in H.initial_model(cfg).state_dict().items()}
    trained = H.initial_model(cfg)
    with torch.no_grad():  # stands for an earlier stage's training: every weight moved
        for p in trained.parameters():
            p.add_(0.5)
    moved = {k: v.clone() for k, v in trained.state_dict().items()}
    H.reset_to_initial(trained, cfg, ["backbone"])
    for key, value in trained.state_dict().items():
        assert torch.equal(value, initial[key] if key.startswith("backbone.") else moved[key]), key
    with pytest.raises(ValueError, match="trunk"):
        H.reset_to_initial(trained, cfg, ["trunk"])
    refused = run_tool("x", "--task", "det", "--reset", "neck", "--profile", "smoke", "--out", tmp_path)
    assert refused.returncode != 0 and "--reset needs --init" in refused.stderr


def test_readme_lists_stage_tables_and_whole_pipeline_runs(tmp_path):
    """--readme: a folder of stage records becomes a table; a folder holding only a README (a whole notebook run)
    is listed by its title and linked; a folder with neither is left out."""
    stage = tmp_path / "stage2"
    stage.mkdir()
    record = {"name": "s2-x", "task": "det", "overrides": {"lr": 0.002}, "seed": 3, "device": "CPU", "date": "2026-01-01",
              "commit": "abc1234", "metrics": {"det.map": 0.0123, "seg.miou": 0.4567},
              "history": [{"epoch": 1, "det.map": 0.0123}]}
    (stage / "s2-x.json").write_text(json.dumps(record))
    agreement = {"name": "agree-x", "task": "det", "reference": "alone.pt", "data_root": "data", "images": "cls:train",
                 "date": "2026-01-02", "rows": [{"model": "s2-x.pt", "images": 240, "distillation_loss": 0.321}]}
    (stage / "agree-x.json").write_text(json.dumps(agreement))  # listed under the table, not as an experiment row
    (tmp_path / "pipeline-y").mkdir()
    (tmp_path / "pipeline-y" / "README.md").write_text("# The pipeline with y changed\n\nbody\n")
    (tmp_path / "empty").mkdir()
    done = run_tool("--readme", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "README.md").read_text()
    assert "## stage2" in text and "| s2-x | lr=0.002 | 3 | 0.0123 |" in text and "0.4567" in text
    assert "- [pipeline-y](pipeline-y/README.md): The pipeline with y changed" in text
    assert "empty" not in text
    assert "Agreement `agree-x` (det outputs against alone.pt, 240 images cls:train of data" in text
    assert "| s2-x.pt | 0.3210 |" in text and "| agree-x |" not in text


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bootstrap_tool():
    return load_tool("rule_bootstrap")


def test_bootstrap_draws_score_repeated_images_as_new_ones(tmp_path):
    """Known answers for one draw: detection with a perfect result for the first val image only scores below 1
    over all images and exactly 1 over a draw of that image repeated (each copy a new image id); a repeated
    confusion matrix keeps its IoU; top-1 counts a repeated image each time."""
    import torch
    import helpers as H
    tool = load_bootstrap_tool()
    val = H.load_all(H.make_synthetic_dataset(tmp_path, n_train=2, n_val=4), ["det"], ["val"], verbose=False)["det"]["val"]
    first = val.samples[0]["image_id"]
    perfect = [{"image_id": first, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in val.coco_gt["annotations"] if a["image_id"] == first]
    assert perfect
    parts = [perfect] + [[] for _ in val.samples[1:]]
    n = len(val.samples)
    assert tool.score_draw("det", val, parts, np.arange(n)) < 1.0
    assert tool.score_draw("det", val, parts, np.zeros(n, dtype=int)) == pytest.approx(1.0)
    cm = torch.zeros(21, 21, dtype=torch.int64)
    cm[0, 0], cm[1, 1], cm[1, 0] = 6, 3, 1  # IoU 6/7 and 3/4
    seg = H.TaskData("seg", "val", [], H.VOC_CLASSES, "voc")
    assert tool.score_draw("seg", seg, [cm, cm * 0], np.array([0, 0])) == pytest.approx((6 / 7 + 3 / 4) / 2)
    assert tool.score_draw("cls", seg, [1, 0, 1], np.array([0, 1, 1])) == pytest.approx(1 / 3)


def test_compare_runs_tabulates_each_runs_stage_records(tmp_path):
    """tools/compare_runs.py: one row per run and stage, the values of its done.json, the stage's own last-epoch
    training loss and its minutes; --stages keeps the named stages; a folder without stages is an error."""
    def stage(run, name, val, last, seconds):
        folder = tmp_path / run / "full" / name
        folder.mkdir(parents=True)
        record = {"task": name.split("_")[1], "val": val, "history": [{"epoch": 1}, last], "seconds": seconds}
        (folder / "done.json").write_text(json.dumps(record))
    stage("a", "stage1_seg", {"seg.miou": 0.5, "det.map": 0.0}, {"seg": 0.25}, 60)
    stage("a", "stage2_det", {"det.map": 0.0123, "det.map50": 0.04, "seg.miou": 0.47}, {"det_heatmap": 2.5, "det_box": 7.0}, 90)
    stage("b", "stage2_det", {"det.map": 0.02, "det.map50": 0.05, "seg.miou": 0.45}, {"det_heatmap": 2.9, "det_box": 7.25}, 120)
    tool = [sys.executable, str(ROOT / "tools" / "compare_runs.py")]
    out = subprocess.run(tool + [tmp_path / "a", tmp_path / "b", "--stages", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[2:]
    assert rows == [f"| {tmp_path / 'a'} | 2 (det) | 0.0123 | 0.0400 | 0.4700 |  | det_heatmap 2.500, det_box 7.000 | 1.5 |",
                    f"| {tmp_path / 'b'} | 2 (det) | 0.0200 | 0.0500 | 0.4500 |  | det_heatmap 2.900, det_box 7.250 | 2.0 |"]
    every = subprocess.run(tool + [tmp_path / "a"], capture_output=True, text=True)
    assert every.stdout.splitlines()[2].startswith(f"| {tmp_path / 'a'} | 1 (seg) | ") and "seg 0.250 | 1.0 |" in every.stdout
    missing = subprocess.run(tool + [tmp_path / "nothing"], capture_output=True, text=True)
    assert missing.returncode != 0 and "no full/ stages in" in missing.stderr


def test_experiment_refuses_an_expert_it_would_not_use(tmp_path):
    """--expert only acts in a later stage of the method with a single_task_teacher_weight for the task: without
    --init/--earlier, or with the weight at 0, the run stops before training and says what is missing."""
    common = ["--profile", "smoke", "--out", tmp_path, "--expert", tmp_path / "single.pt"]
    alone = run_tool("e1", "--task", "det", *common)
    assert alone.returncode != 0 and "--expert needs --init and --earlier" in alone.stderr
    unweighted = run_tool("e2", "--task", "det", "--init", tmp_path / "w.pt", "--earlier", "seg",
                          "--set", 'single_task_teacher_weight={"det": 0}', *common)  # detection's is on by default
    assert unweighted.returncode != 0 and "--expert needs a weight for it" in unweighted.stderr
    assert not list(tmp_path.glob("*.json"))


def test_score_only_scores_saved_weights_with_other_scoring_settings_and_refuses_training_fields(tmp_path,
                                                                                                synthetic_root):
    """--score-only: no training; the record's metrics are evaluate()'s on the checkpoint with the scoring field
    changed (detection at 1.25 x 128 = 160 px), and a field that would change training is refused."""
    import dataclasses
    import helpers as H

    cfg = H.make_config("smoke", image_size=128, eval_scale={"det": 1.0, "seg": 1.0})
    data = H.load_all(synthetic_root, tasks=["det", "seg"], verbose=False)
    weights = H.save_checkpoint(tmp_path / "w.pt", H.initial_model(cfg), cfg, H.data_classes(data))
    proc = run_tool("w-det125", "--task", "det", "--earlier", "seg", "--score-only", weights,
                    "--set", 'eval_scale={"det": 1.25}', "--data_root", synthetic_root, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "w-det125.json").read_text())
    assert record["scored_only"] and record["history"] == [] and record["earlier"] == ["seg"]
    assert record["scored_with"]["eval_sides"] == {"det": 160, "seg": 128}
    assert record["config"]["eval_scale"] == {"det": 1.25, "seg": 1.0}  # partial dict layered on the checkpoint's
    model, loaded, _ = H.load_checkpoint(weights)
    expected = H.evaluate(model, {t: data[t]["val"] for t in ("det", "seg")},
                          dataclasses.replace(loaded, eval_scale={"det": 1.25, "seg": 1.0}), tasks=["det", "seg"])
    for key in ("det.map", "det.map50", "seg.miou"):
        assert record["metrics"][key] == pytest.approx(expected[key]), key
    assert f"no training: {weights} scored on {synthetic_root}'s val" in run_tool("--table", tmp_path).stdout
    proc = run_tool("w-int8", "--task", "seg", "--score-only", weights, "--set", "final_precision=int8",
                    "--data_root", synthetic_root, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    H.round_to_storage(model, "int8")  # the weights as an int8 final.pt holds them
    expected = H.evaluate(model, {"seg": data["seg"]["val"]}, loaded, tasks=["seg"])
    assert json.loads((tmp_path / "w-int8.json").read_text())["metrics"]["seg.miou"] == pytest.approx(expected["seg.miou"])
    refused = run_tool("w-lr", "--task", "det", "--score-only", weights, "--set", "lr=0.1",
                       "--data_root", synthetic_root, "--out", tmp_path)
    assert refused.returncode != 0 and "['lr'] are training fields" in refused.stderr


def test_score_only_with_another_checkpoints_backbone(tmp_path, synthetic_root):
    """--score-only W --backbone-from D: W's neck and head on D's backbone (weights and statistics), scored; the
    record and the table name the donor; without --score-only the option is refused."""
    import helpers as H

    cfg = H.make_config("smoke", image_size=128)
    data = H.load_all(synthetic_root, tasks=["det", "seg"], verbose=False)
    own, donor = H.initial_model(cfg), H.initial_model(cfg)
    with torch.no_grad():
        for value in donor.backbone.parameters():
            value.mul_(0.5)  # a backbone that scores differently
        for value in own.head.parameters():
            value.add_(0.01)
    weights = H.save_checkpoint(tmp_path / "own.pt", own, cfg, H.data_classes(data))
    other = H.save_checkpoint(tmp_path / "donor.pt", donor, cfg, H.data_classes(data))
    proc = run_tool("swap", "--task", "seg", "--score-only", weights, "--backbone-from", other,
                    "--data_root", synthetic_root, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "swap.json").read_text())
    hybrid, loaded, _ = H.load_checkpoint(weights)
    hybrid.backbone.load_state_dict(H.load_checkpoint(other)[0].backbone.state_dict())
    expected = H.evaluate(hybrid, {"seg": data["seg"]["val"]}, loaded, tasks=["seg"])["seg.miou"]
    assert record["metrics"]["seg.miou"] == pytest.approx(expected) and record["backbone_from"] == str(other)
    image = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(hybrid(image)["seg"], H.load_checkpoint(weights)[0](image)["seg"])  # what was scored moved
    torch.testing.assert_close(hybrid.head.layers[-1].weight, own.head.layers[-1].weight.detach())
    assert f"no training: {weights} scored with the backbone of {other} on" in run_tool("--table", tmp_path).stdout
    refused = run_tool("x", "--task", "seg", "--backbone-from", other, "--out", tmp_path)
    assert refused.returncode != 0 and "--backbone-from goes with --score-only" in refused.stderr


def test_images_per_step_counts_replay_only_where_the_stage_replays():
    """A record's train images/s counts the replayed images of a stage that replays, and none for a stage that holds
    every earlier task (it runs without replay), a single-task stage or naive fine-tuning."""
    sys.path.insert(0, str(ROOT / "tools"))
    import experiment
    import helpers as H
    held = H.make_config("smoke")  # its classification stage holds segmentation and detection
    replays = H.make_config("smoke", later_backbone_lr_scale={"cls": 1.0})
    assert experiment.images_per_step(held, "cls", ["seg", "det"], True) == held.batch_size
    assert experiment.images_per_step(replays, "cls", ["seg", "det"], True) == 8 + 2 * 4
    assert experiment.images_per_step(replays, "cls", ["seg", "det"], False) == 8  # naive
    assert experiment.images_per_step(replays, "det", [], True) == 8  # alone


def test_stage_weights_from_final_recover_the_weights_before_a_held_last_stage(tmp_path):
    """A smoke sequence whose classification stage holds the earlier tasks (grown, old channels held, backbone not
    learning): the tool cuts final.pt back to stage 2's weights, every tensor as stage 2 saved it (final.pt in
    fp32 here), classification's own output rows put back to the run's initial draw (stage 1 decays them by
    a factor that only the tool's --row-factor knows: compared at a tolerance that covers it)."""
    import torch
    import helpers as H
    tool = load_tool("stage_weights_from_final")
    root = H.make_synthetic_dataset(tmp_path / "data", n_train=8, n_val=4)
    cfg = H.make_config("smoke", out_dir=str(tmp_path / "run"), data_root=str(root), batch_size=4,
                        epochs={"seg": 1, "det": 1, "cls": 1}, probe_epochs={"det": 0, "cls": 1},
                        grow_neck_head={"det": 8, "cls": 8}, final_precision="fp32")
    data = H.load_all(root, verbose=False)
    H.run_sequence(cfg, data)
    tool.main([str(tmp_path / "run" / "final.pt"), str(tmp_path / "stage2.pt")])
    got = H.read_checkpoint(tmp_path / "stage2.pt")
    saved = H.read_checkpoint(H.stage_dir(cfg, "full", 1) / "weights.pt")
    assert got["width"] == saved["width"] == 48 + 8
    model = H.build_model(cfg, backbone_weights="none", width=56)
    rows = H.own_output_rows(model, "cls")
    last = f"head.layers.{len(model.head.layers) - 1}."
    for key, value in saved["model"].items():
        if not value.dtype.is_floating_point:
            continue
        if key.startswith(last):
            torch.testing.assert_close(got["model"][key][~rows], value[~rows], rtol=0, atol=0)
            torch.testing.assert_close(got["model"][key][rows], value[rows], rtol=1e-2, atol=1e-6)
        else:
            assert torch.equal(got["model"][key], value), key
    trained = H.read_checkpoint(tmp_path / "run" / "final.pt")["model"][last + "weight"][rows][:, :56]
    assert not torch.allclose(trained, saved["model"][last + "weight"][rows], rtol=1e-2, atol=1e-6)  # stage 3 moved them


def test_agreement_is_zero_against_itself_and_grows_with_a_moved_head(tmp_path, synthetic_root):
    """tools/agreement.py: a model against itself agrees on every image with zero KL and zero heatmap difference;
    a copy whose classification rows moved disagrees (KL > 0); detection read on classification images at the
    detection size; the record lists one row per model; val of the task itself is refused as --images."""
    import helpers as H

    agreement = load_tool("agreement")
    cfg = H.make_config("smoke", image_size=96)
    data = H.load_all(synthetic_root, verbose=False)
    same = H.initial_model(cfg)
    moved = H.initial_model(cfg)
    moved.load_state_dict(same.state_dict())
    a, b = moved.head.layout["cls"]
    with torch.no_grad():
        moved.head.layers[-1].bias[a:b] += torch.linspace(-3, 3, b - a)
    ref = H.save_checkpoint(tmp_path / "ref.pt", same, cfg, H.data_classes(data))
    other = H.save_checkpoint(tmp_path / "moved.pt", moved, cfg, H.data_classes(data))
    batches = agreement.image_batches(data["cls"]["val"], cfg, "cls")
    same_out = agreement.task_outputs(same, batches)
    itself = agreement.disagreement(same_out, same_out, batches, "cls")
    assert itself["top1_agreement"] == 1.0 and itself["kl_from_reference"] == pytest.approx(0.0, abs=1e-6)
    assert itself["images"] == len(data["cls"]["val"]) and itself["top1"] == itself["reference_top1"]
    assert agreement.disagreement(agreement.task_outputs(moved, batches), same_out, batches,
                                  "cls")["kl_from_reference"] > 0.01
    det_batches = agreement.image_batches(data["cls"]["train"], cfg, "det")
    assert det_batches[0]["image"].shape[-2:] == (96, 96)
    on_seg = agreement.image_batches(data["seg"]["train"], H.make_config("smoke", image_size=96,
                                                                         eval_scale={"det": 2.0, "seg": 1.0}), "det")
    assert on_seg[0]["image"].shape[-2:] == (192, 192)  # at detection's eval scale, not segmentation's
    with pytest.raises(ValueError, match="stand for"):
        agreement.image_batches(data["det"]["train"], cfg, "cls")
    moved_det, same_det = (agreement.task_outputs(m, det_batches) for m in (moved, same))
    assert agreement.disagreement(moved_det, same_det, det_batches, "det")["heatmap_abs_diff"] == 0.0  # det rows untouched
    record = agreement.main(["t", str(ref), str(other), "--task", "cls", "--reference", str(ref), "--data_root",
                             str(synthetic_root), "--out", str(tmp_path)])
    assert [r["model"] for r in record["rows"]] == [str(ref), str(other)]
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["top1_agreement"] == 1.0
    with pytest.raises(SystemExit, match="outside val"):
        agreement.main(["t", str(ref), "--task", "cls", "--images", "cls:val", "--reference", str(ref),
                        "--data_root", str(synthetic_root), "--out", str(tmp_path)])


def test_agreement_against_the_imagenet_teacher(tmp_path, synthetic_root):
    """tools/agreement.py --reference imagenet: the reference is the backbone's ImageNet classifier (its logits of the
    10 classes, averaged with its mirror image's under the flip test), its top-1 the record's reference_top1;
    detection has no such reference."""
    import helpers as H

    agreement = load_tool("agreement")
    cfg = H.make_config("smoke", image_size=96)
    data = H.load_all(synthetic_root, verbose=False)
    model = H.initial_model(cfg)
    path = H.save_checkpoint(tmp_path / "m.pt", model, cfg, H.data_classes(data))
    teacher = H.ImageNetTeacher(cfg.backbone, cfg.backbone_weights, data["cls"]["val"].class_names)
    batches = agreement.image_batches(data["cls"]["val"], cfg, "cls")
    x = batches[0]["image"]
    plain = agreement.imagenet_outputs(teacher, batches[:1])[0]["cls"]
    flipped = agreement.imagenet_outputs(teacher, batches[:1], flip_test=True)[0]["cls"]
    torch.testing.assert_close(plain, teacher(x))
    torch.testing.assert_close(flipped, (teacher(x) + teacher(x.flip(-1))) / 2)
    record = agreement.main(["t", str(path), "--task", "cls", "--reference", "imagenet", "--data_root",
                             str(synthetic_root), "--out", str(tmp_path)])
    logits = torch.cat([o["cls"] for o in agreement.imagenet_outputs(teacher, batches, flip_test=cfg.flip_test)])
    labels = torch.cat([b["label"] for b in batches])
    row, = record["rows"]
    assert row["reference_top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert record["reference"] == "imagenet" and row["kl_from_reference"] > 0
    with pytest.raises(SystemExit, match="classification outputs only"):
        agreement.main(["t", str(path), "--task", "det", "--reference", "imagenet", "--data_root",
                        str(synthetic_root), "--out", str(tmp_path)])
