"""tools/bench.py: it runs at --size=tiny and writes a well-formed bench.json whose non-timing facts are right.

No test here looks at a timing's value.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision

import bench
import common
import gpt2_to_rnn
import resnet18_to_mlp
from runs import run_main

SCRIPTS = ("resnet18_to_mlp", "dinov2_to_patchmlp", "gpt2_to_rnn", "resnet50_to_resnet18")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    log = run_main(bench, ["--size=tiny", "--repeats=1", "--warmup=0", f"--out={tmp / 'b.json'}"], tmp)
    with open(tmp / "b.json") as f:
        return json.load(f), log


def conv_shapes(model, size):
    """{name: (input shape, output shape)} of every Conv2d, from forward hooks."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.update({n: (i[0].shape[1:], o.shape[1:])}))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_json_has_every_measurement(report):
    res, log = report
    assert positive(res["cka_over_gram"]) and res["size"] == "tiny" and res["device"] == "cpu"
    for key in ("first_over_last_stage", "align_over_train", "train_step_s", "inference"):
        assert set(res[key]) == set(SCRIPTS), key
    for name in SCRIPTS:
        assert positive(res["first_over_last_stage"][name]) and positive(res["align_over_train"][name])
        assert all(positive(t) for t in res["align_step_s"][name])
        assert f"{name}: batch" in log
    # one alignment step timed per stage: 20 convolutions, 12 blocks (both transformers at 12 at tiny), 5 stages
    assert {n: len(res["align_step_s"][n]) for n in SCRIPTS} == {"resnet18_to_mlp": 20, "dinov2_to_patchmlp": 12,
                                                                 "gpt2_to_rnn": 12, "resnet50_to_resnet18": 5}
    for name in SCRIPTS:
        rows = res["inference"][name]
        assert [r["model"] for r in rows] == ["guide", "target"] * (len(rows) // 2)
        speed = "tokens_per_s" if name == "gpt2_to_rnn" else "examples_per_s"
        flops = "flops_per_token" if name == "gpt2_to_rnn" else "flops_per_example"
        assert all(positive(r[speed]) and positive(r[flops]) and positive(r["peak_memory_bytes"]) for r in rows)
    assert [r["setting"] for r in res["inference"]["gpt2_to_rnn"][::2]] == ["context 128", "context 512",
                                                                            "context 1024"]
    assert [r["setting"] for r in res["inference"]["dinov2_to_patchmlp"][::2]] == ["32 px", "72 px"]


def test_cka_forms_no_matrix_as_large_as_its_inputs(report):
    res, _ = report
    assert res["cka_input_bytes"] == 4 * 64 * (64 * 56 * 56 + 128 * 28 * 28)
    # Centred a sixteenth of the columns at a time (common._CentredGram), beside the 64 x 64 Gram matrices: a copy
    # of the inputs would be as large as they are.
    assert 0 < res["cka_peak_extra_bytes"] < res["cka_input_bytes"] / 8


def test_parameter_counts_and_flops_match_independent_counts(report):
    res, _ = report
    mlp = res["inference"]["resnet18_to_mlp"]
    assert mlp[0]["params"] == sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    # The target: every convolution a Linear(in -> 32) without bias and a Linear(32 -> out) with one.
    guide = torchvision.models.resnet18(num_classes=10).eval()
    shapes, kept = conv_shapes(guide, 32), sum(p.numel() for n, p in guide.named_parameters() if "conv" not in n
                                                and "downsample.0" not in n)
    assert mlp[1]["params"] == kept + sum(32 * math.prod(i) + 32 * math.prod(o) + math.prod(o)
                                          for i, o in shapes.values())
    # and its FLOPs: one multiply-add per weight of the low-rank maps, the rest BatchNorm, pooling and fc
    fc = 2 * 512 * 10
    assert mlp[1]["flops_per_example"] == fc + 2 * sum(32 * (math.prod(i) + math.prod(o)) for i, o in shapes.values())
    r50 = res["inference"]["resnet50_to_resnet18"]
    assert (r50[0]["params"], r50[1]["params"]) == (
        sum(p.numel() for p in torchvision.models.resnet50(num_classes=10).parameters()), mlp[0]["params"])


def test_generation_memory_per_sequence(report):
    res, _ = report
    layers, width = 12, gpt2_to_rnn.PRESETS["tiny"]["n_embd"]
    for context, guide, target in zip((128, 512, 1024), *(res["inference"]["gpt2_to_rnn"][i::2] for i in (0, 1))):
        assert guide["memory_per_sequence_bytes"] == 2 * layers * context * width * 4  # float32 keys and values
        assert target["memory_per_sequence_bytes"] == layers * 2 * width * 4  # two RNN layers' states per block


BYTES_PER_PARAM_FLOOR = 16  # weights, gradients and AdamW's two moments are resident however they are laid out


def test_scale_table_arithmetic(report):
    res, _ = report
    rows = res["scale"]
    assert [r["rank"] for r in rows] == [256, 512, 1024]
    for r in rows:
        assert r["ddp_bytes_per_gpu"] == 16 * r["params"] and r["sharded_bytes_per_gpu"] == 16 * r["params"] // 8
    # about 4.67 million x r parameters: 1.2 billion at r = 256, 4.8 billion at r = 1024
    assert 1.19e9 < rows[0]["params"] < 1.21e9 and 4.77e9 < rows[2]["params"] < 4.79e9
    # the formula against a real model (at a rank small enough to build)
    guide = torchvision.models.resnet18(num_classes=1000)
    stages = resnet18_to_mlp.make_stages(guide, torch.zeros(1, 3, 224, 224), SimpleNamespace(rank=2, order="forward"))
    assert bench.mlp_params(2) == sum(p.numel() for p in common.swapped(guide, stages).parameters())
    # DDP's copied gradients cost about one float32 (4 bytes) a parameter more than bucket views.
    measured = res["ddp_bytes_per_param"]
    assert measured["bucket_view"] >= BYTES_PER_PARAM_FLOOR and measured["copied"] - measured["bucket_view"] > 2


def test_cached_gpt2_step_matches_the_full_forward():
    torch.manual_seed(0)
    model = gpt2_to_rnn.load_guide("random", 2, 64, 100)
    idx = torch.randint(100, (3, 9))
    cache = bench.kv_cache(model, 3, 9, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        full = model(idx)
        steps = [bench.gpt_cached_step(model, idx[:, pos], pos, cache) for pos in range(9)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_tensor_memory_counts_what_lives():
    x = torch.randn(64, 1000)
    assert bench.peak_extra_memory(lambda: x.T @ x, torch.device("cpu")) >= 1000 * 1000 * 4
    assert bench.peak_extra_memory(lambda: x.T.sum(), torch.device("cpu")) < 1000  # a view is not new memory

    def two_at_once():
        a = torch.ones(1000)
        b = torch.ones(1000)
        del a, b
        return torch.ones(1000)

    assert bench.peak_extra_memory(two_at_once, torch.device("cpu")) == 2 * 4000


def test_target_steps_loader_rows_and_the_cost_of_table_1(report):
    res, log = report
    stages = {"resnet18_to_mlp": 20, "dinov2_to_patchmlp": 12, "gpt2_to_rnn": 12, "resnet50_to_resnet18": 5}
    for name, count in stages.items():
        assert len(res["finetune_step_s"][name]) == count and positive(res["target_train_step_s"][name])
        assert res["align_over_target_train"][name] == pytest.approx(
            sum(res["align_step_s"][name]) / count / res["target_train_step_s"][name])
        # The arithmetic, from the script's paper defaults: ImageNet's 1281167 images at batch 256 for 100 epochs
        # (GPT-2: 100 epochs of 103,227,021 words at 1.209 tokens a word, 256 windows of 128 a step), each stage's
        # alignment and fine-tuning steps, 8 GPUs, 5 seeds of 3 arms.
        align, finetune = (1000, 100) if name != "resnet50_to_resnet18" else (2000, 200)
        final = 100 * (round(103227021 * 1.209) // (256 * 128)) if name == "gpt2_to_rnn" else 100 * (1281167 // 256)
        target = res["target_train_step_s"][name]
        not_s = sum(align * a + finetune * f for a, f in zip(res["align_step_s"][name], res["finetune_step_s"][name]))
        not_s += final * target
        naive_s = (count * (align + finetune) + final) * target
        cost = res["table1_cost"][name]
        assert cost["not_hours"] == pytest.approx(not_s / 3600) and cost["naive_hours"] == pytest.approx(naive_s / 3600)
        assert cost["grid_gpu_hours"] == pytest.approx(8 * 5 * (2 * not_s + naive_s) / 3600)
    paths = {row["decode"]: row for row in res["loader"]["paths"]}
    assert set(paths) == {"pil", "cpu"}  # the GPU path only on CUDA
    assert all(positive(row["images_per_s_per_core"]) for row in paths.values())
    best = max(row["images_per_s_per_core"] for row in paths.values())
    for row in res["loader"]["models"]:
        per_gpu = res["batch"][row["guide_of"]] / res["train_step_s"][row["guide_of"]]
        assert row["train_images_per_s_per_gpu"] == pytest.approx(per_gpu)
        assert row["cores_for_8_gpus"] == pytest.approx(8 * per_gpu / best)
    assert "loader pil |" in log and "loader cpu |" in log and "Table 1 at the paper's settings" in log


def test_generated_jpegs_are_imagenet_sized(tmp_path):
    from PIL import Image

    train = bench.jpeg_folder(str(tmp_path), 3)
    for name in ("0.JPEG", "1.JPEG", "2.JPEG"):
        image = Image.open(f"{train}/a/{name}")
        assert image.format == "JPEG" and image.size == (500, 375)
        assert 20_000 < (tmp_path / "train" / "a" / name).stat().st_size < 200_000  # ImageNet's are ~110 KB on average
