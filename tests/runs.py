"""Running a script's command line the way a user does, for the end-to-end tests."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# A rare abort of a gloo process at exit, after all its work is done (seen once in about 25 two-process CPU runs
# of torch 2.14 here, and once in CI under mp.spawn): a two-process run that fails this way alone is run once
# more, from scratch.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_script(script, args, cwd, launcher=(sys.executable,), check=True, env=None):
    """Run ROOT/script with args in cwd; with check, fail with the end of its output unless it exits 0."""
    command = [*launcher, os.path.join(ROOT, script), *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 and launcher == TORCHRUN_2 and GLOO_EXIT_ABORT in proc.stderr:
        for arg in args:
            if arg.startswith("--out_dir="):
                shutil.rmtree(os.path.join(cwd, arg.split("=", 1)[1]), ignore_errors=True)
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def spawn_two(worker, args, folder):
    """mp.spawn(worker, (init_method, *args)) over 2 processes, each calling worker(rank, init_method, *args);
    run once more, from a new rendezvous file, if a process aborted (SIGABRT) after worker had returned."""
    for attempt in (1, 2):
        marks = tempfile.mkdtemp(dir=folder)
        try:
            mp.spawn(_run_and_mark, args=(worker, f"file://{marks}/init", marks, *args), nprocs=2)
            return
        except mp.ProcessExitedException as e:
            finished = os.path.exists(os.path.join(marks, f"returned-{e.error_index}"))
            if attempt == 2 or e.signal_name != "SIGABRT" or not finished:
                raise


def _run_and_mark(rank, worker, init_method, marks, *args):
    worker(rank, init_method, *args)
    open(os.path.join(marks, f"returned-{rank}"), "w").close()
