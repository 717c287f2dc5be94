"""
The margins of the test suite's assertions on trained numbers: every entry of tests/learning.py run over seeds and
torch thread counts (a short run's floating point differs between CPUs as it does between seeds), each bound
against its worst run. Not part of the suite (about three hours on two cores: 19 entries x 5 seeds x 2 thread
counts); run it before a new bound lands.

    python tools/margins.py                          # every entry, seeds 0-4, 1 and 2 threads
    python tools/margins.py "gpt2_to_rnn not" --seeds=2 --threads=1
    python tools/margins.py resnet18 --flags=--epochs=2    # entries whose name holds "resnet18", a flag added

Prints one line per run as it ends, then per entry: the bound, the worst and best run, the mean, and the margin
(worst minus bound, by the side the bound is on). Runs with one thread go two at a time.
"""
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import common  # noqa: E402
import runs  # noqa: E402
from learning import LEARNED  # noqa: E402

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
seeds = 5  # seeds 0 .. seeds - 1
threads = "1,2"  # torch thread counts (OMP_NUM_THREADS)
flags = ""  # flags added to every run, separated by spaces
# -----------------------------------------------------------------------------


def one_run(entry, seed, threads, extra, folder):
    """Entry's run at this seed and thread count, in a folder of its own; returns its results.json."""
    work = pathlib.Path(tempfile.mkdtemp(dir=folder))
    script = os.path.join(ROOT, entry.script)
    if entry.copy:
        import test_copy

        script, _ = getattr(test_copy, entry.copy)(work)
    data = runs.write_text_folder(work / "text")
    args = [a.format(data=data, cache=work / "cache") for a in entry.args]
    proc = subprocess.run([sys.executable, str(script), *args, *extra, f"--seed={seed}", f"--out_dir={work / 'out'}"],
                          cwd=work, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads),
                                                                            PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{entry.script} {args} seed {seed}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    with open(work / "out" / "results.json") as f:
        return json.load(f)


def main(argv):
    ours = {"seeds": seeds, "threads": threads, "flags": flags}
    cfg = common.parse_flags(ours, [a for a in argv if a.startswith("--")])
    parts = [a for a in argv if not a.startswith("--")]
    wanted = [n for n in LEARNED if not parts or any(p in n for p in parts)]
    extra = cfg["flags"].split()
    runs_of = {}  # entries that read the same run share it
    for name in wanted:
        entry = LEARNED[name]
        runs_of.setdefault((entry.script, tuple(entry.args), entry.copy), []).append(name)
    numbers = {n: [] for n in wanted}
    with tempfile.TemporaryDirectory() as folder:
        for count in (int(t) for t in str(cfg["threads"]).split(",")):
            with concurrent.futures.ThreadPoolExecutor(2 if count == 1 else 1) as pool:
                jobs = {pool.submit(one_run, LEARNED[names[0]], s, count, extra, folder): (names, s, count)
                        for names in runs_of.values() for s in range(cfg["seeds"])}
                for job in concurrent.futures.as_completed(jobs):
                    names, seed, count = jobs[job]
                    for name in names:
                        numbers[name].append(LEARNED[name].number(job.result()))
                        print(f"{name:32s} seed {seed} threads {count}: {numbers[name][-1]:.4g}", flush=True)
    print(f"\n{'entry':32s} {'bound':>7s} {'worst':>8s} {'best':>8s} {'mean':>8s} {'margin':>8s}  runs")
    for name in wanted:
        entry, values = LEARNED[name], numbers[name]
        worst, best = (max, min) if entry.below else (min, max)
        margin = entry.bound - worst(values) if entry.below else worst(values) - entry.bound
        print(f"{name:32s} {entry.bound:7.4g} {worst(values):8.4g} {best(values):8.4g} "
              f"{statistics.mean(values):8.4g} {margin:8.4g}  {len(values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
