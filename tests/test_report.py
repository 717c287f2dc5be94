"""python tools/report.py: Table 1 and Figure 1 from run folders, old and new."""
import csv
import json
import os
import statistics
import subprocess
import sys

import pytest
from PIL import Image

import common
import report
from runs import ROOT

CONFIG = {"method": "not", "guide": "pretrained", "order": "forward", "seed": 0, "out_dir": "x", "lr": 1e-3,
          "align_steps": 10}


def write_run(folder, script="resnet18_to_mlp.py", status="done", value=50.0, guide_metric=69.0, stages=(), best=None,
              **cfg):
    folder.mkdir(parents=True)
    results = {"script": script, "status": status, "config": {**CONFIG, **cfg}, "guide_metric": guide_metric,
               "stages": [{"stage": i + 1, "top1": v} for i, v in enumerate(stages)],
               "metric": {"name": "top1", "value": value}, "grad_steps": 100, "evals": [],
               "best": {"value": best, "step": 50} if best is not None else None}
    (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


@pytest.fixture
def grid(tmp_path):
    dirs = []
    not_trained = [61.0, 62.5, 63.0]
    for seed, v in enumerate(not_trained):
        dirs.append(write_run(tmp_path / f"not-{seed}", value=v, seed=seed, stages=(60, 55, v), best=v + 1))
    dirs.append(write_run(tmp_path / "not-rev", value=58.0, order="reverse", stages=(50, 52, 58)))
    for seed, v in enumerate([59.0, 61.0]):
        dirs.append(write_run(tmp_path / f"not-random-{seed}", value=v, seed=seed, guide="random",
                              guide_metric=0.1, stages=(1, 20, v)))
    for seed, v in enumerate([40.0, 42.0, 38.0, 50.0]):  # seed 3 has no NoT partner: not in the paired column
        dirs.append(write_run(tmp_path / f"naive-{seed}", value=v, seed=seed, method="naive", best=v + 5))
    dirs.append(write_run(tmp_path / "other-lr", value=10.0, lr=0.1))  # a different setting: its own row
    # The run that trained the guide: an input of the study, not one of its arms.
    dirs.append(write_run(tmp_path / "guide", value=69.0, guide="random", guide_metric=None, method="guide",
                          eval_guide=False))
    return dirs, not_trained


def test_table_averages_over_seeds_only(grid, tmp_path):
    dirs, not_trained = grid
    said = []
    report.report(dirs, str(tmp_path / "out"), say=said.append)
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    cell = {(r["settings"], r["column"]): r for r in rows}
    forward = "lr=0.001, order=forward"
    nt = cell[(forward, "NoT (trained)")]
    assert float(nt["mean"]) == pytest.approx(statistics.mean(not_trained))
    assert float(nt["standard_error"]) == pytest.approx(statistics.stdev(not_trained) / 3 ** 0.5, rel=1e-5)
    assert nt["seeds"] == "3"
    assert float(cell[(forward, "NoT (untrained)")]["mean"]) == pytest.approx(60.0)
    assert float(cell[(forward, "Naive (trained)")]["mean"]) == pytest.approx(42.5)
    differences = [61.0 - 40.0, 62.5 - 42.0, 63.0 - 38.0]
    paired = cell[(forward, "NoT - naive (trained)")]
    assert float(paired["mean"]) == pytest.approx(statistics.mean(differences))
    assert float(paired["standard_error"]) == pytest.approx(statistics.stdev(differences) / 3 ** 0.5, rel=1e-5)
    assert float(cell[(forward, "Guide")]["mean"]) == pytest.approx(69.0)  # untrained guides do not count here
    assert cell[(forward, "Guide")]["seeds"] == "4"  # one guide per seed (0-3), however many arms it guided
    # The reverse run and the other learning rate are rows of their own, labelled by what differs.
    assert float(cell[("lr=0.001, order=reverse", "NoT (trained)")]["mean"]) == 58.0
    assert float(cell[("lr=0.1, order=forward", "NoT (trained)")]["mean"]) == 10.0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "62.17 ± 0.60 (n=3)" in table and table in said
    # Written through a temporary file, yet readable as if written by open(): the umask decides, not mkstemp.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out" / "table.md").st_mode & 0o777 == 0o666 & ~umask
    assert {r["settings"] for r in rows} == {forward, "lr=0.001, order=reverse", "lr=0.1, order=forward"}
    assert any(line.startswith(f"not in the table: {tmp_path / 'guide'} trained a guide") for line in said)


def test_not_is_paired_with_each_baseline_by_seed(tmp_path):
    dirs = []
    for seed, (trained, untrained, naive, scratch) in enumerate([(5.0, 5.8, 5.1, 6.0), (5.2, 5.6, 5.0, 6.5),
                                                                  (4.9, 5.9, 5.3, 6.1)]):
        dirs.append(write_run(tmp_path / f"t{seed}", value=trained, seed=seed))
        dirs.append(write_run(tmp_path / f"u{seed}", value=untrained, seed=seed, guide="random"))
        dirs.append(write_run(tmp_path / f"n{seed}", value=naive, seed=seed, guide="random", method="naive"))
        dirs.append(write_run(tmp_path / f"s{seed}", value=scratch, seed=seed, guide="random", method="scratch"))
    report.report(dirs, str(tmp_path / "out"), say=lambda line: None)
    cell = {r["column"]: (float(r["mean"]), float(r["standard_error"]))
            for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    for heading, differences in [("NoT (trained) - naive (untrained)", [-0.1, 0.2, -0.4]),
                                 ("NoT - naive (untrained)", [0.7, 0.6, 0.6]),
                                 ("NoT (trained) - scratch", [-1.0, -1.3, -1.2]),
                                 ("NoT (untrained) - scratch", [-0.2, -0.9, -0.2])]:
        assert cell[heading] == pytest.approx((statistics.mean(differences),
                                               statistics.stdev(differences) / 3 ** 0.5)), heading
    assert "NoT - naive (trained)" not in cell  # no naive run with a trained guide


def test_validation_selected_results(grid, tmp_path):
    dirs, not_trained = grid
    report.report(dirs, str(tmp_path / "out"), select="best", say=lambda *a: None)
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    cell = {(r["settings"], r["column"]): r for r in rows}
    forward = "lr=0.001, order=forward"
    assert float(cell[(forward, "NoT (trained)")]["mean"]) == pytest.approx(statistics.mean(not_trained) + 1)
    assert float(cell[(forward, "Naive (trained)")]["mean"]) == pytest.approx(42.5 + 5)
    assert (forward, "NoT (untrained)") not in cell  # those runs recorded no validations


def test_figure_is_drawn(grid, tmp_path):
    dirs, _ = grid
    report.report(dirs, str(tmp_path / "out"), say=lambda *a: None)
    pngs = sorted(p.name for p in (tmp_path / "out").glob("figure1-*.png"))
    assert len(pngs) == 2  # one per setting; forward and reverse order share one
    assert all((tmp_path / "out" / p.replace(".png", ".pdf")).read_bytes().startswith(b"%PDF") for p in pngs)
    image = Image.open(tmp_path / "out" / pngs[0]).convert("RGB")
    colors = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colors  # the first curve's colour was drawn


def test_curves_average_stages_and_start_at_the_guide(grid):
    dirs, not_trained = grid
    curves, lines = report.stage_curves(report.read_runs(dirs[:3] + dirs[6:9], say=lambda *a: None))
    # Each stage's value of every seed (the figure draws their mean and standard error); the last is the final.
    assert curves == {"NoT forward, trained guide, linear CKA": {0: [69.0] * 3, 1: [60.0] * 3, 2: [55.0] * 3,
                                                                 3: not_trained, 4: not_trained}}
    assert lines == {"naive, trained guide": [40.0, 42.0, 38.0]}  # the naive runs of seeds 0-2


def test_stage_table_gives_each_stage_over_the_seeds(tmp_path):
    """stages.md: per stage the mean CKA over places and seeds, the metric before and after fine-tuning (mean ±
    standard error), the lowest seed and its share of that seed's guide; untrained guides get a table of their own."""
    after = {1: [80.0, 95.0], 2: [70.0, 99.0]}  # seed: per-stage top-1
    dirs = []
    for seed, guide in ((1, 100.0), (2, 90.0)):
        dirs.append(write_run(tmp_path / f"not-{seed}", seed=seed, guide_metric=guide, stages=after[seed]))
        results = json.loads((tmp_path / f"not-{seed}" / "results.json").read_text())
        for k, stage in enumerate(results["stages"]):
            stage.update(replaced=[f"layer{k}"], cka={"a": 0.5 + 0.1 * seed, "b": 0.7 + 0.1 * k},
                         top1_before_finetune=10.0 * seed + k)
        (tmp_path / f"not-{seed}" / "results.json").write_text(json.dumps(results))
    dirs.append(write_run(tmp_path / "not-random", seed=1, guide="random", guide_metric=10.0, stages=(30.0,)))
    report.report(dirs, str(tmp_path / "out"), say=lambda *a: None)
    text = (tmp_path / "out" / "stages.md").read_text()
    tables = {part.split(", ")[1].split()[0]: part for part in text.split("### ")[1:]}
    trained, untrained = tables["trained"], tables["untrained"]
    rows = [r.split(" | ") for r in trained.splitlines() if r.startswith("| 1 ") or r.startswith("| 2 ")]
    cka_1 = statistics.mean([(0.6 + 0.7) / 2, (0.7 + 0.7) / 2])
    assert rows[0][1:3] == ["layer0", f"{cka_1:.3f}"]
    assert rows[0][3] == f"{statistics.mean([10.0, 20.0]):.2f} ± {statistics.stdev([10.0, 20.0]) / 2 ** 0.5:.2f} (n=2)"
    assert rows[0][4] == f"{statistics.mean([80.0, 70.0]):.2f} ± {statistics.stdev([80.0, 70.0]) / 2 ** 0.5:.2f} (n=2)"
    assert rows[0][5:] == ["70.00", "77.8 |"]  # seed 2: 70 of its guide's 90
    assert rows[1][5:] == ["95.00", "95.0 |"]
    assert "seeds 1, 2" in trained and "seeds 1)" in untrained
    assert "| 1 |  |  |  | 30.00 (n=1) | 30.00 |  |" in untrained


def test_bad_folders_are_named_and_skipped(tmp_path):
    good = write_run(tmp_path / "good")
    running = write_run(tmp_path / "running", status="running", stages=(1, 2))
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "results.json").write_text('{"script": "resnet18_to_mlp.py", "sta')
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text('{"accuracy": 3}')
    (tmp_path / "run.log").write_text("step 1\n")
    proc = subprocess.run([sys.executable, f"{ROOT}/tools/report.py", good, running, str(tmp_path / "truncated"),
                           str(tmp_path / "foreign"), str(tmp_path / "missing"), str(tmp_path / "run.log"),
                           f"--out={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"in progress: {running} (2 stages recorded)" in proc.stdout
    assert f"skipped {tmp_path / 'truncated' / 'results.json'}: not valid JSON" in proc.stdout
    assert f"skipped {tmp_path / 'foreign' / 'results.json'}: not a results.json" in proc.stdout
    assert f"skipped {tmp_path / 'missing' / 'results.json'}: missing" in proc.stdout
    assert f"skipped {tmp_path / 'run.log'}: not a folder" in proc.stdout
    assert "50.00 (n=1)" in proc.stdout


def test_results_of_the_current_run_format_are_read(tmp_path):
    """results.json as common.Run writes it today (per-stage CKA curves, statistics batches), beside the old form."""
    task = common.Task(loss=None, inputs=None, evaluate=None, metric="top1")
    for seed, value in enumerate([70.0, 72.0]):
        cfg = common.configure({}, [f"--out_dir={tmp_path / f'new-{seed}'}", f"--seed={seed}", "--guide=random"])
        run = common.Run(cfg, common.Context(script="resnet18_to_mlp.py"), task, batches=None)
        run.guide_metric = 10.0
        run.records = [{"stage": 1, "replaced": ["conv1"], "cka": {"conv1": 0.9}, "cka_curve": [[5, {"conv1": 0.8}]],
                        "bn_recal_batches": 20, "top1_before_finetune": 30.0, "top1": 40.0 + seed}]
        run.write_results(value, "done")
    old = write_run(tmp_path / "old", value=50.0, guide="random", stages=(20.0,))
    runs = report.read_runs([str(tmp_path / "new-0"), str(tmp_path / "new-1"), old], say=lambda *a: None)
    assert len(runs) == 3
    curves, _ = report.stage_curves(runs[:2])
    assert curves == {"NoT forward, untrained guide, linear CKA": {0: [10.0, 10.0], 1: [40.0, 41.0], 2: [70.0, 72.0]}}
    # A run aligned by D-MNN: its own row, named in the similarity column, and its own curve in the same figure.
    cfg = common.configure({}, [f"--out_dir={tmp_path / 'dmnn'}", "--guide=random", "--similarity=dmnn"])
    run = common.Run(cfg, common.Context(script="resnet18_to_mlp.py"), task, batches=None)
    run.guide_metric = 10.0
    run.records = [{"stage": 1, "replaced": ["conv1"], "dmnn": {"conv1": 0.6}, "mutual_knn": {"conv1": 0.4},
                    "dmnn_curve": [[5, {"conv1": 0.5}]], "top1": 35.0}]
    run.write_results(65.0, "done")
    folders = [str(tmp_path / "new-0"), str(tmp_path / "new-1"), old, str(tmp_path / "dmnn")]
    curves, _ = report.stage_curves(report.read_runs(folders[:2] + folders[3:], say=lambda *a: None))
    assert curves["NoT forward, untrained guide, D-MNN"] == {0: [10.0], 1: [35.0], 2: [65.0]}
    report.report(folders, str(tmp_path / "out"), say=lambda *a: None)
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert {(r["similarity"], r["column"], r["mean"], r["seeds"]) for r in rows
            if r["column"] == "NoT (untrained)"} >= {
        ("linear CKA", "NoT (untrained)", "71", "2"), ("D-MNN", "NoT (untrained)", "65", "1")}
    stages = (tmp_path / "out" / "stages.md").read_text()
    assert "| stage | replaced | D-MNN | top1 before" in stages and "| 1 | conv1 | 0.600 |" in stages
    # Two figures: the old run's settings, and the new runs' with their CKA and D-MNN curves together.
    assert len(list((tmp_path / "out").glob("figure1-resnet18_to_mlp*.png"))) == 2
