"""Running a script's command line the way a user does, for the end-to-end tests."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def run_script(script, args, cwd, launcher=(sys.executable,), check=True, env=None):
    """Run ROOT/script with args in cwd; with check, fail with the end of its output unless it exits 0."""
    proc = subprocess.run([*launcher, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)
