"""
Network of Theseus (NoT): the method, and what every conversion script needs.

A trained, or even untrained, *guide* network becomes a different *target* architecture part by part. Each
*stage* swaps some guide modules for new target modules in the *hybrid*; only the new modules train, everything
else frozen, until the hybrid's activations at each swapped place match the guide's under a similarity (loss
1 - similarity; linear CKA in the paper's Table 1); then the whole hybrid is fine-tuned on the task for a few
steps. After the last stage the target trains end to end. The baseline, *naive replacement*, swaps in every target
module at once and trains on the task alone, for the same number of gradient steps.

Read in this order: 1. the similarities (linear CKA, RSA, D-MNN), 2. capture and replace, 3. the method (Stage,
align_step, train, convert: the staged loop on one screen), 4. config, 5. plumbing (processes, the run, checkpoints,
image and text data), 6. the method's helpers.
"""
import ast
import contextlib
import copy
import datetime
import gc
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. similarities: linear CKA (Table 1's), RSA, D-MNN (Figure 1's); each a textbook form and the form the runs use


def textbook_cka(x, y, unbiased=False):
    """Linear CKA as Kornblith et al. (2019) write it, in float64: X and Y hold one example per row; with the linear
    kernels K = X X^T, L = Y Y^T and the centering matrix H = I - 11^T/n, HSIC(K, L) = tr(K H L H) / (n - 1)^2 and
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), 1 for representations equal up to rotation, offset and scale.
    unbiased=True: Song et al.'s (2012) HSIC, eq. 5, from K~ and L~, K and L with zero diagonals:
    [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2 / (n-2) 1^T K~ L~ 1] / (n (n-3)).
    The reference the fast `cka` below is tested against."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype, device=x.device) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    if unbiased:
        k, l = k - torch.diag(k.diagonal()), l - torch.diag(l.diagonal())
        hsic = lambda a, b: (torch.trace(a @ b) + a.sum() * b.sum() / ((n - 1) * (n - 2))  # noqa: E731
                             - 2 / (n - 2) * a.sum(0) @ b.sum(1)) / (n * (n - 3))
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
        # A variance below float32 noise relative to the raw scale counts as constant; the unbiased HSIC is divided
        # by n(n - 3), and so is its floor.
        floor_x, floor_y = ((1e-6 * torch.linalg.vector_norm(t.detach()).square()).square() / (n * (n - 3) if unbiased else 1)
                            + torch.finfo(torch.float32).tiny for t in (x, y))
        # Centred before any product: the Gram matrix of offset features loses the digits.
        d1, d2 = x.shape[1], y.shape[1]
        if n * (d1 + d2) <= d1 * d1 + d1 * d2 + d2 * d2:  # the Gram form's multiply-adds against the other's
            xy, xx, yy = _hsic_gram(_CentredGram.apply(x), _CentredGram.apply(y), unbiased)  # H K H = Xc Xc^T
        else:
            xy, xx, yy = _hsic_features(x - x.mean(0), y - y.mean(0), unbiased)
        value = xy / torch.sqrt(xx.clamp_min(floor_x) * yy.clamp_min(floor_y))
        return torch.where((xx <= floor_x) | (yy <= floor_y), torch.zeros_like(value), value)


def textbook_rsa(x, y):
    """RSA (Kriegeskorte et al., 2008) with cosine similarity, as the authors' earlier work ("Training the
    untrainable", Subramaniam et al.) uses it: each batch's matrix S_ij = x_i . x_j / (|x_i| |x_j|), and the Pearson
    correlation of the two matrices' entries above the diagonal (theirs keeps the diagonal, 1 in both, which only
    inflates the correlation). Blind to rotation and scale, not to offset. In float64, the reference of `rsa`."""
    x, y = (F.normalize(t.flatten(1).double(), dim=1) for t in (x, y))
    i, j = torch.triu_indices(len(x), len(x), 1)
    a, b = ((t @ t.T)[i, j] for t in (x, y))
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def rsa(x, y):
    """The same number as the runs compute it: differentiable, without the n x n matrices when the rows are longer
    than they are many (the sums over pairs of S from d x d products, as `cka` does), in float64 (cosines near one
    another cancel in float32). Equal cosines everywhere carry no information: RSA is then 0."""
    with torch.autocast(x.device.type, enabled=False):
        sx, sy, sxy, sxx, syy = _pair_means(*(F.normalize(_rows(t).double(), dim=1) for t in (x, y)))
        cov, vx, vy = sxy - sx * sy, sxx - sx * sx, syy - sy * sy
        value = cov / torch.sqrt(vx.clamp_min(1e-24) * vy.clamp_min(1e-24))
        return torch.where((vx <= 1e-24) | (vy <= 1e-24), torch.zeros_like(value), value).float()


def textbook_dmnn(x, y, k, temperature):
    """D-MNN as `dmnn` defines it, one example at a time, in float64 and differentiable: the reference it is tested
    against, value and gradient."""
    x, y = (F.normalize(t.flatten(1).double(), dim=1) for t in (x, y))
    total = 0.0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        memberships = []
        for t in (x, y):
            s = t[others] @ t[i]
            top = s.sort(descending=True).values
            memberships.append(torch.sigmoid((s - (top[k - 1] + top[k]) / 2) / (temperature * s.std())))
        a, b = memberships
        total = total + a @ b / (a.norm() * b.norm())
    return total / len(x)


def dmnn(x, y, k=10, temperature=0.1):
    """D-MNN, the differentiable mutual nearest neighbours (the paper names it, without a definition; this is ours):
    example i's neighbourhood in each network is a soft membership m_ij = sigmoid((s_ij - t_i) / (temperature
    sigma_i)) of every other example j, s the cosine similarities, t_i halfway between row i's k-th and (k + 1)-th
    largest and sigma_i the spread of row i (a temperature in the row's own units); the score is the mean over
    examples of the cosine between the two networks' membership vectors. In [0, 1], 1 for identical neighbourhoods,
    blind to rotation and scale of either input, and as temperature -> 0 the hard score of `mutual_knn` (k ones
    each). Memory: a few n x n matrices, n the rows (tokens, for the transformers)."""
    n = x.shape[0]
    if y.shape[0] != n or not 0 < k < n - 1:
        raise ValueError(f"dmnn: {n} and {y.shape[0]} examples, k={k}: expected as many, and 0 < k < n - 1")
    with torch.autocast(x.device.type, enabled=False):
        others = ~torch.eye(n, dtype=torch.bool, device=x.device)
        memberships = []
        for t in (x, y):
            t = F.normalize(_rows(t).float(), dim=1)
            similarities = (t @ t.T)[others].view(n, n - 1)  # each row without its own example
            # Threshold and spread in the graph (top-k values are differentiable): the gradient is the score's. Held
            # constant, a common shift of a row's similarities looks free and the outputs collapse onto one direction.
            top = similarities.topk(k + 1, dim=1).values
            threshold, spread = (top[:, k - 1] + top[:, k]) / 2, similarities.std(1).clamp_min(1e-12)
            memberships.append(torch.sigmoid((similarities - threshold[:, None]) / (temperature * spread[:, None])))
        return F.cosine_similarity(*memberships, dim=1, eps=1e-12).mean()


SIMILARITIES = ("cka", "dmnn", "rsa")


def similarity(x, y, cfg):
    """{measure: value} of the hybrid's rows x against the guide's y under the run's similarity (cfg.similarity; for
    D-MNN also the hard mutual k-NN score, for the log): of the global batch under DDP (similarity_scope="global":
    N processes align exactly as one process holding the whole batch would, at the cost of an all_gather of the
    activations), or of this process's slice ("local")."""
    if cfg.similarity_scope == "global":
        x, y = gather_batch(x), gather_batch(y)
    if cfg.similarity == "dmnn":
        return {"dmnn": dmnn(x, y, cfg.mnn_k, cfg.mnn_temperature), "mutual_knn": mutual_knn(x, y, cfg.mnn_k)}
    if cfg.similarity == "rsa":
        return {"rsa": rsa(x, y)}
    return {"cka": cka(x, y, cfg.cka_unbiased)}


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


def swap(hybrid, stage, i, seed):
    """Stage i's swap, its new modules drawn from a random stream of their own, (seed, i): alike on every process
    whatever each drew before (checked), and alike in NoT and naive runs of the same seed; put on the hybrid's device
    and, if its convolutions are channels_last, in that format (a swap may build them on the CPU)."""
    device = next(hybrid.parameters()).device
    layout = torch.channels_last if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(
        memory_format=torch.channels_last) for p in hybrid.parameters()) else torch.preserve_format
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        torch.manual_seed(seed * 1000 + i)
        stage.swap(hybrid)
    for name in stage.train:
        hybrid.get_submodule(name).to(device, memory_format=layout)
    check_replicas([t for name in stage.train for t in hybrid.get_submodule(name).state_dict().values()],
                   f"stage {i}'s new modules")


def swapped(guide, stages, seed=0):
    """A copy of the guide with every stage's swap made: the target's architecture (the naive baseline's start,
    and what a saved target.pt loads into)."""
    model = copy.deepcopy(guide)
    for i, stage in enumerate(stages, 1):
        swap(model, stage, i, seed)
    return model


# =============================================================================
# 3. the method


@dataclass
class Stage:
    """swap(hybrid) puts the stage's new target modules, freshly initialized, into the hybrid (one `replace` each,
    usually; a block-level conversion may add or remove adapters); compare: the (guide module, hybrid module) name
    pairs whose outputs the similarity matches; train: the hybrid modules alignment trains, the new ones."""
    swap: Callable
    compare: list
    train: list


def align_step(guide, hybrid, stage, x, opt, cfg):
    """One alignment step: loss 1 - similarity between the hybrid's and the guide's outputs at each compared place,
    both reading x and stopping there (the hybrid's own upstream layers feed the new modules); returns
    {measure: {place: value}} (the similarity, and for D-MNN the hard mutual k-NN score)."""
    names, places = [g for g, _ in stage.compare], [h for _, h in stage.compare]
    with torch.no_grad(), autocast(x.device, cfg.dtype):
        wanted = forward_until(guide, x, names)
    linears = [f"{place}.{name}".rstrip(".") for place in places for name, m in
               hybrid.get_submodule(place).named_modules() if isinstance(m, nn.Linear) and m.bias is not None
               ] if cfg.similarity == "cka" else []
    with autocast(x.device, cfg.dtype):
        outputs = forward_until(hybrid, x, places + linears)
    got, inner = outputs[:len(places)], outputs[len(places):]
    measured = [similarity(h, g, cfg) for h, g in zip(got, wanted)]
    (1 - torch.stack([m[cfg.similarity] for m in measured]).mean()).backward()
    for name, out in zip(linears, inner):  # biases CKA cannot see: their gradient is float noise, not stepped
        if any(adds_offsets(out, compared) for compared in got):
            hybrid.get_submodule(name).bias.grad = None
    params = [p for group in opt.param_groups for p in group["params"]]
    reduce_gradients(params, mean=cfg.similarity_scope == "local")  # alignment has no DDP wrapper
    gradient_step(params, opt, cfg.grad_clip)
    return {measure: dict(zip(names, (m[measure].detach() for m in measured))) for measure in measured[0]}


def adds_offsets(linear_output, compared):
    """Whether the bias of the Linear that gave linear_output adds one constant to each feature of the compared
    output in every example: the compared output is that Linear's output itself, its rows whole multiples of the
    Linear's features. CKA centres every feature over the examples, so such a bias's true gradient is 0 and autograd's
    is float noise, which Adam (dividing by its root mean square) would turn into steps of the learning rate,
    different on every machine and process count. RSA and D-MNN compare uncentred rows: they see it."""
    rows = _rows(compared)
    return (rows.data_ptr() == linear_output.data_ptr() and rows.numel() == linear_output.numel()
            and rows.is_contiguous() and linear_output.is_contiguous() and rows.shape[1] % linear_output.shape[-1] == 0)


def align(guide, hybrid, stage, i, run):
    """Stage i's alignment: its new modules learn (Adam, warmup then cosine); the rest is frozen and in eval mode,
    BatchNorm keeping its statistics while the similarity, blind to scale, moves the new modules' outputs."""
    cfg = run.cfg
    run.calibration_fit(hybrid, stage)  # a calibration that cannot be made stops the run before the first step
    hybrid.to(run.device).eval().requires_grad_(False)
    new = [p for name in stage.train for p in hybrid.get_submodule(name).train().requires_grad_(True).parameters()]
    opt = make_optimizer(new, "adamw", cfg.align_lr, 0.0, run.device)
    for _ in run.steps(f"stage {i} align", cfg.align_steps, hybrid, opt, cfg.align_lr, cfg.align_steps // 10):
        x = run.task.inputs(next(run.batches)).to(run.device, non_blocking=True)
        run.log(**align_step(guide, hybrid, stage, x, opt, cfg))
    broadcast_buffers(hybrid)  # BatchNorm in new modules counted each process's slice: keep process 0's
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
        swap(hybrid, stage, i, cfg.seed)                                     # swap in fresh target modules
        align(guide, hybrid, stage, i, run)                                  # align them by 1 - similarity
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
def calibration(guide, hybrid, stage, batches, n, inputs, device, dtype="float32", fit="on"):
    """Fold into each compared new module's last Linear the affine map of its channels that, on n batches, brings its
    output to the guide's there: fit="on", each channel's scale and offset (its mean and standard deviation become
    the guide's); fit="linear", the least-squares map over all channels (a small ridge), which undoes a rotation too.
    The similarity is blind to both; the frozen layers downstream are not. The module's output must be that
    Linear's output, channel-major: token rows [N, C], or maps [N, C, H, W] (one map at every position)."""
    for guide_name, hybrid_name in stage.compare:
        linear, sums = last_linear(hybrid, hybrid_name), 0
        for _ in range(n):
            x = inputs(next(batches)).to(device, non_blocking=True)
            with autocast(device, dtype):
                wanted, got = forward_until(guide, x, [guide_name]) + forward_until(hybrid, x, [hybrid_name])
            if wanted.shape[1] != got.shape[1]:
                raise ConfigError(f"--calibrate: {hybrid_name!r} has {got.shape[1]} channels, the guide's "
                                  f"{guide_name!r} {wanted.shape[1]}")
            rows = torch.cat([t.double() for t in (torch.ones_like(got[:, :1]), got, wanted)], 1)  # [1, y, g]
            rows = rows if rows.dim() == 2 else rows.transpose(0, 1).flatten(1).T  # a row per example and position
            sums = sums + rows.T @ rows
        sums = all_reduce_sum(sums)  # over all processes
        c, mean = got.shape[1], sums[0, 1:] / sums[0, 0]
        cov = sums[1:, 1:] / sums[0, 0] - mean[:, None] * mean
        if fit == "linear":  # g = a y + b: a^T = (cov_yy + ridge)^-1 cov_yg
            ridge = 1e-9 * cov[:c, :c].diagonal().mean() + 1e-30  # for directions the output does not vary in
            a = torch.linalg.solve(cov[:c, :c] + ridge * torch.eye(c, dtype=cov.dtype, device=cov.device),
                                   cov[:c, c:]).T
        else:
            a = torch.diag((cov[c:, c:].diagonal() / cov[:c, :c].diagonal().clamp_min(1e-24)).sqrt())
        _fold(linear, a, mean[c:] - a @ mean[:c])


@torch.no_grad()
def readout(guide, hybrid, stage, batches, n, inputs, device, dtype="float32"):
    """Refit each compared new module's last Linear by least squares on n batches: its weight and bias become
    argmin_{W, b} sum_i |W z_i + b - g_i|^2 (a small ridge), z_i the Linear's input and g_i the guide's output at
    the compared place, in the Linear's rows (an example's whole flattened map, or a token). CKA leaves a rotation of
    the module's output free, and the frozen layers downstream read the guide's basis; `calibration`'s linear map,
    shared by every position of a map, cannot undo a rotation that mixes positions. The module's output must be that
    Linear's output, reshaped."""
    for guide_name, hybrid_name in stage.compare:
        linear, seen, sums = last_linear(hybrid, hybrid_name), [], 0
        hook = linear.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
        try:
            for _ in range(n):
                x = inputs(next(batches)).to(device, non_blocking=True)
                with autocast(device, dtype):
                    wanted, got = forward_until(guide, x, [guide_name]) + forward_until(hybrid, x, [hybrid_name])
                z, out = seen.pop()
                if got.numel() != out.numel() or not torch.equal(got.reshape(out.shape), out):
                    raise ConfigError(f"--calibrate=readout: {hybrid_name!r}'s output is not its last Linear's")
                z = torch.cat([torch.ones_like(z[..., :1]), z], -1).reshape(-1, linear.in_features + 1).double()
                sums = sums + z.T @ torch.cat([z, wanted.reshape(z.shape[0], -1).double()], 1)  # [1 z]^T [1 z g]
        finally:
            hook.remove()
        sums = all_reduce_sum(sums)  # over all processes
        k = linear.in_features + 1
        gram = sums[:, :k] + 1e-9 * sums[1:, 1:k].diagonal().mean() / sums[0, 0] * torch.eye(k, dtype=sums.dtype,
                                                                                            device=sums.device)
        solution = torch.linalg.solve(gram, sums[:, k:])  # [b; W^T]
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
        linear.weight.copy_(solution[1:].T)
        linear.bias.copy_(solution[0])


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
    calibrate="auto",  # after each alignment, fold into the new module the affine map of its channels that brings its
    # output to the guide's (the similarity leaves it free): "on" (each channel's scale and offset), "linear" (the
    # least-squares map over all channels: rotation too), "readout" (the module's last Linear refitted by least
    # squares onto the guide's output: every feature of a flattened map), "off", or "auto": "on" when
    # finetune_steps=0 and the module has a Linear to fold into (nothing else repairs the scale then)
    similarity="cka",  # what alignment maximizes: "cka" (linear CKA, Table 1's), "dmnn" (differentiable mutual
    # nearest neighbours, Figure 1's second curve; README's decisions say how it is defined), "rsa" (cosine RSA)
    similarity_scope="global",  # "global": the similarity of the batch of all processes; "local": of each one's slice
    cka_unbiased=False,  # the debiased HSIC estimator in CKA
    mnn_k=10,  # D-MNN: the neighbours each example has, of the batch's other examples (Huh et al. use k=10)
    mnn_temperature=0.1,  # D-MNN: the soft neighbourhood's temperature, in units of each row's spread of similarities
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
    wandb_log=False,  # log to Weights & Biases from process 0 (`pip install wandb`; `wandb login` or
    # WANDB_MODE=offline): every log line's numbers, each stage's record and the final metric, by step, with the config
    wandb_project="network-of-theseus",
    wandb_run_name="",  # "" = out_dir's name; a resumed run continues its wandb run
    dist_timeout=60,  # minutes a process waits in a collective for the others: longer than one process's longest
    # work alone (process 0 scanning ImageNet on a network file system, tokenizing Wikitext-103, writing a 58 GB
    # checkpoint; NCCL's default, 10, can end such a run), short enough that a hung run ends within the hour
    preset="",  # one of the script's PRESETS, applied before the flags, or "smoke": the run exactly as configured for
    # 2 steps of each phase (statistics and evaluations on 2 batches), its checkpoint written, read back and resumed
    # from; prints each kind of step's time and peak GPU memory, the disk it needs and the full run's projected time
)
# Settings a resumed run may change (they do not change what it computes); the rest must match its checkpoint.
RESUMABLE = {"resume", "log_interval", "ckpt_interval", "compile", "workers", "cache_dir", "tokenizer_file",
             "dist_timeout", "wandb_log", "wandb_project", "wandb_run_name"}


def positive(value):
    return "" if value > 0 else "must be positive"


def non_negative(value):
    return "" if value >= 0 else "must not be negative"


# Each setting's allowed values, or a function saying what is wrong with a value ("" if nothing).
CHECKS = dict(method=("not", "naive", "guide"), order=("forward", "reverse"),
              calibrate=("auto", "on", "linear", "readout", "off"),
              similarity=SIMILARITIES, similarity_scope=("global", "local"), optimizer=("adamw", "sgd"),
              device=("auto", "cuda", "cpu"), dtype=("bfloat16", "float32"), tokenizer=("gpt2", "bytes"),
              batch_size=positive, log_interval=positive, ckpt_interval=positive, image_size=positive,
              num_classes=positive, seq_len=positive, mnn_k=positive, mnn_temperature=positive,
              dist_timeout=positive, synthetic_modes=positive, synthetic_val=positive, align_steps=non_negative,
              finetune_steps=non_negative, bn_recal_batches=non_negative, eval_interval=non_negative,
              epochs=non_negative, seed=non_negative, train_steps=non_negative, workers=non_negative,
              synthetic_shift=non_negative, synthetic_colour=non_negative, synthetic_distractors=non_negative,
              synthetic_noise=non_negative)


# Bytes D-MNN's n x n float32 matrices (at least four alive) may take: half an 80 GB card, the rest for the models.
DMNN_MEMORY_BUDGET = 40e9


def configure(settings, argv, presets=None, checks=None, rows_per_example=lambda cfg: 1):
    """The run's settings as attributes (cfg.lr): SETTINGS, then the script's `settings`, then --preset=NAME, then
    the --key=value flags, every value checked (CHECKS, and the script's `checks`) before any work. --help (or -h)
    prints them all and exits. rows_per_example(cfg): the rows of one example the similarity compares (tokens)."""
    if "--help" in argv or "-h" in argv:
        caller = sys._getframe(1).f_globals  # the script's module: its docstring and source
        print(usage(caller.get("__doc__") or "", caller.get("__file__", ""), {**SETTINGS, **settings}, presets or {},
                    {**CHECKS, **(checks or {})}))
        raise SystemExit(0)
    cfg = parse_flags({**SETTINGS, **settings}, argv, {**(presets or {}), "smoke": {}})  # smoke: Run and tasks
    for key, check in {**CHECKS, **(checks or {})}.items():
        if key in cfg and isinstance(check, tuple) and cfg[key] not in check:
            raise ConfigError(f"--{key}={cfg[key]}: expected one of {', '.join(map(str, check))}")
        if key in cfg and callable(check) and check(cfg[key]):
            raise ConfigError(f"--{key} {check(cfg[key])}, got {cfg[key]}")
    if cfg["method"] == "guide" and cfg["guide"] != "random":
        raise ConfigError(f"--method=guide trains a guide from scratch: pass --guide=random, not {cfg['guide']!r}")
    if cfg["eval_only"] not in ("", "guide") and not os.path.isfile(cfg["eval_only"]):
        raise ConfigError(f"--eval_only={cfg['eval_only']}: expected 'guide' or the path of a target.pt")
    cfg = SimpleNamespace(**cfg)
    local = int(os.environ.get("WORLD_SIZE", 1)) if cfg.similarity_scope == "local" else 1
    rows = cfg.batch_size // local * rows_per_example(cfg)  # the rows one similarity reads
    if cfg.similarity == "dmnn" and 4 * 4 * rows ** 2 > DMNN_MEMORY_BUDGET:
        raise ConfigError(f"--similarity=dmnn compares {rows:,} rows at once (--batch_size={cfg.batch_size}"
                          f"{f' over {local} processes' if local > 1 else ''} x {rows_per_example(cfg)}, "
                          f"--similarity_scope={cfg.similarity_scope}): each of its n x n float32 matrices is "
                          f"{4 * rows ** 2 / 1e9:.1f} GB and at least four are alive: over the "
                          f"{DMNN_MEMORY_BUDGET / 1e9:.0f} GB they may take; use --similarity=cka, a smaller "
                          f"--batch_size, or --similarity_scope=local")
    return cfg


def usage(doc, script, defaults, presets, checks):
    """--help: the script's docstring head, every setting with its default, allowed values and the comment beside it
    in the source (the script's, else common.py's), and each preset with what it changes."""
    comments = {**_setting_comments(__file__), **_setting_comments(script)}
    lines = [doc.strip().split("\n\n")[0], "", "Settings, as --name=value (a preset first, then the flags):"]
    for key, default in defaults.items():
        check = checks.get(key)
        allowed = (" (one of " + ", ".join(map(str, check)) + ")" if isinstance(check, tuple) else
                   f" ({check.__name__.replace('_', '-')})" if callable(check) else "")
        lines.append(f"  --{key}={default!r}{allowed}")
        lines += textwrap.wrap(comments.get(key, ""), 116, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["", "Presets:"] + [f"  {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                                 for name, values in presets.items()]
    lines.append("  smoke: the run exactly as configured, 2 steps of each phase (--preset above says what it prints)")
    return "\n".join(lines)


def _setting_comments(path):
    """{setting: its comment} from the `NAME = dict(` blocks of a source file, a comment's continuation lines joined."""
    comments, key, inside = {}, None, False
    for line in open(path, encoding="utf-8") if path and os.path.isfile(path) else []:
        inside = inside and not line.startswith(")") or bool(re.match(r"[A-Z_]+ = dict\(", line))
        found = re.match(r"    (\w+)=.*?  # (.*)$", line) if inside else None
        if found:
            key, comments[found[1]] = found[1], found[2]
        elif inside and key and re.match(r"\s+# ", line):
            comments[key] += " " + line.strip()[2:]
        else:
            key = None
    return comments


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
    if cfg.wandb_log and int(os.environ.get("RANK", 0)) == 0:
        check_wandb()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    ctx = Context(device=torch.device(device), script=os.path.basename(script))
    if "RANK" in os.environ:
        ctx.rank, ctx.local_rank, ctx.world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device == "cuda":
            ctx.device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(ctx.device)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(
            minutes=cfg.dist_timeout), device_id=ctx.device if device == "cuda" else None)
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by {ctx.world} processes")
    seed_everything(cfg.seed)  # alike on every process: new modules must start identical on all of them
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        cfg.dtype = "float32"
    return ctx


def launch(main):
    """A script's entry point: main(its flags). In a run of several processes an error on one prints its message and
    ends that process at once, without the teardown that can wait on the others: torchrun then stops every process,
    instead of leaving them waiting in a collective for dist_timeout."""
    try:
        main(sys.argv[1:])
    except BaseException as e:
        if not dist.is_initialized() or isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, SystemExit):
            print(e.code, file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def check_wandb():
    """--wandb_log=True: stop now, with what to do, if wandb is missing or not logged in (an API key in the
    environment or in the netrc file `wandb login` writes), unless it logs offline or not at all."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_log=True needs the wandb package: pip install wandb")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    netrc = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    if not os.path.isfile(netrc) or f"machine {host}" not in open(netrc).read():
        raise ConfigError(f"--wandb_log=True but this machine is not logged in to {host}: run `wandb login`, set "
                          f"WANDB_API_KEY, or set WANDB_MODE=offline to log to out_dir/wandb and sync later")


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
    """all_gather along dim 0. Every process computes the same loss of the gathered batch, so the gradient of that
    loss with respect to this process's rows is its slice of the incoming gradient, with no communication; each
    process's parameter gradient is then its rows' share, and their sum over processes (`reduce_gradients`) is the
    whole batch's gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[dist.get_rank() * ctx.n:(dist.get_rank() + 1) * ctx.n]


def gather_batch(x):
    """The global batch of an activation (every rank's rows, in rank order), differentiable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def reduce_gradients(params, mean):
    """Sum .grad over the processes (each holds its rows' share of one loss of the gathered batch), or average it
    (mean: each process's own loss, as DDP does); by hand where there is no DDP wrapper."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.is_initialized() and dist.get_world_size() > 1 and grads:
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        if mean:
            flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def broadcast_buffers(model):
    """Process 0's buffers (BatchNorm's running statistics) on every process, as DDP gives them at its next forward:
    evaluations and saved weights then see one model."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def check_replicas(tensors, what):
    """Stop the run if the tensors differ between processes (a fingerprint of each, all-reduced)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    prints = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).flatten()
    if dist.get_backend() == "nccl":  # NCCL sends CUDA tensors only; load_target's model is on the CPU
        prints = prints.to(torch.device("cuda", torch.cuda.current_device()))
    low, high = prints.clone(), prints.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what} differ between processes: every process must build the same network")


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
        self.trace, self.curve = [], []  # the phase's similarity at each step, and its curve (in checkpoints)
        self.stages, self.phases = 0, None  # the plan: how many stages, and every phase's (kind, steps)
        # For the time left: {kind: {phase: seconds per step}}, and (phase, seconds) of the work between phases.
        self.clock = time.time  # the tests give it a clock of their own
        self.started, self.rates, self.gaps, self.phase_end = self.clock(), {}, [], None
        # --preset=smoke: 2 steps of each phase; each kind's peak memory, the phases run, the checkpoint and disk
        self.smoke, self.peaks, self.seen, self.smoke_record = cfg.preset == "smoke", {}, [], {}
        if cfg.resume:
            self.saved = load_checkpoint(self.path, mmap=True)  # tensors read when used: a node's processes share pages
            world = len(self.saved["rng"])  # every process's data position and RNG are its own
            if world != ctx.world:
                raise ConfigError(f"--resume: {self.path} was written by {world} process{'es' * (world > 1)}, this "
                                  f"run has {ctx.world}: resume it on {world}")
            changed = sorted(k for k, v in vars(cfg).items() if k not in RESUMABLE and self.saved["config"].get(k) != v)
            if changed:
                raise ConfigError("--resume with settings that differ from the checkpoint's: " + ", ".join(
                    f"{k} (was {self.saved['config'].get(k)!r}, now {vars(cfg)[k]!r})" for k in changed))
            self.grad_steps, self.records, self.evals, self.guide_metric = self.saved["run"]
            self.log_line(f"resuming {self.path} at phase {self.saved['phase']} step {self.saved['step']}")
        elif ctx.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
        self.wandb = None
        if cfg.wandb_log and ctx.master:  # a resumed run continues the run it logged to
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, config=vars(cfg), dir=cfg.out_dir, resume="allow",
                                    name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                                    id=(self.saved or {}).get("wandb_id") or secrets.token_hex(4))

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
        self.values, self.alignment, self.trace, self.curve = {}, {}, [], []
        if self.saved is not None:
            start = self._restore(model, opt)
        else:
            if phase == 0 and self.ctx.master:
                self._check_disk(model)
            self._save(phase, 0, model, opt)
        kind = "align" if "align" in name else "finetune" if "finetune" in name else "train"
        flops = self.task.flops_per_example(model) if self.task.flops_per_example and kind != "align" else 0
        if self.phase_end is not None:
            self.gaps.append((phase, self.clock() - self.phase_end))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.seen.append((kind, steps))
        end = min(steps, 2) if self.smoke else steps  # a smoke run: 2 steps of every phase, with its schedule
        t0 = t_logged = t_step = self.clock()
        step_logged = start
        for step in range(start, end):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            yield step
            self.grad_steps += 1
            if self.smoke and phase == 0 and step == 0:
                self._round_trip(phase, model, opt)
            now = self.clock()
            # Seconds per step; a smoke run's last step alone (its first pays the one-time costs).
            self.rates.setdefault(kind, {})[phase] = now - t_step if self.smoke else (now - t0) / (step + 1 - start)
            t_step = now
            if kind == "align":  # each measure at each compared place
                self.trace.append(torch.stack([v for places in self.values.values() for v in places.values()]))
                if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == end:  # a point of the curves
                    window = torch.stack(self.trace[self.curve[-1][0] if self.curve else 0:])  # since the last point
                    self.curve.append([step + 1, self._by_measure(window.mean(0))])
                    self._warn_degenerate(name, window)
            if (step + 1) % self.cfg.log_interval == 0 or step + 1 == end:
                dt, t_logged, step_logged = (now - t_logged) / (step + 1 - step_logged), now, step + 1
                left = self._left(phase, kind, steps - step - 1)
                mfu = _mfu(flops, self.cfg.batch_size / self.ctx.world / dt, self.device)
                self.log_line(f"{name} step {step + 1}/{steps} | {self._values()} | lr {group['lr']:.2e} | "
                              f"{dt * 1000:.1f} ms/step | {self.cfg.batch_size / dt:.0f} samples/s"
                              + ("" if mfu is None else f" | mfu {f'{mfu:.1f}%' if mfu else 'n/a'}")
                              + f" | {_clock(now - self.started)} elapsed, {_clock(left)} left")
                self._wandb({"phase": name, **self._numbers(), "lr": group["lr"], "ms_per_step": dt * 1000,
                             "samples_per_s": self.cfg.batch_size / dt, **({"mfu": mfu} if mfu else {})})
            validate = kind == "train" and self.cfg.eval_interval and (step + 1) % self.cfg.eval_interval == 0
            if validate and step + 1 < steps:
                self.evals.append([self.grad_steps, self.evaluate(model)])
                self.log_line(f"{name} step {step + 1}/{steps} | {self.task.metric} {self.evals[-1][1]:.4f}")
                self._wandb({f"val/{self.task.metric}": self.evals[-1][1]})
            if (step + 1) % self.cfg.ckpt_interval == 0 and step + 1 < end:
                self._save(phase, step + 1, model, opt)
        if self.device.type == "cuda":
            self.peaks[kind] = max(self.peaks.get(kind, 0), torch.cuda.max_memory_reserved(self.device))
        if kind == "align" and self.trace:  # the stage's similarity: the mean of its last ten steps, and the curves
            self.alignment = self._by_measure(torch.stack(self.trace[-10:]).mean(0))
            self.alignment.update({f"{m}_curve": [[s, point[m]] for s, point in self.curve] for m in self.values})
        self.phase_end = self.clock()

    def log(self, **values):
        """This step's values for the log line: the loss, or {measure: {place: value}} (the similarity first)."""
        self.values = values

    def _by_measure(self, flat):
        """A stacked trace entry (or a mean of them) back as {measure: {place: value}}."""
        values, out = iter(flat.tolist()), {}
        for measure, places in self.values.items():
            out[measure] = {place: next(values) for place in places}
        return out

    def _numbers(self):
        """This step's values as numbers: {"loss": ...} and, in alignment, {"measure/place": ...}."""
        if "loss" in self.values:
            return {"loss": self.values["loss"].item()}
        measured = self._by_measure(torch.stack([v for places in self.values.values() for v in places.values()]))
        similarity = next(iter(measured.values()))
        return {"loss": 1 - sum(similarity.values()) / len(similarity),
                **{f"{m}/{k}": v for m, places in measured.items() for k, v in places.items()}}

    def _values(self):
        numbers = self._numbers()
        line, last = f"loss {numbers.pop('loss'):.4f}", None
        for key, value in numbers.items():
            measure, place = key.split("/", 1)
            line, last = line + (f" | {measure} " if measure != last else " ") + f"{place} {value:.4f}", measure
        return line

    def _wandb(self, numbers, summary=None):
        """Rank 0's numbers to Weights & Biases (--wandb_log=True), at the run's gradient step."""
        if self.wandb is not None:
            self.wandb.log(numbers, step=self.grad_steps)
            self.wandb.summary.update(summary or {})

    def _warn_degenerate(self, name, window):
        measure, places = next(iter(self.values.items()))  # the similarity
        for place in (p for p, floor in zip(places, (window[:, :len(places)] == 0).any(0).tolist()) if floor):
            if (name, place) not in self.warned:
                self.warned.add((name, place))
                self.log_line(f"warning: {name}: the {measure} of {place} is exactly 0 (constant activations, its "
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
            measured = {} if when else self.records[stage - 1].get(self.cfg.similarity, {})
            measured = f" | {self.cfg.similarity} " + " ".join(f"{k} {v:.4f}" for k, v in measured.items()) if (
                measured) else ""
            self.log_line(f"stage {stage}/{self.stages} {when.replace('_', ' ') or 'done'} | {self.task.metric} "
                          f"{value:.4f}{measured}")
            record = self.records[stage - 1]
            self._wandb({"stage": stage, f"stage/{self.task.metric}" + (f"_{when}" if when else ""): value,
                         **{f"stage/{m}/{k}": v for m in (self.cfg.similarity, "mutual_knn") if not when
                            for k, v in record.get(m, {}).items()}})
        return value

    def evaluate_guide(self, guide):
        if self.cfg.eval_guide and self.saved is None:
            self.guide_metric = self.task.evaluate(guide)
            self.log_line(f"guide {self.task.metric} {self.guide_metric:.4f}")

    def recalibrate_batchnorm(self, hybrid, stage):
        if self.saved is None:
            layers = batchnorm_statistics(hybrid, self.batches, self._batches(self.cfg.bn_recal_batches),
                                          self.task.inputs, self.device, self.cfg.dtype)
            self.record(stage, bn_recal_batches=self.cfg.bn_recal_batches if layers else 0)

    def calibration_fit(self, hybrid, stage):
        """How stage's modules are calibrated ("on", "linear", "readout" or "off"), decided before their alignment:
        "auto" is "on" where finetune_steps=0 (nothing else repairs the scale) and the modules have a Linear to fold
        it into; asked for explicitly, a module without one stops the run here."""
        fit = self.cfg.calibrate if self.cfg.calibrate != "auto" else "on" if not self.cfg.finetune_steps else "off"
        try:
            for _, name in stage.compare if fit != "off" else []:
                last_linear(hybrid, name)
        except ConfigError:
            if self.cfg.calibrate != "auto":
                raise
            fit = "off"
        return fit

    def calibrate(self, guide, hybrid, stage, i):
        fit = self.calibration_fit(hybrid, stage)
        if self.saved is None and fit != "off":
            args = (guide, hybrid.eval(), stage, self.batches, self._batches(max(self.cfg.bn_recal_batches, 1)),
                    self.task.inputs, self.device, self.cfg.dtype)
            if fit == "readout":
                readout(*args)
            else:
                calibration(*args, fit)
            self.record(i, calibrated=fit)

    @contextlib.contextmanager
    def distributed(self, model, compile=False):
        """The model a task phase trains: model itself, DDP around it, or (with the script's `shard`, several
        processes) a sharded copy whose weights come back into model at the end."""
        skipped = self.saved is not None and self.phase < self.saved["phase"]  # a phase a resumed run skips
        sharded = self.shard is not None and self.ctx.world > 1 and not skipped
        trained = self.shard(copy.deepcopy(model)) if sharded else model
        wrapped = torch.compile(trained) if compile else trained
        if self.ctx.world > 1 and not sharded:
            wrapped = nn.parallel.DistributedDataParallel(  # gradients as views of DDP's buckets: no second copy
                wrapped, device_ids=[self.ctx.local_rank] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.sharded = trained if sharded else None
        yield wrapped
        broadcast_buffers(trained)  # DDP would send process 0's at its next forward; evaluation comes first
        if sharded:  # fully_shard's hooks hold the copy in reference cycles: free its shards and optimizer now
            _copy_shards(trained, model)
            self.sharded = None
            del trained, wrapped
            gc.collect()

    def _save(self, phase, step, model, opt):
        """The one checkpoint dict: the position, what the run recorded, the weights, the phase's optimizer (None:
        a fresh one), the data position and every process's RNG."""
        weights, optimizer = model.state_dict(), opt.state_dict() if opt is not None and opt.state else None
        if self.sharded is not None:
            weights, optimizer = gathered_state(self.sharded, opt if optimizer is not None else None)
        rngs = [None] * self.ctx.world
        if dist.is_initialized():
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if self.ctx.master:
            save_atomic({"config": vars(self.cfg), "phase": phase, "step": step, "model": weights,
                         "run": [self.grad_steps, self.records, self.evals, self.guide_metric],
                         "trace": torch.stack(self.trace).tolist() if self.trace else [], "curve": self.curve,
                         "optimizer": optimizer, "batches": self.batches.state_dict(), "rng": rngs,
                         "wandb_id": self.wandb.id if self.wandb else None}, self.path)
        self.write_results(None, "running")

    def _restore(self, model, opt):
        ckpt, self.saved = self.saved, None
        if self.sharded is not None:  # process 0 reads the checkpoint and sends each process its shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            from_rank0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(self.sharded, ckpt["model"] if self.ctx.master else {}, options=from_rank0)
            if ckpt["optimizer"] is not None:
                set_optimizer_state_dict(self.sharded, opt, ckpt["optimizer"] if self.ctx.master else {},
                                         options=from_rank0)
        else:
            model.load_state_dict(ckpt["model"])
            if ckpt["optimizer"] is not None:
                opt.load_state_dict(ckpt["optimizer"])
        self.trace, self.curve = [torch.tensor(v, device=self.device) for v in ckpt.get("trace", [])], ckpt.get(
            "curve", [])
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
                      f"{_clock(self.clock() - self.started)} elapsed")
        if self.smoke and self.ctx.master:  # its disk numbers are process 0's, which alone writes
            if self.rates:
                self._smoke_report()
            else:
                self.log_line("smoke: no step ran (a finished run resumed); run it without --resume=True to measure")
        self._wandb({f"final/{self.task.metric}": final}, {f"final/{self.task.metric}": final})
        if self.wandb is not None:
            self.wandb.finish()
        return self.write_results(final, "done")

    def _batches(self, n):
        return min(n, 2) if self.smoke else n

    def _round_trip(self, phase, model, opt):
        """A smoke run's first step: its checkpoint written, read back and resumed from, as a restart would."""
        self._save(phase, 1, model, opt)
        if dist.is_initialized():
            dist.barrier()  # process 0 has replaced ckpt.pt: none reads the one before
        self.saved = load_checkpoint(self.path, mmap=True)
        self._restore(model, opt)
        self.smoke_record["checkpoint_bytes"] = os.path.getsize(self.path)

    def _check_disk(self, model):
        """Before the first checkpoint: room for two checkpoints at their largest (the weights, and AdamW's two
        moments of every parameter; one replaces the other) and target.pt, or a message saying what is short."""
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        largest = weights + 2 * sum(p.numel() * p.element_size() for p in model.parameters())
        need, free = 2 * largest + weights, shutil.disk_usage(self.cfg.out_dir).free
        self.smoke_record.update(disk_needed_bytes=need, disk_free_bytes=free)
        if free < need:
            raise ConfigError(f"{self.cfg.out_dir!r} has {free / 1e9:.2f} GB free, short by {(need - free) / 1e9:.2f} "
                              f"GB of the {need / 1e9:.2f} GB this run needs: two checkpoints of up to "
                              f"{largest / 1e9:.2f} GB (weights and AdamW's state; one replaces the other) and "
                              f"target.pt ({weights / 1e9:.2f} GB)")

    def _smoke_report(self):
        """What a smoke run measured, logged and kept in results.json "smoke": each kind's seconds per step (the median
        of its phases; each phase's last step) and peak memory (what the allocator reserved: what another process
        cannot have), the checkpoint, the disk, and the full run's time projected by the time-left estimate's method."""
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        if self.phases is None:  # the baselines: their one phase
            self.phases = self.seen
        record = self.smoke_record
        record["kinds"] = {kind: {"seconds_per_step": float(np.median(list(rates.values()))), "phases": rates,
                                  "peak_memory_bytes": self.peaks.get(kind)} for kind, rates in self.rates.items()}
        record["projected_seconds"] = self._left(-1, self.phases[0][0], 0)
        for kind, measured in record["kinds"].items():
            memory = (f"{measured['peak_memory_bytes'] / 2**30:.2f} of {total / 2**30:.2f} GiB reserved" if total else
                      "n/a (CPU)")
            self.log_line(f"smoke: {kind} {measured['seconds_per_step'] * 1000:.1f} ms/step, peak memory {memory}")
        self.log_line(f"smoke: checkpoint {record.get('checkpoint_bytes', 0) / 1e6:.1f} MB written, read back and "
                      f"resumed from")
        self.log_line(f"smoke: disk {record['disk_needed_bytes'] / 1e9:.2f} GB needed, "
                      f"{record['disk_free_bytes'] / 1e9:.2f} GB free")
        steps = ", ".join(f"{sum(n for k, n in self.phases if k == kind)} {kind}" for kind in record["kinds"])
        self.log_line(f"smoke: the full run ({steps} steps) projected at {_clock(record['projected_seconds'])}, "
                      f"its evaluations and statistics counted at 2 batches each")

    def write_results(self, final, status):
        """results.json: the config, each stage's record, the final and the validation-selected metric."""
        best = (min if self.task.lower_is_better else max)(self.evals, key=lambda e: e[1]) if self.evals else None
        results = {"script": self.ctx.script, "status": status, "config": vars(self.cfg),
                   "guide_metric": self.guide_metric, "stages": self.records,
                   "metric": {"name": self.task.metric, "value": final, "lower_is_better": self.task.lower_is_better},
                   "grad_steps": self.grad_steps, "evals": self.evals,
                   "best": {"value": best[1], "step": best[0]} if best else None,
                   "seconds": self.clock() - self.started,  # this process's wall time (since a restart, if resumed)
                   **({"smoke": self.smoke_record} if self.smoke else {})}
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
    """nanoGPT's model FLOPs utilization in percent: this process's FLOP/s over its card's peak; None without the
    model's FLOPs, 0 on a device without a known peak."""
    if not flops:
        return None
    peak = peak_flops(device)
    return 100 * flops * examples_per_s / peak if peak else 0


def gathered_state(sharded, opt):
    """A sharded model's weights and (opt given) its optimizer's state, whole, on process 0's CPU alone (the others
    get empty dicts): no process holds the whole state on its GPU, nor any but process 0 in its memory."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    to_rank0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(sharded, options=to_rank0),
            None if opt is None else get_optimizer_state_dict(sharded, opt, options=to_rank0))


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


def load_checkpoint(path, keys=(), what="checkpoint", mmap=False):
    """torch.load a file these scripts wrote, with a clear message when it is missing, foreign, or lacks keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    num_classes=10,  # generated images (common.synthetic_images says what each setting does): classes, examples,
    synthetic_train=10000,
    synthetic_val=1000,
    synthetic_shift=0,  # how far (pixels) each image moves its class pattern,
    synthetic_modes=1,  # patterns per class,
    synthetic_colour=0.0,  # the spread of each channel's gain,
    synthetic_distractors=0,  # patterns shared by all classes, one added to each image,
    synthetic_noise=1.5,  # and the pixel noise: together, how hard the task is
    workers=8,  # DataLoader processes per GPU
    decode="auto",  # ImageNet folders: "pil" (PIL and torchvision's transforms in the workers), "cpu" (torchvision.io
    # and transforms.v2 on uint8 tensors in the workers), "gpu" (the workers read the files, the main process decodes
    # them with nvjpeg and crops on the GPU); "auto": cpu, until tools/gpu_check.sh shows gpu correct and faster on a
    # GPU (docs/performance.md says which measurement flips it)
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_data(cfg, ctx, interpolation="bilinear"):
    """(train set, val set, number of classes): ImageNet folders when cfg.data_dir is set, else generated images
    (the same for every --seed: seeds vary the runs, not the task)."""
    if cfg.batch_size < 2 * ctx.world:  # a similarity of one example, BatchNorm of one value: nothing to learn from
        raise ConfigError(f"--batch_size={cfg.batch_size} gives {cfg.batch_size // ctx.world} image a process: the "
                          f"similarity compares a batch's images and BatchNorm normalizes each process's, so at "
                          f"least 2 a process ({2 * ctx.world} in all)")
    if cfg.data_dir:
        decode = "cpu" if cfg.decode == "auto" else cfg.decode
        if decode == "gpu" and ctx.device.type != "cuda":
            raise ConfigError("--decode=gpu decodes with nvjpeg on CUDA; on CPU use --decode=cpu or pil")
        classes = check_image_folders(cfg.data_dir)
        train_set, val_set = (ImageFiles(os.path.join(cfg.data_dir, split), split == "train", cfg.image_size,
                                         interpolation, decode, ctx, cfg.seed) for split in ("train", "val"))
        ctx.log(f"data: {len(train_set)} training and {len(val_set)} validation images of {len(classes)} classes in "
                f"{cfg.data_dir}, decoded by {decode} ({cfg.workers} workers per process)")
        return train_set, val_set, len(classes)
    if cfg.synthetic_train < cfg.batch_size:
        raise ConfigError(f"--synthetic_train={cfg.synthetic_train}: fewer generated training images than one batch "
                          f"(--batch_size={cfg.batch_size})")
    if cfg.synthetic_shift >= cfg.image_size:
        raise ConfigError(f"--synthetic_shift={cfg.synthetic_shift}: expected 0 to image_size - 1")
    if cfg.guide == "pretrained":
        raise ConfigError("generated images (empty --data_dir) have their own classes; use --guide=random (or a "
                          "checkpoint path) with them, or give --data_dir")
    return (*synthetic_images(cfg.synthetic_train, cfg.synthetic_val, cfg.num_classes, cfg.image_size,
                              cfg.synthetic_shift, 0, cfg.synthetic_modes, cfg.synthetic_colour,
                              cfg.synthetic_distractors, cfg.synthetic_noise), cfg.num_classes)


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

    A training item's key is (index, epoch) (Batches gives them): its crop and flip come from a random stream of
    that image and epoch alone (and the seed), so a batch is the same whichever process or worker reads it, after
    a restart too, and no draw moves the global generator, which new modules start from. The file list is scanned
    by process 0 and sent to the others, and kept in numpy arrays, not one Python object per file, which forked
    workers would copy page by page as they touch reference counts.

    Files nvjpeg cannot decode (grayscale and CMYK JPEGs, other formats under a .JPEG name) are decoded on the
    CPU and named in the log; a file nothing can decode stops the run with its name.
    """
    augments = True  # (index, epoch) keys for training items

    def __init__(self, root, train, image_size, interpolation, decode, ctx, seed=0):
        self.root, self.offsets, self.names, self.labels = root, *_scan_folder(root, ctx)
        self.train, self.size, self.decode, self.ctx, self.seed, self.seen = train, image_size, decode, ctx, seed, set()
        from torchvision.transforms import InterpolationMode

        # the enum, not its name: torchvision 0.26's v2 functionals refuse a string (0.29 accepts either)
        self.interpolation = InterpolationMode(interpolation)
        self.resize = round(image_size * 256 / 224)

    def __len__(self):
        return len(self.labels)

    def path(self, i):
        return os.path.join(self.root, self.names[self.offsets[i]:self.offsets[i + 1]].tobytes().decode())

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):  # this image and epoch's own stream; the global one untouched
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self._item(self.path(i), int(self.labels[i]))

    def _item(self, path, label):
        from torchvision import transforms
        from torchvision.io import ImageReadMode, decode_image

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
        if self.train:  # torchvision's own parameters
            crop = torch.tensor([*transforms.RandomResizedCrop.get_params(torch.empty(0, height, width),
                                                                          (0.08, 1.0), (3 / 4, 4 / 3)),
                                 float(torch.rand(1) < 0.5)])
        if self.decode == "cpu":
            image = self.crop(image, crop)
        return image, label, crop, path, note

    def _pil(self, data):
        from PIL import Image
        from torchvision import transforms

        if self.train:
            steps = [transforms.RandomResizedCrop(self.size, interpolation=self.interpolation),
                     transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(self.resize, interpolation=self.interpolation), transforms.CenterCrop(self.size)]
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
            if note:
                self._note(note)
        if self.decode == "gpu":
            compressed = [i for i, image in enumerate(images) if image.dim() == 1]
            # torchvision's batched nvjpeg decode writes into new memory before it waits for the queued kernels
            # (pytorch/vision#9606): blocks that zero_grad just freed may still be read. Let them finish first.
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            try:
                decoded = decode_jpeg([images[i] for i in compressed], mode=ImageReadMode.RGB, device=device) if (
                    compressed) else []  # it refuses an empty list
            except RuntimeError:  # one by one: a valid JPEG nvjpeg rejects (arithmetic coding, say) goes to the CPU
                decoded = [self._decode_one(images[i], paths[i], device) for i in compressed]
            images = list(images)
            for i, image in zip(compressed, decoded):
                images[i] = image
            images = torch.stack([self.crop(image.to(device), crop) for image, crop in zip(images, crops)])
        mean, std = (torch.tensor(v, device=device).view(3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (images.to(device, non_blocking=True).float() - mean) / std


    def _decode_one(self, data, path, device):
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            try:
                image = decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise ConfigError(f"cannot decode {path} ({e})") from None
            self._note(f"decoded on the CPU (nvjpeg rejected it): {path}")
            return image

    def _note(self, note):
        if note not in self.seen:
            self.seen.add(note)
            self.ctx.log(note)


def _scan_folder(root, ctx):
    """ImageFolder's files and labels, scanned by process 0 and sent to the others: (offsets, names, labels), the
    names relative to root as one byte array, name i at names[offsets[i]:offsets[i + 1]]."""
    from torchvision import datasets

    scanned = [None]
    if ctx.master:
        samples = datasets.ImageFolder(root, loader=lambda path: path).samples
        names = [os.path.relpath(path, root).encode() for path, _ in samples]
        scanned = [(np.cumsum([0] + [len(n) for n in names]), np.frombuffer(b"".join(names), np.uint8),
                    np.array([label for _, label in samples], np.int64))]
    if dist.is_initialized():
        dist.broadcast_object_list(scanned, 0)
    return scanned[0]


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


def synthetic_images(num_train, num_val, num_classes, image_size, shift=0, seed=0, modes=1, colour=0.0,
                     distractors=0, noise=1.5):
    """Learnable generated images for offline runs: each class a smooth pattern, under noise. The defaults give each
    class one fixed pattern, which once learned makes any model the Bayes classifier; the rest give classes variation
    of their own and models headroom (docs/study.md says why each):

    shift: each image rolls its pattern by up to `shift` pixels each way (wrapping around): a convolution sees the
      same pattern anywhere, a fully connected layer must learn each position apart;
    modes: each class has this many patterns, each image one of them (a class is several looks);
    colour: each image scales its pattern's three channels by 1 + colour * N(0, 1) (illumination);
    distractors: a bank of this many patterns shared by every class, one added to each image at a random place,
      amplitude and sign (clutter that tells nothing of the class);
    noise: the standard deviation of the pixel noise (the part no model can learn).
    """
    g = torch.Generator().manual_seed(seed)
    smooth = lambda n: F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=image_size,  # noqa: E731
                                     mode="bilinear", align_corners=False)
    patterns = smooth(num_classes * modes).view(num_classes, modes, 3, image_size, image_size)
    bank = smooth(distractors) if distractors else None

    def rolled(images, reach):
        offsets = torch.randint(-reach, reach + 1, (len(images), 2), generator=g).tolist()
        return torch.stack([img.roll((dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(images, offsets)])

    def make(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        images = patterns[labels, torch.randint(modes, (n,), generator=g) if modes > 1 else 0]
        if colour:
            images = images * (1 + colour * torch.randn(n, 3, 1, 1, generator=g))
        if shift:
            images = rolled(images, shift)
        if distractors:
            clutter = rolled(bank[torch.randint(distractors, (n,), generator=g)], image_size // 2)
            images = images + torch.randn(n, 1, 1, 1, generator=g) * clutter
        return torch.utils.data.TensorDataset(images + noise * torch.randn(n, 3, image_size, image_size, generator=g),
                                              labels)

    return make(num_train), make(num_val)


class Batches:
    """An endless stream of this process's training batches whose position checkpoints keep: each epoch is one
    pass of a DistributedSampler (this process's share of a seeded shuffle, the same after a restart). One
    DataLoader serves the whole run, its workers kept from epoch to epoch; a dataset that `augments` reads
    (index, epoch) keys and draws each item's augmentation from them, so no worker's random state matters."""

    def __init__(self, dataset, cfg, ctx):
        self.dataset, self.per_rank, self.seed, self.ctx = dataset, cfg.batch_size // ctx.world, cfg.seed, ctx
        self.epoch, self.index, self._iter = 0, 0, None
        if len(dataset) < cfg.batch_size:
            raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one batch (--batch_size="
                              f"{cfg.batch_size})")
        # A generator of its own: starting an iterator draws a seed, which must not move the global generator.
        self.loader = torch.utils.data.DataLoader(
            dataset, self.per_rank, sampler=_Keys(self), drop_last=True, num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0, collate_fn=getattr(dataset, "collate", None),
            pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))

    def __len__(self):
        """Batches per epoch."""
        return len(self.dataset) // (self.per_rank * self.ctx.world)

    def keys(self):
        """This process's keys for the rest of the current epoch."""
        sampler = torch.utils.data.DistributedSampler(self.dataset, self.ctx.world, self.ctx.rank, seed=self.seed,
                                                      drop_last=True)
        sampler.set_epoch(self.epoch)
        indices = list(sampler)[self.index * self.per_rank:len(self) * self.per_rank]
        return [(i, self.epoch) for i in indices] if getattr(self.dataset, "augments", False) else indices

    def __next__(self):
        if self._iter is None:
            self._iter = iter(self.loader)  # kept workers restart from keys() and drop what they had fetched
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


class _Keys(torch.utils.data.Sampler):
    """Batches' sampler: each new iterator of its DataLoader reads the keys from where the stream stands."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches.keys())


def classification_task(cfg, ctx, train_set, val_set):
    """Cross-entropy with label smoothing on (images, labels, ...) batches; top-1 in percent on val_set, each
    example once over all processes (example k on process k mod world)."""
    subset = torch.utils.data.Subset(val_set, range(ctx.rank, len(val_set), ctx.world))
    # Workers kept between evaluations; a generator of its own, as Batches' (evaluating moves no random state).
    loader = torch.utils.data.DataLoader(
        subset, cfg.batch_size // ctx.world, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
        collate_fn=getattr(val_set, "collate", None), pin_memory=ctx.device.type == "cuda", generator=torch.Generator())

    def images(dataset, batch):  # ImageFiles prepare their batches; generated images are ready
        return dataset.prepare(batch, ctx.device) if hasattr(dataset, "prepare") else batch[0].to(ctx.device)

    def loss(model, batch):
        labels = batch[1].to(ctx.device, non_blocking=True)
        return F.cross_entropy(model(images(train_set, batch)), labels, label_smoothing=cfg.label_smoothing)

    @torch.no_grad()
    def top1(model):
        training, counts = model.training, torch.zeros(2, dtype=torch.float64, device=ctx.device)
        model.eval()
        for batch in itertools.islice(loader, 2 if cfg.preset == "smoke" else None):  # smoke: 2 batches
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
    epochs=100,  # final end-to-end training, in passes over the training tokens (windows of seq_len + 1 tokens drawn
    # at random, batch_size of them a step): the paper's 100, about 381,000 steps of Wikitext-103
    train_steps=0,  # if > 0, that many final training steps instead of epochs (the presets)
    train_part="0:1",  # the part of the training tokens this run reads, "A:B" in fractions of them (epochs count
    # passes over it): a guide trained on "0:0.9" knows text that a conversion on "0.9:1" never sees (docs/study.md)
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
    part = training_part(cfg.train_part)
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
        with contextlib.suppress(FileNotFoundError):  # another node may have removed it, sharing the cache
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
    n = len(tokens["train"])
    start, stop = round(part[0] * n), round(part[1] * n)
    tokens["train"] = tokens["train"][start:stop]
    if part != (0, 1):
        ctx.log(f"training on tokens {start}-{stop} of the {n} (--train_part={cfg.train_part})")
    for split, t in tokens.items():
        if len(t) < cfg.seq_len + 1:
            raise ConfigError(f"the {split} split has {len(t)} tokens, fewer than one window of seq_len + 1 = "
                              f"{cfg.seq_len + 1}")
    return tokens


def training_part(spec):
    """(A, B) of --train_part=A:B, fractions with 0 <= A < B <= 1, or a message naming the setting."""
    try:
        start, stop = (float(x) for x in spec.split(":"))
    except ValueError:
        start = stop = None
    if start is None or not 0 <= start < stop <= 1:
        raise ConfigError(f"--train_part={spec}: expected A:B, fractions of the training tokens with 0 <= A < B <= 1 "
                          f"(e.g. 0:0.9)")
    return start, stop


class Windows:
    """An endless stream of this process's batches of random (seq_len + 1)-token windows of the training tokens: the
    global batch k (batch_size windows) takes its starts from numpy's generator seeded with (seed, k), and process
    r of `world` its r-th slice, so that its whole position is k and any number of processes reads the same."""

    def __init__(self, tokens, batch_size, seq_len, seed, rank=0, world=1):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rows, self.count = slice(rank * batch_size // world, (rank + 1) * batch_size // world), 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.count])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)[self.rows]
        self.count += 1
        return torch.from_numpy(np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def perplexity(model, tokens, seq_len, batch_size, ctx, dtype, batches=None):
    """exp(total NLL / predicted tokens) over a split's non-overlapping windows (summed_nll)."""
    nll, count = summed_nll(model, tokens, seq_len, batch_size, ctx, dtype, batches)
    return math.exp(nll / count)


@torch.no_grad()
def summed_nll(model, tokens, seq_len, batch_size, ctx, dtype, batches=None):
    """(total NLL, predicted tokens) of a split's non-overlapping windows, each read with no earlier context: window
    k reads t[k*seq_len : (k+1)*seq_len] and predicts each next token (a tail of fewer than seq_len predictable
    tokens is left out); window k on process k mod world, all summed, each token once (batches: the first only)."""
    training, totals = model.training, torch.zeros(2, dtype=torch.float64, device=ctx.device)
    model.eval()
    windows = list(range(ctx.rank, (len(tokens) - 1) // seq_len, ctx.world))[:batches and batches * batch_size]
    for i in range(0, len(windows), batch_size):
        batch = np.stack([tokens[k * seq_len:k * seq_len + seq_len + 1] for k in windows[i:i + batch_size]])
        batch = torch.from_numpy(batch.astype(np.int64)).to(ctx.device)
        with autocast(ctx.device, dtype):
            logits = model(batch[:, :-1])
        totals += torch.stack([F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"),
                               torch.tensor(batch[:, 1:].numel(), dtype=torch.float64, device=ctx.device)])
    model.train(training)
    return tuple(all_reduce_sum(totals).tolist())


def language_task(cfg, ctx, tokens, flops_per_example=None):
    """Next-token cross-entropy on windows; validation perplexity (evaluate(model, "test") scores the test split)."""

    def loss(model, batch):
        batch = batch.to(ctx.device, non_blocking=True)
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    def evaluate(model, split="val"):
        return perplexity(model, tokens[split], cfg.seq_len, cfg.batch_size // ctx.world, ctx, cfg.dtype,
                          2 if cfg.preset == "smoke" else None)

    return Task(loss=loss, inputs=lambda batch: batch[:, :-1], evaluate=evaluate, metric="val_ppl",
                lower_is_better=True, flops_per_example=flops_per_example)


# =============================================================================
# 6. the method's helpers: the similarities' sums, BatchNorm's moments, calibration's fold, optimizers, schedule


def _rows(x):
    # CKA ignores the order of an example's features: a channels_last map is flattened in memory order (a view).
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def _pair_means(x, y):
    """RSA's means over every ordered pair i != j of S_x, S_y, S_x S_y, S_x^2 and S_y^2, S = the rows' inner products:
    from the n x n matrices, or, with rows longer than they are many, from d x d products (||X^T Y||^2 = <S_x, S_y>)."""
    n = x.shape[0]
    if n <= x.shape[1] + y.shape[1]:
        kx, ky = x @ x.T, y @ y.T
        sums = kx.sum(), ky.sum(), (kx * ky).sum(), kx.square().sum(), ky.square().sum()
    else:
        sums = (x.sum(0).square().sum(), y.sum(0).square().sum(), (x.T @ y).square().sum(), (x.T @ x).square().sum(),
                (y.T @ y).square().sum())
    dx, dy = x.square().sum(1), y.square().sum(1)  # the diagonals, left out
    diagonal = dx.sum(), dy.sum(), (dx * dy).sum(), dx.square().sum(), dy.square().sum()
    return tuple((u - v) / (n * (n - 1)) for u, v in zip(sums, diagonal))


def textbook_mutual_knn(x, y, k):
    """Mutual k-nearest-neighbour alignment (Huh, Cheung, Wang, Isola, 2024): for each example its k nearest other
    examples by inner product of the row-normalized representation, in each network; the mean over examples of the
    fraction of those neighbours the two networks share. In float64, one example at a time."""
    x, y = (F.normalize(t.flatten(1).double(), dim=1) for t in (x, y))
    shared = 0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        near = [set(others[j] for j in (t[others] @ t[i]).topk(k).indices.tolist()) for t in (x, y)]
        shared += len(near[0] & near[1]) / k
    return shared / len(x)


class _CentredGram(torch.autograd.Function):
    """Xc Xc^T, Xc = X less its column means, a block of columns at a time (forward and backward): no centred copy of
    an input as large as an image batch's feature maps is ever held, nor kept for the backward pass."""

    @staticmethod
    def forward(ctx, x):
        gram = x.new_zeros(x.shape[0], x.shape[0])
        for cols in _column_blocks(x):
            a = x[:, cols] - x[:, cols].mean(0)
            gram.addmm_(a, a.T)
        ctx.save_for_backward(x)
        return gram

    @staticmethod
    def backward(ctx, grad_gram):
        (x,), g = ctx.saved_tensors, grad_gram + grad_gram.T
        grad = torch.empty_like(x)
        for cols in _column_blocks(x):
            a = g @ (x[:, cols] - x[:, cols].mean(0))
            grad[:, cols] = a - a.mean(0)  # through the centring: H (G + G^T) Xc
        return grad


def _column_blocks(x):
    n, d = x.shape
    width = max(n, -(-d // 16))  # a sixteenth of the columns: small beside the input, few kernel launches on a GPU
    return [slice(i, i + width) for i in range(0, d, width)]


def _hsic_gram(k, l, unbiased):
    """HSIC(K, L), HSIC(K, K), HSIC(L, L) from centred Gram matrices (biased: up to a factor that cancels)."""
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


def _moments(x):
    """[3, channels]: the count, sum and sum of squares over all but dimension 1 (the channels), in float64."""
    x = x.detach().transpose(0, 1).flatten(1).double()
    return torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), x.square().sum(1)])


def _mean_var(moments):
    count, total, squares = all_reduce_sum(moments)  # over all processes
    mean = total / count
    return mean, (squares - count * mean.square()) / (count - 1)


def last_linear(hybrid, name):
    """The Linear a calibration folds its map into: the last of the module's."""
    linears = [m for m in hybrid.get_submodule(name).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"--calibrate: {name!r} has no Linear to fold a map into")
    return linears[-1]


def _fold(linear, a, b):
    """linear's outputs, C channels of P positions each (channel-major), become a @ them + b at every position."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
    weight, bias = linear.weight.double().view(len(b), -1, linear.in_features), linear.bias.double().view(len(b), -1)
    linear.weight.copy_(torch.einsum("ij,jpk->ipk", a, weight).reshape_as(linear.weight))
    linear.bias.copy_((a @ bias + b[:, None]).flatten())


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


@torch.no_grad()
def mutual_knn(x, y, k):
    """The hard mutual k-NN score as the runs compute it, all examples at once (not differentiable: the log's)."""
    members = []
    for t in (x, y):
        t = F.normalize(_rows(t).float(), dim=1)
        nearest = (t @ t.T).fill_diagonal_(-math.inf).topk(k, dim=1).indices
        members.append(torch.zeros(len(t), len(t), dtype=torch.bool, device=t.device).scatter_(1, nearest, True))
    return (members[0] & members[1]).sum(1).float().mean() / k
