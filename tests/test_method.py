"""The method's parts on small models: BatchNorm statistics that follow the hybrid, calibration, the CKA record
and its degenerate-floor warning, and the staged loop's order of work."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from toy import Stream


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


def images(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(5, 3, 8, 8, generator=g) + 2.0 for _ in range(n)]


def reference_statistics(model, batches):
    """Each BatchNorm's input over all batches (train mode), its per-channel mean and unbiased variance."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = {m: [] for m in norms}
    handles = [m.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().double())) for m in norms]
    model = model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    out = []
    for m in norms:
        x = torch.cat(seen[m]).transpose(0, 1).flatten(1)
        out.append((x.mean(1), x.var(1)))
    return out


def test_batchnorm_statistics_are_those_of_the_layers_inputs():
    model = conv_net()
    model(torch.zeros(1, 3, 8, 8))  # materialize the lazy layer
    batches = images(4, seed=1, scale=3.0)
    expected = reference_statistics(copy.deepcopy(model), batches)
    model.eval()
    assert common.batchnorm_statistics(model, Stream(batches), 4, lambda x: x, torch.device("cpu")) == 2
    assert not model.training  # the mode it had
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, (mean, var) in zip(norms, expected):
        torch.testing.assert_close(m.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.running_var, var.float(), rtol=1e-5, atol=1e-5)
    # The old statistics (zero mean, unit variance at initialization) were really replaced.
    assert norms[0].running_var.min() > 2.0
    # No BatchNorm, nothing to do; 0 batches, nothing done.
    assert common.batchnorm_statistics(nn.Linear(3, 3), Stream(batches), 4, lambda x: x, torch.device("cpu")) == 0
    assert common.batchnorm_statistics(model, Stream(batches), 0, lambda x: x, torch.device("cpu")) == 0


class LowRank(nn.Module):
    """A replacement of conv_net's conv at "0" of resnet18_to_mlp.py's kind: a low-rank map of the flattened map,
    channel-major."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Linear(3 * 8 * 8, 16, bias=False), nn.Linear(16, 8 * 8 * 8)

    def forward(self, x):
        return self.up(self.down(x.flatten(1))).view(x.shape[0], 8, 8, 8)


def test_calibration_gives_the_new_module_the_guides_channel_statistics():
    guide = conv_net()
    guide(torch.zeros(1, 3, 8, 8))
    hybrid = copy.deepcopy(guide)
    hybrid[0] = LowRank()
    with torch.no_grad():
        hybrid[0].up.weight.mul_(7.0)  # a scale far from the guide's
    batches = images(3, seed=2)
    stage = common.Stage(swap=None, compare=[("0", "0")], train=["0"])
    common.calibration(guide.eval(), hybrid.eval(), stage, Stream(batches), 3, lambda x: x, torch.device("cpu"))
    with torch.no_grad():
        ours = torch.cat([hybrid[0](x) for x in batches]).transpose(0, 1).flatten(1).double()
        theirs = torch.cat([guide[0](x) for x in batches]).transpose(0, 1).flatten(1).double()
    torch.testing.assert_close(ours.mean(1), theirs.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.std(1), theirs.std(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="no Linear"):
        common.calibration(guide, hybrid, common.Stage(None, [("1", "1")], ["1"]), Stream(batches), 1,
                           lambda x: x, torch.device("cpu"))


def small_run(tmp_path, batches, task, *flags):
    cfg = common.configure({}, [f"--out_dir={tmp_path}", "--log_interval=5", "--batch_size=5", *flags])
    cfg.dtype = "float32"
    return common.Run(cfg, common.Context(script="test.py"), task, Stream(batches))


def test_alignment_records_a_cka_curve_and_warns_at_the_degenerate_floor(tmp_path, capsys):
    guide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    hybrid = copy.deepcopy(guide)
    hybrid[0], hybrid[2] = nn.Linear(6, 8), nn.Linear(8, 3)
    nn.init.zeros_(hybrid[2].weight)
    nn.init.zeros_(hybrid[2].bias)  # constant outputs: CKA 0, no gradient, nothing learned
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 6, generator=g) for _ in range(4)]
    task = common.Task(loss=None, inputs=lambda x: x, evaluate=None, metric="loss")
    run = small_run(tmp_path, batches, task, "--align_steps=20", "--align_lr=0.03")
    for i, compared in ((1, "0"), (2, "2")):
        common.align(guide, hybrid, common.Stage(None, [(compared, compared)], [compared]), i, run)
    first, second = run.records
    # Ten points, each the mean of the two steps since the last; the stage's CKA is the mean of its last ten steps.
    assert [step for step, _ in first["cka_curve"]] == list(range(2, 21, 2))
    assert first["cka_curve"][-1][1]["0"] > first["cka_curve"][0][1]["0"]  # the aligned module learned
    assert 0 < first["cka"]["0"] <= 1 and second["cka"] == {"2": 0.0}
    log = capsys.readouterr().out
    assert log.count("warning: stage 2 align: the cka of 2 is exactly 0") == 1 and "stage 1 align: the" not in log
    assert torch.equal(hybrid[2].weight, torch.zeros(3, 8))  # indeed it learned nothing


class TokenMixer(nn.Module):
    """A replacement of gpt2_to_rnn.py's kind: [B, T, C] in, token rows [B*T, C] out of a last Linear."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x))).flatten(0, 1)


@pytest.mark.parametrize("similarity", ["cka", "rsa", "dmnn"])
def test_alignment_steps_no_bias_the_similarity_cannot_see(tmp_path, similarity):
    """CKA centres every feature: the bias of the compared output's own Linear has a true gradient of 0 and a float
    noise one, which Adam would make into steps of its learning rate. It must stay where it started; every other
    parameter, and that bias under RSA and D-MNN (uncentred rows: they see it), must move."""
    g = torch.Generator().manual_seed(0)
    maps = common.Stage(None, [("0", "0")], ["0"])
    tokens = common.Stage(None, [("1", "1")], ["1"])
    cases = [(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), LowRank(), maps, [torch.randn(
        12, 3, 8, 8, generator=g) + 1.0 for _ in range(3)], "up"),
             (nn.Sequential(nn.Linear(8, 8), TokenMixer()), TokenMixer(), tokens, [torch.randn(
                 3, 4, 8, generator=g) + 1.0 for _ in range(3)], "out"),
             (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), nn.Linear(8, 3), common.Stage(
                 None, [("2", "2")], ["2"]), [torch.randn(12, 6, generator=g) for _ in range(3)], "")]
    for guide, new, stage, batches, last in cases:
        torch.manual_seed(0)
        hybrid = copy.deepcopy(guide)
        hybrid[int(stage.train[0])] = new
        before = copy.deepcopy(new.state_dict())
        task = common.Task(loss=None, inputs=lambda x: x, evaluate=None, metric="loss")
        run = small_run(tmp_path / type(new).__name__ / similarity, batches, task, "--align_steps=30",
                        f"--similarity={similarity}", "--mnn_k=2")
        common.align(guide.eval(), hybrid, stage, 1, run)
        blind = {f"{last}.bias".lstrip(".")} if similarity == "cka" else set()
        for key, value in new.state_dict().items():
            assert torch.equal(value, before[key]) == (key in blind), (key, similarity)


def test_convert_swaps_aligns_finetunes_and_evaluates_each_stage_in_order(tmp_path):
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                          nn.Tanh(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(3, (5,), generator=g)) for _ in range(6)]
    events = []

    def evaluate(model):
        events.append(("evaluate", [type(m).__name__ for m in model]))
        return float(sum(e[0] == "evaluate" for e in events))

    def stage(index):
        return common.Stage(lambda hybrid: events.append(("swap", index)) or hybrid.__setitem__(index, nn.Linear(
            hybrid[index].in_features, hybrid[index].out_features)), [(str(index), str(index))], [str(index)])

    task = common.Task(loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]), inputs=lambda b: b[0],
                       evaluate=evaluate, metric="score")
    run = small_run(tmp_path, batches, task, "--align_steps=3", "--finetune_steps=2", "--bn_recal_batches=2")
    target = common.convert(guide, [stage(0), stage(3)], 4, task, run)
    assert [e[0] for e in events] == ["swap", "evaluate", "evaluate", "swap", "evaluate", "evaluate"]
    assert run.grad_steps == 2 * (3 + 2) + 4 == common.total_steps([0, 0], run.cfg, 4)
    first, second = run.records
    assert first["replaced"] == ["0"] and first["align_steps"] == 3 and first["bn_recal_batches"] == 2
    assert (first["score_before_finetune"], first["score"], second["score"]) == (1.0, 2.0, 4.0)
    assert not any(m is g for m in target for g in guide)  # the target is a new model; the guide is untouched
    assert math.isfinite(target(batches[0][0]).sum().item())


@pytest.mark.parametrize("align_steps, finetune_steps, train_steps", [(0, 2, 4), (3, 2, 0), (0, 0, 0)])
def test_a_conversion_without_alignment_or_final_training_finishes(tmp_path, align_steps, finetune_steps,
                                                                    train_steps):
    """--align_steps=0 (the stages only swap and fine-tune), --epochs=0 (the target as the stages left it): fair
    requests, which must run to the end and say what they did."""
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(3, (5,), generator=g)) for _ in range(6)]
    task = common.Task(loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]), inputs=lambda b: b[0],
                       evaluate=lambda model: 0.5, metric="score")
    stages = [common.Stage(lambda hybrid, i=i: hybrid.__setitem__(i, nn.Linear(6 if i == 0 else 8, 8 if i == 0 else 3)),
                           [(str(i), str(i))], [str(i)]) for i in (0, 2)]
    run = small_run(tmp_path, batches, task, f"--align_steps={align_steps}", f"--finetune_steps={finetune_steps}",
                    "--bn_recal_batches=0")
    run.finish(common.convert(guide, stages, train_steps, task, run))
    assert run.grad_steps == 2 * (align_steps + finetune_steps) + train_steps
    assert [r["align_steps"] for r in run.records] == [align_steps] * 2
    assert json.load(open(tmp_path / "results.json"))["status"] == "done"


def test_time_left_in_the_log_is_exact_for_steady_costs(tmp_path):
    """A clock of the test's own: an alignment step costs 1 s (its input), a task step 0.5 s (its loss), an evaluation
    3 s, the work between phases (and after the last, the final evaluation). With costs steady per kind, every log
    line's time left from the end of the first stage (every kind of phase and the work between them seen; the
    final training's rate is fine-tuning's) is the truth, to the second the log prints."""
    import re

    now = [0.0]

    def spend(seconds, value=None):
        now[0] += seconds
        return value

    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                          nn.Tanh(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(3, (5,), generator=g)) for _ in range(6)]
    task = common.Task(loss=lambda model, b: spend(0.5, F.cross_entropy(model(b[0]), b[1])),
                       inputs=lambda b: spend(1.0, b[0]), evaluate=lambda model: spend(3.0, 0.0), metric="score")
    stages = [common.Stage(lambda hybrid, i=i: hybrid.__setitem__(i, nn.Linear(6 if i == 0 else 8, 8)),
                           [(str(i), str(i))], [str(i)]) for i in (0, 3)]
    run = small_run(tmp_path, batches, task, "--align_steps=6", "--finetune_steps=4", "--bn_recal_batches=0",
                    "--log_interval=2")
    run.clock, run.started, lines = (lambda: now[0]), 0.0, []
    run.log_line = lines.append
    run.finish(common.convert(guide, stages, 8, task, run))
    assert now[0] == 2 * (6 + 3 + 4 * 0.5 + 3) + 8 * 0.5 + 3
    clock = r"(\d+):(\d\d):(\d\d)"
    seconds = [(int(a) * 3600 + int(b) * 60 + int(c), int(d) * 3600 + int(e) * 60 + int(f)) for a, b, c, d, e, f
               in re.findall(rf"{clock} elapsed, {clock} left", "\n".join(lines[lines.index(next(
                   line for line in lines if line.startswith("stage 1/2 done"))):]))]
    assert len(seconds) == 3 + 2 + 4  # stage 2's alignment and fine-tuning, then the final training
    assert all(abs(left - (now[0] - elapsed)) <= 1 for elapsed, left in seconds), (seconds, now[0])


def test_the_trend_of_a_cost_follows_a_drift_and_keeps_within_bounds():
    assert common._trend([(1, 2.0), (2, 4.0)], 10) == 3.0  # fewer than 5 points: their mean
    drifting = [(p, 1.0 + 0.5 * p) for p in range(1, 7)]
    assert common._trend(drifting, 8) == pytest.approx(5.0)  # the least-squares line, extrapolated
    assert common._trend(drifting, 100) == pytest.approx(1.5 * 4.0)  # at most 1.5 times the largest seen
    assert common._trend(drifting, -100) == pytest.approx(0.5 * 1.5)  # at least half the smallest


def least_squares(got, wanted):
    """wanted's least-squares affine prediction from got, channel by channel over rows (and positions), float64."""
    rows = lambda t: (t if t.dim() == 2 else t.transpose(0, 1).flatten(1).T).double()  # noqa: E731
    y, g = rows(got), rows(wanted)
    solution = torch.linalg.lstsq(torch.cat([y, torch.ones(len(y), 1, dtype=y.dtype)], 1), g).solution
    predicted = torch.cat([y, torch.ones(len(y), 1, dtype=y.dtype)], 1) @ solution
    return predicted if got.dim() == 2 else predicted.T.reshape(got.shape[1], got.shape[0], *got.shape[2:]).transpose(
        0, 1)


def test_linear_calibration_folds_the_least_squares_map_into_the_last_linear():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(40, 6, generator=g) for _ in range(3)]
    # Token rows: a rotated, scaled, offset copy of the guide's mixer, whose output only a full map undoes.
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    hybrid = copy.deepcopy(guide)
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
        hybrid[1][2].weight.copy_(3.0 * q @ guide[1][2].weight)
        hybrid[1][2].bias.copy_(torch.randn(8, generator=g))
        hybrid[1][0].weight.add_(0.3 * torch.randn(8, 8, generator=g))  # not exactly a map of the guide's
        got = torch.cat([hybrid[1](hybrid[0](x)) for x in batches])
        wanted = torch.cat([guide[1](guide[0](x)) for x in batches])
    stage = common.Stage(swap=None, compare=[("1", "1")], train=["1"])
    common.calibration(guide, hybrid, stage, Stream(batches), 3, lambda x: x, torch.device("cpu"), fit="linear")
    with torch.no_grad():
        folded = torch.cat([hybrid[1](hybrid[0](x)) for x in batches]).double()
    expected = least_squares(got, wanted)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)
    assert (expected - wanted).abs().max() > 1e-2  # the map could not make it the guide's: a least-squares fit
    # Already aligned: the map found is the identity, the module unchanged.
    same, before = copy.deepcopy(guide), copy.deepcopy(guide[1].state_dict())
    common.calibration(guide, same, stage, Stream(batches), 3, lambda x: x, torch.device("cpu"), fit="linear")
    for key, value in same[1].state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-4, atol=1e-5)


def test_linear_calibration_of_a_feature_map_is_one_map_at_every_position():
    guide = conv_net()
    guide(torch.zeros(1, 3, 8, 8))
    hybrid = copy.deepcopy(guide)
    hybrid[0] = LowRank()
    batches = images(3, seed=4)
    with torch.no_grad():
        got, wanted = torch.cat([hybrid[0](x) for x in batches]), torch.cat([guide[0](x) for x in batches])
    stage = common.Stage(swap=None, compare=[("0", "0")], train=["0"])
    common.calibration(guide.eval(), hybrid.eval(), stage, Stream(batches), 3, lambda x: x, torch.device("cpu"),
                       fit="linear")
    with torch.no_grad():
        folded = torch.cat([hybrid[0](x) for x in batches]).double()
    torch.testing.assert_close(folded, least_squares(got, wanted), rtol=1e-4, atol=1e-4)


def test_the_readout_refits_the_last_linear_to_the_least_squares_prediction_of_the_guides_output():
    guide = conv_net()
    guide(torch.zeros(1, 3, 8, 8))
    hybrid = copy.deepcopy(guide)
    hybrid[0] = LowRank()
    batches = images(8, seed=5)  # 40 maps, more than the bottleneck's 16 + 1 unknowns per feature
    with torch.no_grad():
        bottleneck = torch.cat([hybrid[0].down(x.flatten(1)) for x in batches]).double()
        wanted = torch.cat([guide[0](x) for x in batches]).double().flatten(1)
    stage = common.Stage(swap=None, compare=[("0", "0")], train=["0"])
    down = hybrid[0].down.weight.clone()
    common.readout(guide.eval(), hybrid.eval(), stage, Stream(batches), 8, lambda x: x, torch.device("cpu"))
    with torch.no_grad():
        fitted = torch.cat([hybrid[0](x) for x in batches]).double().flatten(1)
    # The textbook solve: every feature of the flattened map (all channels at all positions) regressed on [1, z].
    design = torch.cat([torch.ones(len(bottleneck), 1, dtype=torch.float64), bottleneck], 1)
    expected = design @ torch.linalg.lstsq(design, wanted).solution
    torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(hybrid[0].down.weight, down)  # only the Linear the guide's output is read from moves
    # A per-position channel map (calibrate=linear) is a different, worse fit: the readout mixes positions.
    shared = copy.deepcopy(guide)
    shared[0] = LowRank()
    common.calibration(guide, shared.eval(), stage, Stream(batches), 8, lambda x: x, torch.device("cpu"),
                       fit="linear")
    with torch.no_grad():
        mapped = torch.cat([shared[0](x) for x in batches]).double().flatten(1)
    assert (mapped - wanted).square().sum() > 1.5 * (fitted - wanted).square().sum()


def test_the_readout_leaves_an_aligned_module_as_it_is_and_refuses_one_not_ending_in_its_linear():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(40, 6, generator=g) for _ in range(3)]
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    same, before = copy.deepcopy(guide), copy.deepcopy(guide[1].state_dict())
    stage = common.Stage(swap=None, compare=[("1", "1")], train=["1"])
    common.readout(guide, same, stage, Stream(batches), 3, lambda x: x, torch.device("cpu"))
    for key, value in same[1].state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-4, atol=1e-5)
    after_relu = copy.deepcopy(guide)
    after_relu[1].append(nn.ReLU())
    with pytest.raises(SystemExit, match=r"--calibrate=readout: '1''s output is not its last Linear's"):
        common.readout(guide, after_relu, stage, Stream(batches), 1, lambda x: x, torch.device("cpu"))
