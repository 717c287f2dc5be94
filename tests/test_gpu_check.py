"""tools/gpu_check.sh, the one call a lent GPU gets, in its CPU mode: every part runs at tiny sizes, so a Python or
shell error is found here and not in the GPU's few minutes."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["bench", "rnn_dtype", "eval_dtype", "decode", "smoke", "compile", "peaks"]


@pytest.mark.commands  # 2 minutes: with the paper commands, outside the suite (pytest.ini)
def test_every_part_of_the_gpu_check_runs_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--cpu", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    rows = [line.split("|")[1:3] for line in (tmp_path / "summary.md").read_text().splitlines()[2:]]
    assert [name.strip() for name, _ in rows] == PARTS
    assert all(outcome.strip() == "passed" for _, outcome in rows), (rows, proc.stdout[-3000:])
    assert proc.returncode == 0
    log = (tmp_path / "log.txt").read_text()
    for dtype in ("float32", "bfloat16"):  # the recurrence's own dtype, each way
        assert f"rnn_dtype={dtype}: " in log and f"the recurrence returns torch.{dtype}" in log
    assert "0 corrupted" in log and "smoke: checkpoint" in log and log.count("smoke: train") == 5
