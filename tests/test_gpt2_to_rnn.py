"""gpt2_to_rnn.py on CPU: the GPT-2 loader against transformers, the real GPT-2 BPE, the token cache, tiny
conversions through the command line (one and two processes), recurrent generation, and bad inputs.

Test-only packages: pytest, transformers (the independent GPT-2), openai-whisper installed with --no-deps
(it ships GPT-2's BPE as whisper/assets/gpt2.tiktoken, so the real tokenizer works offline).
"""
import importlib.util
import math
import os
import re

import pytest
import torch
import torch.nn as nn

import common
import gpt2_to_rnn
from learning import AGREED, GPT2_FLAGS as FAST, LEARNED
from runs import (TORCHRUN_2, assert_other_similarity_run, read_results, run_main, run_script,
                  spawn_two, write_text_folder)

SEQ_LEN = 32
# learning.py's runs: the tiny preset with fewer, smaller steps, 2 stages x (6 + 2) steps, then 40 steps of final
# training.
GRAD_STEPS = 2 * (6 + 2) + 40
# The pre-tokenizer of OpenAI's GPT-2 release (openai/gpt-2, src/encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="session")
def bpe_file():
    spec = importlib.util.find_spec("whisper")
    path = spec and os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
    if not path or not os.path.isfile(path):
        pytest.fail("these tests need GPT-2's BPE file: pip install --no-deps openai-whisper")
    return path


def lines_of(path):
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def byte_tokens(path):
    return [b for line in lines_of(path) for b in line.encode("utf-8")]


def reference_ppl(model, ids, seq_len):
    """exp(mean NLL) over non-overlapping windows, one window at a time, in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range((len(ids) - 1) // seq_len):
            window = torch.tensor(ids[k * seq_len:k * seq_len + seq_len + 1])
            logp = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            nll -= logp[torch.arange(seq_len), window[1:]].sum().item()
            count += seq_len
    return math.exp(nll / count)


def run(args, cwd, **kwargs):
    return run_script("gpt2_to_rnn.py", args, cwd, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """NoT, naive and --method=guide on a small text folder (one token per byte), and NoT on 2 processes."""
    tmp = tmp_path_factory.mktemp("runs")
    data = write_text_folder(tmp / "text")
    out = {}
    for name, entry in [("not", "not"), ("naive", "naive"), ("ddp", "not"), ("guide", "guide")]:
        args = [*(a.format(data=data, cache=tmp / "cache") for a in LEARNED[f"gpt2_to_rnn {entry}"].args),
                f"--out_dir={tmp / name}"]
        log = run(args, cwd=tmp, launcher=TORCHRUN_2).stdout if name == "ddp" else run_main(gpt2_to_rnn, args, tmp)
        out[name] = (str(tmp / name), log)
    out["data"] = data
    return out


def test_not_converts_every_block_and_reports_its_perplexity(runs):
    out_dir, log = runs["not"]
    res = read_results(out_dir)
    assert res["status"] == "done" and res["grad_steps"] == GRAD_STEPS and res["metric"]["lower_is_better"]
    assert [s["replaced"] for s in res["stages"]] == [["transformer.h.0.attn"], ["transformer.h.1.attn"]]
    for stage in res["stages"]:
        assert stage["align_steps"] == 6 and stage["bn_recal_batches"] == 0  # no BatchNorm in a GPT
        assert set(stage["cka"]) == set(stage["replaced"]) and {"val_ppl", "val_ppl_before_finetune"} <= set(stage)
    LEARNED["gpt2_to_rnn not cka"].check(res)  # alignment raised CKA
    # An untrained guide is near chance (256 bytes); the target must learn more than how often each byte occurs.
    assert res["guide_metric"] > 200
    LEARNED["gpt2_to_rnn not"].check(res)
    target = gpt2_to_rnn.load_target(os.path.join(out_dir, "target.pt"))
    assert not any(isinstance(m, gpt2_to_rnn.CausalSelfAttention) for m in target.modules())
    for block in target.transformer.h:
        rnn = block.attn.rnn
        assert type(rnn) is nn.RNN and (rnn.num_layers, rnn.nonlinearity, rnn.batch_first) == (2, "tanh", True)
        assert rnn.hidden_size == rnn.input_size == 128
    # The reported perplexities, recomputed from the text files one window at a time.
    data = runs["data"]
    assert reference_ppl(target, byte_tokens(data / "wiki.valid.raw"), SEQ_LEN) == pytest.approx(
        res["metric"]["value"], rel=1e-4)
    assert reference_ppl(target, byte_tokens(data / "wiki.test.raw"), SEQ_LEN) == pytest.approx(
        res["test_ppl"]["target"], rel=1e-4)
    assert "stage 2/2 done" in log and "train step 40/40" in log


def test_naive_takes_as_many_gradient_steps_as_not(runs):
    out_dir, log = runs["naive"]
    res = read_results(out_dir)
    assert res["grad_steps"] == read_results(runs["not"][0])["grad_steps"] == GRAD_STEPS
    assert res["stages"] == [] and "align" not in log and f"train step {GRAD_STEPS}/{GRAD_STEPS}" in log
    target = gpt2_to_rnn.load_target(os.path.join(out_dir, "target.pt"))
    assert reference_ppl(target, byte_tokens(runs["data"] / "wiki.valid.raw"), SEQ_LEN) == pytest.approx(
        res["metric"]["value"], rel=1e-4)
    # Same guide, same data: the guide's perplexities agree with the NoT run's.
    assert res["guide_metric"] == pytest.approx(read_results(runs["not"][0])["guide_metric"], rel=1e-6)


def test_method_guide_writes_a_gpt2_that_transformers_and_guide_read(runs, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir, log = runs["guide"]
    res = read_results(out_dir)
    assert res["grad_steps"] == GRAD_STEPS and res["stages"] == [] and "align" not in log
    assert not os.path.exists(os.path.join(out_dir, "target.pt"))
    weights = os.path.join(out_dir, "pytorch_model.bin")
    # transformers' own GPT-2 reads the file (only the tied lm_head and the mask buffers are not in it) and
    # scores the validation text, one window at a time, as the run reported.
    reference = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=256)).eval()
    missing, unexpected = reference.load_state_dict(torch.load(weights), strict=False)
    assert unexpected == [] and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing)
    reference.tie_weights()
    assert reference_ppl(lambda x: reference(x).logits, byte_tokens(runs["data"] / "wiki.valid.raw"),
                         SEQ_LEN) == pytest.approx(res["metric"]["value"], rel=1e-4)
    # --guide=PATH takes it as the guide of a conversion.
    guide = gpt2_to_rnn.load_guide(weights)
    ids = torch.randint(0, 256, (2, SEQ_LEN))
    with torch.no_grad():
        torch.testing.assert_close(guide(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_wikitext_offline_says_what_to_download(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no connection and nothing cached")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext-2", "wikitext-103"):
        with pytest.raises(SystemExit) as err:
            common.load_wikitext(name)
        message = str(err.value.code)
        assert f"https://wikitext.smerity.com/{name}-raw-v1.zip" in message
        assert f"--data=/path/to/{name}-raw" in message


def test_torchrun_two_processes_compute_what_one_does(runs):
    out_dir, log = runs["ddp"]
    res = read_results(out_dir)
    assert res["status"] == "done" and log.count("final val_ppl") == 1  # rank 0 alone logs
    for name in ("cka", "stages", "first eval", "final"):
        AGREED[f"gpt2_to_rnn {name}"].check(res, read_results(runs["not"][0]))
    # The perplexity over both processes' windows, recomputed by one process one window at a time.
    target = gpt2_to_rnn.load_target(os.path.join(out_dir, "target.pt"))
    assert reference_ppl(target, byte_tokens(runs["data"] / "wiki.valid.raw"), SEQ_LEN) == pytest.approx(
        res["metric"]["value"], rel=1e-4)


def scored_by_two(rank, init_method, folder):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model, tokens = gpt2_to_rnn.load_guide("random", 1, 64, 256), torch.load(os.path.join(folder, "tokens.pt"))
        totals = common.summed_nll(model, tokens.numpy(), 16, 3, common.Context(rank, rank, 2), "float32")
        if rank == 0:
            torch.save(totals, os.path.join(folder, "two.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_score_every_token_once(tmp_path):
    tokens = torch.randint(0, 256, (16 * 11 + 5,), generator=torch.Generator().manual_seed(0)).to(torch.uint16)
    torch.save(tokens, tmp_path / "tokens.pt")
    spawn_two(scored_by_two, (str(tmp_path),), str(tmp_path))
    torch.manual_seed(0)
    one = common.summed_nll(gpt2_to_rnn.load_guide("random", 1, 64, 256), tokens.numpy(), 16, 3, common.Context(),
                            "float32")
    nll, count = torch.load(tmp_path / "two.pt")
    # 11 whole windows of 16 predicted tokens (the 5 left over are not a window), each scored once in all.
    assert one[1] == count == 11 * 16 and nll == pytest.approx(one[0], rel=1e-6)


def elman(rnn, x):
    """Two stacked Elman layers written out: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                           "bias_hh"))
        h, outputs = torch.zeros(x.shape[0], w_hh.shape[0]), []
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
            outputs.append(h)
        x = torch.stack(outputs, dim=1)
    return x


@pytest.mark.parametrize("rnn_dtype", ["float32", "bfloat16"])
def test_the_recurrence_runs_in_its_own_dtype_whatever_the_autocast(rnn_dtype):
    """--rnn_dtype is the dtype of the RNN itself (its input, state and weights), under autocast or none: CUDA's
    autocast would run cuDNN's RNN in float16, whatever the autocast dtype. Gradients reach the float32 weights."""
    torch.manual_seed(0)
    mixer = gpt2_to_rnn.RNNMixer(16, rnn_dtype)
    seen = []
    mixer.rnn.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output[0].dtype)))
    x = torch.randn(2, 5, 16)
    for context in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with context:
            mixer(x).float().sum().backward()
    assert seen == [(getattr(torch, rnn_dtype),) * 2] * 2
    assert all(p.dtype == torch.float32 and p.grad is not None for p in mixer.parameters())
    # The same recurrence as nn.RNN's own float32 forward, to bfloat16's precision.
    with torch.no_grad():
        reference = mixer.out(mixer.rnn(x)[0]).flatten(0, 1)
        torch.testing.assert_close(mixer(x), reference, **({} if rnn_dtype == "float32" else dict(atol=3e-2,
                                                                                                     rtol=0)))


def test_recurrent_generation_matches_the_full_forward(runs):
    target = gpt2_to_rnn.load_target(os.path.join(runs["not"][0], "target.pt"))
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        full = target(ids)
        # The replacement is the Elman recurrence and its output layer, returned one row per token.
        x = torch.randn(3, 40, 128)
        mixer = target.transformer.h[0].attn
        output = mixer.out.weight, mixer.out.bias
        assert torch.allclose(mixer(x), (elman(mixer.rnn, x) @ output[0].T + output[1]).reshape(120, 128), atol=1e-5)
        # Causal: changing the last token changes no earlier logits.
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 256
        assert torch.allclose(target(changed)[:, :-1], full[:, :-1], atol=1e-6, rtol=0)
        # Token by token, carrying the RNN states, gives the same logits.
        states = [None] * len(target.transformer.h)
        for pos in range(ids.shape[1]):
            logits, states = target.step(ids[:, pos], pos, states)
            assert torch.allclose(logits, full[:, pos], atol=1e-4), pos
    # Sampling draws the same tokens as a loop that reruns the whole sequence for every token (same seed).
    prompt = ids[:, :5]
    generated = target.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    expected, draws = prompt, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            probs = torch.softmax(target(expected)[:, -1], dim=-1)
            expected = torch.cat([expected, torch.multinomial(probs, 1, generator=draws)], dim=1)
    assert torch.equal(generated, expected)
    # top_k=1 is greedy decoding.
    greedy = target.generate(prompt, 5, top_k=1)
    with torch.no_grad():
        assert torch.equal(target(greedy[:, :-1])[:, 4:].argmax(-1), greedy[:, 5:])
    with pytest.raises(ValueError, match="positions"):
        target.generate(prompt, target.cfg.block_size)
    with pytest.raises(TypeError, match="converted model"):
        gpt2_to_rnn.load_guide("random", n_layer=1, n_embd=64, vocab_size=256).generate(prompt, 1)


def test_tiny_preset_as_documented(tmp_path):
    """`python gpt2_to_rnn.py --preset=tiny`: generated text, one token per byte, offline."""
    run([a.format(cache="cache") for a in LEARNED["gpt2_to_rnn tiny"].args] + ["--out_dir=out"], cwd=tmp_path)
    res = read_results(tmp_path / "out")
    assert res["status"] == "done" and len(res["stages"]) == 2 and res["test_ppl"]["target"] < res["test_ppl"]["guide"]
    LEARNED["gpt2_to_rnn tiny"].check(res)


def test_gpt2_bpe_ids(bpe_file, monkeypatch):
    from_flag = common.load_tokenizer("gpt2", bpe_file)
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", bpe_file)
    for enc in (from_flag, common.load_tokenizer("gpt2")):
        assert enc.encode_ordinary("Hello world") == [15496, 995]
        assert enc.encode("<|endoftext|>", allowed_special="all") == [50256] and enc.eot_token == 50256
        assert enc.n_vocab == 50257 and enc.decode([15496, 995]) == "Hello world"


def test_token_cache_is_reused_and_rebuilt_when_truncated(tmp_path, bpe_file):
    import tiktoken
    import tiktoken.load
    import numpy as np

    data = write_text_folder(tmp_path / "text", sizes=(20, 6, 6))
    args = ["--eval_only=guide", "--guide=random", "--n_layer=1", "--n_embd=64", "--tokenizer=gpt2",
            f"--tokenizer_file={bpe_file}", f"--data={data}", "--cache_dir=cache", f"--seq_len={SEQ_LEN}"]
    reference = tiktoken.Encoding("reference", pat_str=GPT2_PATTERN, special_tokens={},
                                  mergeable_ranks=tiktoken.load.load_tiktoken_bpe(bpe_file))
    expected = {split: [t for line in lines_of(data / f"wiki.{name}.raw") for t in reference.encode(line)]
                for split, name in [("train", "train"), ("val", "valid"), ("test", "test")]}

    def cached():
        (folder,) = os.listdir(tmp_path / "cache")
        assert not [f for f in os.listdir(tmp_path / "cache" / folder) if f.startswith(".tmp-")]
        return {s: np.fromfile(tmp_path / "cache" / folder / f"{s}.bin", dtype=np.uint16).tolist() for s in expected}

    log = run(args, cwd=tmp_path).stdout
    assert all(f"tokenized the {s} split" in log for s in expected) and "guide val_ppl" in log
    assert cached() == expected
    (folder,) = os.listdir(tmp_path / "cache")
    train_bin = tmp_path / "cache" / folder / "train.bin"
    mtime = os.stat(train_bin).st_mtime_ns
    log = run(args, cwd=tmp_path).stdout
    assert "reusing the token cache" in log and "tokenized" not in log
    assert os.stat(train_bin).st_mtime_ns == mtime
    # A truncated file, and one whose .json is missing (a build that stopped half way), are rebuilt.
    with open(train_bin, "r+b") as f:
        f.truncate(os.path.getsize(train_bin) // 2)
    os.unlink(tmp_path / "cache" / folder / "test.bin.json")
    log = run(args, cwd=tmp_path).stdout
    assert "tokenized the train split" in log and "tokenized the test split" in log
    assert "tokenized the val split" not in log
    assert cached() == expected


def test_guide_matches_transformers_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, attn_implementation="eager")
    reference = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters too
        for name, p in reference.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    # Hugging Face's folder (model.safetensors, keys with the `transformer.` prefix) ...
    reference.save_pretrained(tmp_path / "hf")
    # ... and the layout of OpenAI's pytorch_model.bin: no prefix, no lm_head, the causal-mask buffers.
    state = dict(reference.transformer.state_dict())
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        expected = reference(ids).logits
        for spec in (tmp_path / "hf", tmp_path / "pytorch_model.bin"):
            guide = gpt2_to_rnn.load_guide(str(spec))
            assert not guide.training
            logits = guide(ids)
            assert logits.shape == (2, 64, 50257)
            assert (logits - expected).abs().max().item() < 1e-4, spec
    state.pop("h.1.mlp.c_fc.weight")
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(SystemExit, match="h.1.mlp.c_fc.weight"):
        gpt2_to_rnn.load_guide(str(tmp_path / "broken.bin"))


def test_pretrained_guide_offline_says_what_to_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and nothing cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as err:
        gpt2_to_rnn.load_guide("pretrained")
    message = str(err.value.code)
    assert "https://huggingface.co/openai-community/gpt2/resolve/main/pytorch_model.bin" in message
    assert "--guide=/path/to/pytorch_model.bin" in message and "HF_HOME" in message


def test_windows_resume_exactly_and_are_windows_of_the_stream():
    tokens = torch.randperm(5000).numpy().astype("uint16")  # every value once: a window pins its start
    stream = common.Windows(tokens, 4, SEQ_LEN, seed=1, rank=0)
    first = [next(stream) for _ in range(3)]
    state = stream.state_dict()
    rest = [next(stream) for _ in range(2)]
    resumed = common.Windows(tokens, 4, SEQ_LEN, seed=1, rank=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [next(resumed) for _ in range(2)]))
    # Two processes read the two halves of the one process's global batch, from their first batch on.
    halves = [common.Windows(tokens, 4, SEQ_LEN, seed=1, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([next(h) for h in halves]), first[0]) and not torch.equal(first[0], first[1])
    for batch in first + rest:
        assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == torch.int64
        for row in batch.tolist():
            start = tokens.tolist().index(row[0])
            assert row == tokens[start:start + SEQ_LEN + 1].tolist()


@pytest.mark.parametrize("args, message", [
    (["--data=no/such/folder"], "--data=no/such/folder: expected wikitext-103, wikitext-2, generated, or a folder"),
    (["--method=guide", "--guide=pretrained"], "--method=guide trains a guide from scratch: pass --guide=random"),
    (["--data=missing_test"], "wiki.test.raw' is missing"),
    (["--data=empty_file"], "wiki.valid.raw' is empty"),
    (["--data=blank_text"], "the val split of 'blank_text' holds no text"),
    (["--n_layres=3"], "unknown config key 'n_layres'; valid keys:"),
    (["--tokenizer=gpt2", "--tokenizer_file=missing.tiktoken"], "tokenizer file 'missing.tiktoken' does not exist"),
    (["--tokenizer=gpt2", "--tokenizer_file=words.txt"], "tokenizer file 'words.txt' is not in tiktoken's format"),
    (["--tokenizer=gpt2", "--tokenizer_file=small.tiktoken"], "holds 2 BPE ranks, not GPT-2's 50256"),
    (["--tokenizer_file=small.tiktoken"], "use it with --tokenizer=gpt2"),
    (["--tokenizer=gpt2", "--guide=no_weights.bin"], "--guide=no_weights.bin: expected pretrained, random"),
    (["--guide=pretrained"], "reads GPT-2's BPE tokens"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE", raising=False)
    write_text_folder(tmp_path / "missing_test").joinpath("wiki.test.raw").unlink()
    write_text_folder(tmp_path / "empty_file").joinpath("wiki.valid.raw").write_text("")
    write_text_folder(tmp_path / "blank_text").joinpath("wiki.valid.raw").write_text(" \n \n\n")
    (tmp_path / "words.txt").write_text("hello world\nthis is not a tokenizer\n")
    (tmp_path / "small.tiktoken").write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(SystemExit) as err:
        gpt2_to_rnn.main([*FAST, "--out_dir=out", "--cache_dir=cache", *args])
    assert message in str(err.value.code) and str(err.value.code).startswith("error: ")
    assert not (tmp_path / "out").exists()
    # The token cache holds only complete files: no temporary file, no .bin without its .json.
    for folder, _, files in os.walk(tmp_path / "cache"):
        assert not [f for f in files if f.startswith(".tmp-")]
        assert {f for f in files if f.endswith(".bin")} == {f[:-5] for f in files if f.endswith(".json")}


def test_bad_value_on_the_command_line(tmp_path):
    proc = run(["--preset=tiny", "--lr=fast"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: --lr=fast: expected a float" in proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


def test_a_cache_shared_by_two_nodes_is_rebuilt_by_either(tmp_path, monkeypatch):
    """Two nodes' first processes rebuilding one cache file at once: the other removed its .json first."""
    data = write_text_folder(tmp_path / "text", sizes=(10, 3, 3))
    args = ["--eval_only=guide", "--guide=random", "--n_layer=1", "--n_embd=64", "--tokenizer=bytes",
            f"--data={data}", "--cache_dir=cache", f"--seq_len={SEQ_LEN}"]
    monkeypatch.chdir(tmp_path)
    gpt2_to_rnn.main(args)
    (folder,) = os.listdir(tmp_path / "cache")
    train = tmp_path / "cache" / folder / "train.bin"
    whole = train.read_bytes()
    train.write_bytes(whole[:len(whole) // 2])
    unlink = os.unlink

    def the_other_node_was_first(path, *args, **kwargs):
        if str(path).endswith(".json"):
            unlink(path)
            raise FileNotFoundError(path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", the_other_node_was_first)
    gpt2_to_rnn.main(args)
    assert train.read_bytes() == whole and common.cached_tokens(str(train)) == len(whole) // 2


# A run's shortest whole form, for the switches of what it computes.
MINIMAL = ["--preset=tiny", "--device=cpu", "--align_steps=3", "--finetune_steps=1", "--train_steps=4",
           "--batch_size=8", "--seq_len=32", "--cache_dir=cache"]
STAGES = 2


@pytest.mark.parametrize("flag, measure", [("--similarity=dmnn", "dmnn"), ("--similarity=rsa", "rsa"),
                                           ("--calibrate=linear", "cka")])
def test_the_other_similarities_and_linear_calibration_run_end_to_end(tmp_path, monkeypatch, capsys, flag, measure):
    monkeypatch.chdir(tmp_path)
    gpt2_to_rnn.main([*MINIMAL, flag, "--out_dir=out"])
    assert_other_similarity_run(tmp_path / "out", capsys.readouterr().out, flag, measure, STAGES)


def test_a_run_trains_on_the_part_of_the_text_it_is_given(tmp_path):
    from types import SimpleNamespace

    data = write_text_folder(tmp_path / "text")
    whole = byte_tokens(data / "wiki.train.raw")  # the folder's training text, one token per byte, read here

    def train_tokens(part):
        cfg = SimpleNamespace(data=str(data), tokenizer="bytes", tokenizer_file="", cache_dir=str(tmp_path / "cache"),
                              seq_len=SEQ_LEN, train_part=part)
        tokens = common.token_splits(cfg, common.Context())
        return tokens["train"].tolist(), len(tokens["val"])

    (guide, val), (conversion, val_too) = train_tokens("0:0.9"), train_tokens("0.9:1")
    # the study's split: the guide's 90% and the conversion's 10% are disjoint, in order, and make up the whole
    assert guide == whole[:round(0.9 * len(whole))] and conversion == whole[round(0.9 * len(whole)):]
    assert train_tokens("0:1")[0] == whole and val == val_too > 0  # validation and test are never split
    for bad in ("0.9", "0.5:0.5", "0.2:1.5", "a:b", "-0.1:1"):
        with pytest.raises(common.ConfigError, match=rf"--train_part={re.escape(bad)}: expected A:B"):
            train_tokens(bad)
    with pytest.raises(common.ConfigError, match="the train split has 3 tokens"):  # a part too small for a window
        train_tokens(f"0:{3 / len(whole)}")
