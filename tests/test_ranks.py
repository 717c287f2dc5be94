"""Processes against each other (two gloo processes) and against one: what a run of several processes must share
(new modules, BatchNorm statistics, the file list), what each must draw apart (augmentations), and how its
checkpoints are gathered and resumed."""
import copy
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image

import common
from runs import spawn_two
from toy import CLASSIFY, Stream, classification_batches


def image_folder(root, classes=2, per_class=8, size=(40, 48)):
    """train/ and val/ JPEGs, every one of the same size (so a crop's parameters depend on its draws alone)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for j in range(per_class):
                pixels = rng.integers(60 * c, 60 * c + 120, (*size, 3)).astype("uint8")
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{j}.JPEG", quality=90)
    return root


def settings(*flags):
    cfg = common.configure({**common.IMAGE_SETTINGS}, ["--image_size=16", "--batch_size=8", *flags])
    cfg.dtype = "float32"
    return cfg


def joined(init_method, rank, work):
    """Run work() in a process group of two, rank 0 gathering what each returns; rank 0 returns the list."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        mine, every = work(), [None, None]
        dist.all_gather_object(every, mine)
        dist.barrier()  # gloo may abort a process that leaves while the other still runs
    finally:
        dist.destroy_process_group()
    return every


# -----------------------------------------------------------------------------
# new modules


STAGE = common.Stage(swap=lambda model: model.__setitem__(1, nn.Sequential(nn.Linear(8, 3), nn.ReLU(),
                                                                           nn.Linear(3, 8))),
                     compare=[("1", "1")], train=["1"])


def swap_after_drawing_apart(rank, init_method, folder):
    """Each process draws a different number of random values (as a data loader in the main process does), then
    swaps stage 3 in."""
    def work():
        torch.manual_seed(0)  # common.start seeds every process alike
        torch.rand(1 + 7 * rank)
        hybrid = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        common.swap(hybrid, STAGE, 3, seed=5)
        return {k: v.clone() for k, v in hybrid[1].state_dict().items()}

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, "swapped.pt"))


def swap_that_differs(rank, init_method, folder):
    def work():
        def swap(model):
            model[0] = nn.Linear(4, 8)
            with torch.no_grad():
                model[0].bias.add_(rank)

        try:
            common.swap(nn.Sequential(nn.Linear(4, 8)), common.Stage(swap, [("0", "0")], ["0"]), 1, seed=0)
        except RuntimeError as e:
            return str(e)
        return ""

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, "messages.pt"))


def test_new_modules_start_alike_on_every_process_whatever_each_drew(tmp_path):
    spawn_two(swap_after_drawing_apart, (str(tmp_path),), str(tmp_path))
    first, second = torch.load(tmp_path / "swapped.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # They come from the stage's own stream, (seed 5, stage 3), whatever the global generator holds.
    alone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    torch.manual_seed(123)
    common.swap(alone, STAGE, 3, seed=5)
    assert all(torch.equal(alone[1].state_dict()[k], first[k]) for k in first)
    common.swap(alone, STAGE, 4, seed=5)
    assert not torch.equal(alone[1].state_dict()["0.weight"], first["0.weight"])
    # A swap that builds different modules on different processes stops the run.
    spawn_two(swap_that_differs, (str(tmp_path),), str(tmp_path))
    assert torch.load(tmp_path / "messages.pt") == ["stage 1's new modules differ between processes: every process "
                                                    "must build the same network"] * 2


# -----------------------------------------------------------------------------
# augmentations


def first_batches(rank, init_method, folder, workers):
    def work():
        ctx = common.Context(rank, rank, 2)
        data = common.ImageFiles(os.path.join(folder, "images", "train"), True, 16, "bilinear", "cpu", ctx, seed=3)
        batches = common.Batches(data, settings(f"--workers={workers}", "--seed=3"), ctx)
        return [next(batches)[2:4] for _ in range(2)]  # (crops, paths) of two batches

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, f"batches-{workers}.pt"))


@pytest.mark.parametrize("workers", [0, 2])
def test_crops_and_flips_are_drawn_apart_on_each_process(tmp_path, workers):
    image_folder(tmp_path / "images")
    spawn_two(first_batches, (str(tmp_path), workers), str(tmp_path))
    ranks = torch.load(tmp_path / f"batches-{workers}.pt")
    for (crops0, paths0), (crops1, paths1) in zip(*ranks):
        assert not set(paths0) & set(paths1)  # each process reads its own files
        # Images of one size: crops drawn from streams alike on both processes would be equal, row by row.
        assert not (crops0 == crops1).all(1).any()
    # Read by one process, an image and epoch give the crop the two processes drew.
    data = common.ImageFiles(str(tmp_path / "images" / "train"), True, 16, "bilinear", "cpu", common.Context(),
                             seed=3)
    index = {data.path(i): i for i in range(len(data))}
    crops, paths = ranks[1][0]
    assert all(torch.equal(data[index[p], 0][2], c) for p, c in zip(paths, crops))


def test_a_batch_is_the_same_for_any_workers_and_after_a_restart(tmp_path):
    image_folder(tmp_path / "images")
    data = common.ImageFiles(str(tmp_path / "images" / "train"), True, 16, "bilinear", "cpu", common.Context())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    streams = {w: common.Batches(data, settings(f"--workers={w}"), common.Context()) for w in (0, 2)}
    reference = [next(streams[0]) for _ in range(5)]  # 16 images, batches of 8: two and a half epochs
    assert torch.equal(torch.get_rng_state(), before)  # reading batches draws nothing from the global generator
    with_workers = [next(streams[2]) for _ in range(2)]
    workers = [w.pid for w in streams[2].loader._iterator._workers]
    with_workers.append(next(streams[2]))
    state = streams[2].state_dict()
    next(streams[2])
    streams[2].load_state_dict(state)  # a restart mid-epoch: the kept workers drop what they had fetched
    with_workers += [next(streams[2]) for _ in range(2)]
    for (a, la, ca, pa, _), (b, lb, cb, pb, _) in zip(reference, with_workers):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ca, cb) and pa == pb
    assert not torch.equal(reference[0][2], reference[2][2])  # epoch 1 crops anew
    # The same two workers from the first epoch to the third; the file list is numpy arrays, not an object per file.
    assert len(workers) == 2 and [w.pid for w in streams[2].loader._iterator._workers] == workers
    assert isinstance(data.labels, np.ndarray) and isinstance(data.names, np.ndarray)


def files_of_rank_1_unscanned(rank, init_method, folder):
    from torchvision import datasets

    def work():
        if rank == 1:
            datasets.ImageFolder = None  # process 1 never scans: process 0 sends the list
        data = common.ImageFiles(os.path.join(folder, "images", "train"), True, 16, "bilinear", "cpu",
                                 common.Context(rank, rank, 2))
        return [(data.path(i), int(data.labels[i])) for i in range(len(data))]

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, "files.pt"))


def test_process_0_scans_the_folder_for_all(tmp_path):
    image_folder(tmp_path / "images")
    spawn_two(files_of_rank_1_unscanned, (str(tmp_path),), str(tmp_path))
    first, second = torch.load(tmp_path / "files.pt")
    from torchvision import datasets

    expected = datasets.ImageFolder(str(tmp_path / "images" / "train")).samples
    assert first == second == [(path, label) for path, label in expected]


# -----------------------------------------------------------------------------
# BatchNorm statistics and checkpoints


BATCHES = classification_batches(40, shift=2.0)


def make_run(folder, rank=0, world=1, stream=None, *flags):
    cfg = common.configure({}, [f"--out_dir={folder}", "--batch_size=8", "--log_interval=100", "--warmup_steps=1",
                                *flags])
    cfg.dtype = "float32"
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    return common.Run(cfg, common.Context(rank, rank, world, torch.device("cpu"), "test.py"), CLASSIFY,
                      stream or Stream(BATCHES, rank, world))


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def buffers_after_a_task_phase(rank, init_method, folder):
    def work():
        model, storages, step = bn_net(), [], common.gradient_step

        def recorded(params, opt, clip):  # how many tensors hold the gradients DDP gives the optimizer
            storages.append(len({p.grad.untyped_storage().data_ptr() for p in params}))
            step(params, opt, clip)

        common.gradient_step = recorded
        common.train(model, "train", 3, 1e-2, CLASSIFY, make_run(os.path.join(folder, "run"), rank, 2))
        common.gradient_step = step
        return {"storages": storages, **{k: v.clone() for k, v in model.state_dict().items() if "running" in k}}

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, "buffers.pt"))


def test_batchnorm_statistics_agree_between_processes_after_a_task_phase(tmp_path):
    spawn_two(buffers_after_a_task_phase, (str(tmp_path),), str(tmp_path))
    first, second = torch.load(tmp_path / "buffers.pt")
    # Each process normalized its own half; evaluation and target.pt must see one model: process 0's.
    assert all(torch.equal(first[k], second[k]) for k in first if k != "storages")
    # DDP's gradients are views of its one bucket (gradient_as_bucket_view), not a second copy of every gradient.
    assert first["storages"] == second["storages"] == [1, 1, 1]
    assert first["1.running_mean"].abs().max() > 0.1  # the batches' statistics, not the initial zeros


def smoke_run(rank, init_method, folder, save_delay):
    """A --preset=smoke task run on two processes, process 0's checkpoint writes taking save_delay seconds more."""
    def work():
        real_save = common.save_atomic

        def slow_save(obj, path):
            time.sleep(save_delay)  # the old ckpt.pt is still in place meanwhile
            real_save(obj, path)

        common.save_atomic = slow_save
        run = make_run(os.path.join(folder, "smoke"), rank, 2, None, "--preset=smoke")
        run.task = task = common.Task(CLASSIFY.loss, CLASSIFY.inputs, lambda m: CLASSIFY.loss(m, BATCHES[0]).item(),
                                      "loss", lower_is_better=True)
        model = bn_net()
        common.train(model, "train", 4, 1e-2, task, run)
        run.finish(model)
        return {k: v.clone() for k, v in model.state_dict().items()}

    every = joined(init_method, rank, work)
    if rank == 0:
        torch.save(every, os.path.join(folder, "smoke.pt"))


def test_a_smoke_run_of_two_processes_finishes_with_equal_replicas(tmp_path):
    from runs import read_results

    spawn_two(smoke_run, (str(tmp_path), 0.5), str(tmp_path))
    res = read_results(tmp_path / "smoke")
    assert res["status"] == "done" and res["grad_steps"] == 2 and "disk_needed_bytes" in res["smoke"]
    first, second = torch.load(tmp_path / "smoke.pt")
    # Read before process 0 replaced it, process 1 would restore the weights from before the first step.
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_refuses_another_number_of_processes(tmp_path):
    model = bn_net()
    common.train(model, "train", 2, 1e-2, CLASSIFY, make_run(tmp_path / "one"))
    with pytest.raises(SystemExit, match="was written by 1 process, this run has 2: resume it on 1"):
        make_run(tmp_path / "one", 0, 2, None, "--resume=True")


def test_a_restart_mid_alignment_keeps_the_stages_record(tmp_path):
    guide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    stage = common.Stage(None, [("0", "0")], ["0"])

    def aligned(folder, stream, *flags):
        hybrid = copy.deepcopy(guide)
        torch.manual_seed(1)
        hybrid[0] = nn.Linear(6, 8)
        run = make_run(folder, 0, 1, stream, "--align_steps=30", "--align_lr=0.01", "--ckpt_interval=7", *flags)
        common.align(guide, hybrid, stage, 1, run)
        return run.records[0], hybrid

    whole, whole_hybrid = aligned(tmp_path / "whole", Stream(BATCHES))
    with pytest.raises(KeyboardInterrupt):  # killed before step 19: the checkpoint is at step 14
        aligned(tmp_path / "killed", Stream(BATCHES, stop_at=18))
    saved = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert (saved["phase"], saved["step"], len(saved["trace"])) == (0, 14, 14)
    resumed, resumed_hybrid = aligned(tmp_path / "killed", Stream(BATCHES), "--resume=True")
    assert [s for s, _ in resumed["cka_curve"]] == [3 * k for k in range(1, 11)]
    assert resumed == whole  # the curve, the stage's CKA (its last ten steps), bit for bit
    assert all(torch.equal(a, b) for a, b in zip(resumed_hybrid.parameters(), whole_hybrid.parameters()))


# -----------------------------------------------------------------------------
# whole runs on an image folder


def test_kill_and_resume_with_workers_reproduces_the_run(tmp_path):
    from runs import kill_mid_phase, read_results, run_script, steps_logged

    image_folder(tmp_path / "images")
    args = ["--preset=tiny", "--data_dir=images", "--decode=cpu", "--workers=2", "--batch_size=8", "--align_steps=4",
            "--finetune_steps=2", "--epochs=3", "--log_interval=1"]
    run_script("dinov2_to_patchmlp.py", [*args, "--out_dir=whole"], tmp_path)
    saved = kill_mid_phase("dinov2_to_patchmlp.py", [*args, "--out_dir=killed", "--ckpt_interval=1"], tmp_path,
                           "killed", [f"stage {i} {kind} step 2/" for i in (2, 3, 4) for kind in ("align", "finetune")])
    log = run_script("dinov2_to_patchmlp.py", [*args, "--out_dir=killed", "--ckpt_interval=1", "--resume=True"],
                     tmp_path).stdout
    assert len(steps_logged(log)) == 4 * (4 + 2) + 3 * 2 - saved["run"][0]  # the steps left, and no more
    whole, killed = (torch.load(tmp_path / name / "target.pt")["model"] for name in ("whole", "killed"))
    assert all(torch.equal(whole[k], killed[k]) for k in whole)
    whole, killed = (read_results(tmp_path / name) for name in ("whole", "killed"))
    for key in ("stages", "evals", "metric", "grad_steps", "guide_metric", "best"):
        assert whole[key] == killed[key], key


def test_an_error_on_one_process_ends_the_run_with_its_message(tmp_path):
    import time

    from runs import TORCHRUN_2, run_script

    image_folder(tmp_path / "images")
    broken = os.path.join("images", "train", "c1", "3.JPEG")
    (tmp_path / broken).write_bytes((tmp_path / broken).read_bytes()[:200])
    t0 = time.time()
    proc = run_script("dinov2_to_patchmlp.py", ["--preset=tiny", "--data_dir=images", "--decode=cpu", "--workers=0",
                                                "--batch_size=8", "--dist_timeout=5", "--out_dir=out"],
                      tmp_path, launcher=TORCHRUN_2, check=False)
    assert proc.returncode != 0 and f"error: cannot decode {broken}" in proc.stderr
    assert time.time() - t0 < 120
