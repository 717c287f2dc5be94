"""
Network of Theseus (NoT): the method, and what every conversion script needs.

A trained, or even untrained, *guide* network becomes a different *target* architecture part by part. Each
*stage* swaps some guide modules for new target modules in the *hybrid*; only the new modules train, everything
else frozen, until the hybrid's activations at each swapped place match the guide's under linear CKA (loss
1 - CKA); then the whole hybrid is fine-tuned on the task for a few steps. After the last stage the target
trains end to end. The baseline, *naive replacement*, swaps in every target module at once and trains on the
task alone, for the same number of gradient steps.

Read in this order: 1. CKA, 2. capture and replace, 3. the method (Stage, align_step, train, convert: the
staged loop on one screen), 4. config, 5. plumbing (processes, the run, checkpoints, image and text data).
"""
import ast
import contextlib
import copy
import datetime
import gc
import hashlib
import io
import itertools
import json
import math
import os
import random
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. CKA


def textbook_cka(x, y):
    """Linear CKA as Kornblith et al. (2019) write it, in float64: X and Y hold one example per row; with the linear
    kernels K = X X^T, L = Y Y^T and the centering matrix H = I - 11^T/n, HSIC(K, L) = tr(K H L H) / (n - 1)^2 and
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), 1 for representations equal up to rotation, offset and scale.
    The reference the fast `cka` below is tested against."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype, device=x.device) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))


def cka(x, y, unbiased=False):
    """The same number as the runs compute it: differentiable, in float32 even under autocast, without forming H.

    Of two equal forms the cheaper runs: the n x n Gram matrices (fewer examples than features: image feature maps)
    or the d1 x d2 cross-covariances (tokens as examples). unbiased=True: the debiased HSIC of Song et al. (2012),
    as in Nguyen et al. (2021), n >= 4. Constant activations carry no information: CKA is then exactly 0 (the run
    warns), with finite gradients.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"cka: x has {n} examples but y has {y.shape[0]}")
    if unbiased and n < 4:
        raise ValueError(f"cka: the unbiased estimator needs at least 4 examples, got {n}")
    with torch.autocast(x.device.type, enabled=False):
        x, y = _rows(x).float(), _rows(y).float()
        d1, d2 = x.shape[1], y.shape[1]
        if n * (d1 + d2) <= d1 * d1 + d1 * d2 + d2 * d2:  # the Gram form's multiply-adds against the other's
            gram_x, gram_y = x @ x.T, y @ y.T
            sq_x, sq_y = gram_x.detach().trace(), gram_y.detach().trace()  # squared norms, for the floors
            xy, xx, yy = _hsic_gram(_center_gram(gram_x), _center_gram(gram_y), unbiased)
        else:
            sq_x, sq_y = (torch.linalg.vector_norm(t.detach()).square() for t in (x, y))
            xy, xx, yy = _hsic_features(x - x.mean(0), y - y.mean(0), unbiased)
        # A variance below float32 noise relative to the raw scale counts as constant.
        floor_x, floor_y = ((1e-6 * sq).square() + torch.finfo(torch.float32).tiny for sq in (sq_x, sq_y))
        value = xy / torch.sqrt(xx.clamp_min(floor_x) * yy.clamp_min(floor_y))
        return torch.where((xx <= floor_x) | (yy <= floor_y), torch.zeros_like(value), value)


def _rows(x):
    # CKA ignores the order of an example's features: a channels_last map is flattened in memory order (a view).
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def _center_gram(k):
    row = k.mean(dim=0, keepdim=True)  # H K H, without H
    return k - row - row.T + row.mean()


def _hsic_gram(k, l, unbiased):
    """HSIC(K, L), HSIC(K, K), HSIC(L, L) from centered Gram matrices (biased: up to a factor that cancels)."""
    if not unbiased:
        return (k * l).sum(), (k * k).sum(), (l * l).sum()
    k, l = k - torch.diag_embed(k.diagonal()), l - torch.diag_embed(l.diagonal())
    return tuple(_unbiased((a * b).sum(), a.sum(1), b.sum(1)) for a, b in ((k, l), (k, k), (l, l)))


def _unbiased(kl, k1, l1):
    # Song et al. 2012, eq. 5, from <K~, L~> and the row sums K~1, L~1 of zero-diagonal Gram matrices.
    n = k1.shape[0]
    return (kl + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2 * (k1 @ l1) / (n - 2)) / (n * (n - 3))


def _hsic_features(x, y, unbiased):
    """The same three numbers from centered activations, through d x d products: ||X^T Y||^2 = <XX^T, YY^T>."""
    if not unbiased:
        return (x.T @ y).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()
    dx, dy = x.square().sum(1), y.square().sum(1)  # the Gram diagonals

    def hsic(a, b, da, db):  # <K~, L~> = ||A^T B||^2 - the diagonal products; K~1 = A (A^T 1) - the diagonal
        return _unbiased((a.T @ b).square().sum() - (da * db).sum(), a @ a.sum(0) - da, b @ b.sum(0) - db)

    return hsic(x, y, dx, dy), hsic(x, x, dx, dx), hsic(y, y, dy, dy)


def global_cka(x, y, unbiased=False, scope="global"):
    """CKA of the global batch under DDP (scope="global"): N processes align exactly as one process holding the
    whole batch would, at the cost of an all_gather of the activations; "local": of this process's slice."""
    if scope == "global":
        x, y = gather_batch(x), gather_batch(y)
    return cka(x, y, unbiased)


# =============================================================================
# 2. capture and replace


class _Stop(Exception):
    pass


def forward_until(model, x, names):
    """The outputs of the named submodules for input x, in the order of `names`; the forward pass stops once the
    last of them has run, so what nobody reads (the rest of the network, the logits) costs nothing."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing} in {type(model).__name__}")
    outputs = {}

    def save(name):
        def hook(module, inputs, output):
            outputs.setdefault(name, output)
            if len(outputs) == len(set(names)):
                raise _Stop

        return hook

    handles = [modules[n].register_forward_hook(save(n)) for n in set(names)]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(outputs) < len(set(names)):
        raise RuntimeError(f"submodules {[n for n in names if n not in outputs]} did not run in the forward pass")
    return [outputs[n] for n in names]


def replace(model, name, make_new, example):
    """Put make_new(old, in_shape, out_shape) at the dotted `name` (e.g. "layer1.0.conv1") and return the old
    module; the shapes, batch dimension left out, are what it reads and returns when the model reads `example`."""
    old, shapes, training = model.get_submodule(name), [], model.training

    def probe(module, inputs, output):
        shapes.append((tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        raise _Stop

    handle = old.register_forward_hook(probe)
    try:
        with torch.no_grad():
            model.eval()(example)  # eval mode: no BatchNorm statistics move
    except _Stop:
        pass
    finally:
        handle.remove()
        model.train(training)
    (in_shape, out_shape), = shapes
    new = make_new(old, in_shape, out_shape).to(example.device)
    with torch.no_grad():
        got = tuple(new.eval()(torch.zeros(2, *in_shape, device=example.device)).shape[1:])
    if got != out_shape:
        raise ValueError(f"replacement for {name!r} maps input {in_shape} to {got}, but the module it replaces "
                         f"returns {out_shape}")
    model.set_submodule(name, new)
    return old


def swapped(guide, stages):
    """A copy of the guide with every stage's swap made: the target's architecture (the naive baseline's start,
    and what a saved target.pt loads into)."""
    model = copy.deepcopy(guide)
    for stage in stages:
        stage.swap(model)
    return model


# =============================================================================
# 3. the method


@dataclass
class Stage:
    """swap(hybrid) puts the stage's new target modules, freshly initialized, into the hybrid (one `replace` each,
    usually; a block-level conversion may add or remove adapters); compare: the (guide module, hybrid module) name
    pairs whose outputs CKA matches; train: the hybrid modules alignment trains, the new ones."""
    swap: Callable
    compare: list
    train: list


def align_step(guide, hybrid, stage, x, opt, cfg):
    """One alignment step: loss 1 - CKA between the hybrid's and the guide's outputs at each compared place, both
    reading x and stopping there (the hybrid's own upstream layers feed the new modules); returns each CKA."""
    names = [g for g, _ in stage.compare]
    with torch.no_grad(), autocast(x.device, cfg.dtype):
        wanted = forward_until(guide, x, names)
    with autocast(x.device, cfg.dtype):
        got = forward_until(hybrid, x, [h for _, h in stage.compare])
    similarity = torch.stack([global_cka(h, g, cfg.cka_unbiased, cfg.cka_scope) for h, g in zip(got, wanted)])
    (1 - similarity.mean()).backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    average_gradients(params)  # alignment has no DDP wrapper
    gradient_step(params, opt, cfg.grad_clip)
    return dict(zip(names, similarity.detach()))


def align(guide, hybrid, stage, i, run):
    """Stage i's alignment: its new modules learn (Adam, warmup then cosine); the rest is frozen and in eval mode,
    BatchNorm keeping its statistics while CKA, blind to scale and offset, moves the new modules' outputs."""
    cfg = run.cfg
    hybrid.to(run.device).eval().requires_grad_(False)
    new = [p for name in stage.train for p in hybrid.get_submodule(name).train().requires_grad_(True).parameters()]
    opt = make_optimizer(new, "adamw", cfg.align_lr, 0.0, run.device)
    for _ in run.steps(f"stage {i} align", cfg.align_steps, hybrid, opt, cfg.align_lr, cfg.align_steps // 10):
        x = run.task.inputs(next(run.batches)).to(run.device, non_blocking=True)
        run.log(cka=align_step(guide, hybrid, stage, x, opt, cfg))
    run.record(i, replaced=stage.train, align_steps=cfg.align_steps, **run.alignment)


def task_step(model, batch, opt, task, cfg):
    """One step of the task loss on every parameter (model may be DDP-wrapped or sharded); returns the loss."""
    with autocast(next(model.parameters()).device, cfg.dtype):
        loss = task.loss(model, batch)
    loss.backward()
    gradient_step(model.parameters(), opt, cfg.grad_clip)
    return loss.detach()


def train(model, name, steps, lr, task, run):
    """Task training of every parameter: a stage's fine-tuning, the final training, and the baselines."""
    cfg = run.cfg
    model.to(run.device).train().requires_grad_(True)
    with run.distributed(model, compile=cfg.compile and name == "train") as trained:  # DDP, or sharded
        opt = make_optimizer(trained.parameters(), cfg.optimizer, lr, cfg.weight_decay, run.device)
        for _ in run.steps(name, steps, model, opt, lr, cfg.warmup_steps if name == "train" else steps // 10):
            run.log(loss=task_step(trained, next(run.batches), opt, task, cfg))
        del trained, opt  # a sharded copy and its optimizer state must not outlive the phase


def convert(guide, stages, train_steps, task, run):
    """Network of Theseus: the guide's parts replaced stage by stage, then the target trained end to end.

    A resumed run goes through this loop again: `run` skips what was done before the restart (phases, and the work
    between them) and puts the weights back where the run stopped.
    """
    cfg = run.plan(len(stages), train_steps)
    guide.eval().requires_grad_(False)
    hybrid = copy.deepcopy(guide)
    for i, stage in enumerate(stages, 1):
        stage.swap(hybrid)                                                   # swap in fresh target modules
        align(guide, hybrid, stage, i, run)                                  # align them by 1 - CKA
        run.calibrate(guide, hybrid, stage, i)
        run.recalibrate_batchnorm(hybrid, i)                                 # statistics of their outputs
        if cfg.finetune_steps:
            run.evaluate(hybrid, i, "before_finetune")
            train(hybrid, f"stage {i} finetune", cfg.finetune_steps, cfg.finetune_lr, task, run)   # fine-tune
            run.recalibrate_batchnorm(hybrid, i)
        run.evaluate(hybrid, i)                                              # evaluate the hybrid
    train(hybrid, "train", train_steps, cfg.lr, task, run)                   # the target, end to end
    return hybrid


def total_steps(stages, cfg, train_steps):
    """Gradient steps of a NoT run (alignment, fine-tuning, final training): what every baseline takes."""
    return len(stages) * (cfg.align_steps + cfg.finetune_steps) + train_steps


def _moments(x):
    """[3, channels]: the count, sum and sum of squares over all but dimension 1 (the channels), in float64."""
    x = x.detach().transpose(0, 1).flatten(1).double()
    return torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), x.square().sum(1)])


def _mean_var(moments):
    count, total, squares = all_reduce_sum(moments)  # over all processes
    mean = total / count
    return mean, (squares - count * mean.square()) / (count - 1)


@torch.no_grad()
def batchnorm_statistics(model, batches, n, inputs, device, dtype="float32"):
    """Re-estimate every BatchNorm's running statistics from n training batches; returns how many layers it set.

    Forward passes only, in train mode (each batch normalized by its own statistics, as in training); the running
    mean and variance become those of each layer's inputs pooled over the n batches of every process, so all
    processes end with the same. No gradient step: the equal-steps rule is untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or n == 0:
        return 0
    sums = dict.fromkeys(norms, 0)
    handles = [m.register_forward_pre_hook(lambda m, args: sums.update({m: sums[m] + _moments(args[0])}))
               for m in norms]
    training = model.training
    try:
        model.train()
        for _ in range(n):
            with autocast(device, dtype):
                model(inputs(next(batches)).to(device, non_blocking=True))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    for m in norms:
        mean, var = _mean_var(sums[m])
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return len(norms)


@torch.no_grad()
def calibration(guide, hybrid, stage, batches, n, inputs, device, dtype="float32"):
    """Fold into each compared new module's last Linear the per-channel scale and offset that give its output, on n
    batches, the guide's per-channel mean and standard deviation there (CKA ignores both; frozen layers downstream
    would compound them). The module's output must be that Linear's output, reshaped channel-major."""
    for guide_name, hybrid_name in stage.compare:
        linears = [m for m in hybrid.get_submodule(hybrid_name).modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"--calibrate: {hybrid_name!r} has no Linear to fold a scale and offset into")
        moments = 0
        for _ in range(n):
            x = inputs(next(batches)).to(device, non_blocking=True)
            with autocast(device, dtype):
                pair = forward_until(guide, x, [guide_name]) + forward_until(hybrid, x, [hybrid_name])
            if pair[0].shape[1] != pair[1].shape[1]:
                raise ConfigError(f"--calibrate: {hybrid_name!r} has {pair[1].shape[1]} channels, the guide's "
                                  f"{guide_name!r} {pair[0].shape[1]}")
            moments = moments + torch.stack([_moments(t) for t in pair])
        (guide_mean, guide_var), (mean, var) = _mean_var(moments[0]), _mean_var(moments[1])
        scale = (guide_var / var.clamp_min(1e-24)).sqrt()
        linear = linears[-1]
        scale, shift = (t.repeat_interleave(linear.out_features // len(t)).float()
                        for t in (scale, guide_mean - scale * mean))
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
        linear.weight.mul_(scale[:, None])
        linear.bias.mul_(scale).add_(shift)


def make_optimizer(params, kind, lr, weight_decay, device):
    """AdamW or SGD with Nesterov momentum; weight decay on matrices and kernels, not on biases and norms."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def gradient_step(params, opt, clip):
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lr_at(step, steps, peak, warmup):
    """Linear warmup for `warmup` steps, then cosine decay to zero at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0)))


# =============================================================================
# 4. config


class ConfigError(SystemExit):
    """Bad user input: exits with the message, before any long work starts."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# Every script's settings; a script's SETTINGS add its own and may change these defaults. Each is a flag.
SETTINGS = dict(
    out_dir="",  # checkpoint, results.json and target.pt; "" = out-<script> (out-<script>-<preset> with a preset)
    resume=False,  # continue the run in out_dir from its last checkpoint
    eval_only="",  # "guide", or the path of a target.pt: evaluate it and exit
    guide="pretrained",  # "pretrained", "random" (untrained), or a path (the script says of what)
    method="not",  # "not": NoT; "naive": every target module at once, task loss only; "guide": train the guide's
    # architecture from scratch (--guide=random), to be --guide= of later runs. All take NoT's gradient steps.
    order="forward",  # the stages' order: "forward" (first part first) or "reverse"
    align_steps=1000,  # CKA alignment steps per stage: the paper's ~1,000; at laptop scale CKA plateaued by 40 (ViT)
    # to 100 (ResNet-18) steps of batch 64 and still rose at 200 for an RNN (docs/study.md): 1000 keeps that margin
    align_lr=1e-3,  # peak learning rate of the new modules in alignment (Adam, warmup then cosine)
    finetune_steps=100,  # task steps of the whole hybrid after each stage's alignment (0: none): they repair the
    # scale and rotation CKA leaves free; 100 is 10% of the alignment, the laptop study a quarter
    finetune_lr=1e-4,  # their peak learning rate
    bn_recal_batches=20,  # training batches that re-estimate BatchNorm statistics after each alignment and each
    # fine-tuning (forward passes only; 0: off), and that fit the calibration: 20 lifted the median ResNet-18 stage
    # from 22% to 81% of the guide at laptop scale; at batch 256 that is 5,120 images, 800 forward passes a run
    calibrate="auto",  # fold a per-channel scale and offset into each new module after its alignment: "on", "off",
    # or "auto": on when finetune_steps=0, where nothing else repairs the scale CKA leaves free
    cka_scope="global",  # "global": CKA of the batch of all processes; "local": of each process's slice
    cka_unbiased=False,  # the debiased HSIC estimator in CKA
    batch_size=256,  # the global batch, split evenly over the processes
    optimizer="adamw",  # of the task training: "adamw" or "sgd"
    lr=1e-3,  # peak learning rate of the final training and of the baselines
    weight_decay=0.05,
    warmup_steps=2500,  # linear warmup of the final training, then cosine decay to zero
    grad_clip=1.0,  # gradient norm clip; 0: off
    eval_guide=True,  # measure the guide first (Table 1's guide column)
    eval_interval=0,  # validations during the final training every this many steps (results.json "evals")
    log_interval=50,
    ckpt_interval=1000,
    device="auto",  # "auto" (CUDA when present), "cuda" or "cpu"
    dtype="bfloat16",  # autocast dtype on CUDA ("float32": none); CPU runs float32
    seed=0,  # seeds everything (data order, initialization, augmentation), alike on every process
    compile=False,  # torch.compile the final training's model (not alignment: its forward passes stop early)
    preset="",  # one of the script's PRESETS, applied before the flags
)
# Settings a resumed run may change (they do not change what it computes); the rest must match its checkpoint.
RESUMABLE = {"resume", "log_interval", "ckpt_interval", "compile", "workers", "cache_dir", "tokenizer_file"}


def positive(value):
    return "" if value > 0 else "must be positive"


def non_negative(value):
    return "" if value >= 0 else "must not be negative"


# Each setting's allowed values, or a function saying what is wrong with a value ("" if nothing).
CHECKS = dict(method=("not", "naive", "guide"), order=("forward", "reverse"), calibrate=("auto", "on", "off"),
              cka_scope=("global", "local"), optimizer=("adamw", "sgd"), device=("auto", "cuda", "cpu"),
              dtype=("bfloat16", "float32"), tokenizer=("gpt2", "bytes"), batch_size=positive,
              log_interval=positive, ckpt_interval=positive, image_size=positive, num_classes=positive,
              seq_len=positive, align_steps=non_negative, finetune_steps=non_negative, bn_recal_batches=non_negative,
              eval_interval=non_negative, epochs=non_negative, seed=non_negative, train_steps=non_negative,
              workers=non_negative, synthetic_shift=non_negative)


def configure(settings, argv, presets=None, checks=None):
    """The run's settings as attributes (cfg.lr): SETTINGS, then the script's `settings`, then --preset=NAME, then
    the --key=value flags, every value checked (CHECKS, and the script's `checks`) before any work."""
    cfg = parse_flags({**SETTINGS, **settings}, argv, presets)
    for key, check in {**CHECKS, **(checks or {})}.items():
        if key in cfg and isinstance(check, tuple) and cfg[key] not in check:
            raise ConfigError(f"--{key}={cfg[key]}: expected one of {', '.join(map(str, check))}")
        if key in cfg and callable(check) and check(cfg[key]):
            raise ConfigError(f"--{key} {check(cfg[key])}, got {cfg[key]}")
    if cfg["method"] == "guide" and cfg["guide"] != "random":
        raise ConfigError(f"--method=guide trains a guide from scratch: pass --guide=random, not {cfg['guide']!r}")
    if cfg["eval_only"] not in ("", "guide") and not os.path.isfile(cfg["eval_only"]):
        raise ConfigError(f"--eval_only={cfg['eval_only']}: expected 'guide' or the path of a target.pt")
    return SimpleNamespace(**cfg)


def parse_flags(defaults, argv, presets=None):
    """A copy of `defaults`, overridden by presets[NAME] for --preset=NAME, then by the --key=value flags: Python
    literals (`--lr=3e-4`, `--resume=True`) or bare strings (`--guide=random`), each of its default's type (an int
    is taken for a float), as in nanoGPT's configurator."""
    presets, flags = presets or {}, []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(defaults))}")
        flags.append((key, text))
    cfg = dict(defaults)
    for key, name in flags:
        if key == "preset":
            if name not in presets:
                raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(presets))}")
            unknown = sorted(set(presets[name]) - set(defaults))
            if unknown:
                raise ConfigError(f"preset {name!r} sets unknown config keys {unknown}")
            cfg.update({k: _typed(k, v, repr(v), defaults[k]) for k, v in presets[name].items()}, preset=name)
    for key, text in flags:
        if key != "preset":
            value = text
            if not isinstance(defaults[key], str):
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    pass
            if isinstance(defaults[key], bool) and text.lower() in ("true", "false"):
                value = text.lower() == "true"
            cfg[key] = _typed(key, value, text, defaults[key])
    return cfg


def _typed(key, value, text, default):
    if type(default) is float and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"--{key}={text}: expected a {type(default).__name__} like the default {default!r}")
    return value


# =============================================================================
# 5. plumbing: processes, the run (its position, log, checkpoints, results), image and text data


@dataclass
class Context:
    """Where this process runs: its rank among `world` processes (local_rank on its node), its device, the
    script it runs; log() prints on rank 0 only."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    script: str = ""

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args):
        if self.master:
            print(*args, flush=True)


def start(cfg, script):
    """Every script's preamble, before long work: out_dir named and checked, the processes joined (torchrun's RANK,
    LOCAL_RANK, WORLD_SIZE; NCCL on CUDA, gloo on CPU), every process seeded alike, TF32 on."""
    name = os.path.splitext(os.path.basename(script))[0]
    cfg.out_dir = cfg.out_dir or f"out-{name}" + (f"-{cfg.preset}" if cfg.preset else "")
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and not cfg.eval_only and not os.path.isfile(ckpt):
        raise ConfigError(f"--resume=True but there is no checkpoint at {ckpt!r}")
    if not cfg.resume and not cfg.eval_only and os.path.exists(ckpt):
        raise ConfigError(f"{cfg.out_dir!r} already holds a run (ckpt.pt); pass --resume=True to continue it, or "
                          f"choose another --out_dir")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    ctx = Context(device=torch.device(device), script=os.path.basename(script))
    if "RANK" in os.environ:
        ctx.rank, ctx.local_rank, ctx.world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device == "cuda":
            ctx.device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(ctx.device)
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                device_id=ctx.device if device == "cuda" else None)
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by {ctx.world} processes")
    seed_everything(cfg.seed)  # alike on every process: new modules must start identical on all of them
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        cfg.dtype = "float32"
    return ctx


def rank0_first(load):
    """load() on each node's first process, then on the others: one download per node, the rest read its cache."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()
    result = load()
    if dist.is_initialized() and first:
        dist.barrier()
    return result


def finish_processes():
    if dist.is_initialized():
        dist.barrier()  # gloo may abort a process that leaves while another still works (rank 0 saving)
        dist.destroy_process_group()


def autocast(device, dtype):
    """bf16 autocast on CUDA (float16 would need loss scaling, so it is not offered); none on CPU."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward is this rank's slice of the summed gradient: every rank computes the
    same loss of the whole batch, so the sum is world x the true gradient, which averaging divides out."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_sum(grad.contiguous())
        return grad[dist.get_rank() * ctx.n:(dist.get_rank() + 1) * ctx.n]


def gather_batch(x):
    """The global batch of an activation (every rank's rows, in rank order), differentiable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def average_gradients(params):
    """Average .grad over the processes: DDP's job, by hand where there is no DDP wrapper."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.is_initialized() and dist.get_world_size() > 1 and grads:
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


@dataclass
class Task:
    """What a script tells the run of its task: loss(model, batch), the training loss; inputs(batch), the model's
    input in a batch; evaluate(model), the metric on the validation set, all processes together; and, for the
    log's model FLOPs utilization, flops_per_example(model), training FLOPs of one example (None: no MFU)."""
    loss: Callable
    inputs: Callable
    evaluate: Callable
    metric: str
    lower_is_better: bool = False
    flops_per_example: Callable = None


class Run:
    """Where a run is, what it recorded, and how it logs, validates and saves: all of it in every checkpoint.

    The staged loop asks run.steps() for each phase's steps, in order, and phases are numbered as they come. A
    resumed run goes through the loop again: until it reaches the phase it was saved in, steps() yields nothing
    and calibrate, recalibrate_batchnorm, evaluate and record do nothing (what they found is in the checkpoint);
    there the weights, the optimizer, the data position and every process's RNG come back.
    """

    def __init__(self, cfg, ctx, task, batches, shard=None):
        self.cfg, self.ctx, self.task, self.batches, self.shard = cfg, ctx, task, batches, shard
        self.device, self.log_line, self.path = ctx.device, ctx.log, os.path.join(cfg.out_dir, "ckpt.pt")
        self.phase, self.grad_steps, self.records, self.evals, self.guide_metric = 0, 0, [], [], None
        self.saved, self.sharded, self.warned, self.values, self.alignment = None, None, set(), {}, {}
        self.stages, self.phases = 0, None  # the plan: how many stages, and every phase's (kind, steps)
        # For the time left: {kind: {phase: seconds per step}}, and (phase, seconds) of the work between phases.
        self.started, self.rates, self.gaps, self.phase_end = time.time(), {}, [], None
        if cfg.resume:
            self.saved = load_checkpoint(self.path)
            changed = sorted(k for k, v in vars(cfg).items() if k not in RESUMABLE and self.saved["config"].get(k) != v)
            if changed:
                raise ConfigError("--resume with settings that differ from the checkpoint's: " + ", ".join(
                    f"{k} (was {self.saved['config'].get(k)!r}, now {vars(cfg)[k]!r})" for k in changed))
            self.grad_steps, self.records, self.evals, self.guide_metric = self.saved["run"]
            self.log_line(f"resuming {self.path} at phase {self.saved['phase']} step {self.saved['step']}")
        elif ctx.master:
            os.makedirs(cfg.out_dir, exist_ok=True)

    def plan(self, stages, train_steps):
        """What convert will do (for the log's stage count and time left); returns the settings."""
        per_stage = [("align", self.cfg.align_steps)] + [("finetune", self.cfg.finetune_steps)] * bool(
            self.cfg.finetune_steps)
        self.stages, self.phases = stages, per_stage * stages + [("train", train_steps)]
        return self.cfg

    def steps(self, name, steps, model, opt, lr, warmup):
        """The step numbers of one phase (from where a resumed run stopped), each with its learning rate set
        (linear warmup, then cosine decay to zero); logs, validates and saves checkpoints between them."""
        phase, self.phase, start = self.phase, self.phase + 1, 0
        if self.saved is not None and phase < self.saved["phase"]:
            return
        if self.saved is not None:
            start = self._restore(model, opt)
        else:
            self._save(phase, 0, model, opt)
        kind = "align" if "align" in name else "finetune" if "finetune" in name else "train"
        self.values, self.alignment, window, last, curve = {}, {}, [], deque(maxlen=10), []
        flops = self.task.flops_per_example(model) if self.task.flops_per_example and kind != "align" else 0
        if self.phase_end is not None:
            self.gaps.append((phase, time.time() - self.phase_end))
        t0 = t_logged = time.time()
        step_logged = start
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            yield step
            self.grad_steps += 1
            now = time.time()
            self.rates.setdefault(kind, {})[phase] = (now - t0) / (step + 1 - start)
            if "cka" in self.values:
                window.append(torch.stack(list(self.values["cka"].values())))
                last.append(window[-1])
                if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == steps:  # a point of the CKA curve
                    curve.append([step + 1, dict(zip(self.values["cka"], torch.stack(window).mean(0).tolist()))])
                    self._warn_degenerate(name, torch.stack(window))
                    window = []
            if (step + 1) % self.cfg.log_interval == 0 or step + 1 == steps:
                dt, t_logged, step_logged = (now - t_logged) / (step + 1 - step_logged), now, step + 1
                left = self._left(phase, kind, steps - step - 1)
                self.log_line(f"{name} step {step + 1}/{steps} | {self._values()} | lr {group['lr']:.2e} | "
                              f"{dt * 1000:.1f} ms/step | {self.cfg.batch_size / dt:.0f} samples/s"
                              + _mfu(flops, self.cfg.batch_size / self.ctx.world / dt, self.device)
                              + f" | {_clock(now - self.started)} elapsed, {_clock(left)} left")
            validate = kind == "train" and self.cfg.eval_interval and (step + 1) % self.cfg.eval_interval == 0
            if validate and step + 1 < steps:
                self.evals.append([self.grad_steps, self.evaluate(model)])
                self.log_line(f"{name} step {step + 1}/{steps} | {self.task.metric} {self.evals[-1][1]:.4f}")
            if (step + 1) % self.cfg.ckpt_interval == 0 and step + 1 < steps:
                self._save(phase, step + 1, model, opt)
        if "cka" in self.values:
            self.alignment = {"cka": dict(zip(self.values["cka"], torch.stack(list(last)).mean(0).tolist())),
                              "cka_curve": curve}
        self.phase_end = time.time()

    def log(self, **values):
        """This step's values for the log line: the loss, or each compared place's CKA."""
        self.values = values

    def _values(self):
        if "cka" not in self.values:
            return f"loss {self.values['loss'].item():.4f}"
        cka = {k: v.item() for k, v in self.values["cka"].items()}
        return f"loss {1 - sum(cka.values()) / len(cka):.4f} | cka " + " ".join(f"{k} {v:.4f}" for k, v in cka.items())

    def _warn_degenerate(self, name, window):
        for place in (p for p, floor in zip(self.values["cka"], (window == 0).any(0).tolist()) if floor):
            if (name, place) not in self.warned:
                self.warned.add((name, place))
                self.log_line(f"warning: {name}: the CKA of {place} is exactly 0 (constant activations, CKA's "
                              f"degenerate floor): it gives no gradient, and this stage learns nothing there")

    def _left(self, phase, kind, steps_left):
        """Seconds left in the run: the steps left of each phase at its kind's seconds per step, and the work between
        phases, each extrapolated along the phases so far by a least-squares line (costs drift as the hybrid
        changes); a kind before its first phase takes the nearest kind's."""
        nearest = {"align": ("align", "finetune", "train"), "finetune": ("finetune", "train", "align"),
                   "train": ("train", "finetune", "align")}
        left = [(phase, kind, steps_left)] + [(p, k, n) for p, (k, n) in enumerate(self.phases or []) if p > phase]
        seconds = sum(n * _trend(list(next(self.rates[k] for k in nearest[later] if k in self.rates).items()), p)
                      for p, later, n in left)
        return seconds + sum(_trend(self.gaps, p + 1) for p, _, _ in left if self.gaps)

    def record(self, stage, **fields):
        """Add fields to the stage's entry in results.json."""
        if self.saved is None:
            while len(self.records) < stage:
                self.records.append({"stage": len(self.records) + 1})
            self.records[stage - 1].update(fields)

    def evaluate(self, model, stage=None, when=""):
        """The task metric of model; with a stage, recorded as the stage's metric (or its metric `when`)."""
        if self.saved is not None:
            return None
        if self.sharded is not None:
            _copy_shards(self.sharded, model)
        value = self.task.evaluate(model)
        if stage is not None:
            self.record(stage, **{f"{self.task.metric}_{when}" if when else self.task.metric: value})
            cka = {} if when else self.records[stage - 1].get("cka", {})
            cka = " | cka " + " ".join(f"{k} {v:.4f}" for k, v in cka.items()) if cka else ""
            self.log_line(f"stage {stage}/{self.stages} {when.replace('_', ' ') or 'done'} | {self.task.metric} "
                          f"{value:.4f}{cka}")
        return value

    def evaluate_guide(self, guide):
        if self.cfg.eval_guide and self.saved is None:
            self.guide_metric = self.task.evaluate(guide)
            self.log_line(f"guide {self.task.metric} {self.guide_metric:.4f}")

    def recalibrate_batchnorm(self, hybrid, stage):
        if self.saved is None:
            layers = batchnorm_statistics(hybrid, self.batches, self.cfg.bn_recal_batches, self.task.inputs,
                                          self.device, self.cfg.dtype)
            self.record(stage, bn_recal_batches=self.cfg.bn_recal_batches if layers else 0)

    def calibrate(self, guide, hybrid, stage, i):
        if self.saved is None and (self.cfg.calibrate == "on" or self.cfg.calibrate == "auto" and not
                                   self.cfg.finetune_steps):
            calibration(guide, hybrid.eval(), stage, self.batches, max(self.cfg.bn_recal_batches, 1),
                        self.task.inputs, self.device, self.cfg.dtype)
            self.record(i, calibrated=True)

    @contextlib.contextmanager
    def distributed(self, model, compile=False):
        """The model a task phase trains: model itself, DDP around it, or (with the script's `shard`, several
        processes) a sharded copy whose weights come back into model at the end."""
        skipped = self.saved is not None and self.phase < self.saved["phase"]  # a phase a resumed run skips
        sharded = self.shard is not None and self.ctx.world > 1 and not skipped
        trained = self.shard(copy.deepcopy(model)) if sharded else model
        wrapped = torch.compile(trained) if compile else trained
        if self.ctx.world > 1 and not sharded:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[self.ctx.local_rank] if self.device.type == "cuda" else None)
        self.sharded = trained if sharded else None
        yield wrapped
        if sharded:  # fully_shard's hooks hold the copy in reference cycles: free its shards and optimizer now
            _copy_shards(trained, model)
            self.sharded = None
            del trained, wrapped
            gc.collect()

    def _save(self, phase, step, model, opt):
        """The one checkpoint dict: the position, what the run recorded, the weights, the phase's optimizer (None:
        a fresh one), the data position and every process's RNG."""
        optimizer = opt.state_dict() if opt is not None and opt.state else None
        if self.sharded is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            _copy_shards(self.sharded, model)
            if optimizer is not None:
                optimizer = get_optimizer_state_dict(self.sharded, opt, options=StateDictOptions(full_state_dict=True))
        rngs = [None] * self.ctx.world
        if dist.is_initialized():
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if self.ctx.master:
            save_atomic({"config": vars(self.cfg), "phase": phase, "step": step, "model": model.state_dict(),
                         "run": [self.grad_steps, self.records, self.evals, self.guide_metric],
                         "optimizer": optimizer, "batches": self.batches.state_dict(), "rng": rngs}, self.path)
        self.write_results(None, "running")

    def _restore(self, model, opt):
        ckpt, self.saved = self.saved, None
        model.load_state_dict(ckpt["model"])
        if self.sharded is not None:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.sharded, ckpt["model"], options=full)
            if ckpt["optimizer"] is not None:
                set_optimizer_state_dict(self.sharded, opt, ckpt["optimizer"], options=full)
        elif ckpt["optimizer"] is not None:
            opt.load_state_dict(ckpt["optimizer"])
        self.batches.load_state_dict(ckpt["batches"])
        _set_rng_state(ckpt["rng"][self.ctx.rank])
        return ckpt["step"]

    def finish(self, model):
        """The final metric, a last checkpoint, and results.json marked done; returns the results."""
        if self.saved is not None:  # a finished run resumed: nothing was left to do
            model.load_state_dict(self.saved["model"])
            self.saved = None
        final = self.task.evaluate(model)
        self._save(self.phase, 0, model, None)
        self.evals.append([self.grad_steps, final])
        self.log_line(f"final {self.task.metric} {final:.4f} after {self.grad_steps} gradient steps, "
                      f"{_clock(time.time() - self.started)} elapsed")
        return self.write_results(final, "done")

    def write_results(self, final, status):
        """results.json: the config, each stage's record, the final and the validation-selected metric."""
        best = (min if self.task.lower_is_better else max)(self.evals, key=lambda e: e[1]) if self.evals else None
        results = {"script": self.ctx.script, "status": status, "config": vars(self.cfg),
                   "guide_metric": self.guide_metric, "stages": self.records,
                   "metric": {"name": self.task.metric, "value": final, "lower_is_better": self.task.lower_is_better},
                   "grad_steps": self.grad_steps, "evals": self.evals,
                   "best": {"value": best[1], "step": best[0]} if best else None,
                   "seconds": time.time() - self.started}  # this process's wall time (since a restart, if resumed)
        if self.ctx.master:
            write_json(os.path.join(self.cfg.out_dir, "results.json"), results)
        return results


def _trend(points, x):
    """The least-squares line through points (x, y) at x, kept within half the smallest and 1.5 times the largest
    y seen; their mean while fewer than 5 (a line through a few noisy points swings far)."""
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(points) < 5 or np.ptp(xs) == 0:
        return float(ys.mean())
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(np.clip(slope * x + intercept, 0.5 * ys.min(), 1.5 * ys.max()))


def _clock(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))


# Dense bf16 peak FLOP/s by a part of torch.cuda.get_device_name's answer; the first match wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device):
    """The bf16 peak FLOP/s of the card in use, for MFU; None on CPU and on cards not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    return next((flops for part, flops in PEAK_FLOPS if part in torch.cuda.get_device_name(device)), None)


def _mfu(flops, examples_per_s, device):
    # nanoGPT's model FLOPs utilization: this process's FLOP/s over its card's peak.
    if not flops:
        return ""
    peak = peak_flops(device)
    return f" | mfu {100 * flops * examples_per_s / peak:.1f}%" if peak else " | mfu n/a"


@torch.no_grad()
def _copy_shards(sharded, model):
    """The sharded copy's weights, gathered, into model, with rank 0's buffers (as DDP broadcasts them)."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for name, p in sharded.named_parameters():
        params[name].copy_(p.full_tensor())
    for name, b in sharded.named_buffers():
        dist.broadcast(b, 0)
        buffers[name].copy_(b)


def _rng_state():
    # Python values only: they travel through all_gather_object and load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tobytes(), pos, has_gauss, cached),
             "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8))


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, renamed onto it when the block succeeds: a crash leaves the old file or the
    new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes the file private; give it the permissions a plain open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_atomic(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, keys=(), what="checkpoint"):
    """torch.load a file these scripts wrote, with a clear message when it is missing, foreign, or lacks keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path!r} could not be read ({type(e).__name__}: {e}); is it a truncated or "
                          f"foreign file?") from None
    if keys and not (isinstance(saved, dict) and set(keys) <= set(saved)):
        raise ConfigError(f"{path!r} is not a {what} written by these scripts (it lacks {', '.join(keys)})")
    return saved


def state_dict_mismatch(state, expected):
    """Why `state` would not load into a model whose state dict is `expected` (nothing when it fits)."""
    problems = []
    for what, keys in (("missing keys", [k for k in expected if k not in state]),
                       ("unexpected keys", [k for k in state if k not in expected]),
                       ("wrong shapes", [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                                         for k, v in expected.items() if k in state and state[k].shape != v.shape])):
        if keys:
            problems.append(f"{what} {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else ""))
    return problems


# -----------------------------------------------------------------------------
# images: ImageNet folders or generated images, a resumable stream of batches, top-1

IMAGE_SETTINGS = dict(  # the image scripts' settings, over SETTINGS
    data_dir="",  # ImageNet root holding train/ and val/ (one folder per class); "" = generated images
    epochs=100,  # final end-to-end training, in passes over the training set
    label_smoothing=0.1,
    image_size=224,  # the crop size, for ImageNet too
    num_classes=10,  # generated images: classes, examples, and how far (pixels) each moves its class pattern
    synthetic_train=10000,
    synthetic_val=1000,
    synthetic_shift=0,
    workers=8,  # DataLoader processes per GPU
    decode="auto",  # ImageNet folders: "pil" (PIL and torchvision's transforms in the workers), "cpu" (torchvision.io
    # and transforms.v2 on uint8 tensors in the workers), "gpu" (the workers read the files, the main process decodes
    # them with nvjpeg and crops on the GPU); "auto": gpu on CUDA, else cpu
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_data(cfg, ctx, interpolation="bilinear"):
    """(train set, val set, number of classes): ImageNet folders when cfg.data_dir is set, else generated images
    (the same for every --seed: seeds vary the runs, not the task)."""
    if cfg.data_dir:
        decode = ("gpu" if ctx.device.type == "cuda" else "cpu") if cfg.decode == "auto" else cfg.decode
        if decode == "gpu" and ctx.device.type != "cuda":
            raise ConfigError("--decode=gpu decodes with nvjpeg on CUDA; on CPU use --decode=cpu or pil")
        classes = check_image_folders(cfg.data_dir)
        train_set, val_set = (ImageFiles(os.path.join(cfg.data_dir, split), split == "train", cfg.image_size,
                                         interpolation, decode, ctx) for split in ("train", "val"))
        ctx.log(f"data: {len(train_set)} training and {len(val_set)} validation images of {len(classes)} classes in "
                f"{cfg.data_dir}, decoded by {decode} ({cfg.workers} workers per process)")
        return train_set, val_set, len(classes)
    if cfg.synthetic_shift >= cfg.image_size:
        raise ConfigError(f"--synthetic_shift={cfg.synthetic_shift}: expected 0 to image_size - 1")
    if cfg.guide == "pretrained":
        raise ConfigError("generated images (empty --data_dir) have their own classes; use --guide=random (or a "
                          "checkpoint path) with them, or give --data_dir")
    return (*synthetic_images(cfg.synthetic_train, cfg.synthetic_val, cfg.num_classes, cfg.image_size,
                              cfg.synthetic_shift), cfg.num_classes)


def check_image_folders(data_dir):
    """Stop with a clear message unless data_dir holds train/ and val/ with the same non-empty class folders."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data_dir {data_dir!r} is not a folder (expected train/ and val/ inside)")
    classes = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise ConfigError(f"{root!r} is missing: data_dir must hold train/ and val/, one folder per class")
        classes[split] = sorted(e.name for e in os.scandir(root) if e.is_dir())
        empty = [c for c in classes[split] if not any(os.scandir(os.path.join(root, c)))]
        if not classes[split] or empty:
            raise ConfigError(f"{root!r} holds no class folders" if not empty else
                              f"class folders without images in {root!r}: {empty[:5]}")
    train, val = set(classes["train"]), set(classes["val"])
    if train != val:
        raise ConfigError(f"train/ and val/ class folders differ in {data_dir!r}: only in train "
                          f"{sorted(train - val)[:5]}, only in val {sorted(val - train)[:5]}")
    return classes["train"]


class ImageFiles(torch.utils.data.Dataset):
    """An ImageFolder's images (train: RandomResizedCrop, scale (0.08, 1), ratio (3/4, 4/3), and a flip of one half;
    evaluation: a resize to image_size * 256 / 224 and a center crop, as torchvision's references), decoded by
    `decode` (see IMAGE_SETTINGS). Items are (image, label, crop, path, note); `collate` batches them, `prepare` turns
    a batch into the model's normalized input on the device.

    Files nvjpeg cannot decode (grayscale and CMYK JPEGs, other formats under a .JPEG name) are decoded on the
    CPU and named in the log; a file nothing can decode stops the run with its name.
    """

    def __init__(self, root, train, image_size, interpolation, decode, ctx):
        from torchvision import datasets

        self.samples = datasets.ImageFolder(root, loader=lambda path: path).samples
        self.train, self.size, self.decode, self.ctx, self.seen = train, image_size, decode, ctx, set()
        self.interpolation, self.resize = interpolation, round(image_size * 256 / 224)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision import transforms
        from torchvision.io import ImageReadMode, decode_image

        path, label = self.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        note = ""
        try:
            if self.decode == "pil":
                return self._pil(data), label, torch.zeros(5), path, note
            header = _jpeg_header(data)
            if self.decode == "gpu" and header and header[2] == 3:
                image, (height, width) = torch.frombuffer(bytearray(data), dtype=torch.uint8), header[:2]
            else:  # the CPU decodes it: every file with --decode=cpu, the odd ones with --decode=gpu
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                height, width = image.shape[1:]
                if self.decode == "gpu":
                    what = f"a JPEG of {header[2]} components" if header else "not a JPEG"
                    note = f"decoded on the CPU ({what}): {path}"
        except Exception as e:
            return torch.zeros(0, dtype=torch.uint8), label, torch.zeros(5), path, f"error: cannot decode {path} ({e})"
        crop = torch.zeros(5)
        if self.train:  # torchvision's own parameters, drawn here, in the worker, from its seeded generator
            crop = torch.tensor([*transforms.RandomResizedCrop.get_params(torch.empty(0, height, width),
                                                                          (0.08, 1.0), (3 / 4, 4 / 3)),
                                 float(torch.rand(1) < 0.5)])
        if self.decode == "cpu":
            image = self.crop(image, crop)
        return image, label, crop, path, note

    def _pil(self, data):
        from PIL import Image
        from torchvision import transforms

        mode = transforms.InterpolationMode(self.interpolation)
        if self.train:
            steps = [transforms.RandomResizedCrop(self.size, interpolation=mode), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(self.resize, interpolation=mode), transforms.CenterCrop(self.size)]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return transforms.Compose(steps + [transforms.PILToTensor()])(image)

    def crop(self, image, crop):
        """A uint8 [3, H, W] image, on any device, cropped and resized to image_size x image_size."""
        from torchvision.transforms.v2 import functional as F2

        if not self.train:
            return F2.center_crop(F2.resize(image, [self.resize], self.interpolation), [self.size, self.size])
        top, left, height, width, flip = crop.tolist()
        image = F2.resized_crop(image, int(top), int(left), int(height), int(width), [self.size, self.size],
                                self.interpolation)
        return F2.horizontal_flip(image) if flip else image

    def collate(self, items):
        images, labels, crops, paths, notes = zip(*items)
        if self.decode != "gpu" and all(image.dim() == 3 for image in images):
            images = torch.stack(images)
        return images, torch.tensor(labels), torch.stack(crops), list(paths), list(notes)

    def prepare(self, batch, device):
        """The batch's images as the model reads them: on the device, float, normalized with ImageNet's statistics."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images, _, crops, paths, notes = batch
        for note in notes:
            if note.startswith("error"):
                raise ConfigError(note[len("error: "):])
            if note and note not in self.seen:
                self.seen.add(note)
                self.ctx.log(note)
        if self.decode == "gpu":
            compressed = [i for i, image in enumerate(images) if image.dim() == 1]
            try:
                decoded = decode_jpeg([images[i] for i in compressed], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # which file: decode them one by one
                for i in compressed:
                    try:
                        decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device)
                    except RuntimeError as e:
                        raise ConfigError(f"cannot decode {paths[i]} ({e})") from None
                raise
            images = list(images)
            for i, image in zip(compressed, decoded):
                images[i] = image
            images = torch.stack([self.crop(image.to(device), crop) for image, crop in zip(images, crops)])
        mean, std = (torch.tensor(v, device=device).view(3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (images.to(device, non_blocking=True).float() - mean) / std


def _jpeg_header(data):
    """(height, width, components) from a JPEG's frame header; None for anything that is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        i += 2 + length
    return None


def synthetic_images(num_train, num_val, num_classes, image_size, shift=0, seed=0):
    """Learnable generated images for offline runs: a fixed smooth pattern per class, under noise. With shift > 0
    each image rolls its pattern by up to `shift` pixels each way (wrapping around): a convolution sees the same
    pattern anywhere, a fully connected layer must learn each position apart."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear",
                             align_corners=False)

    def make(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        images = patterns[labels]
        if shift:
            offsets = torch.randint(-shift, shift + 1, (n, 2), generator=g).tolist()
            images = torch.stack([img.roll((dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(images, offsets)])
        return torch.utils.data.TensorDataset(images + 1.5 * torch.randn(n, 3, image_size, image_size, generator=g),
                                              labels)

    return make(num_train), make(num_val)


class Batches:
    """An endless stream of this process's training batches whose position checkpoints keep: each epoch is one
    pass of a DistributedSampler (this process's share of a seeded shuffle, the same after a restart)."""

    def __init__(self, dataset, cfg, ctx):
        self.dataset, self.per_rank, self.seed, self.ctx = dataset, cfg.batch_size // ctx.world, cfg.seed, ctx
        self.workers, self.epoch, self.index, self._iter = cfg.workers, 0, 0, None
        if len(dataset) < cfg.batch_size:
            raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one batch of {cfg.batch_size}")

    def __len__(self):
        """Batches per epoch."""
        return len(self.dataset) // (self.per_rank * self.ctx.world)

    def __next__(self):
        if self._iter is None:
            sampler = torch.utils.data.DistributedSampler(self.dataset, self.ctx.world, self.ctx.rank, seed=self.seed,
                                                          drop_last=True)
            sampler.set_epoch(self.epoch)
            indices = list(sampler)[self.index * self.per_rank:len(self) * self.per_rank]
            # A generator of its own: the workers' seeds must not move the global RNG (new modules draw from it).
            self._iter = iter(torch.utils.data.DataLoader(
                self.dataset, self.per_rank, sampler=indices, drop_last=True, num_workers=self.workers,
                collate_fn=getattr(self.dataset, "collate", None), pin_memory=self.ctx.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)))
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.index, self._iter = self.epoch + 1, 0, None
            return next(self)
        self.index += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index, self._iter = state["epoch"], state["index"], None


def classification_task(cfg, ctx, train_set, val_set):
    """Cross-entropy with label smoothing on (images, labels, ...) batches; top-1 in percent on val_set, each
    example once over all processes (example k on process k mod world)."""
    subset = torch.utils.data.Subset(val_set, range(ctx.rank, len(val_set), ctx.world))
    loader = torch.utils.data.DataLoader(subset, cfg.batch_size // ctx.world, num_workers=cfg.workers,
                                         collate_fn=getattr(val_set, "collate", None),
                                         pin_memory=ctx.device.type == "cuda")

    def images(dataset, batch):  # ImageFiles prepare their batches; generated images are ready
        return dataset.prepare(batch, ctx.device) if hasattr(dataset, "prepare") else batch[0].to(ctx.device)

    def loss(model, batch):
        labels = batch[1].to(ctx.device, non_blocking=True)
        return F.cross_entropy(model(images(train_set, batch)), labels, label_smoothing=cfg.label_smoothing)

    @torch.no_grad()
    def top1(model):
        training, counts = model.training, torch.zeros(2, dtype=torch.float64, device=ctx.device)
        model.eval()
        for batch in loader:
            labels = batch[1].to(ctx.device, non_blocking=True)
            with autocast(ctx.device, cfg.dtype):
                counts[0] += (model(images(val_set, batch)).argmax(1) == labels).sum()
            counts[1] += labels.numel()
        model.train(training)
        correct, total = all_reduce_sum(counts).tolist()
        return 100.0 * correct / max(total, 1)

    return Task(loss=loss, inputs=lambda batch: images(train_set, batch), evaluate=top1, metric="top1")


# -----------------------------------------------------------------------------
# text: Wikitext, GPT-2's BPE (or bytes), a token cache, random windows, perplexity

TEXT_SETTINGS = dict(  # the language model's settings, over SETTINGS
    data="wikitext-103",  # "wikitext-103" or "wikitext-2" (the Hugging Face Hub), "generated" (made-up text,
    # offline), or a folder holding wiki.train.raw, wiki.valid.raw and wiki.test.raw (the official zip's layout)
    cache_dir="token-cache",  # tokenized splits, made once per data source and tokenizer
    tokenizer="gpt2",  # "gpt2": GPT-2's BPE (tiktoken); "bytes": one token per UTF-8 byte
    tokenizer_file="",  # a local gpt2.tiktoken; "" = $GPT2_TIKTOKEN_FILE if set, else tiktoken's download
    seq_len=128,  # tokens a window predicts (it reads seq_len + 1)
    train_steps=10000,  # final end-to-end training steps
)
SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
WIKITEXTS, WIKITEXT_REPO, TIKTOKEN_ENV = ("wikitext-103", "wikitext-2"), "Salesforce/wikitext", "GPT2_TIKTOKEN_FILE"


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256): the offline stand-in for GPT-2's BPE."""
    n_vocab = 256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(kind, path=""):
    """tiktoken's GPT-2 encoding (from a local gpt2.tiktoken when path or $GPT2_TIKTOKEN_FILE is set), or bytes."""
    if kind == "bytes":
        return ByteTokenizer()
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern

    path = path or os.environ.get(TIKTOKEN_ENV, "")
    if not path:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise ConfigError(f"could not download GPT-2's BPE for tiktoken ({type(e).__name__}); pass "
                              f"--tokenizer_file= (or set {TIKTOKEN_ENV}) to a local gpt2.tiktoken, e.g. "
                              f"whisper/assets/gpt2.tiktoken of `pip install --no-deps openai-whisper`") from None
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer file {path!r} does not exist (expected a gpt2.tiktoken file)")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path)
    except Exception as e:
        raise ConfigError(f"tokenizer file {path!r} is not in tiktoken's format ({type(e).__name__}: {e}); "
                          f"expected a gpt2.tiktoken file") from None
    if sorted(ranks.values()) != list(range(50256)):
        raise ConfigError(f"tokenizer file {path!r} holds {len(ranks)} BPE ranks, not GPT-2's 50256 (0 to 50255); "
                          f"expected a gpt2.tiktoken file")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def generated_lines(split):
    """Made-up Wikitext-like text (headings, paragraphs of simple sentences), the same on every machine."""
    rng = np.random.default_rng(list(SPLITS).index(split))
    words = [["the old man", "a young woman", "the small dog", "my brother", "the king", "a tired soldier", "the river",
              "our teacher", "the black cat", "a famous writer"],
             ["sees", "finds", "follows", "remembers", "builds", "carries", "watches", "loves", "paints", "leaves"],
             ["the house", "a red ball", "the long road", "an old letter", "the bright moon", "a wooden boat",
              "the garden", "a quiet village", "the broken bridge", "a golden ring"],
             ["in the morning", "after the rain", "near the sea", "every day", "with great care", "before dinner",
              "in the winter of 1805", "for many years"]]
    lines = []
    for chapter in range({"train": 120, "val": 12, "test": 12}[split]):
        lines += ["", f" = Chapter {chapter + 1} = \n", ""]
        for _ in range(6):
            sentences = [" ".join(parts) for parts in zip(*(rng.choice(ws, 5) for ws in words))]
            lines.append(" " + " . ".join(sentences).capitalize() + " . \n")
    return lines


def split_lines(cfg, split, wikitext):
    """A split's lines, newline kept, whitespace-only lines empty (as in the Hugging Face copy, so that a local
    folder and the download give the same tokens)."""
    if cfg.data == "generated":
        return generated_lines(split)
    if wikitext is not None:
        return wikitext[HF_SPLITS[split]]["text"]
    with open(os.path.join(cfg.data, SPLITS[split]), encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def load_wikitext(name):
    """Wikitext-103 or Wikitext-2 (raw) from the Hugging Face Hub, through `datasets`."""
    import datasets

    try:
        return datasets.load_dataset(WIKITEXT_REPO, f"{name}-raw-v1")
    except Exception as e:
        raise ConfigError(f"could not load {name} ({WIKITEXT_REPO}, {name}-raw-v1) from the Hugging Face Hub "
                          f"({type(e).__name__}: {e}). Offline, download the official {name}-raw-v1.zip "
                          f"(https://wikitext.smerity.com/{name}-raw-v1.zip), unzip it and pass "
                          f"--data=/path/to/{name}-raw") from None


def cached_tokens(path):
    """The token count of a complete cache file; None when it is missing, half-written or truncated."""
    try:
        with open(path + ".json") as f:
            n = json.load(f)["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if os.path.isfile(path) and os.path.getsize(path) == 2 * n else None


def token_splits(cfg, ctx):
    """Each split's tokens as a read-only uint16 memmap of cache_dir/<source>-<tokenizer>/<split>.bin; each node's
    first process tokenizes what the cache lacks (each line on its own, encode_ordinary: no <|endoftext|>)."""
    if cfg.data not in WIKITEXTS + ("generated",):
        for path in [cfg.data] + [os.path.join(cfg.data, name) for name in SPLITS.values()]:
            if not os.path.exists(path) or (path != cfg.data and os.path.getsize(path) == 0):
                raise ConfigError(f"--data={cfg.data}: expected wikitext-103, wikitext-2, generated, or a folder "
                                  f"holding {', '.join(SPLITS.values())}" if path == cfg.data else
                                  f"{path!r} is {'empty' if os.path.exists(path) else 'missing'}: --data must hold "
                                  f"{', '.join(SPLITS.values())}")
    if cfg.tokenizer == "bytes" and cfg.tokenizer_file:
        raise ConfigError("--tokenizer_file is GPT-2's BPE: use it with --tokenizer=gpt2")
    if cfg.tokenizer == "gpt2" and (cfg.tokenizer_file or os.environ.get(TIKTOKEN_ENV)):
        load_tokenizer("gpt2", cfg.tokenizer_file)  # a missing or foreign file stops the run here
    source = cfg.data
    if source not in WIKITEXTS + ("generated",):  # a folder: its name and a hash of its absolute path
        path = os.path.abspath(source)
        source = f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    folder = os.path.join(cfg.cache_dir, f"{source}-{cfg.tokenizer}")
    paths = {split: os.path.join(folder, f"{split}.bin") for split in SPLITS}
    missing = [s for s in SPLITS if cached_tokens(paths[s]) is None] if ctx.local_rank == 0 else []
    if missing:
        encoder = load_tokenizer(cfg.tokenizer, cfg.tokenizer_file)
        wikitext = load_wikitext(cfg.data) if cfg.data in WIKITEXTS else None
        os.makedirs(folder, exist_ok=True)
    for split in missing:  # each written under a temporary name, then its .json: a cache file is whole or absent
        t0, what, n = time.time(), f"the {split} split of {cfg.data!r}", 0
        lines = iter(split_lines(cfg, split, wikitext))
        if os.path.exists(paths[split] + ".json"):
            os.unlink(paths[split] + ".json")
        with atomic_path(paths[split]) as tmp, open(tmp, "wb") as f:
            while chunk := list(itertools.islice(lines, 100_000)):
                ids = np.fromiter(itertools.chain.from_iterable(encoder.encode_ordinary_batch(chunk)), np.uint16)
                ids.tofile(f)
                n += len(ids)
            if n == 0:
                raise ConfigError(f"{what} holds no text")
        write_json(paths[split] + ".json", {"tokens": n})
        ctx.log(f"tokenized {what}: {n} tokens in {time.time() - t0:.0f} s -> {paths[split]}")
    if ctx.local_rank == 0 and not missing:
        ctx.log(f"reusing the token cache in {folder}")
    if dist.is_initialized():
        dist.barrier()
    tokens = {s: np.memmap(paths[s], dtype=np.uint16, mode="r") for s in SPLITS}
    for split, t in tokens.items():
        if len(t) < cfg.seq_len + 1:
            raise ConfigError(f"the {split} split has {len(t)} tokens, fewer than one window of seq_len + 1 = "
                              f"{cfg.seq_len + 1}")
    return tokens


class Windows:
    """An endless stream of batches of random (seq_len + 1)-token windows of the training tokens: batch k of rank r
    takes its window starts from numpy's generator seeded with (seed, r, k), so its whole position is k."""

    def __init__(self, tokens, batch_size, seq_len, seed, rank):
        self.tokens, self.batch_size, self.seq_len, self.seed, self.rank = tokens, batch_size, seq_len, seed, rank
        self.count = 0

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
    """exp(total NLL / predicted tokens) over a split's non-overlapping windows, each read with no earlier context:
    window k reads t[k*seq_len : (k+1)*seq_len] and predicts each next token (a tail of fewer than seq_len
    predictable tokens is left out); window k on process k mod world, all summed, each token once."""
    training, totals = model.training, torch.zeros(2, dtype=torch.float64, device=ctx.device)
    model.eval()
    windows = list(range(ctx.rank, (len(tokens) - 1) // seq_len, ctx.world))
    for i in range(0, len(windows), batch_size):
        batch = np.stack([tokens[k * seq_len:k * seq_len + seq_len + 1] for k in windows[i:i + batch_size]])
        batch = torch.from_numpy(batch.astype(np.int64)).to(ctx.device)
        with autocast(ctx.device, dtype):
            logits = model(batch[:, :-1])
        totals += torch.stack([F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"),
                               torch.tensor(batch[:, 1:].numel(), dtype=torch.float64, device=ctx.device)])
    model.train(training)
    nll, count = all_reduce_sum(totals).tolist()
    return math.exp(nll / count)


def language_task(cfg, ctx, tokens, flops_per_example=None):
    """Next-token cross-entropy on windows; validation perplexity (evaluate(model, "test") scores the test split)."""

    def loss(model, batch):
        batch = batch.to(ctx.device, non_blocking=True)
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    def evaluate(model, split="val"):
        return perplexity(model, tokens[split], cfg.seq_len, cfg.batch_size // ctx.world, ctx, cfg.dtype)

    return Task(loss=loss, inputs=lambda batch: batch[:, :-1], evaluate=evaluate, metric="val_ppl",
                lower_is_better=True, flops_per_example=flops_per_example)
