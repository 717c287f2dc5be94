"""The task phases' performance switches: --shard (FSDP over 2 CPU processes, gloo), --compile, and MFU."""
import os
import re
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import gpt2_to_rnn
import resnet18_to_mlp
from runs import spawn_two
from toy import CLASSIFY, Stream, classification_batches

STEPS = 4


def model():
    # No bias before the BatchNorm: its gradient would be float noise, which Adam turns into full-size steps
    # that differ between any two ways of summing.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


BATCHES = classification_batches(STEPS)


def phase_run(folder, rank=0, world=1, shard=None, task=CLASSIFY, *flags):
    cfg = common.configure({}, [f"--out_dir={folder}", "--batch_size=8", "--ckpt_interval=2", "--log_interval=100",
                                "--warmup_steps=1", *flags])
    cfg.dtype = "float32"
    return common.Run(cfg, common.Context(rank, rank, world, torch.device("cpu"), "test.py"), task,
                      Stream(BATCHES, rank, world), shard=shard)


def worker(rank, init_method, runs, folder):
    """Each (name, shard, resume) of runs in turn, in folder/name; rank 0 saves the final weights there."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        for name, shard, resume in runs:
            phase(rank, shard, resume, f"{folder}/{name}")
        dist.barrier()  # gloo may abort a process that leaves while the other still runs
    finally:
        dist.destroy_process_group()


def phase(rank, shard, resume, folder):
    """A 4-step task phase on this rank's half of each batch, sharded or under DDP; or (resume) the same phase
    continued from the checkpoint its first run saved after step 2."""
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()
    sharded_copies = []

    def shard_and_record(module):  # resnet18_to_mlp.py's rule, recording the copy it shards
        sharded = resnet18_to_mlp.shard(module)
        sharded_copies.append(weakref.ref(sharded))
        return sharded

    hybrid, taken, gathered = model(), [], []

    def loss(model, batch):  # counts the steps this run takes
        taken.append(1)
        return CLASSIFY.loss(model, batch)

    def gather(sharded, opt):  # what the checkpoint gathers on this process
        state = common_gathered_state(sharded, opt)
        gathered.append((len(state[0]), None if state[1] is None else len(state[1].get("state", {}))))
        return state

    task = common.Task(loss=loss, inputs=CLASSIFY.inputs, evaluate=None, metric="loss")
    common_gathered_state, common.gathered_state = common.gathered_state, gather
    try:
        run = phase_run(folder, rank, 2, shard_and_record if shard else None, task, f"--resume={resume}")
        common.train(hybrid, "train", STEPS, 1e-2, task, run)
    finally:
        common.gathered_state = common_gathered_state
    # The sharded copy is gone when the phase returns, with its optimizer state; not left to the collector.
    assert len(sharded_copies) == shard and all(ref() is None for ref in sharded_copies)
    if rank == 0:
        torch.save(hybrid.state_dict(), f"{folder}/final-{resume}.pt")
    torch.save({"steps": len(taken), "gathered": gathered}, f"{folder}/taken-{resume}-{rank}.pt")


def test_sharded_task_phase_trains_like_ddp_and_resumes_exactly(tmp_path):
    # the sharded run saves a checkpoint after step 2 of 4; the resumed run starts from it
    spawn_two(worker, ([("ddp", False, False), ("sharded", True, False)], str(tmp_path)), str(tmp_path))
    spawn_two(worker, ([("sharded", True, True)], str(tmp_path)), str(tmp_path))
    ddp, sharded, resumed = (torch.load(tmp_path / name / f"final-{resume}.pt")
                             for name, resume in (("ddp", False), ("sharded", False), ("sharded", True)))
    initial = model().state_dict()
    assert ddp.keys() == sharded.keys() == resumed.keys()
    for key in ddp:
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed[key], sharded[key]), key
    assert (ddp["0.weight"] - initial["0.weight"]).abs().max() > 1e-3  # training moved the weights
    # Each run took its steps: 4, and the resumed one the 2 after its checkpoint.
    taken = {(name, resume, rank): torch.load(tmp_path / name / f"taken-{resume}-{rank}.pt")
             for name, resume in (("ddp", False), ("sharded", False), ("sharded", True)) for rank in (0, 1)}
    assert {key: t["steps"] for key, t in taken.items()} == {
        (name, resume, rank): 2 if resume else 4 for name, resume, rank in taken}
    # Checkpoints of a sharded phase (at its start, and after step 2) gather the weights (5 parameters, 3 buffers)
    # and the optimizer's state (5 parameters) on process 0 alone; process 1 holds nothing of them.
    assert taken["sharded", False, 0]["gathered"] == [(8, None), (8, 5)]
    assert taken["sharded", False, 1]["gathered"] == [(0, None), (0, 0)]
    # The checkpoint holds the whole optimizer state, by parameter name (the sharded form), for all parameters.
    saved = torch.load(tmp_path / "sharded" / "ckpt.pt", weights_only=True)
    assert (saved["phase"], saved["step"]) == (0, 2)
    assert set(saved["optimizer"]["state"]) == {"0.weight", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert saved["optimizer"]["state"]["0.weight"]["exp_avg"].shape == (32, 6)


IMAGES = [(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(k)), torch.arange(8) % 3) for k in range(2)]


def conv_model():
    """Convolutions in channels_last, as the ResNet-18 guide's on CUDA, with a Linear (a unit of its own)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 3)).to(
        memory_format=torch.channels_last)


def trained_conv_model(folder, rank=0, world=1):
    """Two task steps of conv_model on this rank's rows of IMAGES; sharded by resnet18_to_mlp's rule on two."""
    cfg = common.configure({}, [f"--out_dir={folder}", "--batch_size=8", "--log_interval=100", "--warmup_steps=1"])
    cfg.dtype = "float32"
    run = common.Run(cfg, common.Context(rank, rank, world, torch.device("cpu"), "test.py"), CLASSIFY,
                     Stream(IMAGES, rank, world), shard=resnet18_to_mlp.shard)
    model = conv_model()
    common.train(model, "train", 2, 1e-2, CLASSIFY, run)
    return model


def sharded_conv_worker(rank, init_method, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        if rank == 0:
            os.makedirs(f"{folder}/sharded", exist_ok=True)
        dist.barrier()
        model = trained_conv_model(f"{folder}/sharded", rank, 2)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{folder}/conv-{rank}.pt")
        torch.save(model[0].weight.is_contiguous(memory_format=torch.channels_last), f"{folder}/layout-{rank}.pt")
        dist.barrier()  # gloo may abort a process that leaves while the other still runs
    finally:
        dist.destroy_process_group()


def test_a_channels_last_model_shards_and_its_weights_come_back_in_their_format(tmp_path):
    spawn_two(sharded_conv_worker, (str(tmp_path),), str(tmp_path))
    one = trained_conv_model(tmp_path / "one").state_dict()  # one process on the whole batches: no sharding
    assert (one["0.weight"] - conv_model()[0].weight).abs().max() > 1e-3  # the steps moved the weights
    for rank in (0, 1):
        two = torch.load(tmp_path / f"conv-{rank}.pt")
        assert torch.load(tmp_path / f"layout-{rank}.pt")
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def one_process_phase(tmp_path, name, task=CLASSIFY, *flags):
    hybrid, logs = model(), []
    run = phase_run(tmp_path / name.replace(" ", "-"), 0, 1, None, task, "--ckpt_interval=100", *flags)
    run.log_line = logs.append
    common.train(hybrid, name, 2, 1e-2, task, run)
    return hybrid, logs


def test_compile_wraps_the_final_training_only(monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    one_process_phase(tmp_path, "stage 1 finetune", CLASSIFY, "--compile=True")
    final, _ = one_process_phase(tmp_path, "train", CLASSIFY, "--compile=True")
    one_process_phase(tmp_path, "train again", CLASSIFY)
    assert compiled == [final]


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Tesla T4", None)])
def test_peak_flops_of_the_card_in_use(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.peak_flops(torch.device("cuda")) == peak
    assert common.peak_flops(torch.device("cpu")) is None


def test_mfu_in_the_log_lines(monkeypatch, tmp_path):
    task = common.Task(loss=CLASSIFY.loss, inputs=CLASSIFY.inputs, evaluate=None, metric="loss",
                       flops_per_example=lambda m: 1e6)
    _, logs = one_process_phase(tmp_path, "train", task, "--log_interval=1")
    steps = [line for line in logs if " step " in line]
    assert len(steps) == 2 and all("| mfu n/a |" in line for line in steps)  # on CPU
    monkeypatch.setattr(common, "peak_flops", lambda device: 1e9)
    _, logs = one_process_phase(tmp_path, "train 2", task, "--log_interval=1")
    assert all(re.search(r"\| mfu \d+\.\d% \|", line) for line in logs if " step " in line)
    _, logs = one_process_phase(tmp_path, "train 3", CLASSIFY, "--log_interval=1")  # no FLOPs given, no MFU
    assert not any("mfu" in line for line in logs)


@pytest.mark.parametrize("rnn_blocks", [0, 1])
def test_gpt2_flops_per_window_counts_what_runs(rnn_blocks):
    """nanoGPT's estimate against the matrix products really run in a forward and backward pass."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    gpt = gpt2_to_rnn.load_guide("random", 2, 64, 100).train()
    for block in gpt.transformer.h[:rnn_blocks]:
        block.attn = gpt2_to_rnn.RNNMixer(64)
    idx = torch.randint(100, (1, 17))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(gpt(idx[:, :-1]).flatten(0, 1), idx[0, 1:]).backward()
    # The estimate also counts biases and LayerNorm gains as multiplied weights: a few percent at this width.
    assert gpt2_to_rnn.flops_per_window(gpt, 16) == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_cka_reads_channels_last_maps_without_copying_them():
    import bench  # tools/bench.py

    torch.manual_seed(0)
    x, y = torch.randn(8, 16, 12, 12), torch.randn(8, 32, 6, 6)
    xl, yl = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    assert common.cka(xl, yl).item() == pytest.approx(common.cka(x, y).item(), abs=1e-6)
    # Feature order does not matter to CKA; a copy into the logical order would be the size of the input.
    assert bench.peak_extra_memory(lambda: common.cka(xl, yl), torch.device("cpu")) < x.nbytes / 4
