"""What a paper-scale run gets before it starts and while it runs: the smoke run (--preset=smoke) and its lines
against its own records, the disk check."""
import os
import re
import shutil
from types import SimpleNamespace

import pytest

import common
import dinov2_to_patchmlp
from runs import read_results, run_script

# DINOv2's script at the tiny preset's size, given as flags: --preset=smoke takes the preset's place.
TINY_FLAGS = ["--device=cpu", "--guide=random", "--embed_dim=128", "--depth=4", "--patch_size=8",
              "--token_mlp_width=256", "--image_size=32", "--synthetic_train=1024", "--synthetic_val=256",
              "--batch_size=32", "--workers=0", "--epochs=2", "--align_steps=40"]


def test_a_smoke_run_takes_two_steps_of_each_phase_and_says_what_the_full_run_needs(tmp_path):
    log = run_script("dinov2_to_patchmlp.py", ["--preset=smoke", *TINY_FLAGS], tmp_path).stdout
    res = read_results(tmp_path / "out-dinov2_to_patchmlp-smoke")
    assert res["grad_steps"] == 4 * (2 + 2) + 2 and res["status"] == "done"  # 2 steps of every phase
    smoke = res["smoke"]
    for kind in ("align", "finetune", "train"):
        line = re.search(rf"^smoke: {kind} ([\d.]+) ms/step, peak memory n/a \(CPU\)$", log, re.MULTILINE)
        assert float(line[1]) == pytest.approx(smoke["kinds"][kind]["seconds_per_step"] * 1000, abs=0.051)
    # The first step's checkpoint (the weights, and Adam's state of the new modules): more than the last one, which has
    # the weights alone.
    last = os.path.getsize(tmp_path / "out-dinov2_to_patchmlp-smoke" / "ckpt.pt")
    assert f"smoke: checkpoint {smoke['checkpoint_bytes'] / 1e6:.1f} MB written, read back and resumed from" in log
    assert last < smoke["checkpoint_bytes"] < 2 * last
    assert (f"smoke: disk {smoke['disk_needed_bytes'] / 1e9:.2f} GB needed, {smoke['disk_free_bytes'] / 1e9:.2f} GB "
            f"free") in log
    # The full run: 4 stages of 40 alignment and 100 fine-tuning steps, then 2 epochs of 1024 / 32.
    projected = re.search(r"^smoke: the full run \(160 align, 400 finetune, 64 train steps\) projected at "
                          r"(\d+):(\d\d):(\d\d),", log, re.MULTILINE)
    assert projected and common._clock(smoke["projected_seconds"]) == ":".join(projected.groups())
    fastest = sum(n * min(smoke["kinds"][k]["phases"].values()) for k, n in (("align", 160), ("finetune", 400),
                                                                             ("train", 64)))
    assert smoke["projected_seconds"] >= fastest  # the steps at each kind's fastest, and the work between phases


def test_a_smoke_runs_peak_memory_is_what_the_allocator_reserved(tmp_path, monkeypatch):
    import torch
    import torch.nn as nn

    from toy import CLASSIFY, Stream, classification_batches

    # A CUDA run as the smoke report sees it: the allocator's numbers given, the model and batches on the CPU.
    gib = 2 ** 30
    for name, value in (("reset_peak_memory_stats", None), ("max_memory_allocated", 1.5 * gib),
                        ("max_memory_reserved", 2.25 * gib)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, value=value: value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * gib))
    cfg = common.configure({}, [f"--out_dir={tmp_path}", "--preset=smoke", "--batch_size=8"])
    task = common.Task(CLASSIFY.loss, CLASSIFY.inputs, lambda model: 0.0, "loss")
    run = common.Run(cfg, common.Context(device=torch.device("cuda")), task, Stream(classification_batches(2)))
    logs, model = [], nn.Linear(6, 3)
    run.log_line = logs.append
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in run.steps("train", 4, model, opt, 0.1, 0):
        run.log(loss=common.task_step(model, next(run.batches), opt, task, cfg))
    run.finish(model)
    assert "smoke: train" in logs[-4] and logs[-4].endswith("ms/step, peak memory 2.25 of 80.00 GiB reserved")


def test_a_disk_too_small_stops_the_run_before_its_first_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5_000_000))
    with pytest.raises(SystemExit, match=r"'out' has 0.01 GB free, short by 0.0\d GB of the 0.0\d GB this run needs"):
        dinov2_to_patchmlp.main([*TINY_FLAGS, "--preset=smoke", "--out_dir=out"])
    assert " step " not in capsys.readouterr().out and not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_wandb_logs_what_results_json_records_and_a_resumed_run_continues_it(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    inits, logged = [], []
    real_init = wandb.init

    def init(**kwargs):  # the real wandb, offline, with what it is handed recorded
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda numbers, step: logged.append((step, numbers)) or real_log(numbers, step=step)
        inits.append((kwargs, run.id))
        return run

    monkeypatch.setattr(wandb, "init", init)
    args = ["--preset=tiny", "--align_steps=4", "--finetune_steps=2", "--epochs=1", "--synthetic_val=64",
            "--wandb_log=True", "--similarity=dmnn", "--out_dir=out"]
    dinov2_to_patchmlp.main(args)
    log, res = capsys.readouterr().out, read_results(tmp_path / "out")
    (kwargs, run_id), = inits
    assert kwargs["config"] == res["config"] and kwargs["project"] == "network-of-theseus" and kwargs["name"] == "out"
    assert os.path.isdir(tmp_path / "out" / "wandb") and any(run_id in f for f in os.listdir(tmp_path / "out" /
                                                                                             "wandb"))
    # Every log line's numbers, at the gradient step it was printed at.
    lines = [line for line in log.splitlines() if " step " in line and " | lr " in line]
    steps = [(step, numbers) for step, numbers in logged if "loss" in numbers]
    assert len(steps) == len(lines) and [n["phase"] for _, n in steps] == [line.split(" step ")[0] for line in lines]
    for (step, numbers), line in zip(steps, lines):
        assert f"loss {numbers['loss']:.4f} |" in line and f"lr {numbers['lr']:.2e} |" in line
    # Each stage's record and the final metric, as results.json has them.
    stages = {n["stage"]: n for _, n in logged if "stage" in n and "stage/top1" in n}
    assert len(stages) == len(res["stages"]) == 4
    for stage in res["stages"]:
        logged_stage = stages[stage["stage"]]
        assert logged_stage["stage/top1"] == stage["top1"]
        assert {k.split("/", 2)[2]: v for k, v in logged_stage.items() if k.startswith("stage/dmnn/")} == stage["dmnn"]
        assert {k.split("/", 2)[2]: v for k, v in logged_stage.items() if k.startswith(
            "stage/mutual_knn/")} == stage["mutual_knn"]
    assert [n for _, n in logged if "final/top1" in n] == [{"final/top1": res["metric"]["value"]}]
    # Resumed, the run logs into the same wandb run.
    dinov2_to_patchmlp.main([*args, "--resume=True"])
    assert [i for _, i in inits] == [run_id, run_id]


def test_wandb_is_not_imported_when_off_and_its_absence_or_no_login_stops_the_run_first(tmp_path, monkeypatch):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dinov2_to_patchmlp as s; s.main(sys.argv[2:]); "
            "assert 'wandb' not in sys.modules, 'wandb was imported'")
    import subprocess
    import sys

    from runs import ROOT

    proc = subprocess.run([sys.executable, "-c", code, ROOT, "--preset=tiny", "--align_steps=1", "--finetune_steps=0",
                           "--epochs=1", "--synthetic_train=64", "--synthetic_val=32", "--out_dir=off"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(SystemExit, match="not logged in to api.wandb.ai: run `wandb login`, set WANDB_API_KEY, or"):
        dinov2_to_patchmlp.main(["--preset=tiny", "--wandb_log=True", "--out_dir=nologin"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="--wandb_log=True needs the wandb package: pip install wandb"):
        dinov2_to_patchmlp.main(["--preset=tiny", "--wandb_log=True", "--out_dir=missing"])
    assert sorted(os.listdir(tmp_path)) == ["off"]  # neither began
