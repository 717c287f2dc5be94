"""
Network of Theseus: GPT-2 -> Elman RNN on Wikitext-103.

In every block of a GPT-2 small guide (12 layers, 12 heads, 768 wide), the
causal self-attention becomes two stacked Elman RNN layers (tanh, hidden size
768, batch-first): the same input (the output of ln_1), an output of the same
shape added to the residual stream, causal by construction. Embeddings, MLPs,
LayerNorms and the tied output layer stay. The converted model is a true
recurrent language model: `generate` carries each block's RNN state one token
at a time. Paper: perplexity of the guide 37.50, NoT 50.58 (trained guide) /
58.26 (untrained guide), naive 119.44.

Run, first on a laptop (CPU, offline, generated text, one token per byte, under two minutes):
    python gpt2_to_rnn.py --preset=tiny
The same with the real GPT-2 BPE (`pip install --no-deps openai-whisper` ships gpt2.tiktoken):
    python gpt2_to_rnn.py --preset=tiny --tokenizer=gpt2 --tokenizer_file=/path/to/whisper/assets/gpt2.tiktoken
The paper's job, one node of 8 GPUs (global batch 256 windows of 128 tokens):
    torchrun --nproc_per_node=8 gpt2_to_rnn.py
Offline compute nodes: a local copy of the data and of the tokenizer file (or $GPT2_TIKTOKEN_FILE):
    torchrun --nproc_per_node=8 gpt2_to_rnn.py --data=/path/to/wikitext-103-raw \\
        --tokenizer_file=/path/to/gpt2.tiktoken --guide=/path/to/pytorch_model.bin
The baseline and the untrained guide:
    ... --method=naive        ... --guide=random
The small study's arms (CPU, a few minutes each, bytes as tokens; README.md has the whole grid):
    python gpt2_to_rnn.py --preset=small --data=/path/to/wikitext-2 --method=guide --out_dir=out-guide
    python gpt2_to_rnn.py --preset=small --data=/path/to/wikitext-2 --guide=out-guide/pytorch_model.bin --seed=1
Resume a run that stopped (same flags plus):
    ... --resume=True
Only evaluate the guide, or a converted model (validation and test perplexity):
    python gpt2_to_rnn.py --eval_only=guide
    python gpt2_to_rnn.py --eval_only=out-gpt2-rnn/target.pt
Sample text from the converted model (constant memory per token):
    import torch, gpt2_to_rnn
    model = gpt2_to_rnn.load_target("out-gpt2-rnn/target.pt")
    enc = gpt2_to_rnn.load_tokenizer("gpt2", "/path/to/gpt2.tiktoken")
    ids = model.generate(torch.tensor([enc.encode_ordinary(" The ship of Theseus")]), 100, top_k=50)
    print(enc.decode(ids[0].tolist()))

Data and metric, exactly:
- Text: each split is the list of lines of the raw file (newline kept; lines
  holding only whitespace become empty, as in the Hugging Face copy, so a local
  folder and the download give the same tokens). Each line is encoded on its
  own (tiktoken `encode_ordinary`, no <|endoftext|>) and the ids are
  concatenated into one stream per split, cached as uint16 files in
  cache_dir/<source>-<tokenizer>/{train,val,test}.bin, each with a .json
  holding its token count: a file whose size does not match is rebuilt. Each
  node's first process builds what is missing while the others wait (for Wikitext-103
  the first time, the download and a few minutes of tokenizing).
- Training batches: windows of seq_len + 1 tokens starting anywhere in the
  training stream (uniform), input the first seq_len, targets the last seq_len.
- Perplexity of a split with N tokens t[0..N-1]: windows k = 0 .. (N-1)//seq_len - 1
  read t[k*seq_len : k*seq_len + seq_len] with no earlier context (the RNN
  state starts at zero, attention sees only the window) and predict
  t[k*seq_len + 1 : k*seq_len + seq_len + 1]; the tail of fewer than seq_len
  predictable tokens is left out. ppl = exp(total NLL / number of predicted
  tokens), NLL in nats, summed over all windows of all processes (window k on
  rank k mod world), each token once. The same function scores the guide, the
  NoT target and the naive baseline; `val_ppl` during training, the test split
  at the end (results.json "test_ppl").

Decisions the paper leaves open (and the config key to change each):
- One block per stage, first to last (`order`): 12 stages.
- CKA treats each token as an example: the attention module (and the RNN that
  replaces it) returns its output as rows [B*T, C], and the block reshapes it
  back before the residual add. common.cka takes the first dimension as
  examples, so it sees the 32768 tokens of a global batch with 768 features
  each and uses the 768 x 768 cross-covariance form. Under DDP it is computed
  on the global batch (`cka_scope`).
- During alignment only the new RNN trains (Adam, `align_lr`, warmup then
  cosine); everything else, the earlier RNNs included, is frozen. Each stage
  ends with `finetune_steps` task steps of the whole hybrid (CKA ignores
  scale and rotation; the frozen layers after the RNN need to adapt), then
  the hybrid's validation perplexity is measured for that stage.
- The RNN is nn.RNN as it is (no output projection, PyTorch's initialization)
  and runs in float32 even under bf16 autocast: autocast would run cuDNN's
  RNN in float16 without loss scaling.
- No dropout anywhere. The learned position embeddings stay, so the target
  reads at most 1024 positions (`generate` stops there).
- Final training: AdamW, warmup then cosine, `train_steps`. The naive baseline
  trains for exactly as many gradient steps as NoT took in all.
- `--method=guide` trains a GPT of the guide's size from scratch for that many
  steps too and writes out_dir/pytorch_model.bin in Hugging Face's GPT-2 layout
  (which `--guide=` and transformers' GPT2LMHeadModel read): a trained guide
  for small studies, where no pretrained GPT-2 fits the tokenizer or the size.
- A random guide uses GPT-2's initialization (normal 0.02, residual
  projections scaled by 1/sqrt(2 * n_layer)); heads are 64 wide, as in every
  released GPT-2 (so weights files need no head count).
- On CUDA the runs use bf16 autocast, TF32 and fused AdamW. `--compile=True`
  puts the final training's model through torch.compile. Not the per-stage
  fine-tuning (short, and each stage meets a new architecture: a compilation
  each), nor alignment (its forward passes stop by raising from hooks, which
  compiled code does not support).
  The task phases' log lines report MFU as nanoGPT estimates it (6 N + 12 L H
  Q T FLOPs per token, L counting only the attention layers left) against the
  bf16 peak of the card in use (common.PEAK_FLOPS; "n/a" on CPU and others).
"""
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
# I/O
out_dir = "out-gpt2-rnn"  # checkpoint, results.json and target.pt go here
data = "wikitext-103"  # "wikitext-103" or "wikitext-2" (Hugging Face download), "generated" (made-up text, offline),
# or a folder holding wiki.train.raw, wiki.valid.raw and wiki.test.raw (the official zip's layout)
cache_dir = "token-cache"  # tokenized splits, made once per data source and tokenizer
tokenizer = "gpt2"  # "gpt2": GPT-2's BPE (tiktoken); "bytes": one token per UTF-8 byte (offline tiny runs)
tokenizer_file = ""  # a local gpt2.tiktoken; "" = $GPT2_TIKTOKEN_FILE if set, else tiktoken's own download
eval_only = ""  # "guide" or a path to a target.pt: print its validation and test perplexity and exit
resume = False  # continue the run in out_dir from its last checkpoint
# guide and target
guide = "pretrained"  # "pretrained" (OpenAI's GPT-2 small), "random" (untrained), or a model.safetensors /
# pytorch_model.bin in Hugging Face's GPT-2 format (or a folder holding one)
n_layer = 12  # size of a random guide (weights files carry their own)
n_embd = 768
# method
method = "not"  # "not": Network of Theseus; "naive": all attentions replaced at once, task loss only;
# "guide": train a GPT from scratch (--guide=random) and write out_dir/pytorch_model.bin
order = "forward"  # "forward": first block first; "reverse": last first
align_steps = 1000  # CKA alignment steps per stage
align_lr = 1e-3  # peak learning rate of the new RNN during its alignment
finetune_steps = 100  # task steps on the whole hybrid after each stage's alignment; 0 turns it off
finetune_lr = 1e-4  # peak learning rate of that per-stage fine-tuning
cka_scope = "global"  # "global": CKA on the batch of all processes; "local": per process, no all_gather
cka_unbiased = False  # debiased HSIC estimator in CKA
# task training
train_steps = 10000  # final end-to-end training steps (about 3 passes over Wikitext-103's 117M tokens)
batch_size = 256  # global batch in windows, split evenly over processes
seq_len = 128  # tokens a window predicts (it reads seq_len + 1)
optimizer = "adamw"  # "adamw" or "sgd"
lr = 3e-4  # peak learning rate of the final training (and of the naive baseline)
weight_decay = 0.1
warmup_steps = 500  # linear warmup of the final training, then cosine decay to zero
grad_clip = 1.0  # clip the gradient norm; 0 turns it off
# evaluation, logging, checkpoints
eval_guide = True  # measure the guide's perplexity first (validation, and test at the end)
eval_interval = 2000  # steps between validation runs during the final training; 0: only at the end
log_interval = 50
ckpt_interval = 1000
# system
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast dtype on CUDA ("float32" to turn autocast off); CPU always runs float32
seed = 0
compile = False  # torch.compile the model of the final training (see the docstring)
preset = ""  # "tiny": the whole conversion on CPU in under two minutes; "small": one arm of the laptop study
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

PRESETS = {
    "tiny": dict(out_dir="out-gpt2-rnn-tiny", data="generated", tokenizer="bytes", guide="random", n_layer=2,
                 n_embd=128, align_steps=40, align_lr=3e-3, finetune_steps=10, finetune_lr=1e-3, train_steps=60,
                 batch_size=8, seq_len=64, lr=3e-3, warmup_steps=6, eval_interval=0, log_interval=10,
                 ckpt_interval=50),
    # The laptop study: a 4-block, 128-wide GPT on Wikitext-2, one token per byte (no BPE file, small logits).
    "small": dict(out_dir="out-gpt2-rnn-small", data="wikitext-2", tokenizer="bytes", guide="random", n_layer=4,
                  n_embd=128, align_steps=40, align_lr=3e-3, finetune_steps=10, finetune_lr=1e-3, train_steps=400,
                  batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20, eval_interval=50, log_interval=50,
                  ckpt_interval=200),
}
# -----------------------------------------------------------------------------

SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
TIKTOKEN_ENV = "GPT2_TIKTOKEN_FILE"
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXTS = ("wikitext-103", "wikitext-2")  # the --data names loaded from the Hub
GPT2_REPO = "openai-community/gpt2"


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # context: rows of the learned position embedding

    @property
    def n_head(self):
        return self.n_embd // 64


class CausalSelfAttention(nn.Module):
    """GPT-2's attention; returns one row per token, [B*T, C] (the unit CKA compares)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B * T, C))


class RNNMixer(nn.Module):
    """The replacement of one attention: two stacked Elman RNN layers (tanh), rows [B*T, C] out like the attention."""

    def __init__(self, width):
        super().__init__()
        self.rnn = nn.RNN(width, width, num_layers=2, nonlinearity="tanh", batch_first=True)

    def forward(self, x):
        y, _ = self.step(x, None)
        return y.reshape(-1, y.shape[-1])

    def step(self, x, state):
        """x [B, T, C] continuing from state ([2, B, C] or None for zeros) -> (outputs [B, T, C], new state)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.rnn(x.float(), state)


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
    """GPT-2 (nanoGPT-style, Hugging Face's parameter names): token ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def step(self, tokens, pos, states):
        """Recurrent inference: tokens [B] at position pos, given each block's RNN state (None at the start).

        Returns the next-token logits [B, vocab] and the new states; memory does
        not grow with the position. Only a converted model (every attention an
        RNNMixer) can do this.
        """
        if not all(isinstance(block.attn, RNNMixer) for block in self.transformer.h):
            raise TypeError("step/generate need every attention replaced by an RNN (a converted model)")
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
            raise ValueError(f"need a prompt of at least one token and at most {self.cfg.block_size} positions "
                             f"in all (the learned position embedding's size); asked for {length}")
        states = [None] * len(self.transformer.h)
        for pos in range(prompt.shape[1]):
            logits, states = self.step(prompt[:, pos], pos, states)
        out = [prompt]
        for pos in range(prompt.shape[1], length):
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out.append(token)
            if pos + 1 < length:
                logits, states = self.step(token[:, 0], pos, states)
        return torch.cat(out, dim=1)


# Hugging Face's GPT-2 stores these as Conv1D weights, [in, out]: nn.Linear wants them transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_from_hf_state(state, spec):
    """Our GPT holding a Hugging Face GPT-2 state dict (keys with or without the `transformer.` prefix)."""
    # The causal-mask buffers (attn.bias, attn.masked_bias) are not weights; lm_head is tied to wte.
    state = {k.removeprefix("transformer."): v.float() for k, v in state.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise common.ConfigError(f"guide {spec!r} is not a GPT-2 state dict (no wte.weight / wpe.weight)")
    vocab_size, n_embd = state["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in state if k.startswith("h.")})
    if n_embd % 64:
        raise common.ConfigError(f"guide {spec!r} is {n_embd} wide, not a multiple of GPT-2's 64-wide heads")
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
    if not os.path.isfile(path):
        raise common.ConfigError(f"--guide={path}: expected pretrained, random, or a model.safetensors / "
                                 f"pytorch_model.bin file (or a folder holding one)")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise common.ConfigError(f"reading {path!r} needs the safetensors package (pip install "
                                         f"safetensors), or use a pytorch_model.bin") from None
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except common.ConfigError:
        raise
    except Exception as e:
        raise common.ConfigError(f"could not read GPT-2 weights from {path!r} ({type(e).__name__}: {e})") from None


def load_guide(spec, n_layer=12, n_embd=768, vocab_size=50257):
    """The GPT-2 guide in eval mode: "pretrained" (GPT-2 small), "random" (of the given size), or a weights path."""
    if spec == "random":
        return GPT(GPTConfig(n_layer, n_embd, vocab_size)).eval()
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
    else:
        path = spec
    return gpt_from_hf_state(read_weights(path), spec).eval()


def build_target(arch):
    """A GPT whose every attention is an RNNMixer: the architecture a conversion ends with."""
    model = GPT(arch)
    for block in model.transformer.h:
        block.attn = RNNMixer(arch.n_embd)
    return model


def flops_per_window(model, seq_len):
    """Training FLOPs (forward and backward) of one window of seq_len tokens, as nanoGPT estimates them.

    6 N per token for the N weights it multiplies (all but the position embedding; the RNNs' included),
    plus 12 L H Q T for the attention of its L attention layers (H heads of Q dimensions over T tokens).
    """
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    attention_layers = sum(isinstance(block.attn, CausalSelfAttention) for block in model.transformer.h)
    return (6 * n + 12 * attention_layers * model.cfg.n_embd * seq_len) * seq_len


def make_stages(cfg, guide):
    """One stage per block's attention, in cfg["order"]."""
    width = guide.cfg.n_embd
    names = [f"transformer.h.{i}.attn" for i in range(guide.cfg.n_layer)]
    if cfg["order"] == "reverse":
        names = names[::-1]

    def attention_stage(name):
        def swap(hybrid):
            # Both mixers map [B, T, C] to token rows [B*T, C]; replace() checks the RNN does.
            common.replace(hybrid, name, RNNMixer(width), (cfg["seq_len"], width), (width,))

        return common.Stage(swap, compare=[(name, name)], train=[name], align_steps=cfg["align_steps"],
                            align_lr=cfg["align_lr"], finetune_steps=cfg["finetune_steps"],
                            finetune_lr=cfg["finetune_lr"])

    return [attention_stage(name) for name in names]


def load_target(path):
    """The converted model saved by a run (out_dir/target.pt), in eval mode."""
    saved = common.load_checkpoint(path)
    if not {"config", "arch", "model"} <= set(saved):
        raise common.ConfigError(f"{path!r} is not a target.pt written by gpt2_to_rnn.py")
    model = build_target(GPTConfig(**saved["arch"]))
    model.load_state_dict(saved["model"])
    return model.eval()


# -----------------------------------------------------------------------------
# tokenizer and data


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256): the offline stand-in when there is no GPT-2 BPE file."""

    n_vocab = 256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(kind, path=""):
    """tiktoken's GPT-2 encoding (from a local gpt2.tiktoken file when path or $GPT2_TIKTOKEN_FILE is set), or bytes."""
    if kind == "bytes":
        return ByteTokenizer()
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern, as tiktoken's "gpt2"

    path = path or os.environ.get(TIKTOKEN_ENV, "")
    if not path:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise common.ConfigError(
                f"could not download GPT-2's BPE for tiktoken ({type(e).__name__}); pass --tokenizer_file= (or set "
                f"{TIKTOKEN_ENV}) to a local gpt2.tiktoken, e.g. whisper/assets/gpt2.tiktoken of "
                f"`pip install --no-deps openai-whisper`") from None
    if not os.path.isfile(path):
        raise common.ConfigError(f"tokenizer file {path!r} does not exist (expected a gpt2.tiktoken file)")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path)
    except Exception as e:
        raise common.ConfigError(f"tokenizer file {path!r} is not in tiktoken's format "
                                 f"({type(e).__name__}: {e}); expected a gpt2.tiktoken file") from None
    if len(ranks) != 50256 or sorted(ranks.values()) != list(range(50256)):
        raise common.ConfigError(f"tokenizer file {path!r} holds {len(ranks)} BPE ranks, not GPT-2's 50256 "
                                 f"(0 to 50255); expected a gpt2.tiktoken file")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def generated_lines(split):
    """Made-up Wikitext-like text (headings and paragraphs of simple sentences), the same on every machine."""
    rng = np.random.default_rng(list(SPLITS).index(split))
    subjects = ["the old man", "a young woman", "the small dog", "my brother", "the king", "a tired soldier",
                "the river", "our teacher", "the black cat", "a famous writer"]
    verbs = ["sees", "finds", "follows", "remembers", "builds", "carries", "watches", "loves", "paints", "leaves"]
    objects = ["the house", "a red ball", "the long road", "an old letter", "the bright moon", "a wooden boat",
               "the garden", "a quiet village", "the broken bridge", "a golden ring"]
    tails = ["in the morning", "after the rain", "near the sea", "every day", "with great care", "before dinner",
             "in the winter of 1805", "for many years"]
    lines = []
    for chapter in range({"train": 120, "val": 12, "test": 12}[split]):
        lines += ["", f" = Chapter {chapter + 1} = \n", ""]
        for _ in range(6):
            sentences = [" ".join(words) for words in zip(*(rng.choice(ws, 5) for ws in
                                                             (subjects, verbs, objects, tails)))]
            lines.append(" " + " . ".join(sentences).capitalize() + " . \n")
    return lines


def split_lines(data, split, wikitext=None):
    """The lines of one split, newline kept, whitespace-only lines empty (the Hugging Face copy's convention)."""
    if data == "generated":
        return generated_lines(split)
    if data in WIKITEXTS:
        return wikitext[HF_SPLITS[split]]["text"]
    with open(os.path.join(data, SPLITS[split]), encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def load_wikitext(name):
    """Wikitext-103 or Wikitext-2 (raw) from the Hugging Face Hub through `datasets`."""
    import datasets

    try:
        return datasets.load_dataset(WIKITEXT_REPO, f"{name}-raw-v1")
    except Exception as e:
        raise common.ConfigError(
            f"could not load {name} ({WIKITEXT_REPO}, {name}-raw-v1) from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Offline, download the official {name}-raw-v1.zip "
            f"(https://wikitext.smerity.com/{name}-raw-v1.zip), unzip it and pass "
            f"--data=/path/to/{name}-raw") from None


def cache_folder(cfg):
    """cache_dir/<source>-<tokenizer>: a local folder is named by its base name and a hash of its absolute path."""
    source = cfg["data"]
    if source not in WIKITEXTS + ("generated",):
        path = os.path.abspath(source)
        source = f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return os.path.join(cfg["cache_dir"], f"{source}-{cfg['tokenizer']}")


def cached_tokens(path):
    """The token count of a complete cache file, or None when it is missing, half-written or truncated."""
    try:
        with open(path + ".json") as f:
            n = json.load(f)["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if os.path.isfile(path) and os.path.getsize(path) == 2 * n else None


def write_tokens(lines, encoder, path, what):
    """Encode each line, append the ids to a temporary uint16 file, then rename it into place and write its .json."""
    folder = os.path.dirname(path)
    if os.path.exists(path + ".json"):
        os.unlink(path + ".json")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".bin")
    n = 0
    try:
        with os.fdopen(fd, "wb") as f:
            lines = iter(lines)
            while chunk := list(itertools.islice(lines, 100_000)):
                ids = np.fromiter(itertools.chain.from_iterable(encoder.encode_ordinary_batch(chunk)), np.uint16)
                ids.tofile(f)
                n += len(ids)
        if n == 0:
            raise common.ConfigError(f"{what} holds no text")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    common.write_json(path + ".json", {"tokens": n})
    return n


def token_splits(cfg, ctx, log):
    """The token stream of each split (read-only uint16 memmaps); each node's first process tokenizes what the
    cache lacks (where nodes share cache_dir, the files are renamed into place whole, so that is safe too)."""
    folder = cache_folder(cfg)
    paths = {split: os.path.join(folder, f"{split}.bin") for split in SPLITS}
    if ctx.local_rank == 0:
        missing = [s for s in SPLITS if cached_tokens(paths[s]) is None]
        if missing:
            encoder = load_tokenizer(cfg["tokenizer"], cfg["tokenizer_file"])
            wikitext = load_wikitext(cfg["data"]) if cfg["data"] in WIKITEXTS else None
            os.makedirs(folder, exist_ok=True)
            for split in missing:
                t0 = time.time()
                what = f"the {split} split of {cfg['data']!r}"
                n = write_tokens(split_lines(cfg["data"], split, wikitext), encoder, paths[split], what)
                log(f"tokenized {what}: {n} tokens in {time.time() - t0:.0f} s -> {paths[split]}")
        else:
            log(f"reusing the token cache in {folder}")
    common.barrier()
    tokens = {s: np.memmap(paths[s], dtype=np.uint16, mode="r") for s in SPLITS}
    for split, t in tokens.items():
        if len(t) < cfg["seq_len"] + 1:
            raise common.ConfigError(f"the {split} split has {len(t)} tokens, fewer than one window of "
                                     f"seq_len + 1 = {cfg['seq_len'] + 1}")
    return tokens


class Windows:
    """An endless stream of batches of random (seq_len + 1)-token windows of the training tokens.

    Batch k of rank r takes its window starts from numpy's generator seeded
    with (seed, r, k), so the stream's whole position is k: a resumed run gets
    exactly the batches an uninterrupted one would have (every rank is at the
    same k, and the checkpoint keeps rank 0's).
    """

    def __init__(self, tokens, batch_size, seq_len, seed, rank):
        self.tokens, self.batch_size, self.seq_len, self.seed, self.rank = tokens, batch_size, seq_len, seed, rank
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.rank, self.count])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.count += 1
        return torch.from_numpy(np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


@torch.no_grad()
def perplexity(model, tokens, seq_len, batch_size, ctx, dtype):
    """exp(mean NLL) over the non-overlapping windows of a split, all ranks together (see the docstring)."""
    was_training = model.training
    model.eval()
    windows = list(range(ctx.rank, (len(tokens) - 1) // seq_len, ctx.world))
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for i in range(0, len(windows), batch_size):
        batch = np.stack([tokens[k * seq_len:k * seq_len + seq_len + 1] for k in windows[i:i + batch_size]])
        batch = torch.from_numpy(batch.astype(np.int64)).to(ctx.device)
        with common.autocast(ctx.device, dtype):
            logits = model(batch[:, :-1])
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        totals[1] += batch[:, 1:].numel()
    model.train(was_training)
    common.all_reduce_sum(totals)
    return math.exp(totals[0].item() / totals[1].item())


# -----------------------------------------------------------------------------


def check_config(cfg):
    choices = {"method": ("not", "naive", "guide"), "order": ("forward", "reverse"), "cka_scope": ("global", "local"),
               "optimizer": ("adamw", "sgd"), "device": ("auto", "cuda", "cpu"),
               "dtype": ("bfloat16", "float32"), "tokenizer": ("gpt2", "bytes")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise common.ConfigError(f"--{key}={cfg[key]}: expected one of {', '.join(allowed)}")
    for key in ("n_layer", "n_embd", "batch_size", "seq_len", "log_interval", "ckpt_interval"):
        if cfg[key] <= 0:
            raise common.ConfigError(f"--{key} must be positive, got {cfg[key]}")
    if cfg["seed"] < 0:
        raise common.ConfigError(f"--seed must be non-negative, got {cfg['seed']}")
    if cfg["n_embd"] % 64:
        raise common.ConfigError(f"--n_embd={cfg['n_embd']}: must be a multiple of 64 (GPT-2's heads are 64 wide)")
    if cfg["seq_len"] > GPTConfig.block_size:
        raise common.ConfigError(f"--seq_len={cfg['seq_len']}: GPT-2 reads at most {GPTConfig.block_size} tokens")
    if cfg["eval_only"] not in ("", "guide") and not os.path.isfile(cfg["eval_only"]):
        raise common.ConfigError(f"--eval_only={cfg['eval_only']}: expected 'guide' or the path of a target.pt")
    if cfg["guide"] not in ("pretrained", "random") and not os.path.exists(cfg["guide"]):
        raise common.ConfigError(f"--guide={cfg['guide']}: expected pretrained, random, or the path of a "
                                 f"model.safetensors / pytorch_model.bin (or a folder holding one)")
    if cfg["method"] == "guide" and cfg["guide"] != "random":
        raise common.ConfigError(f"--method=guide trains a guide from scratch: pass --guide=random, "
                                 f"not {cfg['guide']!r}")
    if cfg["data"] not in WIKITEXTS + ("generated",):
        if not os.path.isdir(cfg["data"]):
            raise common.ConfigError(f"--data={cfg['data']}: expected wikitext-103, wikitext-2, generated, or a "
                                     f"folder holding {', '.join(SPLITS.values())}")
        for name in SPLITS.values():
            path = os.path.join(cfg["data"], name)
            if not os.path.isfile(path):
                raise common.ConfigError(f"{path!r} is missing: --data must hold {', '.join(SPLITS.values())}")
            if os.path.getsize(path) == 0:
                raise common.ConfigError(f"{path!r} is empty")
    if cfg["tokenizer"] == "bytes":
        if cfg["tokenizer_file"]:
            raise common.ConfigError("--tokenizer_file is GPT-2's BPE: use it with --tokenizer=gpt2")
        if cfg["guide"] == "pretrained":
            raise common.ConfigError("--guide=pretrained reads GPT-2's BPE tokens: use --tokenizer=gpt2, or a guide "
                                     "of your own (random, or trained by --method=guide) with --tokenizer=bytes")
    else:
        path = cfg["tokenizer_file"] or os.environ.get(TIKTOKEN_ENV, "")
        if path:
            load_tokenizer("gpt2", path)  # a missing or foreign file stops the run here, before any work


def main(argv):
    cfg = common.parse_config(config, argv, PRESETS)
    check_config(cfg)
    ctx, log, cfg = common.start(cfg)
    vocab_size = 50257 if cfg["tokenizer"] == "gpt2" else ByteTokenizer.n_vocab

    # data
    tokens = token_splits(cfg, ctx, log)
    per_rank = cfg["batch_size"] // ctx.world

    def evaluate(model, split="val"):
        return perplexity(model, tokens[split], cfg["seq_len"], per_rank, ctx, cfg["dtype"])

    def fitting(model, what):
        if model.cfg.vocab_size != vocab_size:
            raise common.ConfigError(f"{what} has a vocabulary of {model.cfg.vocab_size}, the {cfg['tokenizer']} "
                                     f"tokenizer {vocab_size}")
        if model.cfg.block_size < cfg["seq_len"]:
            raise common.ConfigError(f"{what} reads at most {model.cfg.block_size} positions, fewer than "
                                     f"--seq_len={cfg['seq_len']}")
        return model.to(ctx.device)

    def get_guide():
        model = common.rank0_first(lambda: load_guide(cfg["guide"], cfg["n_layer"], cfg["n_embd"], vocab_size))
        return fitting(model, f"the guide {cfg['guide']!r}")

    if cfg["eval_only"]:
        model = get_guide() if cfg["eval_only"] == "guide" else fitting(load_target(cfg["eval_only"]), cfg["eval_only"])
        log(f"{cfg['eval_only']} val_ppl {evaluate(model):.2f} test_ppl {evaluate(model, 'test'):.2f}")
        common.cleanup_distributed()
        return

    guide_model = get_guide()
    batches = Windows(tokens["train"], per_rank, cfg["seq_len"], cfg["seed"], ctx.rank)

    stages = make_stages(cfg, guide_model)
    train_steps = cfg["train_steps"]
    if cfg["method"] == "guide":
        # The random guide itself is trained, no stages, for as many steps as a NoT run takes.
        train_steps, stages, cfg["eval_guide"] = common.total_grad_steps(stages, train_steps), [], False

    def task_loss(model, batch):
        batch = batch.to(ctx.device, non_blocking=True)
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    task = common.Task(loss=task_loss, inputs=lambda batch: batch[:, :-1], evaluate=evaluate, metric="val_ppl",
                       lower_is_better=True, flops_per_example=lambda model: flops_per_window(model, cfg["seq_len"]))
    t0 = time.time()
    target, results = common.convert(guide_model, stages, task, batches, cfg, ctx, train_steps, log)
    # The test split, scored once at the end for the target (and the guide).
    results["test_ppl"] = {"guide": evaluate(guide_model, "test") if cfg["eval_guide"] else None,
                           "target": evaluate(target, "test")}
    log(f"test_ppl target {results['test_ppl']['target']:.2f}"
        + (f" guide {results['test_ppl']['guide']:.2f}" if cfg["eval_guide"] else ""))
    if ctx.master:
        common.write_json(os.path.join(cfg["out_dir"], "results.json"), results)
        if cfg["method"] == "guide":
            name, saved = "pytorch_model.bin", hf_state(target)
        else:
            name, saved = "target.pt", {"config": cfg, "arch": asdict(guide_model.cfg), "model": target.state_dict()}
        common.save_atomic(saved, os.path.join(cfg["out_dir"], name))
        log(f"wrote {cfg['out_dir']}/{name} and results.json in {time.time() - t0:.0f} s")
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
