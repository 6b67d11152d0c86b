"""The training method's parts, each against a known answer: the detector overfits a few images to a high
mAP, dense targets with a sigma floor, the weight EMA, the probe that leaves every other task's outputs
exactly as they were, the ImageNet-classifier teacher, WiSE-FT mixing, fp16 rounding, progress lines."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import helpers as H


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return H.make_synthetic_dataset(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4)


def test_detector_overfits_a_few_images_to_a_high_map(tiny_root):
    """Eight synthetic images, the real model (Lite0, ImageNet weights), targets, loss, decoder and COCOeval:
    60 steps on the same batch must detect them almost perfectly. A broken target, loss or decoder cannot."""
    td = H.load_detection_split(tiny_root, "train")
    cfg = H.make_config("smoke", image_size=128, lr=3e-3, backbone_lr=1e-3)
    H.seed_everything(0)
    model = H.build_model(cfg).train()
    optimizer = torch.optim.AdamW(H._param_groups(model, cfg, 1.0))
    ds = H.TaskDataset(td, cfg, train=False)
    batch = H.collate([ds[i] for i in range(len(ds))], ragged=H.TASK_TABLE["det"].ragged)
    for _ in range(60):
        loss = sum(H.TASK_TABLE["det"].loss(model(batch["image"]), batch, cfg).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    m = H.evaluate(model, {"det": td}, cfg, tasks=["det"])
    assert m["det.map50"] >= 0.9 and m["det.map"] >= 0.7, m


def test_sigma_floor_widens_small_boxes_only():
    """A 4x4 box centred at (32, 32) (centre cell (4, 4), sigma 0.36 px) gives full negatives next door; with a
    floor of 1 cell (8 px) its neighbour cell, 8 px away, gets exp(-8^2 / (2 * 8^2)) = exp(-0.5). A 160 px
    box's sigma (14.4 px) is above the floor: its Gaussian is unchanged."""
    small = torch.tensor([[30.0, 30.0, 34.0, 34.0]])
    plain = H.encode_detection_targets(small, torch.tensor([0]), 1, (64, 64))
    floored = H.encode_detection_targets(small, torch.tensor([0]), 1, (64, 64), min_sigma=1.0)
    assert plain["heatmap"][0, 4, 4] == 1.0 and plain["heatmap"][0, 4, 3] < 1e-6
    assert floored["heatmap"][0, 4, 4] == 1.0
    assert floored["heatmap"][0, 4, 3] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert floored["heatmap"][0, 3, 4] == pytest.approx(math.exp(-0.5), rel=1e-5)
    big = torch.tensor([[0.0, 0.0, 160.0, 160.0]])
    a = H.encode_detection_targets(big, torch.tensor([0]), 1, (160, 160))
    b = H.encode_detection_targets(big, torch.tensor([0]), 1, (160, 160), min_sigma=1.0)
    assert torch.equal(a["heatmap"], b["heatmap"])


def test_weight_ema_known_answer():
    """decay 0.5 with its warm-up ramp min(0.5, (1 + n) / (10 + n)): from w = 0, live weight 1 gives
    d = 2/11, w = 9/11; live weight 3 then gives d = 3/12, w = 0.25 * 9/11 + 0.75 * 3. From the ninth update
    on, the ramp exceeds 0.5 and the decay itself holds."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = H.WeightEMA(model, decay=0.5)
    for value in (1.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.25 * 9 / 11 + 0.75 * 3)
    ema.updates = 20
    before = ema.model.weight.item()
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.5 * before + 0.5 * 3)
    assert not any(p.requires_grad for p in ema.model.parameters())


@pytest.fixture(scope="module")
def tiny_data(tiny_root):
    return H.load_all(tiny_root, verbose=False)


def test_probe_trains_only_its_own_outputs(tiny_data):
    """LP of LP-FT on classification after segmentation and detection: cls outputs change, every other output
    channel (and every BatchNorm statistic) stays bit for bit what it was."""
    cfg = H.make_config("smoke", batch_size=4)
    model = H.initial_model(cfg)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        before = model(x)["raw"].clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stage = H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg", "det"], replay=True)
    log = H.probe_own_outputs(stage, epochs=2)
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    model.eval()
    with torch.no_grad():
        after = model(x)["raw"]
    rows = H.own_output_rows(model, "cls")
    assert rows.sum() == 10
    assert torch.equal(after[:, ~rows], before[:, ~rows])
    assert not torch.equal(after[:, rows], before[:, rows])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == ["head.layers.2.weight", "head.layers.2.bias"]


def test_probe_runs_only_in_the_methods_later_stages(tiny_data, tmp_path):
    """probe_epochs applies where a stage has earlier tasks to protect with replay (the method); naive
    fine-tuning and a single-task baseline (no earlier task) train without it."""
    cfg = H.make_config("smoke", batch_size=4, epochs={"seg": 1, "det": 1, "cls": 1}, eval_every=1,
                        probe_epochs={"seg": 0, "det": 2, "cls": 0})
    probes = {}
    for name, kw in {"method": dict(earlier=["seg"], replay=True), "naive": dict(earlier=["seg"], replay=False),
                     "single": dict()}.items():
        record = H.train_stage(H.initial_model(cfg), "det", tiny_data, cfg, tmp_path / name, **kw)
        probes[name] = len(record["probe"])
    assert probes == {"method": 2, "naive": 0, "single": 0}


def test_later_backbone_lr_scale_acts_only_in_the_methods_later_stages(tiny_data):
    """The backbone's learning rate is backbone_lr x lr_scale, times later_backbone_lr_scale of the task only in a
    stage with earlier tasks and replay; the neck and head keep lr x lr_scale everywhere."""
    cfg = H.make_config("smoke", batch_size=4, later_backbone_lr_scale={"cls": 0.25})
    def peak_lrs(**kw):
        stage = H.make_stage(H.initial_model(cfg), "cls", tiny_data, cfg, lr_scale=2.0, **kw)
        return {g["name"]: g["initial_lr"] for g in stage.optimizer.param_groups}
    method = peak_lrs(earlier=["seg", "det"], replay=True)
    naive, single = peak_lrs(earlier=["seg", "det"], replay=False), peak_lrs()
    assert method["backbone"] == pytest.approx(cfg.backbone_lr * 2.0 * 0.25)
    assert method["backbone_no_decay"] == pytest.approx(cfg.backbone_lr * 2.0 * 0.25)
    assert naive["backbone"] == single["backbone"] == pytest.approx(cfg.backbone_lr * 2.0)
    assert method["head"] == naive["head"] == single["head"] == pytest.approx(cfg.lr * 2.0)


def test_report_states_a_slower_backbone_only_when_used():
    cfg = H.make_config("smoke").to_dict()
    assert not any("Slower backbone" in line for line in H._method_extras(cfg))
    cfg["later_backbone_lr_scale"] = {"seg": 1.0, "det": 1.0, "cls": 0.25}
    line, = [line for line in H._method_extras(cfg) if "Slower backbone" in line]
    assert "{'cls': 0.25}" in line and str(cfg["backbone_lr"]) in line


def test_imagenet_teacher_and_its_loss_term(tiny_data):
    """The teacher reads the ImageNet logits of the Imagenette classes, in their order; its KL term is
    added to the cross-entropy, scaled exactly by cls_teacher_weight, and absent at weight 0."""
    names = tiny_data["cls"]["train"].class_names
    teacher = H.ImageNetTeacher("efficientnet-lite0", "imagenet", names)
    assert teacher.index.tolist() == [H.IMAGENET_INDEX[n] for n in names] and teacher.index[0] == 0
    x = torch.randn(3, 3, 64, 64)
    full = teacher.net(x)
    torch.testing.assert_close(teacher(x), full[:, teacher.index])
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = {"cls": torch.randn(3, 10)}
    batch = {"label": torch.tensor([0, 1, 2]), "teacher_logits": teacher(x)}
    one = H.classification_loss(out, batch, 0.1, teacher_weight=1.0)
    three = H.classification_loss(out, batch, 0.1, teacher_weight=3.0)
    assert three["cls_teacher"] == pytest.approx(3 * one["cls_teacher"].item()) and one["cls_teacher"] > 0
    assert three["cls"] == one["cls"]
    assert set(H.classification_loss(out, batch, 0.1, teacher_weight=0.0)) == {"cls"}
    cfg = H.make_config("smoke", cls_teacher_weight=0.5)
    built = H.TASK_TABLE["cls"].external_teacher(cfg, tiny_data["cls"]["train"])
    assert isinstance(built, H.ImageNetTeacher)
    assert H.TASK_TABLE["cls"].external_teacher(H.make_config("smoke"), tiny_data["cls"]["train"]) is None
    with pytest.raises(ValueError, match="ImageNet index"):
        H.ImageNetTeacher("efficientnet-lite0", "none", ["tench", "unicorn"])


def test_wise_mix_known_answer():
    """start 0, trained 1, alpha 0.25: every weight 0.25, except the stage's own output channels (cls here),
    which keep their trained value 1."""
    cfg = H.make_config("smoke")
    model = H.build_model(cfg, backbone_weights="none")
    start = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dtype.is_floating_point:
                v.fill_(1.0)
    H.wise_mix(model, start, 0.25, "cls")
    rows = H.own_output_rows(model, "cls")
    last = model.head.layers[-1]
    assert (last.weight[rows] == 1).all() and (last.bias[rows] == 1).all()
    assert (last.weight[~rows] == 0.25).all() and (model.neck.fuse[0].weight == 0.25).all()


@pytest.mark.parametrize("precision", ["fp16", "int8-neck-head", "int8"])
def test_round_to_storage_matches_the_stored_checkpoint(tmp_path, tiny_data, precision):
    """What is scored is what is shipped: a model rounded to `precision` equals, bit for bit, the one loaded from a
    checkpoint saved at it; int8 stores every conv weight as int8 (one scale per output channel, each channel's
    largest weight at +-127, every weight within half a step) and the rest in fp16, int8-neck-head only the neck's and
    head's, and storing the rounded model again gives the same integers and scales."""
    cfg = H.make_config("smoke")
    model = H.build_model(cfg, backbone_weights="none")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    path = H.save_checkpoint(tmp_path / "m.pt", model, cfg, H.data_classes(tiny_data), precision=precision)
    H.round_to_storage(model, precision)
    loaded, _, payload = H.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    raw = torch.load(path, weights_only=False)["model"]
    key = "head.layers.0.0.weight"
    if precision == "fp16":
        assert all(H.stored_tensor(v).dtype in (torch.float16, torch.int64) for v in raw.values())
        return
    q, scale = H.restore_zeros(raw[key]["int8"]), raw[key]["scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (q.shape[0],)
    assert torch.equal(q.flatten(1).abs().amax(dim=1), torch.full((q.shape[0],), 127, dtype=torch.int8))
    step = scale.view(-1, 1, 1, 1)
    assert (model.state_dict()[key] - original[key]).abs().le(step / 2 * 1.0001).all()
    assert raw["head.layers.0.1.running_var"].dtype == torch.float16 and raw["head.layers.0.1.num_batches_tracked"].dtype == torch.int64
    again = H.pack_weights(H.state_on_cpu(model), "int8")
    assert torch.equal(H.restore_zeros(again[key]["int8"]), q) and torch.equal(again[key]["scale"], scale)
    assert payload["model"][key].dtype == torch.float32  # read_checkpoint gives int8 weights back as float32
    backbone_conv = next(k for k, v in original.items() if k.startswith("backbone.") and v.ndim == 4)
    stored_backbone = raw[backbone_conv]
    if precision == "int8-neck-head":  # the backbone's weights in fp16, only the neck's and head's in int8
        assert not (isinstance(stored_backbone, dict) and "int8" in stored_backbone)
        assert H.stored_tensor(stored_backbone).dtype == torch.float16
    else:
        assert H.restore_zeros(stored_backbone["int8"]).dtype == torch.int8
    with pytest.raises(ValueError, match="final_precision must be one of"):
        H.make_config("smoke", final_precision="int4")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_stored_weights_keep_only_the_nonzero_values_of_a_mostly_zero_tensor(tmp_path, tiny_data, precision):
    """The held zero blocks of a grown neck and head are not written out: the 3x3 convs of a model grown on a path of its
    own store their nonzero values and a bitmask, the file shrinks, and what is read back is what was stored, bit
    for bit (zeros where they were, every other value as `round_to_storage` gives it)."""
    cfg = H.make_config("smoke")
    model = H.build_model(cfg, backbone_weights="none")
    H.grow_neck_head(model, model.width, isolate_task="det")  # a fresh path as wide as the old one: half zeros
    key = "head.layers.0.0.weight"
    zeros = model.state_dict()[key] == 0
    assert 0.4 < zeros.float().mean() < 0.6
    path = H.save_checkpoint(tmp_path / "m.pt", model, cfg, H.data_classes(tiny_data), precision=precision)
    raw = torch.load(path, weights_only=False)["model"][key]
    entry = raw["int8"] if precision == "int8" else raw
    dense = H.pack_weights(H.state_on_cpu(model), precision)[key]
    assert torch.equal(H.stored_tensor(dense), H.stored_tensor(raw))
    nonzero = int((H.stored_tensor(raw) != 0).sum())  # int8 also rounds the smallest weights to 0
    assert isinstance(entry, dict) and entry["values"].numel() == nonzero <= int((~zeros).sum())
    H.round_to_storage(model, precision)
    assert torch.equal(H.load_checkpoint(path)[0].state_dict()[key], model.state_dict()[key])
    assert (model.state_dict()[key][zeros] == 0).all()
    plain = {k: H.stored_tensor(v) for k, v in torch.load(path, weights_only=False)["model"].items()}
    torch.save(plain, tmp_path / "plain.pt")  # the same values without elision
    element = 1 if precision == "int8" else 2
    saved_by_one = int(zeros.sum()) * element - zeros.numel() / 8  # this weight's zeros, less its bitmask
    assert (tmp_path / "plain.pt").stat().st_size - path.stat().st_size > saved_by_one
    old = torch.load(path, weights_only=False)
    old["model"] = {k: ({"int8": H.restore_zeros(v["int8"]), "scale": v["scale"]} if "int8" in v else H.restore_zeros(v))
                    if isinstance(v, dict) else v for k, v in old["model"].items()}
    torch.save(old, tmp_path / "old.pt")  # as written before elision: read the same
    assert torch.equal(H.read_checkpoint(tmp_path / "old.pt")["model"][key], H.read_checkpoint(path)["model"][key])


def test_a_checkpoint_from_before_the_flip_test_is_scored_without_it(tmp_path, tiny_data):
    cfg = H.make_config("smoke")
    model = H.build_model(cfg, backbone_weights="none")
    path = H.save_checkpoint(tmp_path / "new.pt", model, cfg, H.data_classes(tiny_data))
    assert cfg.flip_test and H.load_checkpoint(path)[1].flip_test
    payload = H.read_checkpoint(path)
    del payload["config"]["flip_test"]  # as every final.pt written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    assert not H.load_checkpoint(tmp_path / "old.pt")[1].flip_test


def test_a_checkpoint_from_before_eval_scale_is_scored_at_its_image_size(tmp_path, tiny_data):
    cfg = H.make_config("smoke", image_size=128, eval_scale={"det": 1.25})
    model = H.build_model(cfg, backbone_weights="none")
    path = H.save_checkpoint(tmp_path / "new.pt", model, cfg, H.data_classes(tiny_data))
    assert H.eval_side(H.load_checkpoint(path)[1], "det") == 160  # 128 px x 1.25, as its config says
    payload = H.read_checkpoint(path)
    del payload["config"]["eval_scale"]  # as every final.pt written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    old = H.load_checkpoint(tmp_path / "old.pt")[1]
    assert (H.eval_side(old, "det"), H.eval_side(old, "seg")) == (128, 128)


def test_progress_prints_one_line_per_epoch_outside_a_notebook(capsys):
    progress = H.Progress("stage", epochs=3)
    for epoch in (1, 2, 3):
        progress.step(1, 2, 0.5)  # steps draw nothing outside a notebook
        progress.end_epoch({"epoch": epoch, "loss": 1.0 / epoch})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("[stage] epoch 3/3: loss=0.3333")


def test_mosaic_keeps_boxes_on_their_objects():
    """Four images, one rectangle each in a grey level of its class: in every mosaic, each kept box covers
    pixels of its own class's grey level only, and (keeping every box of 2 px or more) the pixels that no
    box covers are background."""
    size, levels = 64, [60, 110, 160, 210]
    samples = []
    g = torch.Generator().manual_seed(0)
    for k in range(4):
        image = torch.zeros(3, size, size, dtype=torch.uint8)
        x1, y1 = (int(v) for v in torch.randint(0, 30, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(12, 30, (2,), generator=g))
        image[:, y1:y1 + h, x1:x1 + w] = levels[k]
        samples.append({"image": image, "boxes": torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32),
                        "labels": torch.tensor([k]), "file": f"{k}.jpg", "image_id": k})
    td = H.TaskData("det", "train", samples, ["a", "b", "c", "d"], "coco")
    cfg = H.make_config("smoke", image_size=size, backbone="efficientnet-lite0")
    ds = H.TaskDataset(td, cfg, train=False)  # the deterministic transform: only the mosaic is random
    value = {k: (levels[k] / 255 - 0.498) / 0.502 for k in range(4)}
    background = (0 - 0.498) / 0.502
    seen = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = H.mosaic(ds, ds.transformed(seed % 4), p=1.0, min_kept=0.0)
        image, boxes = out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor)
        assert tuple(image.shape) == (3, size, size) and len(boxes) == len(out["labels"])
        covered = torch.zeros(size, size, dtype=torch.bool)
        for box, label in zip(boxes.round().long().tolist(), out["labels"].tolist()):
            x1, y1, x2, y2 = box
            torch.testing.assert_close(image[:, y1:y2, x1:x2], torch.full_like(image[:, y1:y2, x1:x2], value[label]))
            covered[y1:y2, x1:x2] = True
            seen += 1
        # with min_kept 0 every object pixel in the crop lies in a kept box, but for slivers under 2 px at its edge
        inner = torch.zeros(size, size, dtype=torch.bool)
        inner[2:-2, 2:-2] = True
        assert torch.allclose(image[:, ~covered & inner], torch.tensor(background))
    assert seen >= 10


def test_later_stages_keep_neck_and_head_batchnorm_statistics(tiny_data):
    """With BatchNorm in neck and head, the first stage trains its statistics; a later stage's training step
    moves the weights but not one running statistic (its images would otherwise re-estimate them). A stage that does
    not grow the neck and head (one that does gives its fresh channels live statistics: see grow_neck_head)."""
    cfg = H.make_config("smoke", norm="bn", batch_size=4, replay_per_task=2, grow_neck_head={"cls": 0})
    model = H.initial_model(cfg)
    first = H.make_stage(model, "seg", tiny_data, cfg)
    model.train()
    assert all(m.training for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    later = H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg"], teacher=H.freeze_teacher(model), replay=True)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    weight = model.head.layers[0][0].weight.clone()
    batch = H.batch_to_device(next(iter(later.loader)), torch.device("cpu"), cfg.channels_last)
    model.train()
    H.train_step(later, batch, H.next_replay(later))
    assert stats and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert not torch.equal(weight, model.head.layers[0][0].weight)
    assert first.model is model


def test_a_bf16_training_step_computes_in_bf16_and_keeps_fp32_weights(tiny_data):
    """cpu_bf16 "on": the convolutions of a training step (stage's task, replay and the teacher's passes) run in
    bf16, the losses come out finite fp32, and the weights, optimiser and EMA stay fp32 and move; with "off" the
    same step computes in fp32. Evaluation outside the step is fp32 either way."""
    for setting, dtype in (("on", torch.bfloat16), ("off", torch.float32)):
        cfg = H.make_config("smoke", batch_size=4, replay_per_task=2, cpu_bf16=setting)
        model = H.initial_model(cfg)
        stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=H.freeze_teacher(model),
                             replay=True)
        seen = []
        hook = model.neck.fuse[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        weight = model.head.layers[0][0].weight.clone()
        batch = H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last)
        model.train()
        terms = H.train_step(stage, batch, H.next_replay(stage))
        assert seen == [dtype, dtype]  # the stage's batch and the replayed segmentation batch
        assert {"det_heatmap", "replay_seg", "kd_seg", "replay_kd_seg"} <= set(terms)
        assert all(math.isfinite(v) for v in terms.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for v in stage.ema.model.state_dict().values() if v.is_floating_point())
        assert not torch.equal(weight, model.head.layers[0][0].weight)
        seen.clear()
        H.evaluate(model, {"seg": tiny_data["seg"]["val"]}, cfg, tasks=["seg"])
        assert seen and set(seen) == {torch.float32}
        hook.remove()


def test_redrawn_stage_starts_from_the_initial_neck_and_head_and_keeps_the_backbone(tiny_data, tmp_path):
    """redraw_neck_head: the method's detection stage starts with neck and head as initial_model drew them (the
    backbone as stage 1 left it), trains their BatchNorm statistics live, and distils from the model before the
    redraw; naive fine-tuning and the stage of a task not listed keep every weight they were given."""
    cfg = H.make_config("smoke", batch_size=4, epochs={"seg": 1, "det": 1, "cls": 1}, probe_epochs={"det": 0},
                        redraw_neck_head=("det",), grow_neck_head={"det": 0, "cls": 0})  # redraw alone (with growth: next test)
    initial = {k: v.clone() for k, v in H.initial_model(cfg).state_dict().items()}
    model = H.initial_model(cfg)
    with torch.no_grad():  # stands for stage 1: every weight moved
        for p in model.parameters():
            p.add_(0.25)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    H.reset_to_initial(model, cfg, ("neck", "head"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key] if key.startswith(("neck.", "head.")) else moved[key]), key
    assert H.redraws_neck_head(cfg, "det", ["seg"], replay=True)
    assert not H.redraws_neck_head(cfg, "det", ["seg"], replay=False)  # naive: nothing would bring seg back
    assert not H.redraws_neck_head(cfg, "cls", ["seg", "det"], replay=True)
    assert not H.redraws_neck_head(cfg, "det", [], replay=False)  # the single-task baseline starts fresh anyway
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=H.freeze_teacher(model), replay=True)
    assert not stage.model.freeze_neck_head_bn
    assert H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg", "det"], replay=True).model.freeze_neck_head_bn
    # through start_stage and train_stage: a later detection stage redraws, a naive one does not
    for replay in (True, False):
        model = H.initial_model(cfg)
        with torch.no_grad():
            for p in model.neck.parameters():
                p.add_(0.25)
        teacher = H.freeze_teacher(model) if replay else None
        H.start_stage(model, "det", cfg, earlier=["seg"], replay=replay)
        H.train_stage(model, "det", tiny_data, cfg, tmp_path / f"replay{replay}", earlier=["seg"], teacher=teacher,
                      replay=replay)
        lateral = model.neck.laterals[0].weight
        gap = (lateral - initial["neck.laterals.0.weight"]).abs().max().item()
        assert (gap < 0.1) if replay else (gap > 0.2), gap  # one epoch at lr 3e-3 moves a weight far less than 0.25


def test_a_redrawn_stage_can_also_grow(tiny_data, tmp_path):
    """redraw_neck_head and grow_neck_head together: the stage starts from the initial neck and head (starting
    width, even from a model grown before) widened by the stage's channels, and trains from there."""
    cfg = H.make_config("smoke", batch_size=4, epochs={"seg": 1, "det": 1, "cls": 1}, probe_epochs={"det": 0},
                        redraw_neck_head=("det",), grow_neck_head={"det": 16}, reads_old_channels={"det": True})
    initial = H.initial_model(cfg).state_dict()
    model = H.initial_model(cfg)
    H.grow_neck_head(model, 8)  # any width before: the redraw goes back to the initial one
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    assert model.width == cfg.neck_channels + 16
    for key, value in model.state_dict().items():
        if key.startswith(("neck.", "head.")) and value.ndim:
            assert torch.equal(value[tuple(slice(0, n) for n in initial[key].shape)], initial[key]), key
    teacher = H.freeze_teacher(H.initial_model(cfg))
    record = H.train_stage(model, "det", tiny_data, cfg, tmp_path / "det", earlier=["seg"], teacher=teacher, replay=True)
    assert len(record["history"]) == 1 and model.width == cfg.neck_channels + 16


def test_grown_neck_and_head_keep_every_output_and_train_the_new_channels(tiny_data, tmp_path):
    """grow_neck_head: 48 -> 64 channels; every output of the grown model equals the old one's (the new channels
    reach no existing channel or output yet), every old weight sits where it was, and one training step sends
    gradient into the new channels' weights into the outputs (so they can join). A checkpoint records the width:
    load_checkpoint rebuilds the grown model with the same outputs."""
    cfg = H.make_config("smoke", batch_size=4, grow_neck_head={"det": 16, "cls": 0})
    model = H.initial_model(cfg).eval()
    image = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    before = model(image)["raw"]
    old = {k: v.clone() for k, v in model.state_dict().items()}
    H.grow_neck_head(model, 16, seed=1)
    assert model.width == 64 == H.final_width(cfg) and model.head.layers[-1].in_channels == 64
    H.grow_neck_head(model, 0)  # nothing to add: the same modules
    assert model.width == 64
    after = model(image)["raw"]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for key, value in old.items():
        grown = model.state_dict()[key]
        assert torch.equal(grown[tuple(slice(0, n) for n in value.shape)] if value.ndim else grown, value), key
    assert (model.head.layers[-1].weight[:, 48:] == 0).all() and (model.head.layers[0][0].weight[:48, 48:] == 0).all()
    assert model.head.layers[0][0].weight[48:].abs().sum() > 0  # the new channels are drawn, not zero
    # the stage: grows only in the method's later stage of a listed task, with live BatchNorm statistics
    assert H.grows_neck_head(cfg, "det", ["seg"], replay=True)
    assert not H.grows_neck_head(cfg, "det", ["seg"], replay=False)
    assert not H.grows_neck_head(cfg, "cls", ["seg", "det"], replay=True)
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=H.freeze_teacher(model), replay=True)
    assert not stage.model.freeze_neck_head_bn
    batch = H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last)
    model.train()
    terms = H.training_step_loss(model, "det", batch, cfg)
    sum(terms.values()).backward()
    assert model.head.layers[-1].weight.grad[:, 48:].abs().sum() > 0
    # checkpoint round trip at the grown width
    path = H.save_checkpoint(tmp_path / "grown.pt", model, cfg, H.data_classes(tiny_data))
    loaded, _, payload = H.load_checkpoint(path)
    assert payload["width"] == 64 and loaded.width == 64
    torch.testing.assert_close(loaded(image)["raw"], model.eval()(image)["raw"])


def test_frozen_old_channels_keep_the_earlier_tasks_outputs_while_the_new_ones_train(tiny_data, tmp_path):
    """freeze_old_channels in a grown stage (48 -> 64 channels), backbone learning rate 0 so that only the neck and
    head can move: after training steps every segmentation and classification output is bit for bit what it was,
    and so is every old weight and BatchNorm statistic of the neck and head, while detection's outputs and the new
    channels changed. In training the old channels are normalised with their kept statistics (as in evaluation);
    the new channels with the batch's. The stage takes its hooks off when it ends."""
    cfg = H.make_config("smoke", batch_size=4, grow_neck_head={"det": 16, "cls": 0},
                        freeze_old_channels=("neck", "head"), backbone_lr=0.0, ema_decay=0.0, epochs={"det": 1})
    model = H.initial_model(cfg)
    teacher = H.freeze_teacher(model)
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    image = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    before = model.eval()(image)
    old = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("neck.", "head."))}
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=teacher, replay=True)
    assert stage.frozen is not None and len(stage.frozen.hooks) == 3  # the neck's and head's three BatchNorms
    model.train()
    norm, x = model.neck.fuse[1], torch.randn(4, 64, 12, 12)
    expected_old = torch.nn.functional.batch_norm(x[:, :48], old["neck.fuse.1.running_mean"][:48],
                                                  old["neck.fuse.1.running_var"][:48], norm.weight[:48],
                                                  norm.bias[:48], False, 0.0, norm.eps)
    y = norm(x)
    torch.testing.assert_close(y[:, :48], expected_old)
    assert y[:, 48:].mean(dim=(0, 2, 3)).abs().max() < 1e-4  # batch statistics (BatchNorm's bias starts at 0)
    stage.frozen.restore()
    for _ in range(3):
        H.train_step(stage, H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last),
                     H.next_replay(stage))
    after = model.eval()(image)
    for name in ("seg", "cls"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["det_heatmap"], before["det_heatmap"])
    state = model.state_dict()
    rows = ~H.own_output_rows(model, "det")
    for key, value in old.items():
        if not value.dtype.is_floating_point:
            continue
        kept = rows if key.startswith("head.layers.2.") else slice(0, 48)
        assert torch.equal(state[key][kept], value[kept]), key
    assert not torch.equal(state["head.layers.0.0.weight"][48:], old["head.layers.0.0.weight"][48:])
    assert not torch.equal(state["neck.fuse.1.running_mean"][48:], old["neck.fuse.1.running_mean"][48:])
    # off by default, and only where the stage grows; train_stage takes the hooks off
    assert H.make_stage(model, "det", tiny_data, dataclasses.replace(cfg, freeze_old_channels=()), earlier=["seg"],
                        teacher=teacher, replay=True).frozen is None
    assert H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg", "det"], teacher=teacher, replay=True).frozen is None
    stage.frozen.remove()
    assert all(not m._forward_hooks for m in model.modules())
    H.train_stage(model, "det", tiny_data, cfg, tmp_path / "det", earlier=["seg"], teacher=teacher, replay=True)
    assert all(not m._forward_hooks for m in model.modules())
    # the report's method section says so exactly when it is on
    assert any("Old channels frozen" in line for line in H._method_extras(cfg.to_dict()))
    off = dataclasses.replace(cfg, freeze_old_channels=())
    assert not any("Old channels frozen" in line for line in H._method_extras(off.to_dict()))


def test_a_stage_that_holds_the_earlier_tasks_trains_the_new_one_alone(tiny_data, tmp_path):
    """Grown, old channels of neck and head held, backbone at learning rate 0 (later_backbone_lr_scale 0): nothing an
    earlier task reads can move, so the stage has no replay sampler, no teacher and no external teacher of the
    earlier tasks, its own loss at weight 1 and a backbone that takes no gradient (no backward pass through it).
    After a whole stage (probe, epochs, EMA) every segmentation output and every backbone weight is bit for bit
    what it was, while detection learned. Any one of the three conditions missing: replay and distillation as
    before."""
    cfg = H.make_config("smoke", batch_size=4, grow_neck_head={"det": 16}, freeze_old_channels=("neck", "head"),
                        reads_old_channels={"det": True},
                        later_backbone_lr_scale={"det": 0.0, "cls": 1.0}, epochs={"det": 2}, probe_epochs={"det": 1})
    model = H.initial_model(cfg)
    teacher = H.freeze_teacher(model)
    kw = dict(earlier=["seg"], teacher=teacher, replay=True)
    assert H.holds_earlier_tasks(cfg, "det", ["seg"], True)
    assert not H.holds_earlier_tasks(cfg, "det", ["seg"], False)  # naive fine-tuning: no stage of the method
    for other in (dict(freeze_old_channels=("neck",)), dict(later_backbone_lr_scale={"det": 0.5}),
                  dict(grow_neck_head={"det": 0})):
        changed = dataclasses.replace(cfg, **other)
        assert not H.holds_earlier_tasks(changed, "det", ["seg"], True), other
        stage = H.make_stage(H.initial_model(cfg), "det", tiny_data, changed, **kw)
        assert stage.replay is not None and stage.teacher is teacher and stage.task_weight == cfg.task_weight["det"]
    image = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    before = model.eval()(image)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    stage = H.make_stage(model, "det", tiny_data, cfg, **kw)
    assert stage.replay is None and stage.teacher is None and stage.task_weight == 1.0
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(g["name"].startswith("backbone") for g in stage.optimizer.param_groups)
    assert model.train().training and not model.backbone.training  # a fixed extractor: no stochastic depth
    stage.frozen.remove()
    record = H.train_stage(model, "det", tiny_data, cfg, tmp_path / "held", **kw)
    assert len(record["probe"]) == 1 and len(record["history"]) == 2
    assert set(record["history"][-1]) >= {"det_heatmap", "det_box"}
    assert not any(k.startswith(("replay", "kd")) for k in record["history"][-1])
    after = model.eval()(image)
    assert torch.equal(after["seg"], before["seg"])
    assert not torch.equal(after["det_heatmap"], before["det_heatmap"])
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    # the next stage that trains the backbone gives it its gradients back
    H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg", "det"], teacher=teacher, replay=True)
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.train().backbone.training


def test_report_names_the_stages_that_hold_the_earlier_tasks():
    """held_stages reads a run's config.json; the method paragraph describes parameter isolation (no replay, no
    distillation) when every later stage holds, names the held stages when some do, and says nothing of it when none."""
    isolate = dict(grow_neck_head={"det": 16, "cls": 8}, freeze_old_channels=("neck", "head"))
    every = H.make_config("smoke", **isolate, later_backbone_lr_scale={"det": 0.0, "cls": 0.0}).to_dict()
    some = H.make_config("smoke", **isolate, later_backbone_lr_scale={"det": 0.0, "cls": 1.0}).to_dict()
    none = H.make_config("smoke", later_backbone_lr_scale={"cls": 1.0}).to_dict()
    assert [H.held_stages(c) for c in (every, some, none)] == [["det", "cls"], ["det"], []]
    text = {name: " ".join(H._method_paragraph(c, "")) for name, c in (("every", every), ("some", some), ("none", none))}
    assert "parameter isolation" in text["every"] and "images per earlier task per step" not in text["every"]
    assert "bit for bit" in text["every"] and "{'det': 16, 'cls': 8}" in text["every"]
    assert "The stage of det holds every earlier task" in text["some"] and "replay" in text["some"]
    assert "every earlier task instead" not in text["none"] and "parameter isolation" not in text["none"]
    assert not any("Slower backbone" in line for line in H._method_extras(every))  # a held backbone is not "slower"
    # a config.json from before a field that holds a stage existed held none (today's defaults hold cls)
    assert H.held_stages(H.make_config("smoke").to_dict()) == ["cls"]
    assert H.held_stages({k: v for k, v in every.items() if k != "later_backbone_lr_scale"}) == []


def test_frozen_old_channels_of_the_neck_alone(tiny_data):
    """freeze_old_channels ("neck",): the neck's old channels stay bit for bit while the head's old channels and
    segmentation's output rows train with the new task; only the neck's BatchNorm is hooked. Unknown parts are refused."""
    cfg = H.make_config("smoke", batch_size=4, grow_neck_head={"det": 16}, freeze_old_channels=("neck",),
                        reads_old_channels={"det": True},
                        backbone_lr=0.0, ema_decay=0.0)
    model = H.initial_model(cfg)
    teacher = H.freeze_teacher(model)
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=teacher, replay=True)
    assert len(stage.frozen.hooks) == 1
    model.train()
    for _ in range(2):
        H.train_step(stage, H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last),
                     H.next_replay(stage))
    stage.frozen.remove()
    state = model.state_dict()
    for key in ("neck.laterals.0.weight", "neck.fuse.0.weight", "neck.fuse.1.weight", "neck.fuse.1.running_var"):
        assert torch.equal(state[key][:48], old[key][:48]), key
    assert not torch.equal(state["neck.fuse.0.weight"][48:], old["neck.fuse.0.weight"][48:])
    seg_rows = slice(*model.head.layout["seg"])
    assert not torch.equal(state["head.layers.0.0.weight"][:48], old["head.layers.0.0.weight"][:48])
    assert not torch.equal(state["head.layers.2.weight"][seg_rows], old["head.layers.2.weight"][seg_rows])
    with pytest.raises(ValueError, match="'neck' and/or 'head'"):
        H.FrozenOldChannels(model, 48, "det", ("backbone",))
    for bad in (True, ["backbone"]):  # a bool (the option's first form) or an unknown part: refused by the config
        with pytest.raises(ValueError, match="freeze_old_channels names parts to hold"):
            H.make_config("smoke", freeze_old_channels=bad)
    assert H.make_config("smoke", freeze_old_channels=["neck"],
                         reads_old_channels={"det": True}).freeze_old_channels == ("neck",)


def test_cut_neck_head_undoes_grow_neck_head():
    """Grow by 16, train the grown model's fresh channels a little (old channels untouched), cut back: every
    weight and statistic is the one before growing, and so are the outputs; a cut to a width the model does not
    have is refused."""
    model = H.build_model(H.make_config("smoke"), backbone_weights="none").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(2, 3, 96, 96)
    expected = model(image)["raw"]
    H.grow_neck_head(model, 16, seed=3)
    with torch.no_grad():  # what a grown stage changes: the fresh channels (and the reads of them)
        model.neck.fuse[0].weight[48:] += 1.0
        model.head.layers[0][0].weight[:, 48:] += 1.0
    assert model.width == 64
    H.cut_neck_head(model, 48)
    assert model.width == 48 and model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(model(image)["raw"], expected)
    with pytest.raises(ValueError, match="keeps 1 to 48"):
        H.cut_neck_head(model, 64)


def test_grow_neck_head_refuses_groupnorm():
    model = H.build_model(H.make_config("smoke", norm="gn"), backbone_weights="none")
    with pytest.raises(ValueError, match="norm 'bn'"):
        H.grow_neck_head(model, 8)


def test_a_sequence_that_grows_resumes_and_writes_a_loadable_final_model(tiny_data, tmp_path):
    """grow_neck_head {"det": 16} through run_sequence: the method's model ends 64 wide, the naive one 48; a
    second call loads every finished stage (the grown stage's weights into a grown model) and gives the same
    final row; final.pt rebuilds at the grown width with the same outputs."""
    cfg = H.make_config("smoke", out_dir=str(tmp_path), batch_size=4, epochs={"seg": 1, "det": 1, "cls": 1},
                        probe_epochs={"det": 1, "cls": 0}, grow_neck_head={"det": 16, "cls": 0}, final_precision="fp32")
    first = H.run_sequence(cfg, tiny_data)
    assert first["model"].width == 64
    assert H.run_sequence(cfg, tiny_data, "naive")["model"].width == 48
    again = H.run_sequence(cfg, tiny_data)
    assert again["final"] == first["final"] and again["model"].width == 64
    loaded, _, payload = H.load_checkpoint(tmp_path / "final.pt")
    image = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    assert payload["width"] == 64
    torch.testing.assert_close(loaded(image)["raw"], again["model"].eval()(image)["raw"])


def test_held_stage_epochs_apply_to_the_methods_held_stage_only():
    """held_stage_epochs: the method's held stage (grown, old channels held, backbone not learning) trains its own
    number of epochs; a single-task baseline, the first stage, a naive stage and a stage whose backbone learns keep
    cfg.epochs."""
    cfg = H.make_config("smoke", epochs={"seg": 2, "det": 3, "cls": 4}, held_stage_epochs={"cls": 7},
                        grow_neck_head={"det": 8, "cls": 8}, later_backbone_lr_scale={"cls": 0.0})
    assert H.holds_earlier_tasks(cfg, "cls", ["seg", "det"], True)
    assert H.stage_epochs(cfg, "cls", ["seg", "det"], True) == 7
    assert H.stage_epochs(cfg, "cls") == 4  # alone: the single-task baseline
    assert H.stage_epochs(cfg, "cls", ["seg", "det"], False) == 4  # naive fine-tuning
    assert H.stage_epochs(cfg, "det", ["seg"], True) == 3  # detection's stage: its backbone learns
    learning = dataclasses.replace(cfg, later_backbone_lr_scale={"seg": 1.0, "det": 1.0, "cls": 0.5})
    assert H.stage_epochs(learning, "cls", ["seg", "det"], True) == 4
    assert H.stage_epochs(dataclasses.replace(cfg, held_stage_epochs={"cls": 0}), "cls", ["seg", "det"], True) == 4


def test_held_stage_distils_the_imagenet_teacher_at_its_own_weight(tiny_data):
    """held_stage_cls_teacher_weight: classification's held stage trains with the ImageNet teacher at that weight
    (its loss term scaled by it); the single-task baseline, naive fine-tuning and a stage whose backbone learns keep
    cls_teacher_weight; None keeps it everywhere; a run with no teacher (cls_teacher_weight 0) gets none."""
    cfg = H.make_config("smoke", batch_size=4, cls_teacher_weight=0.5, held_stage_cls_teacher_weight=3.0,
                        grow_neck_head={"det": 8, "cls": 8})
    later = (["seg", "det"], True)
    assert H.holds_earlier_tasks(cfg, "cls", *later)
    assert H.stage_config(cfg, "cls", *later).cls_teacher_weight == 3.0
    assert H.stage_config(cfg, "cls", [], False).cls_teacher_weight == 0.5  # classification alone
    assert H.stage_config(cfg, "cls", ["seg", "det"], False).cls_teacher_weight == 0.5  # naive
    learning = dataclasses.replace(cfg, later_backbone_lr_scale={"seg": 1.0, "det": 1.0, "cls": 0.5})
    assert H.stage_config(learning, "cls", *later).cls_teacher_weight == 0.5
    unset = dataclasses.replace(cfg, held_stage_cls_teacher_weight=None)
    assert H.stage_config(unset, "cls", *later) is unset
    assert H.stage_config(dataclasses.replace(cfg, cls_teacher_weight=0.0), "cls", *later).cls_teacher_weight == 0
    assert H.stage_config(cfg, "det", ["seg"], True) is cfg
    model = H.initial_model(cfg)
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    H.start_stage(model, "cls", cfg, earlier=["seg", "det"], replay=True)
    stage = H.make_stage(model, "cls", tiny_data, cfg, earlier=["seg", "det"], replay=True)
    assert stage.cfg.cls_teacher_weight == 3.0 and isinstance(stage.task_teachers["cls"], H.ImageNetTeacher)
    model.train()  # a held backbone runs as in evaluation: no stochastic depth between the two passes
    batch = next(iter(stage.loader))
    held = H.training_step_loss(model, "cls", batch, stage.cfg, task_teachers=stage.task_teachers)
    plain = H.training_step_loss(model, "cls", batch, cfg, task_teachers=stage.task_teachers)
    assert held["cls_teacher"].item() == pytest.approx(6 * plain["cls_teacher"].item(), rel=1e-5)
    assert held["cls"].item() == pytest.approx(plain["cls"].item(), rel=1e-6)
    baseline = H.make_stage(H.initial_model(cfg), "cls", tiny_data, cfg)
    assert baseline.cfg.cls_teacher_weight == 0.5
    # the report discloses both weights, and only the one where the held stage uses the baseline's
    line, = [line for line in H._method_extras(cfg.to_dict()) if "ImageNet-classifier teacher" in line]
    assert "weight 0.5, and 3.0 in classification's held stage, which can move nothing an earlier task reads; KL" in line and "baseline distils the same teacher at 0.5" in line
    line, = [line for line in H._method_extras(unset.to_dict()) if "ImageNet-classifier teacher" in line]
    assert "weight 0.5," in line and "held stage" not in line


def test_a_sequence_continues_from_its_last_finished_stage_without_the_earlier_weights(tiny_data, tmp_path):
    """Re-running a sequence loads only the finished stage it continues from: with stage 1's weights gone (its
    record kept), stage 3 trains from stage 2's weights, for held_stage_epochs, and as a held stage leaves
    segmentation's and detection's figures exactly as stage 2 left them. A caller that wants only the figures
    (load_last=False) reads every record and no weights; a stage to continue from with no weights trains again."""
    cfg = H.make_config("smoke", out_dir=str(tmp_path), batch_size=4, epochs={"seg": 1, "det": 1, "cls": 1},
                        probe_epochs={"det": 0, "cls": 0}, grow_neck_head={"det": 8, "cls": 8},
                        held_stage_epochs={"cls": 2}, final_precision="fp32")
    two = H.run_sequence(cfg, tiny_data, upto=2)
    (H.stage_dir(cfg, "full", 0) / "weights.pt").unlink()
    whole = H.run_sequence(cfg, tiny_data)
    assert not (H.stage_dir(cfg, "full", 0) / "weights.pt").exists()  # stage 1 was not trained again
    assert whole["matrix"][:2] == two["matrix"]
    for metric in ("seg.miou", "det.map", "det.map50"):
        assert whole["matrix"][2][metric] == two["matrix"][1][metric]
    stage3 = json.loads((H.stage_dir(cfg, "full", 2) / "done.json").read_text())
    assert stage3["epochs"] == 2 and len(stage3["history"]) == 2
    assert whole["model"].width == 48 + 8 + 8 and (tmp_path / "final.pt").is_file()
    for k in (1, 2):
        (H.stage_dir(cfg, "full", k) / "weights.pt").unlink()
    figures = H.run_sequence(cfg, tiny_data, load_last=False)
    assert figures["matrix"] == whole["matrix"]
    assert not (H.stage_dir(cfg, "full", 2) / "weights.pt").exists()  # nothing trained again
    with pytest.raises(FileNotFoundError, match="weights.pt"):  # a caller that needs the model: stage 2 has none
        H.run_stage_cached(H.build_model(cfg, backbone_weights="none"), "seg", tiny_data,
                           dataclasses.replace(cfg, flip_test=not cfg.flip_test), H.stage_dir(cfg, "full", 0),
                           eval_tasks=["seg"], need_weights=False)


def test_a_finished_stage_scored_with_other_settings_is_scored_again_from_its_weights(tiny_data, tmp_path, monkeypatch):
    """A finished stage is loaded, not retrained; its scores are reused when the scoring settings are the same and
    computed again from its weights when they differ (the flip test on a record from before it), its training
    record kept; a record with no scoring settings counts as scored without the flip test."""
    cfg = H.make_config("smoke", batch_size=4, epochs={"seg": 1}, flip_test=False)
    stage = tmp_path / "stage1_seg"
    H.run_stage_cached(H.build_model(cfg, backbone_weights="none"), "seg", tiny_data, cfg, stage, eval_tasks=["seg"])
    first = json.loads((stage / "done.json").read_text())
    assert first["scored_with"] == H.scoring_settings(cfg, ["seg"]) and not first["scored_with"]["flip_test"]
    calls = []
    real_evaluate = H.evaluate
    monkeypatch.setattr(H, "evaluate", lambda *a, **k: calls.append(k) or real_evaluate(*a, **k))
    monkeypatch.setattr(H, "train_stage", lambda *a, **k: pytest.fail("a finished stage was trained again"))
    fresh = lambda: H.build_model(cfg, backbone_weights="none")  # noqa: E731
    assert H.run_stage_cached(fresh(), "seg", tiny_data, cfg, stage, eval_tasks=["seg"]) == first and not calls
    del first["scored_with"]  # as a record written before the flip test existed
    H.write_json(first, stage / "done.json")
    assert H.run_stage_cached(fresh(), "seg", tiny_data, cfg, stage, eval_tasks=["seg"]) == first and not calls
    flip = dataclasses.replace(cfg, flip_test=True)
    again = H.run_stage_cached(fresh(), "seg", tiny_data, flip, stage, eval_tasks=["seg"])
    assert len(calls) == 1 and again["scored_with"]["flip_test"] and again["history"] == first["history"]
    model = fresh()
    H.load_weights(model, stage / "weights.pt")
    expected = real_evaluate(model, {"seg": tiny_data["seg"]["val"]}, flip, tasks=["seg"])
    assert again["val"]["seg.miou"] == pytest.approx(expected["seg.miou"])
    assert json.loads((stage / "done.json").read_text()) == again
    # segmentation scored on larger images: scored again; the record says at which side
    larger = dataclasses.replace(flip, eval_scale={"det": 1.25, "seg": 4 / 3})
    scaled = H.run_stage_cached(fresh(), "seg", tiny_data, larger, stage, eval_tasks=["seg"])
    assert len(calls) == 2 and scaled["scored_with"]["eval_sides"] == {"seg": 128} and again["history"] == first["history"]


def test_single_task_teacher_term_is_the_tasks_distillation_from_its_expert(tiny_data):
    """single_task_teacher_weight: the stage's own outputs distilled from the task's single-task model. An expert
    identical to the student gives 0; another one gives exactly weight x the task's distillation loss, with gradient
    into the student; no expert or weight 0: no term. make_stage keeps the expert only in the method's later stages."""
    cfg = H.make_config("smoke", batch_size=4, single_task_teacher_weight={"det": 2.0})
    model = H.initial_model(cfg).eval()  # eval: the same outputs as a frozen copy on the same batch
    stage = H.make_stage(model, "det", tiny_data, cfg)
    batch = H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last)
    same = H.training_step_loss(model, "det", batch, cfg, expert=H.freeze_teacher(model))
    assert same["expert_det"].item() == pytest.approx(0.0, abs=1e-5)
    other = H.initial_model(dataclasses.replace(cfg, seed=5)).eval()
    terms = H.training_step_loss(model, "det", batch, cfg, expert=H.freeze_teacher(other))
    expected = 2.0 * H.detection_distillation_loss(model(batch["image"]), other(batch["image"]), cfg.det_kd_conf)
    assert terms["expert_det"].item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0.01
    terms["expert_det"].backward()
    assert model.head.layers[-1].weight.grad.abs().sum() > 0
    assert "expert_det" not in H.training_step_loss(model, "det", batch, cfg)
    off = dataclasses.replace(cfg, single_task_teacher_weight={"det": 0.0})
    assert "expert_det" not in H.training_step_loss(model, "det", batch, off, expert=H.freeze_teacher(other))
    expert = H.freeze_teacher(other)
    teacher = H.freeze_teacher(model)
    assert H.make_stage(model, "det", tiny_data, cfg, expert=expert).expert is None  # the baseline itself
    assert H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], expert=expert).expert is None  # naive
    assert H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=teacher, replay=True,
                        expert=expert).expert is expert
    assert H.make_stage(model, "det", tiny_data, off, earlier=["seg"], teacher=teacher, replay=True,
                        expert=expert).expert is None


def test_an_isolated_path_keeps_the_new_task_off_the_old_channels(tiny_data):
    """reads_old_channels {"det": False}: the weights by which the old channels (the first 48) reach the new ones or
    detection's outputs start at 0 and stay 0 through training steps (gradients and weight decay notwithstanding), so
    detection's outputs do not change when every old neck and head weight is scrambled, while segmentation's do;
    detection's output rows start drawn afresh on the new channels (segmentation's outputs unchanged by growing) and
    learn. It needs both parts held."""
    cfg = H.make_config("smoke", batch_size=4, grow_neck_head={"det": 16, "cls": 0}, reads_old_channels={"det": False},
                        ema_decay=0.0, epochs={"det": 1})
    model = H.initial_model(cfg)
    teacher = H.freeze_teacher(model)
    image = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    seg_before = model.eval()(image)["seg"]
    H.start_stage(model, "det", cfg, earlier=["seg"], replay=True)
    torch.testing.assert_close(model.eval()(image)["seg"], seg_before, rtol=0, atol=0)  # growing changed no other output
    det_rows = H.own_output_rows(model, "det")
    start = model.head.layers[2].weight.detach()
    assert start[det_rows, 48:].abs().amin(dim=1).gt(0).all() and not start[det_rows, :48].any()  # drawn afresh
    masks = {part: H.isolated_path_masks(getattr(model, part), 48, "det") for part in ("neck", "head")}
    assert set(masks["neck"]) == {"fuse.0.weight"} and set(masks["head"]) == {"layers.0.0.weight", "layers.1.0.weight",
                                                                            "layers.2.weight"}
    assert int(masks["head"]["layers.2.weight"][:, :48].any(dim=(1, 2, 3)).sum()) == 14  # 10 heatmaps, 4 distances
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=teacher, replay=True)
    det_rows_before = model.head.layers[2].weight[H.own_output_rows(model, "det"), 48:].clone()
    for _ in range(3):
        H.train_step(stage, H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last),
                     H.next_replay(stage))
    stage.frozen.remove()
    for part, part_masks in masks.items():
        for name, mask in part_masks.items():
            assert not getattr(model, part).get_parameter(name)[mask].any(), (part, name)
    assert not torch.equal(model.head.layers[2].weight[H.own_output_rows(model, "det"), 48:], det_rows_before)
    before = model.eval()(image)
    with torch.no_grad():
        for layer in (model.neck.fuse[0], model.head.layers[0][0], model.head.layers[1][0]):
            layer.weight[:48, :48] = torch.randn_like(layer.weight[:48, :48])
    after = model(image)
    torch.testing.assert_close(after["det_heatmap"], before["det_heatmap"])
    assert not torch.allclose(after["seg"], before["seg"])
    with pytest.raises(ValueError, match="needs freeze_old_channels"):
        H.make_config("smoke", reads_old_channels={"det": False}, freeze_old_channels=("neck",))


def test_replay_can_leave_the_running_statistics_to_the_new_tasks_images(tiny_data):
    """replay_moves_norm_statistics False: a step's replay images are normalised with their own batch's statistics
    but move no BatchNorm running statistic, so after one loss computation with replay every running statistic is
    exactly what the same computation without replay leaves; True (before): the replay images move them too. The
    momenta are put back afterwards."""
    cfg = H.make_config("smoke", batch_size=4, replay_per_task=2, grow_neck_head={"det": 0, "cls": 0},
                        freeze_head_bn_after_first=False, replay_moves_norm_statistics=False)
    model = H.initial_model(cfg).train()
    stage = H.make_stage(model, "det", tiny_data, cfg, earlier=["seg"], teacher=H.freeze_teacher(model), replay=True)
    batch = H.batch_to_device(next(iter(stage.loader)), torch.device("cpu"), cfg.channels_last)
    replay = H.next_replay(stage)

    def statistics_after(cfg, replay):
        trained = copy.deepcopy(model)
        torch.manual_seed(0)  # the backbone's stochastic depth draws the same for the detection batch
        momenta = [m.momentum for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        H.training_step_loss(trained, "det", batch, cfg, replay=replay, earlier=["seg"], teacher=stage.teacher)
        assert momenta == [m.momentum for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return {k: v.clone() for k, v in trained.state_dict().items() if "running_" in k}

    held, alone = statistics_after(cfg, replay), statistics_after(cfg, {})
    start = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert not torch.equal(alone["neck.fuse.1.running_mean"], start["neck.fuse.1.running_mean"])  # the det batch moved it
    for key in alone:
        torch.testing.assert_close(held[key], alone[key], rtol=0, atol=0, msg=key)
    moved = statistics_after(dataclasses.replace(cfg, replay_moves_norm_statistics=True), replay)
    assert not torch.equal(moved["neck.fuse.1.running_mean"], alone["neck.fuse.1.running_mean"])


def test_precise_norm_statistics_are_the_mean_of_the_batches_statistics(tiny_data):
    """recompute_norm_statistics from channel 40 on: the neck's BatchNorm running mean of those channels becomes the
    mean over the train images' evaluation batches of each batch's mean of its input (computed here on the side with
    a hook), the channels before 40 and every backbone statistic stay bit for bit, the counter and momentum too,
    and the model is left in evaluation mode."""
    cfg = H.make_config("smoke", batch_size=4)
    model = H.initial_model(cfg).eval()
    norm = model.neck.fuse[1]
    with torch.no_grad():
        norm.running_mean.fill_(0.5)
        norm.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = []
    hook = norm.register_forward_hook(lambda m, i, o: inputs.append(i[0].mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for batch in H.make_loader(tiny_data["det"]["train"], cfg, train=False, drop_last=False):
            model(batch["image"].contiguous(memory_format=torch.channels_last))
    hook.remove()
    expected = torch.stack(inputs).mean(dim=0)
    model.train()
    seen = H.recompute_norm_statistics(model, tiny_data["det"]["train"], cfg, first_channel=40)
    assert seen == len(tiny_data["det"]["train"]) and not model.training
    torch.testing.assert_close(norm.running_mean[40:], expected[40:], rtol=1e-4, atol=1e-5)
    assert torch.equal(norm.running_mean[:40], before["neck.fuse.1.running_mean"][:40])
    assert not torch.equal(norm.running_var[40:], before["neck.fuse.1.running_var"][40:])
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") or key.endswith("num_batches_tracked"):
            assert torch.equal(value, before[key]), key
    assert norm.momentum == 0.1
