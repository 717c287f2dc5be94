"""
The laptop-scale study (docs/study.md): per conversion, its guide trained first on a budget of its own, then every
arm for each seed as a process of its own, then Table 1 and Figure 1 of the grid (tools/report.py).

    python tools/study.py resnet18_to_mlp                            # 2 CPU cores: 2 runs at a time, 1 thread each
    python tools/study.py gpt2_to_rnn --data=/path/to/wikitext-2     # extra flags go to every run
    python tools/study.py all --device=cuda --parallel=8 --seeds=10  # a GPU: every grid, more seeds

`gpt2_to_rnn_unseen` is GPT -> RNN in the paper's regime: its guide reads text its arms never see.
A grid resumes: a run whose results.json says "done" is not run again, so a stopped grid continues where it was
(its unfinished runs start over). Each run's log is its folder's log.txt. Runs go to OUT/<script>/<arm>-<seed>.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each conversion's grid: the guide's own training (a budget of its own: no stage steps, not counted in the arms'
# equal steps) and the arms, each a list of flags after --preset=small ("{guide}" is the trained guide's file).
# Why each setting is what it is: the presets' comments and docs/study.md.
OWN_BUDGET = ["--method=guide", "--align_steps=0", "--finetune_steps=0"]
UNSEEN = ["--train_part=0.9:1", "--train_steps=2400"]  # the conversion's tenth of the text, about 25 passes over it
STUDIES = {
    "resnet18_to_mlp": dict(guide=[*OWN_BUDGET, "--epochs=20"], guide_file="guide.pt", arms={
        "not-trained": ["--guide={guide}"], "not-trained-reverse": ["--guide={guide}", "--order=reverse"],
        "not-untrained": [], "naive": ["--method=naive"],
        "not-trained-dmnn": ["--guide={guide}", "--similarity=dmnn"],  # Figure 1's second similarity
        # the readout ablation (docs/study.md): the last Linear refitted by least squares after each alignment
        "ablation-readout": ["--guide={guide}", "--calibrate=readout"]}),
    "dinov2_to_patchmlp": dict(guide=[*OWN_BUDGET, "--epochs=40"], guide_file="guide.pt", arms={
        "not-trained": ["--guide={guide}"], "not-trained-reverse": ["--guide={guide}", "--order=reverse"],
        "not-untrained": [], "naive": ["--method=naive"],
        # the least-squares map of each aligned mixer's output onto the guide's, folded into it (rotation too)
        "not-trained-linear": ["--guide={guide}", "--calibrate=linear"],
        # ablations, not arms of Table 1: ten times the alignment, for the ceiling of a token-wise MLP's CKA; and
        # every attention replaced at once in the trained guide, for what the guide's kept parts give without CKA
        "ablation-align400": ["--guide={guide}", "--align_steps=400"],
        "ablation-naive-trained": ["--guide={guide}", "--method=naive"]}),
    "gpt2_to_rnn": dict(guide=[*OWN_BUDGET, "--train_steps=8000", "--lr=1e-3", "--warmup_steps=200"],
                        guide_file="pytorch_model.bin", arms={
        "not-trained": ["--guide={guide}"], "not-untrained": [], "naive": ["--method=naive"],
        # the mixer's output layer and what CKA leaves free: the least-squares map folded into it after each
        # alignment; the mixer without an output layer (as before it had one)
        "not-trained-linear": ["--guide={guide}", "--calibrate=linear"],
        "not-trained-none": ["--guide={guide}", "--rnn_output=none"]}),
    # The paper's regime (docs/study.md, "GPT -> RNN on text the conversion never sees"): the guide trains on the
    # first 90% of the training text, every arm on the last 10% alone, for more passes over it.
    "gpt2_to_rnn_unseen": dict(script="gpt2_to_rnn", guide=[*OWN_BUDGET, "--train_steps=8000", "--lr=1e-3",
                                                            "--warmup_steps=200", "--train_part=0:0.9"],
                               guide_file="pytorch_model.bin", arms={
        "not-trained": ["--guide={guide}", *UNSEEN], "not-untrained": UNSEEN, "naive": ["--method=naive", *UNSEEN],
        "ablation-not-trained-linear": ["--guide={guide}", "--calibrate=linear", *UNSEEN]}),
    "resnet50_to_resnet18": dict(guide=[*OWN_BUDGET, "--epochs=20"], guide_file="guide.pt", arms={
        "not-trained": ["--guide={guide}"], "not-untrained": [], "scratch": ["--method=scratch"],
        # an ablation, not an arm of Table 1: a plain ResNet-18 given only NoT's final-training steps, for what
        # NoT's stages give for the steps they take from the final training
        "ablation-scratch-short": ["--method=scratch", "--align_steps=0", "--finetune_steps=0"]}),
}

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
out = "study"  # the grids' folder
seeds = 5  # seeds 1 .. seeds
parallel = 2  # runs at a time
threads = 1  # torch threads of each run (OMP_NUM_THREADS)
device = "cpu"  # passed to every run: "cpu", "cuda" or "auto"
arms = ""  # a comma-separated subset of the arms; "" = all
# -----------------------------------------------------------------------------


def run(script, args, out_dir, threads):
    """One run of script in out_dir (skipped when its results.json says done); returns its wall time in seconds."""
    try:
        with open(os.path.join(out_dir, "results.json")) as f:
            if json.load(f)["status"] == "done":
                return 0.0
    except (OSError, ValueError, KeyError):
        pass
    if os.path.isdir(out_dir):  # an unfinished run starts over
        for name in os.listdir(out_dir):
            os.unlink(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--preset=small", *args,
                               f"--out_dir={out_dir}"], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        raise RuntimeError(f"{out_dir} failed (exit {proc.returncode}); see {out_dir}/log.txt")
    return time.time() - t0


def grid(name, cfg, extra):
    """The study `name` (a key of STUDIES): its guide, then its arms; its runs in OUT/name/."""
    study, folder = STUDIES[name], os.path.join(cfg["out"], name)
    script = study.get("script", name)
    wanted = [a for a in study["arms"] if not cfg["arms"] or a in cfg["arms"].split(",")]
    print(f"{name}: guide, then {len(wanted)} arms x {cfg['seeds']} seeds, {cfg['parallel']} at a time", flush=True)
    guide_dir = os.path.join(folder, "guide")
    seconds = run(script, [*study["guide"], "--guide=random", f"--device={cfg['device']}", *extra], guide_dir,
                  cfg["threads"] * cfg["parallel"])
    print(f"  guide: {seconds:.0f} s", flush=True)
    guide_file = os.path.join(guide_dir, study["guide_file"])
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(cfg["parallel"]) as pool:
        for seed in range(1, cfg["seeds"] + 1):
            for arm in wanted:
                args = [a.format(guide=guide_file) for a in study["arms"][arm]]
                if not any(a.startswith("--guide=") for a in args):
                    args.append("--guide=random")
                args += [f"--seed={seed}", f"--device={cfg['device']}", *extra]
                jobs[pool.submit(run, script, args, os.path.join(folder, f"{arm}-{seed}"), cfg["threads"])] = arm
        for job in concurrent.futures.as_completed(jobs):
            job.result()
    runs = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name != "guide")
    report.report(runs + [guide_dir], folder)
    for arm in wanted:  # wall time per arm, from the runs' own clocks
        times = [report.read_runs([os.path.join(folder, f"{arm}-{s}")], say=lambda *a: None)[0].get("seconds", 0)
                 for s in range(1, cfg["seeds"] + 1)]
        print(f"  {arm}: {sum(times) / len(times):.0f} s per run ({cfg['threads']} thread(s) each)")


def main(argv):
    names = [a for a in argv if not a.startswith("--")]
    ours = {"out": out, "seeds": seeds, "parallel": parallel, "threads": threads, "device": device, "arms": arms}
    cfg = common.parse_flags(ours, [a for a in argv if a.split("=")[0][2:] in ours])
    extra = [a for a in argv if a.startswith("--") and a.split("=")[0][2:] not in ours]
    if len(names) != 1 or names[0] not in (*STUDIES, "all"):
        raise common.ConfigError(f"usage: python tools/study.py {{{','.join(STUDIES)},all}} [--seeds=N] "
                                 f"[--parallel=N] [--threads=N] [--device=cpu|cuda] [--arms=A,B] [script flags]")
    for script in STUDIES if names[0] == "all" else names:
        grid(script, cfg, extra)


if __name__ == "__main__":
    main(sys.argv[1:])
