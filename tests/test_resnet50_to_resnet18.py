"""resnet50_to_resnet18.py: block-level stages with adapters at the frontier, ending in a plain ResNet-18."""
import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import resnet50_to_resnet18 as script
from learning import AGREED, LEARNED
from runs import TORCHRUN_2, read_results, run_script

FAST = LEARNED["resnet50_to_resnet18 not"].args  # learning.py's runs: 5 stages x (3 + 1) steps, then 512 / 32
STEPS = 5 * (3 + 1) + 512 // 32


def run(args, cwd, **kwargs):
    return run_script("resnet50_to_resnet18.py", args, cwd, **kwargs)


def is_adapter(module):
    return (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
            and module[0].kernel_size == (1, 1) and isinstance(module[1], nn.BatchNorm2d))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_hybrid_runs_at_every_stage_and_ends_as_resnet18(order):
    torch.manual_seed(0)
    guide = script.load_guide("random", num_classes=10)
    hybrid = copy.deepcopy(guide)
    x = torch.randn(2, 3, 64, 64)
    stages = script.make_stages(guide, SimpleNamespace(order=order))
    compared = []
    for stage in stages:
        stage.swap(hybrid)
        assert hybrid.eval()(x).shape == (2, 10)
        (guide_name, hybrid_name), = stage.compare
        compared.append(guide_name)
        g, = common.forward_until(guide, x, [guide_name])
        h, = common.forward_until(hybrid, x, [hybrid_name])
        if guide_name == "fc":
            assert g.shape == h.shape == (2, 10)
        else:
            k = int(guide_name[-1])  # stage k: ResNet-50 has 4x the channels of ResNet-18, same resolution
            size = 64 // 2 ** (k + 1)
            assert g.shape == (2, 256 * 2 ** (k - 1), size, size)
            assert h.shape == (2, 64 * 2 ** (k - 1), size, size)
        # Adapters only at the frontier: one while ResNet-50 parts remain, none at the end.
        adapters = [n for n, m in hybrid.named_modules() if n.count(".") == 1 and is_adapter(m)]
        assert len(adapters) == (0 if stage is stages[-1] else 1), adapters
    expected = ["layer1", "layer2", "layer3", "layer4", "fc"]
    assert compared == (expected if order == "forward" else expected[::-1])
    target = torchvision.models.resnet18(num_classes=10)
    target.load_state_dict(hybrid.state_dict(), strict=True)
    torch.testing.assert_close(target.eval()(x), hybrid(x))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_each_swap_puts_its_resnet18_parts_on_the_guides_device_and_memory_format(order):
    # The meta device stands in for a GPU: the new ResNet-18 parts are built on the CPU.
    guide = torchvision.models.resnet50(num_classes=10).to("meta", memory_format=torch.channels_last)
    hybrid = copy.deepcopy(guide)
    for i, stage in enumerate(script.make_stages(guide, SimpleNamespace(order=order)), 1):
        common.swap(hybrid, stage, i, seed=0)
        assert {t.device.type for t in [*hybrid.parameters(), *hybrid.buffers()]} == {"meta"}, i
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in hybrid.parameters() if p.dim() == 4), i


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every arm, run in this process (the command line is tested below, with two processes)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("not", "reverse", "naive", "scratch", "guide"):
        script.main([*LEARNED[f"resnet50_to_resnet18 {name}"].args, f"--out_dir={tmp / name}"])
        out[name] = str(tmp / name)
    return out


def test_all_arms_take_the_same_number_of_steps(runs):
    for name in ("not", "reverse", "naive", "scratch", "guide"):
        res = read_results(runs[name])
        epochs = 2 if name == "guide" else 1  # a ResNet-50 from scratch learns slower: learning.py gives it 2
        assert res["status"] == "done" and res["grad_steps"] == STEPS + (epochs - 1) * 512 // 32, name
        LEARNED[f"resnet50_to_resnet18 {name}"].check(res)  # chance is 10%
    assert [s["replaced"] for s in read_results(runs["not"])["stages"]] == [
        ["conv1", "bn1", "layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
    assert [list(s["cka"]) for s in read_results(runs["reverse"])["stages"]] == [
        ["fc"], ["layer4"], ["layer3"], ["layer2"], ["layer1"]]
    assert read_results(runs["scratch"])["guide_metric"] is None


def test_method_guide_trains_a_resnet50_that_guide_reads(runs):
    assert not os.path.exists(os.path.join(runs["guide"], "target.pt"))
    guide = script.load_guide(os.path.join(runs["guide"], "guide.pt"))
    assert sum(isinstance(m, torchvision.models.resnet.Bottleneck) for m in guide.modules()) == 16
    _, val = common.synthetic_images(512, 64, 10, 32, seed=0)
    images, labels = val.tensors
    with torch.no_grad():
        top1 = 100.0 * (guide(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(read_results(runs["guide"])["metric"]["value"], abs=1e-6)


def test_target_is_the_model_the_run_ended_with(runs):
    _, val = common.synthetic_images(512, 64, 10, 32, seed=0)
    images, labels = val.tensors
    for name in ("not", "reverse", "naive", "scratch"):
        target = script.load_target(os.path.join(runs[name], "target.pt"))
        assert type(target) is torchvision.models.ResNet and not any(
            isinstance(m, torchvision.models.resnet.Bottleneck) for m in target.modules())
        # Its top-1, recomputed from target.pt alone on the generated validation set, is the one the run reported.
        with torch.no_grad():
            top1 = 100.0 * (target(images).argmax(1) == labels).float().mean().item()
        assert top1 == pytest.approx(read_results(runs[name])["metric"]["value"], abs=1e-6), name


def test_torchrun_two_processes_align_as_one(tmp_path, monkeypatch):
    """Stages only, without fine-tuning: BatchNorm inside the new ResNet-18 stages normalizes each process's half of
    the batch in alignment, as DDP without SyncBatchNorm does (torchvision's reference default), so each process
    aligns on other statistics than one process does; they are then re-estimated over both halves. The difference
    grows stage by stage, and the near-chance hybrid's top-1 moves by whole images: so stage 1's CKA alone. That
    every stage's new modules start alike on both processes is checked in the run itself (common.check_replicas;
    tests/test_ranks.py)."""
    agreed = AGREED["resnet50_to_resnet18 first cka"]
    run([*agreed.args, "--out_dir=ddp"], cwd=tmp_path, launcher=TORCHRUN_2)
    monkeypatch.chdir(tmp_path)
    script.main([*agreed.args, "--out_dir=one"])
    two = read_results(tmp_path / "ddp")
    assert two["status"] == "done" and len(two["stages"]) == 5
    torchvision.models.resnet18(num_classes=10).load_state_dict(
        torch.load(tmp_path / "ddp" / "target.pt")["model"], strict=True)
    agreed.check(two, read_results(tmp_path / "one"))


@pytest.mark.parametrize("args, message", [
    (["--method=distill"], "--method=distill: expected one of not, naive, scratch, guide"),
    (["--method=guide", "--guide=resnet18.pt"], "--method=guide trains a guide from scratch: pass --guide=random"),
    (["--guide=resnet18.pt"], "does not fit ResNet-50: missing keys ['layer1.0.conv3.weight'"),
    (["--batch_size=0"], "--batch_size must be positive"),
    (["--data_dir=nowhere"], "data_dir 'nowhere' is not a folder"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(SystemExit) as err:
        script.main([*FAST, "--out_dir=out", *args])
    assert message in str(err.value.code) and str(err.value.code).startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_calibration_is_decided_before_any_alignment(tmp_path, monkeypatch, capsys):
    """Its ResNet-18 stages end in BatchNorm, not a Linear: --calibrate=auto with --finetune_steps=0 calibrates only
    the classifier, and --calibrate=on stops the run before the first alignment step, naming the module."""
    monkeypatch.chdir(tmp_path)
    for fit in ("on", "linear"):  # and a map over channels: ResNet-18's stages are narrower than ResNet-50's
        with pytest.raises(SystemExit, match="--calibrate: 'layer1.0' has no Linear to fold a map into"):
            script.main([*FAST, f"--out_dir={fit}", "--finetune_steps=0", f"--calibrate={fit}"])
        assert "align step" not in capsys.readouterr().out and not (tmp_path / fit / "ckpt.pt").exists()
    script.main([*FAST, "--out_dir=auto", "--finetune_steps=0", "--align_steps=1", "--epochs=1"])
    assert [s.get("calibrated") for s in read_results(tmp_path / "auto")["stages"]] == [None] * 4 + ["on"]


# A run's shortest whole form, for the switches of what it computes.
MINIMAL = ["--preset=tiny", "--device=cpu", "--align_steps=2", "--finetune_steps=1", "--epochs=1",
           "--bn_recal_batches=1", "--synthetic_train=256", "--synthetic_val=32"]


@pytest.mark.parametrize("measure", ["dmnn", "rsa"])
def test_the_other_similarities_run_end_to_end(tmp_path, monkeypatch, capsys, measure):
    monkeypatch.chdir(tmp_path)
    script.main([*MINIMAL, f"--similarity={measure}", "--out_dir=out"])
    log, res = capsys.readouterr().out, read_results(tmp_path / "out")
    assert res["status"] == "done" and [list(s[measure]) for s in res["stages"]] == [
        ["layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
    assert f"| {measure} " in log and ("| mutual_knn " in log) == (measure == "dmnn")
