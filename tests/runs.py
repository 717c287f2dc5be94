"""Running a script's command line the way a user does, for the end-to-end tests."""
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# A rare abort of a gloo process at exit, after all its work is done (seen once in about 25 two-process CPU runs
# of torch 2.14 here, and once in CI under mp.spawn): a two-process run that fails this way after its
# results.json says done is run once more, from scratch. One that failed before it was done has failed.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_script(script, args, cwd, launcher=(sys.executable,), check=True, env=None):
    """Run ROOT/script with args in cwd; with check, fail with the end of its output unless it exits 0."""
    command = [*launcher, os.path.join(ROOT, script), *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    out_dirs = [os.path.join(cwd, a.split("=", 1)[1]) for a in args if a.startswith("--out_dir=")]
    if proc.returncode != 0 and launcher == TORCHRUN_2 and GLOO_EXIT_ABORT in proc.stderr and out_dirs and _done(
            out_dirs[-1]):
        shutil.rmtree(out_dirs[-1])
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_main(module, args, cwd):
    """module.main(args) in this process, in cwd, as `python script args` would run there; returns its log. For
    the runs whose tests read what they wrote: a process of its own costs 4 s of imports."""
    log = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(log):
        module.main(args)
    return log.getvalue()


def kill_mid_phase(script, args, cwd, out_dir, lines):
    """Run ROOT/script with args (log_interval=1 and ckpt_interval=1 among them) and stop it at the first of `lines`
    (beginnings of log lines, in the order they come) after which its checkpoint holds a position inside a phase
    (step > 0); kill it there. Returns that checkpoint."""
    import torch

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if lines and line.startswith(lines[0]):
                lines.pop(0)
                proc.send_signal(signal.SIGSTOP)  # ckpt.pt is always whole: it is replaced, never rewritten
                saved = torch.load(os.path.join(cwd, out_dir, "ckpt.pt"), weights_only=True)
                if saved["step"] > 0:
                    return saved
                proc.send_signal(signal.SIGCONT)
        raise AssertionError(f"{script} ended before any of its checkpoints was inside a phase at {lines}")
    finally:
        proc.kill()
        proc.wait()


def steps_logged(log):
    """The (phase name, step) of every step line of a log."""
    return [(name, int(step)) for name, step in re.findall(r"^(.*) step (\d+)/\d+ \|", log, re.MULTILINE)]


def assert_other_similarity_run(out_dir, log, flag, measure, stages):
    """A run with --similarity=dmnn|rsa or --calibrate=linear|readout: done, every stage records its one place's measure and
    curve under that measure's name (D-MNN runs also the hard mutual k-NN), and the log names it."""
    res = read_results(out_dir)
    assert res["status"] == "done" and len(res["stages"]) == stages
    for stage in res["stages"]:
        assert len(stage[measure]) == len(stage[f"{measure}_curve"][-1][1]) == 1
        assert ("mutual_knn" in stage) == (measure == "dmnn") and stage.get("calibrated") == (
            flag.split("=")[1] if flag.startswith("--calibrate=") else None)
    assert f"| {measure} " in log and ("| mutual_knn " in log) == (measure == "dmnn")


def _done(out_dir):
    try:
        return read_results(out_dir)["status"] == "done"
    except (OSError, ValueError, KeyError):
        return False


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
    torch.set_num_threads(1)  # as torchrun sets each process: two processes on two cores
    worker(rank, init_method, *args)
    open(os.path.join(marks, f"returned-{rank}"), "w").close()


def write_text_folder(folder, sizes=(60, 15, 15)):
    """wiki.{train,valid,test}.raw in Wikitext's layout: headings, blank lines of one space, paragraphs."""
    rng = random.Random(0)
    who = ["The captain", "A farmer", "Her uncle", "The committee", "This species", "The old bridge"]
    did = ["was rebuilt", "moved north", "was named after him", "won the award", "declined", "sold the land"]
    when = ["in 1862", "during the war", "the next spring", "after 40 years", "in late October", "at once"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, paragraphs in zip(("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"), sizes):
        lines = []
        for p in range(paragraphs):
            if p % 5 == 0:
                lines += [" \n", f" = Section {p // 5} = \n", " \n"]
            sentences = [f"{rng.choice(who)} {rng.choice(did)} {rng.choice(when)} ." for _ in range(4)]
            lines.append(" " + " ".join(sentences) + " \n")
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


def write_image_folder(root, classes, per_class=4, size=40):
    """PNGs of size x size + 3j pixels (photographs differ in size), each class its own brightness."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                pixels = (torch.rand(size, size + 3 * j, 3, generator=g) * 60 + 80 * i).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{j}.png")
    return root
