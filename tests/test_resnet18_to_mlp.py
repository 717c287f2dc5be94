"""resnet18_to_mlp.py end to end on generated images, on CPU, through its command line (in a process of its own, or
main(argv) in this one)."""
import os
import shutil
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import resnet18_to_mlp
from learning import AGREED, LEARNED
from runs import (TORCHRUN_2, assert_other_similarity_run, kill_mid_phase, read_results,
                  run_main, run_script, steps_logged, write_image_folder)

# learning.py's runs: the tiny preset with fewer steps and images, 20 stages x (4 + 2) steps, then 3 epochs of
# 512 / 32 = 16 steps.
FAST = LEARNED["resnet18_to_mlp forward"].args
STEPS_PER_EPOCH = 512 // 32
CONVOLUTIONS = [n for n, m in torchvision.models.resnet18().named_modules() if isinstance(m, nn.Conv2d)]


def run(args, cwd, **kwargs):
    return run_script("resnet18_to_mlp.py", args, cwd, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One NoT run in each order and one naive run, shared by the tests below: (out_dir, log)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("forward", "reverse", "naive"):
        log = run_main(resnet18_to_mlp, [*LEARNED[f"resnet18_to_mlp {name}"].args, f"--out_dir={tmp / name}"], tmp)
        out[name] = (str(tmp / name), log)
    return out


def test_not_forward_records_every_stage(runs):
    out_dir, log = runs["forward"]
    res = read_results(out_dir)
    assert res["status"] == "done" and res["script"] == "resnet18_to_mlp.py"
    assert [s["replaced"] for s in res["stages"]] == [[n] for n in CONVOLUTIONS]
    for stage in res["stages"]:
        assert stage["align_steps"] == 4 and stage["bn_recal_batches"] == 2 and set(stage["cka"]) == set(
            stage["replaced"])
        assert [step for step, _ in stage["cka_curve"]] == [1, 2, 3, 4]  # at most 10 points; 4 steps, 4 points
        assert {"top1", "top1_before_finetune"} <= set(stage)
    assert res["metric"]["name"] == "top1" and res["metric"]["lower_is_better"] is False
    LEARNED["resnet18_to_mlp forward"].check(res)  # chance is 10% on the 10 generated classes
    assert res["grad_steps"] == 20 * (4 + 2) + 3 * STEPS_PER_EPOCH
    assert res["config"]["method"] == "not" and res["config"]["seed"] == 0
    assert "stage 20/20 done" in log and f"train step {3 * STEPS_PER_EPOCH}/{3 * STEPS_PER_EPOCH}" in log


def test_not_reverse_replaces_last_first(runs):
    res = read_results(runs["reverse"][0])
    assert [s["replaced"][0] for s in res["stages"]] == CONVOLUTIONS[::-1]
    LEARNED["resnet18_to_mlp reverse"].check(res)


def test_naive_takes_as_many_gradient_steps_as_not(runs):
    not_res, (naive_dir, naive_log) = read_results(runs["forward"][0]), runs["naive"]
    naive_res = read_results(naive_dir)
    total = not_res["grad_steps"]
    assert naive_res["grad_steps"] == total
    # The loop itself logged that many task steps in one phase, and no alignment at all.
    assert f"train step {total}/{total}" in naive_log and "align" not in naive_log
    assert naive_res["stages"] == []
    LEARNED["resnet18_to_mlp naive"].check(naive_res)


def test_target_has_no_convolution_and_reproduces_its_accuracy(runs):
    out_dir, _ = runs["forward"]
    target = resnet18_to_mlp.load_target(os.path.join(out_dir, "target.pt"))
    assert not any(isinstance(m, nn.Conv2d) for m in target.modules())
    assert sum(isinstance(m, resnet18_to_mlp.LowRankLinear) for m in target.modules()) == 20
    # Recompute the accuracy from scratch on the same generated validation set.
    _, val = common.synthetic_images(512, 64, 10, 32, seed=0)
    images, labels = val.tensors
    with torch.no_grad():
        top1 = 100.0 * (target(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(read_results(out_dir)["metric"]["value"], abs=1e-6)


def test_method_guide_trains_a_resnet18_that_guide_reads(tmp_path):
    out_dir = tmp_path / "guide"
    resnet18_to_mlp.main([*LEARNED["resnet18_to_mlp guide"].args, f"--out_dir={out_dir}"])
    res = read_results(out_dir)
    # As many steps as a NoT run takes, all of them task steps of a plain ResNet-18.
    assert res["grad_steps"] == 20 * (1 + 1) + STEPS_PER_EPOCH and res["stages"] == []
    assert not (out_dir / "target.pt").exists()
    LEARNED["resnet18_to_mlp guide"].check(res)
    guide = torchvision.models.resnet18(num_classes=10).eval()
    guide.load_state_dict(common.load_checkpoint(str(out_dir / "guide.pt"))["model"])
    _, val = common.synthetic_images(512, 64, 10, 32, seed=0)
    images, labels = val.tensors
    with torch.no_grad():
        top1 = 100.0 * (guide(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(res["metric"]["value"], abs=1e-6)
    # --guide=PATH reads it back: evaluated as the guide, it scores the same.
    proc = run([*FAST, "--out_dir=unused", f"--guide={out_dir / 'guide.pt'}", "--eval_only=guide"], cwd=tmp_path)
    assert f"top1 {top1:.2f}" in proc.stdout and not (tmp_path / "unused").exists()


def test_torchrun_two_processes_align_as_one_on_an_image_folder(tmp_path, monkeypatch):
    """Images of several sizes read in the main process (--workers=0): the crops' draws differ between processes,
    yet each stage's new modules must start alike (checked in the run), and the first stage's CKA must equal one
    process's on the same global batch (tests/learning.py says why not the later ones)."""
    agreed = AGREED["resnet18_to_mlp folder first cka"]
    images = write_image_folder(tmp_path / "data", ["a", "b"], per_class=8)
    args = [a.format(images=images) for a in agreed.args]
    proc = run([*args, "--out_dir=ddp"], cwd=tmp_path, launcher=TORCHRUN_2)
    monkeypatch.chdir(tmp_path)
    resnet18_to_mlp.main([*args, "--out_dir=one"])
    two, one = read_results(tmp_path / "ddp"), read_results(tmp_path / "one")
    # Two processes of 2 images make the same global batch of 4: one epoch is the same 4 steps.
    assert one["grad_steps"] == 20 * 2 + 16 // 4 and len(one["stages"]) == 20
    agreed.check(two, one)
    assert proc.stdout.count("final top1") == 1  # rank 0 alone logs
    assert len(resnet18_to_mlp.load_target(str(tmp_path / "ddp" / "target.pt")).state_dict()) > 0


def test_resume_after_kill_gives_the_same_weights(tmp_path, runs):
    out_dir = tmp_path / "killed"
    args = [*LEARNED["resnet18_to_mlp forward"].args, f"--out_dir={out_dir}", "--log_interval=1"]
    saved = kill_mid_phase("resnet18_to_mlp.py", [*args, "--ckpt_interval=1"], tmp_path, out_dir, [
        f"stage {i} align step 2/4" for i in (5, 9, 13)])
    assert not os.path.exists(out_dir / "target.pt")
    # Phases 2(i - 1) and 2(i - 1) + 1 are stage i's alignment (4 steps) and fine-tuning (2 steps).
    stage, kind, done_before = saved["phase"] // 2 + 1, ("align", "finetune")[saved["phase"] % 2], saved["run"][0]
    assert 0 < stage < 20 and done_before == (stage - 1) * 6 + 4 * (kind == "finetune") + saved["step"]
    # Checkpoints at the preset's interval from here (a setting a resumed run may change; each costs 0.1 s).
    log = run([*args, "--resume=True"], cwd=tmp_path).stdout
    # It says where it resumed, and took exactly the steps left: the rest of that phase first, no earlier phase.
    assert f"resuming {out_dir / 'ckpt.pt'} at phase {saved['phase']} step {saved['step']}" in log
    steps = steps_logged(log)
    assert steps[0] == (f"stage {stage} {kind}", saved["step"] + 1)
    assert len(steps) == 20 * 6 + 3 * STEPS_PER_EPOCH - done_before
    assert not any(name.startswith(f"stage {k} ") for name, _ in steps for k in range(1, stage))
    resumed = torch.load(out_dir / "target.pt")["model"]
    reference = torch.load(os.path.join(runs["forward"][0], "target.pt"))["model"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert read_results(out_dir)["grad_steps"] == read_results(runs["forward"][0])["grad_steps"]


@pytest.mark.parametrize("args, message", [
    (["--data_dir=does/not/exist"], "data_dir 'does/not/exist' is not a folder"),
    (["--rnak=3"], "unknown config key 'rnak'; valid keys:"),
    (["--rank=big"], "--rank=big: expected a int"),
    (["--rank=0"], "--rank must be positive, got 0"),
    (["--order=sideways"], "--order=sideways: expected one of forward, reverse"),
    (["--guide=corrupt.pt"], "checkpoint 'corrupt.pt' could not be read"),
    (["--guide=missing.pt"], "checkpoint 'missing.pt' does not exist"),
    (["--resume=True"], "no checkpoint at"),
    (["--method=guide", "--guide=corrupt.pt"], "--method=guide trains a guide from scratch: pass --guide=random"),
    (["--synthetic_shift=32"], "--synthetic_shift=32: expected 0 to image_size - 1"),
    (["--guide=pretrained"], "generated images (empty --data_dir) have their own classes"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as err:
        resnet18_to_mlp.main([*FAST, "--out_dir=out", *args])
    assert message in str(err.value.code) and str(err.value.code).startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt"]


def test_bad_input_on_the_command_line_and_a_corrupt_checkpoint(tmp_path):
    proc = run([*FAST, "--out_dir=out", "--order=sideways"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: --order=sideways: expected one of forward, reverse" in proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(SystemExit, match="could not be read.*ckpt.pt|ckpt.pt.*could not be read"):
        resnet18_to_mlp.main([*FAST, f"--out_dir={out_dir}", "--resume=True"])
    assert sorted(os.listdir(out_dir)) == ["ckpt.pt"]
    # A finished or running run is never overwritten without --resume.
    with pytest.raises(SystemExit, match="already holds a run"):
        resnet18_to_mlp.main([*FAST, f"--out_dir={out_dir}"])


def test_pretrained_guide_offline_says_what_to_download(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as err:
        resnet18_to_mlp.load_guide("pretrained")
    message = str(err.value.code)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-f37072fd.pth") in message


def test_guide_from_a_path(tmp_path):
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "guide.pt")
    guide = resnet18_to_mlp.load_guide(str(tmp_path / "guide.pt"))
    assert not guide.training and guide.fc.out_features == 7
    for key, value in model.state_dict().items():
        assert torch.equal(guide.state_dict()[key], value)
    state = model.state_dict()
    del state["layer1.0.conv1.weight"]
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(SystemExit) as err:
        resnet18_to_mlp.load_guide(str(tmp_path / "broken.pt"))
    message = str(err.value.code)
    assert "missing keys ['layer1.0.conv1.weight']" in message
    assert "unexpected keys ['extra.weight']" in message
    assert "wrong shapes ['layer2.0.conv1.weight (128, 64, 1, 1) (expected (128, 64, 3, 3))']" in message


def test_image_folder_checks(tmp_path):
    write_image_folder(tmp_path / "ok", ["a", "b"])
    assert common.check_image_folders(str(tmp_path / "ok")) == ["a", "b"]
    train, val = (common.ImageFiles(str(tmp_path / "ok" / split), split == "train", 32, "bilinear", "cpu",
                                    common.Context()) for split in ("train", "val"))
    assert train[0][0].shape == (3, 32, 32) and train[0][0].dtype == torch.uint8 and len(val) == 8
    write_image_folder(tmp_path / "mismatch", ["a", "b"])
    os.rename(tmp_path / "mismatch" / "val" / "b", tmp_path / "mismatch" / "val" / "c")
    with pytest.raises(SystemExit, match=r"only in train \['b'\], only in val \['c'\]"):
        common.check_image_folders(str(tmp_path / "mismatch"))
    write_image_folder(tmp_path / "empty", ["a"])
    (tmp_path / "empty" / "train" / "z").mkdir()
    with pytest.raises(SystemExit, match=r"without images.*\['z'\]"):
        common.check_image_folders(str(tmp_path / "empty"))
    write_image_folder(tmp_path / "noval", ["a"])
    shutil.rmtree(tmp_path / "noval" / "val")
    with pytest.raises(SystemExit, match="val' is missing"):
        common.check_image_folders(str(tmp_path / "noval"))


# A run's shortest whole form, for the switches of what it computes.
MINIMAL = ["--preset=tiny", "--device=cpu", "--align_steps=2", "--finetune_steps=1", "--epochs=1",
           "--bn_recal_batches=1", "--synthetic_train=256", "--synthetic_val=32"]
STAGES = 20


@pytest.mark.parametrize("flag, measure", [("--similarity=dmnn", "dmnn"), ("--similarity=rsa", "rsa"),
                                           ("--calibrate=linear", "cka"), ("--calibrate=readout", "cka")])
def test_the_other_similarities_and_linear_calibration_run_end_to_end(tmp_path, monkeypatch, capsys, flag, measure):
    monkeypatch.chdir(tmp_path)
    resnet18_to_mlp.main([*MINIMAL, flag, "--out_dir=out"])
    assert_other_similarity_run(tmp_path / "out", capsys.readouterr().out, flag, measure, STAGES)
