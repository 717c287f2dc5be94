"""
Network of Theseus: GPT-2 -> RNN on Wikitext-103. Table 1: perplexity of the guide 37.50, NoT 50.58 (trained
guide) and 58.26 (untrained guide), naive 119.44.

In every block of a GPT-2 small guide (12 layers, 768 wide) the causal self-attention becomes two stacked Elman
RNN layers (tanh, as wide as the model) and their output layer, reading the same input, causal by construction
(--calibrate=linear folds the least-squares map onto the guide's output into that layer). Embeddings, MLPs,
LayerNorms and the tied output layer stay. The converted model is a true recurrent language model: `generate`
carries each block's state one token at a time. One block per stage (--order=reverse: last first).

    python gpt2_to_rnn.py --preset=tiny                 # CPU, generated text, one token per byte, offline
    python gpt2_to_rnn.py --preset=tiny --tokenizer=gpt2 --tokenizer_file=.../whisper/assets/gpt2.tiktoken
    torchrun --nproc_per_node=8 gpt2_to_rnn.py          # the paper's run: batch 256 windows of 128 tokens
    torchrun --nproc_per_node=8 gpt2_to_rnn.py --data=/path/to/wikitext-103-raw \\
        --tokenizer_file=/path/to/gpt2.tiktoken --guide=/path/to/pytorch_model.bin        # offline nodes
    ... --method=naive    ... --guide=random    ... --resume=True    ... --eval_only=guide
    python gpt2_to_rnn.py --preset=small --data=/path/to/wikitext-2 --method=guide --out_dir=g   # the study

Sample from a converted model (constant memory per token):
    model = gpt2_to_rnn.load_target("out-gpt2_to_rnn/target.pt")
    enc = common.load_tokenizer("gpt2", "/path/to/gpt2.tiktoken")
    ids = model.generate(torch.tensor([enc.encode_ordinary(" The ship of Theseus")]), 100, top_k=50)
    print(enc.decode(ids[0].tolist()))

Metric: perplexity of non-overlapping windows of seq_len tokens, no earlier context (common.perplexity).
"""
import math
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# config: this script's settings, over common.SETTINGS and common.TEXT_SETTINGS; each is a flag --name=value
SETTINGS = dict(
    common.TEXT_SETTINGS,
    guide="pretrained",  # "pretrained" (OpenAI's GPT-2 small), "random", or a model.safetensors or
    # pytorch_model.bin in Hugging Face's GPT-2 layout (or a folder holding one)
    n_layer=12,  # the size of a random guide (weights files carry their own); heads are 64 wide
    n_embd=768,
    rnn_dtype="float32",  # the recurrence's dtype, its weights cast to it, whatever the run's autocast: "float32" or
    # "bfloat16" (on CPU too; tools/gpu_check.sh measures both on a GPU)
    rnn_output="linear",  # the mixer's output: "linear" (an Elman network's output layer, W h + b: attention's c_proj
    # has one, and a calibration folds into it) or "none" (the second layer's state itself, bounded by tanh)
    lr=3e-4,
    weight_decay=0.1,
    warmup_steps=500,
    eval_interval=2000,
)
PRESETS = {
    "tiny": dict(data="generated", tokenizer="bytes", guide="random", n_layer=2, n_embd=128, align_steps=40,
                 align_lr=3e-3, finetune_steps=10, finetune_lr=1e-3, train_steps=60, batch_size=8, seq_len=64,
                 lr=3e-3, warmup_steps=6, eval_interval=0, log_interval=10, ckpt_interval=50),
    # The laptop study (docs/study.md): a 12-block GPT, so 24 Elman layers, 64 wide, on Wikitext-2 read one byte per
    # token (no BPE file, small logits), windows of 64. CKA still rises at 200 alignment steps (0.47-0.83 beyond the
    # first block, which reaches 0.997): 60 steps is what two CPU cores afford for 12 stages (0.36-0.99 then).
    "small": dict(data="wikitext-2", tokenizer="bytes", guide="random", n_layer=12, n_embd=64, align_steps=60,
                  align_lr=3e-3, finetune_steps=20, finetune_lr=1e-3, train_steps=800, batch_size=16, seq_len=64,
                  lr=3e-3, warmup_steps=20, eval_interval=100, log_interval=100, ckpt_interval=500),
}
# -----------------------------------------------------------------------------


class RNNMixer(nn.Module):
    """The replacement of one attention: two stacked Elman RNN layers (tanh), then an output layer (a Linear, as an
    Elman network has; output="none": none). It reads the attention's input [B, T, C] and returns token rows
    [B*T, C], as the attention does (the similarity compares tokens as examples)."""

    def __init__(self, width, dtype="float32", output="linear"):
        super().__init__()
        self.rnn = nn.RNN(width, width, num_layers=2, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(width, width) if output == "linear" else nn.Identity()
        self.dtype = getattr(torch, dtype)  # how it runs, not a weight: not in the state dict

    def forward(self, x):
        return self.step(x, None)[0].flatten(0, 1)

    def step(self, x, state):
        """x [B, T, C] continuing from state (None: zeros) -> (outputs [B, T, C], the new state)."""
        # The recurrence in its own dtype, whatever the run's autocast: autocast would run cuDNN's RNN in float16
        # (its RNN kernel casts to half, not to the autocast dtype), with no loss scaling.
        with torch.autocast(x.device.type, enabled=False):
            weights = {name: w.to(self.dtype) for name, w in self.rnn.named_parameters()}
            y, state = torch.func.functional_call(self.rnn, weights, (x.to(self.dtype), None if state is None else
                                                                      state.to(self.dtype)))
        return self.out(y.to(x.dtype)), state


def make_stages(guide, example, cfg):
    """One stage per block's attention; `example` (one window of token ids) gives the shapes."""
    attentions = [f"transformer.h.{i}.attn" for i in range(guide.cfg.n_layer)]

    def stage(name):
        def swap(hybrid):
            common.replace(hybrid, name, lambda attn, in_shape, out_shape: RNNMixer(
                in_shape[-1], cfg.rnn_dtype, cfg.rnn_output), example)

        return common.Stage(swap, compare=[(name, name)], train=[name])

    return [stage(name) for name in (attentions if cfg.order == "forward" else attentions[::-1])]


# -----------------------------------------------------------------------------
# the guide: GPT-2, nanoGPT-style, with Hugging Face's parameter names


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # context: rows of the learned position embedding (the target reads no further)

    @property
    def n_head(self):
        return self.n_embd // 64


class CausalSelfAttention(nn.Module):
    """GPT-2's attention; returns token rows [B*T, C]."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B * T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x)).view_as(x)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab]. No dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]), ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        # GPT-2's initialization: normal 0.02, the residual projections scaled by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def step(self, tokens, pos, states):
        """Recurrent inference: tokens [B] at position pos, each block's state given (None at the start); returns
        the next-token logits [B, vocab] and the new states. Memory does not grow with the position."""
        if not all(hasattr(block.attn, "step") for block in self.transformer.h):
            raise TypeError("step/generate need every attention replaced by a recurrence (a converted model)")
        x = (self.transformer.wte(tokens) + self.transformer.wpe.weight[pos])[:, None]
        new_states = []
        for block, state in zip(self.transformer.h, states):
            y, state = block.attn.step(block.ln_1(x), state)
            x = x + y
            x = x + block.mlp(block.ln_2(x))
            new_states.append(state)
        return self.lm_head(self.transformer.ln_f(x[:, 0])), new_states

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue token ids prompt [B, T0] by max_new_tokens sampled tokens, one recurrent step per token."""
        length = prompt.shape[1] + max_new_tokens
        if prompt.shape[1] == 0 or length > self.cfg.block_size:
            raise ValueError(f"need a prompt of at least one token and at most {self.cfg.block_size} positions in "
                             f"all (the learned position embedding's size); asked for {length}")
        states = [None] * len(self.transformer.h)
        for pos in range(prompt.shape[1]):
            logits, states = self.step(prompt[:, pos], pos, states)
        out = [prompt]
        for pos in range(prompt.shape[1], length):
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            out.append(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))
            if pos + 1 < length:
                logits, states = self.step(out[-1][:, 0], pos, states)
        return torch.cat(out, dim=1)


def flops_per_window(model, seq_len):
    """Training FLOPs of one window as nanoGPT estimates them, for MFU: 6 N per token for the N weights it
    multiplies (all but the position embedding), plus 12 L H Q T for its L attention layers."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    attentions = sum(isinstance(block.attn, CausalSelfAttention) for block in model.transformer.h)
    return (6 * n + 12 * attentions * model.cfg.n_embd * seq_len) * seq_len


# Hugging Face's GPT-2 stores these as Conv1D weights, [in, out]: nn.Linear wants them transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_REPO = "openai-community/gpt2"


def gpt_from_hf_state(state, spec):
    """Our GPT holding a Hugging Face GPT-2 state dict (keys with or without the `transformer.` prefix)."""
    # The causal-mask buffers (attn.bias, attn.masked_bias) are not weights; lm_head is tied to wte.
    state = {k.removeprefix("transformer."): v.float() for k, v in state.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise common.ConfigError(f"guide {spec!r} is not a GPT-2 state dict (no wte.weight / wpe.weight)")
    vocab_size, n_embd = state["wte.weight"].shape
    if n_embd % 64:
        raise common.ConfigError(f"guide {spec!r} is {n_embd} wide, not a multiple of GPT-2's 64-wide heads")
    n_layer = len({k.split(".")[1] for k in state if k.startswith("h.")})
    model = GPT(GPTConfig(n_layer, n_embd, vocab_size, state["wpe.weight"].shape[0]))
    ours = {"transformer." + k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state.items()}
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise common.ConfigError(f"guide {spec!r} does not fit GPT-2: {e}") from None
    return model


def hf_state(model):
    """A GPT's weights as a Hugging Face GPT-2 state dict (Conv1D weights [in, out]; lm_head is tied to wte)."""
    return {k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v for k, v in model.state_dict().items()
            if k != "lm_head.weight"}


def read_weights(path):
    """The state dict in a model.safetensors or pytorch_model.bin (or a folder holding one)."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise common.ConfigError(f"guide folder {path!r} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise common.ConfigError(f"reading {path!r} needs the safetensors package (pip install safetensors), or "
                                 f"use a pytorch_model.bin") from None
    except Exception as e:
        raise common.ConfigError(f"could not read GPT-2 weights from {path!r} ({type(e).__name__}: {e})") from None


def load_guide(spec, n_layer=12, n_embd=768, vocab_size=50257):
    """The GPT-2 guide in eval mode: "pretrained" (GPT-2 small), "random" (of the given size), or a weights path."""
    if spec == "random":
        return GPT(GPTConfig(n_layer, n_embd, vocab_size)).eval()
    path = spec
    if spec == "pretrained":
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(GPT2_REPO, "pytorch_model.bin")
        except Exception as e:
            raise common.ConfigError(
                f"could not get GPT-2's weights, pytorch_model.bin of {GPT2_REPO} on the Hugging Face Hub "
                f"({type(e).__name__}). On a machine with internet, download "
                f"https://huggingface.co/{GPT2_REPO}/resolve/main/pytorch_model.bin and pass "
                f"--guide=/path/to/pytorch_model.bin, or fill the Hugging Face cache ($HF_HOME, by default "
                f"~/.cache/huggingface) with `hf download {GPT2_REPO} pytorch_model.bin` and copy it here") from None
    return gpt_from_hf_state(read_weights(path), spec).eval()


def load_target(path):
    """The converted model a run saved (out_dir/target.pt): the guide's architecture with every stage swapped."""
    saved = common.load_checkpoint(path, ("config", "arch", "model"), "target.pt")
    # target.pt files older than the settings
    cfg = SimpleNamespace(**{"rnn_dtype": "float32", "rnn_output": "none", **saved["config"]})
    guide = GPT(GPTConfig(**saved["arch"]))
    target = common.swapped(guide, make_stages(guide, torch.zeros(1, cfg.seq_len, dtype=torch.long), cfg))
    target.load_state_dict(saved["model"])
    return target.eval()


def main(argv):
    cfg = common.configure(SETTINGS, argv, PRESETS, checks={"n_layer": common.positive, "n_embd": common.positive,
                                                            "rnn_dtype": ("float32", "bfloat16"),
                                                            "rnn_output": ("linear", "none")},
                           rows_per_example=lambda cfg: cfg.seq_len)
    if cfg.n_embd % 64:
        raise common.ConfigError(f"--n_embd={cfg.n_embd}: must be a multiple of 64 (GPT-2's heads are 64 wide)")
    if cfg.seq_len > GPTConfig.block_size:
        raise common.ConfigError(f"--seq_len={cfg.seq_len}: GPT-2 reads at most {GPTConfig.block_size} tokens")
    if cfg.guide not in ("pretrained", "random") and not os.path.exists(cfg.guide):
        raise common.ConfigError(f"--guide={cfg.guide}: expected pretrained, random, or the path of a "
                                 f"model.safetensors / pytorch_model.bin (or a folder holding one)")
    if cfg.tokenizer == "bytes" and cfg.guide == "pretrained":
        raise common.ConfigError("--guide=pretrained reads GPT-2's BPE tokens: use --tokenizer=gpt2, or a guide of "
                                 "your own (random, or trained by --method=guide) with --tokenizer=bytes")
    ctx = common.start(cfg, __file__)
    vocab_size = 50257 if cfg.tokenizer == "gpt2" else common.ByteTokenizer.n_vocab
    tokens = common.token_splits(cfg, ctx)
    task = common.language_task(cfg, ctx, tokens, flops_per_example=lambda m: flops_per_window(m, cfg.seq_len))

    def fitting(model, what):
        if model.cfg.vocab_size != vocab_size:
            raise common.ConfigError(f"{what} has a vocabulary of {model.cfg.vocab_size}, the {cfg.tokenizer} "
                                     f"tokenizer {vocab_size}")
        if model.cfg.block_size < cfg.seq_len:
            raise common.ConfigError(f"{what} reads at most {model.cfg.block_size} positions, fewer than "
                                     f"--seq_len={cfg.seq_len}")
        return model.to(ctx.device)

    def get_guide():
        model = common.rank0_first(lambda: load_guide(cfg.guide, cfg.n_layer, cfg.n_embd, vocab_size))
        return fitting(model, f"the guide {cfg.guide!r}")

    if cfg.eval_only:
        model = get_guide() if cfg.eval_only == "guide" else fitting(load_target(cfg.eval_only), cfg.eval_only)
        ctx.log(f"{cfg.eval_only} val_ppl {task.evaluate(model):.2f} test_ppl {task.evaluate(model, 'test'):.2f}")
        return common.finish_processes()
    guide = get_guide()
    batches = common.Windows(tokens["train"], cfg.batch_size, cfg.seq_len, cfg.seed, ctx.rank, ctx.world)
    stages = make_stages(guide, torch.zeros(1, cfg.seq_len, dtype=torch.long, device=ctx.device), cfg)
    run = common.Run(cfg, ctx, task, batches)
    # The final training: train_steps, else epochs of the training tokens, batch_size windows of seq_len a step.
    train_steps = cfg.train_steps or cfg.epochs * len(tokens["train"]) // (cfg.batch_size * cfg.seq_len)
    steps = common.total_steps(stages, cfg, train_steps)  # what every arm takes

    if cfg.method == "not":
        run.evaluate_guide(guide)
        model = common.convert(guide, stages, train_steps, task, run)
    elif cfg.method == "naive":  # every attention replaced at once, task loss only
        run.evaluate_guide(guide)
        model = common.swapped(guide, stages, cfg.seed)
        common.train(model, "train", steps, cfg.lr, task, run)
    else:  # "guide": a GPT of the guide's size from scratch, for --guide= of later runs (and transformers)
        model = guide
        common.train(model, "train", steps, cfg.lr, task, run)
    results = run.finish(model)
    # The test split, scored once at the end, for the target and the guide.
    results["test_ppl"] = {"guide": task.evaluate(guide, "test") if run.guide_metric else None,
                           "target": task.evaluate(model, "test")}
    ctx.log(f"test_ppl target {results['test_ppl']['target']:.2f}"
            + (f" guide {results['test_ppl']['guide']:.2f}" if run.guide_metric else ""))
    if ctx.master:
        common.write_json(os.path.join(cfg.out_dir, "results.json"), results)
        if cfg.method == "guide":
            name, saved = "pytorch_model.bin", hf_state(model)
        else:
            name, saved = "target.pt", {"config": vars(cfg), "arch": asdict(guide.cfg), "model": model.state_dict()}
        common.save_atomic(saved, os.path.join(cfg.out_dir, name))
        ctx.log(f"wrote {cfg.out_dir}/{name} and results.json")
    common.finish_processes()


if __name__ == "__main__":
    common.launch(main)
