"""
Table 1 and Figure 1 from run folders.

    python tools/report.py RUN_DIR... [--out=DIR] [--select=final|best]

Reads each folder's results.json (any written by these scripts, old or new), averages runs that differ only in
the seed, and prints Table 1's layout: the similarity NoT aligned with (the paper's "Similarity Metric" column), the
guide, NoT and the naive baseline with trained and untrained guides, `scratch` where present, each cell
`mean ± standard error (n=seeds)`, and NoT's differences from each baseline paired by seed. Writes table.md,
table.csv, stages.md (Figure 1 as numbers: each stage's similarity and metric over the seeds, and its lowest seed as
a share of that seed's guide) and, per conversion, figure1-<script>.png and .pdf: the metric after each stage, mean
over seeds with a standard-error band, one curve per order, guide and similarity, the baselines as lines. Figures
need matplotlib (a dependency of tools/ alone: README's install line has it; the scripts do not).
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

# Settings that never make two runs incomparable: the seed, where files go, how often the run logs or evaluates.
_NOT_COMPARED = common.RESUMABLE | {"seed", "out_dir", "eval_interval", "eval_only", "preset", "guide", "method",
                                     "eval_guide"}
# What sets Figure 1's curves apart within one figure: the order, the similarity (with its own settings), and
# what is done with the aligned module (its calibration; GPT-2's mixer output), named in a curve's label when it is
# not the default shown here.
_CURVES = {"order", "similarity", "similarity_scope", "cka_unbiased", "mnn_k", "mnn_temperature", "calibrate",
           "rnn_output"}
_LABELLED = {"calibrate": "auto", "rnn_output": "linear"}
SIMILARITY_NAMES = {"cka": "linear CKA", "dmnn": "D-MNN", "rsa": "RSA"}


def similarity_of(run):
    return run["config"].get("similarity", "cka")  # results.json files older than the setting aligned by CKA
# Table 1's columns after "Guide": (method, trained guide? (None: no guide)) and their headings.
_COLUMNS = [(("not", True), "NoT (trained)"), (("not", False), "NoT (untrained)"),
            (("naive", True), "Naive (trained)"), (("naive", False), "Naive (untrained)"),
            (("scratch", None), "Scratch")]
# NoT against each baseline, paired by seed: (NoT arm, baseline arm, heading). The paper's naive baseline trains
# the target from scratch, which is naive with an untrained guide; naive with a trained guide keeps the guide's
# parts that are not replaced.
_PAIRS = [(("not", True), ("naive", True), "NoT - naive (trained)"),
          (("not", False), ("naive", False), "NoT - naive (untrained)"),
          (("not", True), ("naive", False), "NoT (trained) - naive (untrained)"),
          (("not", True), ("scratch", None), "NoT (trained) - scratch"),
          (("not", False), ("scratch", None), "NoT (untrained) - scratch")]
_PAIRED = [heading for _, _, heading in _PAIRS]


_RESULTS_KEYS = {"script", "status", "config", "guide_metric", "stages", "metric", "grad_steps"}


def read_runs(run_dirs, say=print):
    """The finished runs among run_dirs as dicts; what cannot be read, or is still running, is said and skipped."""
    runs = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "results.json")
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            say(f"skipped {run_dir}: not a folder")  # a log file beside the run folders, say, caught by a glob
            continue
        try:
            with open(path) as f:
                results = json.load(f)
        except FileNotFoundError:
            say(f"skipped {path}: missing")
            continue
        except OSError as e:
            say(f"skipped {path}: {e.strerror}")
            continue
        except (json.JSONDecodeError, UnicodeDecodeError):
            say(f"skipped {path}: not valid JSON (truncated?)")
            continue
        if not isinstance(results, dict) or not _RESULTS_KEYS <= set(results):
            say(f"skipped {path}: not a results.json of these scripts")
            continue
        if results.get("status") != "done":
            say(f"in progress: {run_dir} ({len(results.get('stages', []))} stages recorded)")
            continue
        results["dir"] = run_dir
        runs.append(results)
    return runs


def _mean_se(values):
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None, 1
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values)), len(values)


def _fmt(cell):
    if cell is None:
        return ""
    mean, se, n = cell
    return f"{mean:.2f} (n=1)" if se is None else f"{mean:.2f} ± {se:.2f} (n={n})"


def _group(runs, not_compared):
    """{(script, the settings compared, as JSON): runs}."""
    groups = {}
    for run in runs:
        compared = {k: v for k, v in run["config"].items() if k not in not_compared}
        groups.setdefault((run["script"], json.dumps(compared, sort_keys=True)), []).append(run)
    return groups


def _settings(mine, siblings, always=()):
    """What sets one group's settings apart from its siblings' (and the keys in always), as "k=v, ..."."""
    differ = sorted({k for other in siblings for k in set(other) | set(mine) if other.get(k) != mine.get(k)}
                    | set(always))
    return ", ".join(f"{k}={mine.get(k)}" for k in differ)


def _value(run, select):
    """A run's result: its final metric, or (select="best") the best of its validations during final training."""
    if select == "final":
        return run["metric"]["value"]
    return run["best"]["value"] if run.get("best") else None


def table_rows(runs, select="final"):
    """Rows of Table 1: one per conversion and distinct setting, runs averaged over seeds only.

    Besides the columns, the differences in _PAIRS (a NoT arm against a baseline arm) paired by seed, mean
    and standard error over the seeds both arms ran.

    Each row: {"script", "metric", "settings" (what sets it apart from other rows of the same script),
    "runs", "guide": cell, heading: cell, ...}, a cell being (mean, standard error or None, number of seeds).
    """
    groups = _group(runs, _NOT_COMPARED)
    rows = []
    for (script, compared), members in sorted(groups.items()):
        mine = json.loads(compared)
        row = {"script": script, "metric": members[0]["metric"]["name"], "runs": members,
               "similarity": SIMILARITY_NAMES[similarity_of(members[0])],
               "settings": _settings(mine, [json.loads(c) for s, c in groups if s == script])}
        trained = {r["config"]["seed"]: r["guide_metric"] for r in members  # one per seed: arms share the guide
                   if r["config"]["guide"] != "random" and r["guide_metric"] is not None}
        row["guide"] = _mean_se(list(trained.values()))
        arms = {}
        for run in members:
            value = _value(run, select)
            if value is not None:
                method = run["config"]["method"]
                arm = (method, None if method == "scratch" else run["config"]["guide"] != "random")
                arms.setdefault(arm, {})[run["config"]["seed"]] = value
        for arm, heading in _COLUMNS:
            if arm in arms:
                row[heading] = _mean_se(list(arms[arm].values()))
        for not_arm, baseline_arm, heading in _PAIRS:
            ours, theirs = arms.get(not_arm, {}), arms.get(baseline_arm, {})
            pairs = [ours[seed] - theirs[seed] for seed in sorted(set(ours) & set(theirs))]
            if pairs:
                row[heading] = _mean_se(pairs)
        rows.append(row)
    return rows


def report(run_dirs, out_dir=".", select="final", say=print):
    """Print Table 1 from run folders, write it as table.md and table.csv, and one Figure 1 PNG per conversion.

    select: "final" (the metric at the end of training) or "best" (the best validation during final training:
    early stopping; on the image scripts the validation set is also the test set, so this flatters every arm).
    """
    if select not in ("final", "best"):
        raise common.ConfigError(f"--select={select}: expected final or best")
    runs = []
    for run in read_runs(run_dirs, say):
        if run["config"]["method"] == "guide":
            say(f"not in the table: {run['dir']} trained a guide (--method=guide, {run['metric']['name']} "
                f"{run['metric']['value']:.2f}); the runs it guides show it in the Guide column")
        else:
            runs.append(run)
    rows = table_rows(runs, select)
    order = [h for _, h in _COLUMNS] + _PAIRED
    headings = ["Guide"] + sorted({h for h in order if any(h in r for r in rows)}, key=order.index)
    lines = ["| conversion | metric | similarity | settings | " + " | ".join(headings) + " |",
             "|" + "---|" * (4 + len(headings))]
    csv = ["conversion,metric,similarity,settings,column,mean,standard_error,seeds"]
    for row in rows:
        cells = [row["guide"]] + [row.get(h) for h in headings[1:]]
        lines.append(f"| {row['script']} | {row['metric']} | {row['similarity']} | {row['settings']} | "
                     + " | ".join(_fmt(c) for c in cells) + " |")
        for heading, cell in zip(headings, cells):
            if cell is not None:
                se = "" if cell[1] is None else f"{cell[1]:.10g}"
                csv.append(f"{row['script']},{row['metric']},{row['similarity']},\"{row['settings']}\",{heading},"
                           f"{cell[0]:.10g},{se},{cell[2]}")
    os.makedirs(out_dir, exist_ok=True)
    table = "\n".join(lines) + "\n"
    say(table)
    for name, text in (("table.md", table), ("table.csv", "\n".join(csv) + "\n")):
        with common.atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w") as f:
            f.write(text)
    stages = stage_tables(runs)
    if stages:
        with common.atomic_path(os.path.join(out_dir, "stages.md")) as tmp, open(tmp, "w") as f:
            f.write(stages)
        say(f"wrote {os.path.join(out_dir, 'stages.md')}")
    # One figure per conversion and setting, both orders and every similarity together.
    figures = _group(runs, _NOT_COMPARED | _CURVES)
    for i, ((script, _), members) in enumerate(sorted(figures.items())):
        several = sum(s == script for s, _ in figures) > 1
        path = os.path.join(out_dir, f"figure1-{os.path.splitext(script)[0]}" + (f"-{i}" if several else "") + ".png")
        if plot_stages(members, path):
            say(f"wrote {path} and its .pdf")


def stage_tables(runs):
    """stages.md: per conversion, setting and guide (trained or not), one row per stage of the NoT runs: the mean
    similarity at the end of its alignment (over the places it compares), the metric before and after its fine-tuning
    (mean ± standard error over seeds), the lowest seed's metric, and that as a share of the seed's own guide
    (for a lower-is-better metric, guide / metric; left empty for an untrained guide)."""
    groups = {}
    for (script, compared), members in _group([r for r in runs if r["config"]["method"] == "not"],
                                              _NOT_COMPARED).items():
        for run in members:
            trained = run["config"]["guide"] != "random"
            groups.setdefault((script, compared, trained), []).append(run)
    out = []
    for (script, compared, trained), members in sorted(groups.items()):
        name = members[0]["metric"]["name"]
        lower = members[0]["metric"].get("lower_is_better", name != "top1")
        settings = _settings(json.loads(compared), [json.loads(c) for s, c, _ in groups if s == script], {"order"})
        measure = similarity_of(members[0])
        out += [f"### {script}, {'trained' if trained else 'untrained'} guide ({settings}, seeds "
                f"{', '.join(str(r['config']['seed']) for r in sorted(members, key=lambda r: r['config']['seed']))})",
                "", f"| stage | replaced | {SIMILARITY_NAMES[measure]} | {name} before fine-tuning | {name} | "
                "lowest seed | lowest, % of guide |",
                "|---|---|---|---|---|---|---|"]
        for k in range(max(len(r["stages"]) for r in members)):
            done = [r for r in members if len(r["stages"]) > k and name in r["stages"][k]]
            if not done:
                continue
            stages = [r["stages"][k] for r in done]
            aligned = _mean_se([sum(s[measure].values()) / len(s[measure]) for s in stages if s.get(measure)])
            before = _mean_se([s[f"{name}_before_finetune"] for s in stages if f"{name}_before_finetune" in s])
            worst_run = (max if lower else min)(done, key=lambda r: r["stages"][k][name])
            worst, guide = worst_run["stages"][k][name], worst_run["guide_metric"]
            share = ("" if not trained or not guide or not worst
                     else f"{100 * (guide / worst if lower else worst / guide):.1f}")
            aligned = "" if aligned is None else f"{aligned[0]:.3f}"
            out.append(f"| {k + 1} | {', '.join(stages[0].get('replaced', []))} | {aligned} | {_fmt(before)} | "
                       f"{_fmt(_mean_se([s[name] for s in stages]))} | {worst:.2f} | {share} |")
        out.append("")
    return "\n".join(out)


def stage_curves(runs):
    """Figure 1's data: {label: {stage: [metric of each seed]}} for NoT runs, {label: [final metric of each seed]}
    for the baselines. Stage 0 is the guide; stage k the hybrid after the k-th stage (after its task fine-tuning);
    one more point, after the last stage, is the target after its final training."""
    curves, lines = {}, {}
    for run in runs:
        guide = "untrained" if run["config"]["guide"] == "random" else "trained"
        name = run["metric"]["name"]
        if run["config"]["method"] == "not":
            label = f"NoT {run['config']['order']}, {guide} guide, {SIMILARITY_NAMES[similarity_of(run)]}" + "".join(
                f", {k}={run['config'][k]}" for k, shown in _LABELLED.items() if run["config"].get(k, shown) != shown)
            points = [(0, run["guide_metric"])] if run["guide_metric"] is not None else []
            points += [(s["stage"], s[name]) for s in run["stages"] if name in s]
            points.append((len(run["stages"]) + 1, run["metric"]["value"]))
            for k, value in points:
                curves.setdefault(label, {}).setdefault(k, []).append(value)
        else:
            method = run["config"]["method"]
            label = "scratch" if method == "scratch" else f"{method}, {guide} guide"
            lines.setdefault(label, []).append(run["metric"]["value"])
    return curves, lines


def _band(values):
    mean, se, _ = _mean_se(values)
    return mean, se or 0.0


def plot_stages(runs, path):
    """Draw Figure 1 as the paper does, a PNG at path and a PDF beside it: the metric after each stage, each curve
    the mean over seeds with a band of one standard error, the baselines' final metric as lines with their bands;
    False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, lines = stage_curves(runs)
    if not curves:
        return False
    stages = max(k for c in curves.values() for k in c)
    values = [v for c in curves.values() for vs in c.values() for v in vs] + [v for vs in lines.values() for v in vs]
    # A log axis for a lower-is-better metric (perplexity) whose values span more than a factor of 10 (an untrained
    # guide's against a trained one's); accuracies stay linear.
    log = runs[0]["metric"].get("lower_is_better", False) and min(values) > 0 and max(values) / min(values) > 10
    figure, axes = plt.subplots(figsize=(8, 4.8), layout="constrained")
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    for label, points in sorted(curves.items()):
        color, ks = next(colors), sorted(points)
        mean, se = zip(*(_band(points[k]) for k in ks))
        axes.plot(ks, mean, "o-", color=color, label=f"{label} ({max(len(v) for v in points.values())} seeds)")
        axes.fill_between(ks, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)], color=color,
                          alpha=0.2, linewidth=0)
    for label, finals in sorted(lines.items()):
        color, (mean, se) = next(colors), _band(finals)
        axes.axhline(mean, color=color, linestyle="--", label=f"{label}, final ({len(finals)} seeds)")
        axes.axhspan(mean - se, mean + se, color=color, alpha=0.15, linewidth=0)
    if log:
        axes.set_yscale("log")
    axes.set_xticks(range(stages + 1), [str(k) for k in range(stages)] + ["final"])
    axes.set_xlabel("stage (0: the guide; final: after end-to-end training)")
    axes.set_ylabel(runs[0]["metric"]["name"] + (" (log scale)" if log else ""))
    axes.set_title(f"{runs[0]['script']}: {runs[0]['metric']['name']} after each stage, mean ± standard error")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    for suffix in (".png", ".pdf"):
        with common.atomic_path(os.path.splitext(path)[0] + suffix) as tmp:
            figure.savefig(tmp, dpi=120, format=suffix[1:])
    plt.close(figure)
    return True


def main(argv):
    folders = [a for a in argv if not a.startswith("--")]
    if not folders:
        raise common.ConfigError("usage: python tools/report.py RUN_DIR... [--out=DIR] [--select=final|best]")
    options = common.parse_flags({"out": ".", "select": "final"}, [a for a in argv if a.startswith("--")])
    report(folders, options["out"], options["select"])


if __name__ == "__main__":
    main(sys.argv[1:])
