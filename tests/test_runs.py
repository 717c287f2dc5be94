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


FAILING_AT_EXIT = '''import json, os, sys
# Under torchrun: process 0 writes results.json with the status given, then every process fails with the message
# of gloo's abort at exit, on the first attempt only.
out_dir, status = sys.argv[1].split("=", 1)[1], sys.argv[2]
attempts = os.path.join(os.path.dirname(out_dir), f"attempts-{os.environ['RANK']}")
with open(attempts, "a") as f:
    f.write("x")
if os.environ["RANK"] == "0":
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"status": status}, f)
if os.path.getsize(attempts) == 1:
    sys.exit("terminate called without an active exception")
'''


def test_a_torchrun_run_is_rerun_only_when_it_had_finished(tmp_path):
    import runs

    script = tmp_path / "fails_at_exit.py"
    script.write_text(FAILING_AT_EXIT)
    for status, reruns in (("done", True), ("running", False)):
        folder = tmp_path / status
        folder.mkdir()
        proc = runs.run_script(str(script), [f"--out_dir={folder / 'out'}", status], folder, launcher=runs.TORCHRUN_2,
                               check=False)
        assert (proc.returncode == 0) == reruns
        assert os.path.getsize(folder / "attempts-0") == (2 if reruns else 1)
