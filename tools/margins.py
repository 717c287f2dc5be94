"""
The margins of the test suite's assertions on trained numbers: every entry of tests/learning.py run over seeds and
torch thread counts (a short run's floating point differs between CPUs as it does between seeds), each bound
against its worst run; and every agreement tolerance (AGREED: two processes against one), each pair of runs at
one thread count, the worst difference against the tolerance. Not part of the suite (about four hours on two
cores); run it before a new bound or tolerance lands.

    python tools/margins.py                          # every entry, seeds 0-4, 1 and 2 threads
    python tools/margins.py "gpt2_to_rnn not" --seeds=2 --threads=1
    python tools/margins.py resnet18 --flags=--epochs=2    # entries whose name holds "resnet18", a flag added
    python tools/margins.py gpt2_to_rnn --threads=1,2,default   # "default": no OMP_NUM_THREADS, as CI runs

Prints one line per run as it ends, then per entry: the bound, the worst and best run, the mean, and the margin
(worst minus bound, by the side the bound is on; for a tolerance, the tolerance less the worst difference). Runs
with one thread go two at a time.
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
from learning import AGREED, LEARNED  # noqa: E402

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
seeds = 5  # seeds 0 .. seeds - 1
threads = "1,2"  # torch thread counts (OMP_NUM_THREADS; "default": unset, so torch takes every core and torchrun
# gives each process one)
flags = ""  # flags added to every run, separated by spaces
# -----------------------------------------------------------------------------


def one_run(entry, seed, threads, extra, folder, launcher=(sys.executable,)):
    """Entry's run at this seed and thread count, in a folder of its own; returns its results.json."""
    work = pathlib.Path(tempfile.mkdtemp(dir=folder))
    script = os.path.join(ROOT, entry.script)
    if getattr(entry, "copy", ""):
        import test_copy

        script, _ = getattr(test_copy, entry.copy)(work)
    data = runs.write_text_folder(work / "text")
    images = runs.write_image_folder(work / "images", ["a", "b"], per_class=8) if any(
        "{images}" in a for a in entry.args) else None
    args = [a.format(data=data, cache=work / "cache", images=images) for a in entry.args]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=ROOT, **({} if threads == "default" else {"OMP_NUM_THREADS": threads}))
    proc = subprocess.run([*launcher, str(script), *args, *extra, f"--seed={seed}", f"--out_dir={work / 'out'}"],
                          cwd=work, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{entry.script} {args} seed {seed}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    with open(work / "out" / "results.json") as f:
        return json.load(f)


def pair(entry, seed, threads, extra, folder):
    """An AGREED entry's two runs, on two processes and on one: (two, one)."""
    return (one_run(entry, seed, threads, extra, folder, runs.TORCHRUN_2),
            one_run(entry, seed, threads, extra, folder))


def main(argv):
    ours = {"seeds": seeds, "threads": threads, "flags": flags}
    cfg = common.parse_flags(ours, [a for a in argv if a.startswith("--")])
    parts = [a for a in argv if not a.startswith("--")]
    entries = {**LEARNED, **AGREED}
    wanted = [n for n in entries if not parts or any(p in n for p in parts)]
    extra = cfg["flags"].split()
    runs_of = {}  # entries that read the same run (or pair of runs) share it
    for name in wanted:
        entry = entries[name]
        runs_of.setdefault((name in AGREED, entry.script, tuple(entry.args), getattr(entry, "copy", "")), []).append(
            name)
    numbers, failed = {n: [] for n in wanted}, set()
    with tempfile.TemporaryDirectory() as folder:
        for count in str(cfg["threads"]).split(","):
            with concurrent.futures.ThreadPoolExecutor(2 if count == "1" else 1) as pool:
                jobs = {pool.submit(pair if agreed else one_run, entries[names[0]], s, count, extra, folder):
                        (names, s, count) for (agreed, *_), names in runs_of.items() for s in range(cfg["seeds"])}
                for job in concurrent.futures.as_completed(jobs):
                    names, seed, count = jobs[job]
                    if job.exception() is not None:  # said, and the other runs go on
                        print(f"{', '.join(names)} seed {seed} threads {count}: {job.exception()}", flush=True)
                        failed.update(names)
                        continue
                    for name in names:
                        result = job.result()
                        numbers[name].append(AGREED[name].difference(*result) if name in AGREED else
                                             LEARNED[name].number(result))
                        print(f"{name:32s} seed {seed} threads {count}: {numbers[name][-1]:.4g}", flush=True)
    print(f"\n{'entry':32s} {'bound':>7s} {'worst':>8s} {'best':>8s} {'mean':>8s} {'margin':>8s}  runs")
    for name in (n for n in wanted if numbers[n]):
        entry, values = entries[name], numbers[name]
        below = name in AGREED or entry.below
        worst, best = (max, min) if below else (min, max)
        margin = entry.bound - worst(values) if below else worst(values) - entry.bound
        print(f"{name:32s} {entry.bound:7.4g} {worst(values):8.4g} {best(values):8.4g} "
              f"{statistics.mean(values):8.4g} {margin:8.4g}  {len(values)}"
              + ("  (a run failed)" if name in failed else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
