"""
Every setting's edge values, tried: each numeric setting of the four scripts at 0 and 1, and every allowed value of
each setting that has a list of them (booleans too), on top of a tiny run. Each run must finish, or be refused before
its first checkpoint with a message that names the setting (`error: ... --name ...`). Not part of the suite (about
25 minutes on two cores); run it after adding or changing a setting.

    python tools/edges.py                          # all four scripts
    python tools/edges.py gpt2_to_rnn --jobs=1     # one script, one run at a time

Prints one line per run as it ends (finished, refused: the message, or FAILED: the end of its output), then the
failures; exits 1 if there were any.
"""
import ast
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
jobs = 2  # runs at a time, one thread each
timeout = 600  # seconds a run may take
# -----------------------------------------------------------------------------

IMAGES = ["--preset=tiny", "--align_steps=1", "--finetune_steps=1", "--epochs=1", "--bn_recal_batches=1",
          "--synthetic_train=64", "--synthetic_val=32", "--batch_size=16"]
BASE = {  # the tiny run every edge value is tried on
    "resnet18_to_mlp": IMAGES,
    "resnet50_to_resnet18": IMAGES,
    "dinov2_to_patchmlp": IMAGES,
    "gpt2_to_rnn": ["--preset=tiny", "--align_steps=1", "--finetune_steps=1", "--train_steps=2", "--cache_dir=cache"],
}
# Edge values whose meaning needs a partner: --train_steps=0 means "--epochs instead", a full epoch of the text
# unless epochs are 0 too (the run without final training).
PARTNERS = {"gpt2_to_rnn": {"--train_steps=0": ["--epochs=0"]}}
# Settings whose edge values are not numbers to try: where a run writes, and what it reads.
SKIPPED = {"out_dir", "resume", "eval_only", "guide", "data_dir", "data", "cache_dir", "tokenizer_file", "preset",
           "wandb_project", "wandb_run_name"}


def settings_of(script):
    """{setting: (default, allowed values or None)} from the script's --help."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--help"], capture_output=True,
                          text=True, check=True)
    found = re.findall(r"^  --(\w+)=(.*?)(?: \(one of (.*)\)| \([\w-]+\))?$", proc.stdout, re.MULTILINE)
    return {key: (ast.literal_eval(default), choices.split(", ") if choices else None)
            for key, default, choices in found}


def cases(script):
    """The flags to try: numbers at 0 and 1, each allowed value, both booleans."""
    out = []
    for key, (default, choices) in settings_of(script).items():
        if key in SKIPPED:
            continue
        if choices:
            out += [f"--{key}={c}" for c in choices]
        elif isinstance(default, bool):
            out += [f"--{key}=True", f"--{key}=False"]
        elif isinstance(default, (int, float)):
            out += [f"--{key}=0", f"--{key}=1"]
    return out


def try_one(script, flag, folder):
    """('finished' | 'refused' | 'FAILED', what it said) of the tiny run with flag."""
    work = tempfile.mkdtemp(dir=folder)
    out = os.path.join(work, "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WANDB_MODE="disabled")
    env.pop("WANDB_API_KEY", None)
    try:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *BASE[script], flag,
                               *PARTNERS.get(script, {}).get(flag, []),
                               f"--out_dir={out}"], cwd=work,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "FAILED", f"no end after {timeout} s"
    if proc.returncode == 0:
        return "finished", ""
    said = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    key = flag.split("=")[0]
    if said.startswith("error: ") and key in said and not os.path.exists(os.path.join(out, "ckpt.pt")):
        return "refused", said
    return "FAILED", (proc.stdout[-1500:] + proc.stderr[-3000:])


def main(argv):
    cfg = common.parse_flags({"jobs": jobs, "timeout": timeout}, [a for a in argv if a.startswith("--")])
    globals().update(timeout=cfg["timeout"])
    scripts = [a for a in argv if not a.startswith("--")] or list(BASE)
    failures = []
    with tempfile.TemporaryDirectory() as folder, concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        runs = {pool.submit(try_one, script, flag, folder): (script, flag) for script in scripts
                for flag in cases(script)}
        for job in concurrent.futures.as_completed(runs):
            (script, flag), (outcome, said) = runs[job], job.result()
            print(f"{script} {flag}: {outcome}" + (f": {said}" if outcome == "refused" else ""), flush=True)
            if outcome == "FAILED":
                failures.append((script, flag, said))
    for script, flag, said in failures:
        print(f"\n=== FAILED: {script} {flag}\n{said}")
    print(f"\n{len(failures)} failed of {len(runs)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
