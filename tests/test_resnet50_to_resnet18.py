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
from runs import TORCHRUN_2, read_results, run_script

FAST = ["--preset=tiny", "--device=cpu", "--align_steps=3", "--finetune_steps=1", "--epochs=1", "--bn_recal_batches=2",
        "--synthetic_train=512", "--synthetic_val=64"]
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every arm, run in this process (the command line is tested below, with two processes)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in [("not", []), ("reverse", ["--order=reverse"]), ("naive", ["--method=naive"]),
                        ("scratch", ["--method=scratch"]), ("guide", ["--method=guide"])]:
        script.main([*FAST, f"--out_dir={tmp / name}", *extra])
        out[name] = str(tmp / name)
    return out


def test_all_arms_take_the_same_number_of_steps(runs):
    for name in ("not", "reverse", "naive", "scratch", "guide"):
        res = read_results(runs[name])
        assert res["status"] == "done" and res["grad_steps"] == STEPS, name
        assert res["metric"]["value"] > 30, name  # chance is 10%
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
    for name in ("not", "reverse"):
        target = script.load_target(os.path.join(runs[name], "target.pt"))
        assert type(target) is torchvision.models.ResNet and not any(
            isinstance(m, torchvision.models.resnet.Bottleneck) for m in target.modules())
        # Rebuild the run's final hybrid from its last checkpoint and compare outputs.
        hybrid = script.load_guide("random", num_classes=10)
        for stage in script.make_stages(hybrid, SimpleNamespace(order="forward" if name == "not" else "reverse")):
            stage.swap(hybrid)
        hybrid.load_state_dict(torch.load(os.path.join(runs[name], "ckpt.pt"))["model"])
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(target(x), hybrid.eval()(x))


def test_torchrun_two_processes(tmp_path):
    run([*FAST, "--epochs=1", "--out_dir=ddp"], cwd=tmp_path, launcher=TORCHRUN_2)
    res = read_results(tmp_path / "ddp")
    assert res["status"] == "done" and res["grad_steps"] == STEPS and len(res["stages"]) == 5
    torchvision.models.resnet18(num_classes=10).load_state_dict(
        torch.load(tmp_path / "ddp" / "target.pt")["model"], strict=True)


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
