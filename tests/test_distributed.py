"""Two processes aligning on halves of a global batch must match one process on the whole batch; BatchNorm
statistics re-estimated on two processes must equal those of one process that sees both processes' batches."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import common
from runs import spawn_two

CFG = {"dtype": "float32", "similarity": "cka", "cka_unbiased": False, "similarity_scope": "global", "grad_clip": 1.0}
STAGE = common.Stage(swap=None, compare=[("1", "1"), ("4", "4")], train=["1", "4"])  # two modules, one after the other


def guide_and_hybrid():
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12),
                          nn.Linear(12, 3)).eval().requires_grad_(False)
    hybrid = copy.deepcopy(guide)
    hybrid[1] = nn.Sequential(nn.Linear(16, 5), nn.GELU(), nn.Linear(5, 16))
    hybrid[4] = nn.Linear(16, 12)
    params = list(hybrid[1].parameters()) + list(hybrid[4].parameters())
    return guide, hybrid, params


def align(rank, world, scope, out):
    """Three alignment steps on this rank's rows of a fixed global batch; saves CKA values and new weights."""
    guide, hybrid, params = guide_and_hybrid()
    # SGD rather than the scripts' Adam: CKA ignores offsets, so the last bias gets a zero gradient, and
    # Adam would turn the float noise in it into full-size steps that differ between the two runs.
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    torch.manual_seed(1)
    batches = [torch.randn(16, 6) for _ in range(3)]
    per_rank = 16 // world
    history = []
    for x in batches:
        rows = x[rank * per_rank:(rank + 1) * per_rank]
        cka = common.align_step(guide, hybrid, STAGE, rows, opt, SimpleNamespace(**dict(CFG, similarity_scope=scope)))
        history.append([v.item() for v in cka["cka"].values()])
    if rank == 0:
        torch.save({"cka": history, "weights": [p.detach().clone() for p in params]}, out)


def worker(rank, init_method, world, scope, out):
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        {"batchnorm": recalibrate, "gather": gather_gradient}.get(scope, align)(rank, world, scope, out)
        dist.barrier()  # gloo may abort a process that leaves while the other still runs
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, scope):
    out = str(tmp_path / f"two-{scope}.pt")
    spawn_two(worker, (2, scope, out), str(tmp_path))
    return torch.load(out)


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    one_path = str(tmp_path / "one.pt")
    align(0, 1, "global", one_path)
    one = torch.load(one_path)
    two = run_two_processes(tmp_path, "global")
    assert len(one["cka"]) == 3
    for a, b in zip(one["cka"], two["cka"]):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(one["weights"], two["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The weights moved, so the comparison above is not of two untouched copies.
    _, _, initial = guide_and_hybrid()
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(one["weights"], initial))


def test_local_scope_is_a_different_statistic(tmp_path):
    one_path = str(tmp_path / "one.pt")
    align(0, 1, "global", one_path)
    one = torch.load(one_path)
    local = run_two_processes(tmp_path, "local")
    # Per-process CKA of an 8-row slice is not the CKA of the 16-row batch.
    assert abs(one["cka"][0][0] - local["cka"][0][0]) > 1e-3


def save_every_process(result, rank, world, out):
    """Process 0 saves the list of every process's result (one process: a list of its own)."""
    gathered = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if rank == 0:
        torch.save(gathered, out)


def gather_gradient(rank, world, scope, out):
    """The gradient of one CKA of the gathered batch with respect to this rank's rows (float64), and the collectives
    its backward called."""
    torch.manual_seed(3)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 7, dtype=torch.float64)
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    mine = x[rows].clone().requires_grad_()
    loss = common.cka(common.gather_batch(mine), common.gather_batch(y[rows]), False)
    called, originals = [], {name: getattr(dist, name) for name in (
        "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast")}
    for name, original in originals.items():
        def counted(*args, _name=name, _original=original, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        loss.backward()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    save_every_process({"grad": mine.grad, "collectives": called}, rank, world, out)


def test_the_gathered_batchs_backward_is_this_processs_slice_with_no_communication(tmp_path):
    one_path, two_path = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    gather_gradient(0, 1, "gather", one_path)
    spawn_two(worker, (2, "gather", two_path), str(tmp_path))
    (one,), two = torch.load(one_path), torch.load(two_path)
    assert one["grad"].abs().max() > 1e-3
    for rank, part in enumerate(two):
        torch.testing.assert_close(part["grad"], one["grad"][rank * 8:(rank + 1) * 8], rtol=1e-12, atol=1e-14)
        assert part["collectives"] == [], part["collectives"]  # every process already holds the same gradient


def recalibrate(rank, world, scope, out):
    """BatchNorm statistics from this rank's share of 4 batches of 6 (rank r: batches r, r + world, ...)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4), nn.BatchNorm1d(4)).eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(6, 5, generator=g) * 3 * (k + 1) for k in range(4)]
    mine = iter(batches[rank::world])
    common.batchnorm_statistics(model, mine, 4 // world, lambda x: x, torch.device("cpu"))
    save_every_process({k: v.clone() for k, v in model.state_dict().items() if "running" in k}, rank, world, out)


def test_batchnorm_statistics_of_two_processes_equal_one(tmp_path):
    one_path, two_path = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    recalibrate(0, 1, "batchnorm", one_path)
    spawn_two(worker, (2, "batchnorm", two_path), str(tmp_path))
    (one,), (two_rank0, two_rank1) = torch.load(one_path), torch.load(two_path)
    assert one.keys() == two_rank0.keys() and len(one) == 4
    for key in one:
        torch.testing.assert_close(two_rank0[key], one[key], rtol=1e-6, atol=1e-6)
        assert torch.equal(two_rank0[key], two_rank1[key]), key  # every process ends with the same statistics
    assert one["1.running_var"].min() > 5  # the batches' scale, not the initial unit variance
