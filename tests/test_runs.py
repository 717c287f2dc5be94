"""The two-process helper reruns only an abort that comes after the worker has returned."""
import atexit
import os
import time

import pytest
import torch.multiprocessing as mp

from runs import spawn_two


def runs_of(folder, rank):
    path = os.path.join(folder, f"ran-{rank}")
    return os.path.getsize(path) if os.path.exists(path) else 0


def abort_at_exit_once(rank, init_method, folder):
    """Returns normally; on the first run, rank 1 then aborts while its process exits."""
    with open(os.path.join(folder, f"ran-{rank}"), "a") as f:
        f.write("x")
    while rank == 1 and runs_of(folder, 0) < runs_of(folder, 1):
        time.sleep(0.05)  # rank 0 writes before the abort makes spawn stop it
    if rank == 1 and runs_of(folder, 1) == 1:
        atexit.register(os.abort)


def abort_while_working_once(rank, init_method, folder):
    """Rank 1 aborts before returning, on the first run only: a second run would pass."""
    with open(os.path.join(folder, f"ran-{rank}"), "a") as f:
        f.write("x")
    if rank == 1 and runs_of(folder, 1) == 1:
        os.abort()


def test_an_abort_at_exit_is_run_once_more(tmp_path):
    spawn_two(abort_at_exit_once, (str(tmp_path),), str(tmp_path))
    assert runs_of(tmp_path, 0) == runs_of(tmp_path, 1) == 2


def test_an_abort_before_returning_fails(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_two(abort_while_working_once, (str(tmp_path),), str(tmp_path))
    assert runs_of(tmp_path, 1) == 1
