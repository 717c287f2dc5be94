"""
What every Network of Theseus script shares, and nothing more.

Network of Theseus (NoT) turns a trained (or untrained) *guide* network into a
different *target* architecture one part at a time. At each stage some guide
modules are swapped for new target modules; only those are trained, everything
else frozen, so that the *hybrid*'s activation at each swapped place matches
the guide's under linear CKA (loss = 1 - CKA). After the last stage the target
is trained end to end on the task. The baseline, *naive replacement*, swaps in
all target modules at once and trains them from scratch on the task alone, for
the same number of gradient steps.

Sections, in the order a script uses them:
  config          --key=value overrides of a script's module-level defaults
  distributed     torchrun / DDP setup with a single-process fallback
  cka             linear CKA, and its global-batch version under DDP
  capture/replace forward hooks by module name, early stop, module swapping
  data            ImageNet folders, generated images, a resumable batch stream
  training        optimizer, learning-rate schedule, evaluation helpers
  schedule        the NoT loop (and the naive baseline), checkpoints, results
"""
import ast
import contextlib
import copy
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ConfigError(SystemExit):
    """Bad user input: exits with the message, before any long work starts."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# -----------------------------------------------------------------------------
# config


def parse_config(defaults, argv, presets=None):
    """Return a copy of `defaults` overridden by `--key=value` arguments.

    Like nanoGPT's configurator, values are Python literals (`--lr=3e-4`,
    `--resume=True`) or bare strings (`--guide=random`), and each must keep the
    type of its default (an int is accepted where a float is expected).
    `--preset=NAME` applies `presets[NAME]` first, so explicit flags win.
    """
    presets = presets or {}
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(defaults))}")
        pairs.append((key, text))
    config = dict(defaults)
    for key, text in pairs:
        if key == "preset":
            if text not in presets:
                raise ConfigError(f"unknown preset {text!r}; valid presets: {', '.join(sorted(presets))}")
            config.update(presets[text])
            config["preset"] = text
    for key, text in pairs:
        if key != "preset":
            config[key] = _parse_value(key, text, defaults[key])
    return config


def check_choices(cfg, choices):
    """Stop unless each cfg[key] is one of choices[key]."""
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key}={cfg[key]}: expected one of {', '.join(map(str, allowed))}")


def _parse_value(key, text, default):
    kind = type(default)
    if kind is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"--{key}={text}: expected a {kind.__name__} like the default {default!r}")
    return value


# -----------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) or fall back to one process.

    NCCL on CUDA, gloo on CPU. `device` is "auto" (CUDA when present), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Dist(rank, local_rank, world, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, torch.device("cpu"))


def start(cfg):
    """The preamble of every script, before any long work: returns (ctx, log, cfg).

    Checks out_dir (unless only evaluating), joins the other processes, seeds
    and turns on TF32. The returned cfg holds the dtype the run really uses
    (float32 on CPU); log prints on rank 0 only.
    """
    if not cfg["eval_only"]:
        check_out_dir(cfg)
    ctx = setup_distributed(cfg["device"])
    if cfg["batch_size"] % ctx.world:
        raise ConfigError(f"--batch_size={cfg['batch_size']} is not divisible by {ctx.world} processes")
    # Every rank uses the same seed: new modules must start identical on all of them.
    seed_everything(cfg["seed"])
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = print if ctx.master else (lambda *args: None)
    return ctx, log, dict(cfg, dtype=cfg["dtype"] if ctx.device.type == "cuda" else "float32")


def rank0_first(load):
    """Call load() on each node's first process, then on the others: one download per node, the rest read its
    cached copy."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()
    result = load()
    if dist.is_initialized() and first:
        dist.barrier()
    return result


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()  # gloo may abort a process that leaves while another still works (rank 0 saving)
        dist.destroy_process_group()


def autocast(device, dtype):
    """bf16 autocast on CUDA (dtype "bfloat16"; float16 would need loss scaling, so it is not offered); float32
    on CPU."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    Every rank computes the same loss from the gathered batch, so the summed
    gradient is world x the true one; averaging parameter gradients over ranks
    (as DDP does) divides that factor out again.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]


def gather_batch(x):
    """The global batch of an activation (rows of all ranks, rank order), differentiable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x)


def average_gradients(params):
    """Average .grad over ranks: DDP's job, done by hand where no DDP wrapper is used (alignment)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# -----------------------------------------------------------------------------
# cka


def cka(x, y, unbiased=False):
    """Linear CKA (Kornblith et al. 2019) between two batches with the same first dimension n.

    Each example is flattened. Returns a differentiable float32 scalar, computed
    in float32 even under autocast. Two equivalent forms, the cheaper one used:
    the n x n Gram matrices when examples are fewer than features (the usual
    case for image feature maps), the d1 x d2 cross-covariance otherwise (tokens
    as examples). The Gram matrices are centered in place of the activations,
    and no d x d matrix is formed when d exceeds n.

    With unbiased=True the HSIC terms use the debiased estimator of Song et al.
    (2012), as in Nguyen et al. (2021); it needs n >= 4.

    Constant (or zero) activations carry no information: CKA is then 0, with
    finite gradients, never NaN.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"cka: x has {n} examples but y has {y.shape[0]}")
    if unbiased and n < 4:
        raise ValueError(f"cka: the unbiased estimator needs at least 4 examples, got {n}")
    with torch.autocast(x.device.type, enabled=False):
        x = _rows(x).float()
        y = _rows(y).float()
        d1, d2 = x.shape[1], y.shape[1]
        # Gram form costs n^2 (d1 + d2) multiply-adds, feature form n (d1 d2 + d1^2 + d2^2).
        if n * (d1 + d2) <= d1 * d1 + d1 * d2 + d2 * d2:
            gram_x, gram_y = x @ x.T, y @ y.T
            # The squared norms (for the floors below) are the traces: no further pass over the activations.
            sq_x, sq_y = gram_x.detach().trace(), gram_y.detach().trace()
            xy, xx, yy = _hsic_gram(gram_x, gram_y, unbiased)
        else:
            # vector_norm reads the activations once; x.square().sum() would first copy them.
            sq_x, sq_y = (torch.linalg.vector_norm(t.detach()).square() for t in (x, y))
            xy, xx, yy = _hsic_features(x, y, unbiased)
        # A variance below float32 noise relative to the raw scale counts as constant.
        tiny = torch.finfo(torch.float32).tiny
        floor_x = (1e-6 * sq_x).square() + tiny
        floor_y = (1e-6 * sq_y).square() + tiny
        degenerate = (xx <= floor_x) | (yy <= floor_y)
        value = xy / torch.sqrt(xx.clamp_min(floor_x) * yy.clamp_min(floor_y))
        return torch.where(degenerate, torch.zeros_like(value), value)


def _rows(x):
    # One row per example. CKA does not depend on the order of an example's features, so a channels_last
    # feature map is flattened in its memory order (a view) rather than copied into the logical order.
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def _center_gram(k):
    # H K H with H = I - 11^T/n, without forming H or centering the activations.
    row = k.mean(dim=0, keepdim=True)
    return k - row - row.T + row.mean()


def _hsic_gram(gram_x, gram_y, unbiased):
    k = _center_gram(gram_x)
    l = _center_gram(gram_y)
    if unbiased:
        return _hsic_unbiased(k, l), _hsic_unbiased(k, k), _hsic_unbiased(l, l)
    # Biased HSIC up to a constant factor that cancels in CKA.
    return (k * l).sum(), (k * k).sum(), (l * l).sum()


def _hsic_unbiased(k, l):
    # Song et al. 2012, eq. 5, on Gram matrices with zeroed diagonals. The
    # estimator is unchanged by centering the activations, which keeps float32 accurate.
    n = k.shape[0]
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    kl = (k * l).sum()
    k1, l1 = k.sum(dim=1), l.sum(dim=1)
    return (kl + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2 * (k1 @ l1) / (n - 2)) / (n * (n - 3))


def _hsic_features(x, y, unbiased):
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if not unbiased:
        # ||X^T Y||_F^2 = <XX^T, YY^T>: the same numbers as the Gram form.
        return (x.T @ y).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()
    n = x.shape[0]
    dx, dy = x.square().sum(dim=1), y.square().sum(dim=1)  # diagonals of the Gram matrices
    sx, sy = x.sum(dim=0), y.sum(dim=0)

    def hsic(a, b, da, db, sa, sb):
        ab = (a.T @ b).square().sum() - (da * db).sum()  # <K~, L~> with zeroed diagonals
        ka = a @ sa - da  # K~ 1
        lb = b @ sb - db  # L~ 1
        return (ab + ka.sum() * lb.sum() / ((n - 1) * (n - 2)) - 2 * (ka @ lb) / (n - 2)) / (n * (n - 3))

    return hsic(x, y, dx, dy, sx, sy), hsic(x, x, dx, dx, sx, sx), hsic(y, y, dy, dy, sy, sy)


def global_cka(x, y, unbiased=False, scope="global"):
    """CKA on the global batch under DDP (scope="global"), or on this process's slice ("local").

    CKA is a batch statistic, so the per-process value of a slice is a
    different, noisier quantity; the global one makes N processes behave
    exactly like one process with the whole batch. It costs an all_gather of
    the activations; where they are too large to gather, "local" skips it.
    """
    if scope == "global":
        x, y = gather_batch(x), gather_batch(y)
    return cka(x, y, unbiased)


# -----------------------------------------------------------------------------
# capture / replace


class _StopForward(Exception):
    pass


def forward_until(model, x, names):
    """Run `model(x)` and return the outputs of the named submodules, in the order of `names`.

    The forward pass stops right after the last of them has run: layers nobody
    reads (the rest of the network, the classifier, the logits) cost nothing.
    Each named module is expected to run once per forward pass.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing} in {type(model).__name__}")
    outputs = {}

    def hook(name):
        def save(module, inputs, output):
            outputs.setdefault(name, output)
            if len(outputs) == len(names):
                raise _StopForward

        return save

    handles = [modules[n].register_forward_hook(hook(n)) for n in set(names)]
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    not_run = [n for n in names if n not in outputs]
    if not_run:
        raise RuntimeError(f"submodules {not_run} did not run in the forward pass")
    return [outputs[n] for n in names]


def get_module(model, name):
    module = model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def set_module(model, name, new):
    """Put `new` where the dotted name points (`layer1.0.conv1`) and return what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def io_shapes(model, x, names):
    """Input and output shapes (without the batch dimension) of the named submodules for input x."""
    shapes = {}
    modules = dict(model.named_modules())

    def hook(name):
        def save(module, inputs, output):
            shapes.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))

        return save

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def replace(model, name, new, in_shape, out_shape):
    """Swap the submodule at `name` for `new` after checking that `new` maps the old input shape to the old output
    shape."""
    param = next(new.parameters(), None)
    device = param.device if param is not None else "cpu"
    with torch.no_grad():
        got = tuple(new(torch.zeros(2, *in_shape, device=device)).shape[1:])
    if got != tuple(out_shape):
        raise ValueError(f"replacement for {name!r} maps input {tuple(in_shape)} to {got}, "
                         f"but the module it replaces returns {tuple(out_shape)}")
    return set_module(model, name, new)


# -----------------------------------------------------------------------------
# data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_folders(data_dir):
    """Stop with a clear message unless data_dir holds train/ and val/ with the same non-empty class folders."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data_dir {data_dir!r} is not a folder (expected train/ and val/ inside)")
    classes = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise ConfigError(f"{root!r} is missing: data_dir must hold train/ and val/, one folder per class")
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not names:
            raise ConfigError(f"{root!r} holds no class folders")
        empty = [c for c in names if not any(os.scandir(os.path.join(root, c)))]
        if empty:
            raise ConfigError(f"class folders without images in {root!r}: {empty[:5]}")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ConfigError(f"train/ and val/ class folders differ in {data_dir!r}: only in train {only_train[:5]}, "
                          f"only in val {only_val[:5]}")
    return classes["train"]


def image_folders(data_dir, image_size=224, interpolation="bilinear"):
    """ImageNet-style train and val datasets: RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation.

    Evaluation resizes to image_size * 256 / 224 (256 for 224) and crops the center, as torchvision's references
    do; `interpolation` is the resampling of both ("bicubic" in DINOv2's official evaluation).
    """
    from torchvision import datasets, transforms

    check_image_folders(data_dir)
    resize_size = round(image_size * 256 / 224)
    mode = transforms.InterpolationMode(interpolation)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size, interpolation=mode),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(resize_size, interpolation=mode), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), normalize])
    return (datasets.ImageFolder(os.path.join(data_dir, "train"), train_tf),
            datasets.ImageFolder(os.path.join(data_dir, "val"), val_tf))


def synthetic_images(num_train, num_val, num_classes, image_size, shift=0, seed=0):
    """Learnable generated images for offline runs: a fixed smooth pattern per class plus noise.

    The patterns are random low-resolution images upsampled, so a CNN and an
    MLP can both learn them, while the noise keeps the task from being trivial.
    With shift > 0 each image rolls its pattern by up to `shift` pixels in each
    direction (wrapping around): a convolution sees the same pattern anywhere,
    a fully connected layer must learn each position apart, so an MLP trails a CNN.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear",
                             align_corners=False)

    def make(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        images = patterns[labels]
        if shift:
            offsets = torch.randint(-shift, shift + 1, (n, 2), generator=g).tolist()
            images = torch.stack([img.roll((dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(images, offsets)])
        images = images + 1.5 * torch.randn(n, 3, image_size, image_size, generator=g)
        return torch.utils.data.TensorDataset(images, labels)

    return make(num_train), make(num_val)


def image_data(cfg, interpolation="bilinear"):
    """(train set, val set, number of classes): ImageNet folders when cfg["data_dir"] is set, else generated images."""
    if cfg["data_dir"]:
        train_set, val_set = image_folders(cfg["data_dir"], cfg["image_size"], interpolation)
        return train_set, val_set, len(train_set.classes)
    # The generated data set is the same for every --seed: seeds vary the runs, not the task.
    train_set, val_set = synthetic_images(cfg["synthetic_train"], cfg["synthetic_val"], cfg["num_classes"],
                                          cfg["image_size"], cfg["synthetic_shift"], seed=0)
    return train_set, val_set, cfg["num_classes"]


class Batches:
    """An endless stream of training batches whose position is saved in checkpoints.

    Each epoch is one pass of a DistributedSampler (this rank's share of a
    seeded shuffle, the same on every restart); the stream records the epoch
    and the batch index within it, so a resumed run sees the same data order
    as one that never stopped. Random augmentations are re-seeded on resume
    and so are not bitwise identical to an uninterrupted run.
    """

    def __init__(self, dataset, batch_size, seed, rank=0, world=1, workers=0, pin_memory=False):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.workers, self.pin_memory = rank, world, workers, pin_memory
        self.epoch, self.index, self._iter = 0, 0, None
        if len(dataset) < batch_size * world:
            raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one global batch "
                              f"({batch_size} x {world} processes)")

    def __len__(self):
        """Batches per epoch."""
        return len(self.dataset) // (self.batch_size * self.world)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            sampler = torch.utils.data.DistributedSampler(self.dataset, self.world, self.rank, shuffle=True,
                                                          seed=self.seed, drop_last=True)
            sampler.set_epoch(self.epoch)
            indices = list(sampler)[self.index * self.batch_size:len(self) * self.batch_size]
            # A generator of its own: starting an iterator draws a seed for the workers, which must not move
            # the global RNG (the new modules' initialization depends on it).
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, self.batch_size, sampler=indices, drop_last=True,
                                                 num_workers=self.workers, pin_memory=self.pin_memory,
                                                 generator=generator)
            self._iter = iter(loader)
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


def eval_loader(dataset, batch_size, rank=0, world=1, workers=0, pin_memory=False):
    """This rank's share of an evaluation set: every example once over all ranks, none padded or repeated."""
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(subset, batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory)


@torch.no_grad()
def evaluate_accuracy(model, loader, device, dtype="float32", max_batches=0):
    """Top-1 accuracy in percent, summed over all ranks (each example counted once)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (images, labels) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        counts[0] += (logits.argmax(dim=1) == labels).sum()
        counts[1] += labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    return 100.0 * counts[0].item() / max(counts[1].item(), 1)


def classification_task(val_loader, device, dtype, label_smoothing=0.0):
    """The Task of an image classifier: cross-entropy on (images, labels) batches, top-1 on val_loader."""

    def loss(model, batch):
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)

    return Task(loss=loss, inputs=lambda batch: batch[0],
                evaluate=lambda model: evaluate_accuracy(model, val_loader, device, dtype), metric="top1")


# -----------------------------------------------------------------------------
# training


def make_optimizer(params, kind, lr, weight_decay, device):
    """AdamW or SGD with momentum; weight decay on matrices and kernels only, not on biases and norms."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ConfigError(f"optimizer {kind!r} is not one of adamw, sgd")


def lr_at(step, steps, peak, warmup):
    """Linear warmup for `warmup` steps, then cosine decay to zero at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# Dense bf16 peak FLOP/s by a part of the name torch.cuda.get_device_name reports; the first match wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device):
    """The bf16 peak FLOP/s of the card in use, for MFU; None on CPU and on cards not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for part, flops in PEAK_FLOPS if part in name), None)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, renamed onto it when the block succeeds: a crash leaves the old file or
    the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
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


def load_checkpoint(path):
    """torch.load a file we wrote, with a clear message when it is missing or not a checkpoint."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path!r} could not be read ({type(e).__name__}: {e}); "
                          f"is it a truncated or foreign file?") from None


def state_dict_mismatch(state, expected):
    """Why `state` would not load into a model whose state dict is `expected`: a list of
    "missing keys [...]", "unexpected keys [...]", "wrong shapes [...]" (empty when it fits)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if keys:
            problems.append(f"{what} {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else ""))
    return problems


# -----------------------------------------------------------------------------
# schedule


@dataclass
class Stage:
    """One NoT stage.

    swap(hybrid): puts this stage's new, freshly initialized target modules into the hybrid (usually one
        `replace` per module; a block-level conversion may also add or remove adapters).
    compare: (guide module, hybrid module) name pairs whose outputs CKA matches; often the same name twice.
    train: the hybrid modules trained during alignment (the new ones).
    """
    swap: Callable
    compare: list
    train: list
    align_steps: int
    align_lr: float
    finetune_steps: int
    finetune_lr: float


@dataclass
class Task:
    """What a script tells the schedule about its task.

    loss(model, batch): the task loss of a training batch (the model may be DDP-wrapped).
    inputs(batch): the model input of a batch, fed to guide and hybrid during alignment.
    evaluate(model): the task metric on the validation set, all ranks together.
    metric: its name, e.g. "top1" or "val_ppl".
    lower_is_better: the metric's direction (perplexity: True), for the validation-selected result.
    flops_per_example(model): training FLOPs (forward and backward) of one example, for the model FLOPs
        utilization (MFU) in the task phases' log lines; None: no MFU.
    """
    loss: Callable
    inputs: Callable
    evaluate: Callable
    metric: str
    lower_is_better: bool = False
    flops_per_example: Callable = None


def total_grad_steps(stages, train_steps):
    """Gradient steps of a NoT run: every stage's alignment and task fine-tuning, then the final training.

    The naive baseline trains for exactly this many steps.
    """
    return sum(s.align_steps + s.finetune_steps for s in stages) + train_steps


def plan_phases(method, stages, train_steps):
    """The run as a list of (kind, stage index or None, steps).

    kinds: "align" (CKA, new modules only), "finetune" (task loss, whole
    hybrid, then the per-stage evaluation), "train" (task loss, whole model).
    """
    if method == "naive":
        return [("train", None, total_grad_steps(stages, train_steps))]
    phases = []
    for i, stage in enumerate(stages):
        phases += [("align", i, stage.align_steps), ("finetune", i, stage.finetune_steps)]
    return phases + [("train", None, train_steps)]


# Settings a resumed run may change: they do not alter what the run computes (paths may differ between machines).
RESUMABLE_CHANGES = {"resume", "log_interval", "ckpt_interval", "workers", "tokenizer_file", "cache_dir", "compile"}


def check_out_dir(cfg):
    """Before any work: --resume needs a checkpoint, and a new run must not overwrite another."""
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["resume"] and not os.path.isfile(ckpt_path):
        raise ConfigError(f"--resume=True but there is no checkpoint at {ckpt_path!r}")
    if not cfg["resume"] and os.path.exists(ckpt_path):
        raise ConfigError(f"{cfg['out_dir']!r} already holds a run (ckpt.pt); pass --resume=True to continue it, "
                          f"or choose another --out_dir")


def convert(guide, stages, task, batches, cfg, ctx, train_steps, log=print):
    """Run NoT (cfg["method"] == "not") or the naive baseline ("naive"); return (target, results).

    cfg keys used: method, out_dir, resume, eval_guide, optimizer, lr, weight_decay,
    warmup_steps, grad_clip, cka_scope, cka_unbiased, dtype, log_interval,
    eval_interval, ckpt_interval, compile, and shard where a script offers it
    (FSDP instead of DDP in the task phases). Rank 0 keeps the checkpoint in
    out_dir/ckpt.pt and the results in out_dir/results.json.

    Alignment (per stage): the hybrid runs in eval mode (frozen BatchNorm keeps
    the guide's statistics), only the stage's `train` modules learn, and the
    loss is the mean over its `compare` pairs of 1 - CKA between the hybrid's
    output (fed by the hybrid's own upstream layers) and the guide's. Both
    forward passes stop after the deepest compared module; the guide's runs once per
    batch without autograd. Fine-tuning and final training update every
    parameter on the task loss, under DDP when several processes run.
    """
    method = cfg["method"]
    phases = plan_phases(method, stages, train_steps)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    guide.eval().requires_grad_(False)
    hybrid = copy.deepcopy(guide)
    # Where the run is; saved whole in every checkpoint. `applied`: stages swapped into the hybrid.
    state = {"phase": 0, "step": 0, "applied": 0, "grad_steps": 0, "records": [], "recent_cka": [], "evals": [],
             "guide_metric": None}
    optimizer_state = None
    if cfg["resume"]:
        ckpt = load_checkpoint(ckpt_path)
        changed = {k for k in cfg if k not in RESUMABLE_CHANGES and ckpt["config"].get(k) != cfg[k]}
        if changed:
            differences = ", ".join(f"{k} (was {ckpt['config'].get(k)!r}, now {cfg[k]!r})" for k in sorted(changed))
            raise ConfigError(f"--resume with settings that differ from the checkpoint's: {differences}")
        state = ckpt["state"]
        for stage in stages[:state["applied"]]:
            stage.swap(hybrid)
        hybrid.to(ctx.device).load_state_dict(ckpt["model"])
        batches.load_state_dict(ckpt["batches"])
        _set_rng_state(ckpt["rng"][ctx.rank])
        optimizer_state = ckpt["optimizer"]
        log(f"resumed from {ckpt_path} at phase {state['phase']} step {state['step']}")
    else:
        if ctx.master:
            os.makedirs(cfg["out_dir"], exist_ok=True)
        if cfg["eval_guide"]:
            state["guide_metric"] = task.evaluate(guide)
            log(f"guide {task.metric} {state['guide_metric']:.4f}")

    for p in range(state["phase"], len(phases)):
        kind, si, steps = phases[p]
        wanted = len(stages) if si is None else si + 1
        while state["applied"] < wanted:
            stages[state["applied"]].swap(hybrid)
            hybrid.to(ctx.device)
            state["applied"] += 1
        if kind == "align":
            _align_phase(guide, hybrid, si, stages[si], task, batches, cfg, ctx, state, optimizer_state,
                         ckpt_path, log)
        else:
            peak = stages[si].finetune_lr if kind == "finetune" else cfg["lr"]
            warmup = cfg["warmup_steps"] if kind == "train" else steps // 10
            label = f"stage {si + 1} finetune" if kind == "finetune" else "train"
            _task_phase(hybrid, label, steps, peak, warmup, kind == "train", task, batches, cfg, ctx, state,
                        optimizer_state, ckpt_path, log)
        optimizer_state = None
        if kind == "align" and stages[si].finetune_steps > 0:
            # The hybrid straight after alignment: shows what CKA alone leaves to the frozen layers downstream.
            state["records"][si][f"{task.metric}_before_finetune"] = task.evaluate(hybrid)
        if kind == "finetune":
            record = state["records"][si]
            record["finetune_steps"] = steps
            record[task.metric] = task.evaluate(hybrid)
            log(f"stage {si + 1}/{len(stages)} done | {task.metric} {record[task.metric]:.4f} | "
                f"cka {_fmt_cka(record['cka'])}")
        state["phase"], state["step"] = p + 1, 0
        _save(ckpt_path, hybrid, None, batches, cfg, ctx, state)
        write_results(cfg, state, task, None, "running", ctx)

    final = task.evaluate(hybrid)
    state["evals"].append([state["grad_steps"], final])
    log(f"final {task.metric} {final:.4f} after {state['grad_steps']} gradient steps")
    return hybrid, write_results(cfg, state, task, final, "done", ctx)


def _fmt_cka(values):
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def _align_phase(guide, hybrid, si, stage, task, batches, cfg, ctx, state, optimizer_state, ckpt_path, log):
    hybrid.eval().requires_grad_(False)
    params = []
    for name in stage.train:
        module = get_module(hybrid, name).train().requires_grad_(True)
        params += list(module.parameters())
    opt = make_optimizer(params, "adamw", stage.align_lr, 0.0, ctx.device)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    if state["step"] == 0:
        state["records"].append({"stage": si + 1, "replaced": list(stage.train), "align_steps": stage.align_steps,
                                 "cka": {}})
    recent = state["recent_cka"]
    guide_names = [g for g, _ in stage.compare]
    t0, logged = time.time(), state["step"]
    for step in range(state["step"], stage.align_steps):
        lr = lr_at(step, stage.align_steps, stage.align_lr, stage.align_steps // 10)
        for group in opt.param_groups:
            group["lr"] = lr
        x = task.inputs(next(batches)).to(ctx.device, non_blocking=True)
        values = align_step(guide, hybrid, stage.compare, x, opt, params, cfg, ctx.device)
        state["grad_steps"] += 1
        recent[:] = (recent + [values])[-10:]
        if (step + 1) % cfg["log_interval"] == 0 or step + 1 == stage.align_steps:
            dt = (time.time() - t0) / (step + 1 - logged)
            t0, logged = time.time(), step + 1
            log(f"stage {si + 1} align step {step + 1}/{stage.align_steps} | loss {1 - sum(values) / len(values):.4f}"
                f" | cka {_fmt_cka(dict(zip(guide_names, values)))} | lr {lr:.2e} | {dt * 1000:.1f} ms/step | "
                f"{x.shape[0] * ctx.world / dt:.0f} samples/s")
        _maybe_save(step, stage.align_steps, ckpt_path, hybrid, opt.state_dict, batches, cfg, ctx, state)
    # A stage's final CKA: the mean over its last (up to) 10 alignment steps.
    if recent:
        state["records"][si]["cka"] = {n: sum(v[i] for v in recent) / len(recent) for i, n in enumerate(guide_names)}
    recent.clear()


def align_step(guide, hybrid, compare, x, opt, params, cfg, device):
    """One alignment step on input x; returns the CKA of each (guide, hybrid) pair in `compare` (floats)."""
    with torch.no_grad(), autocast(device, cfg["dtype"]):
        targets = forward_until(guide, x, [g for g, _ in compare])
    with autocast(device, cfg["dtype"]):
        outputs = forward_until(hybrid, x, [h for _, h in compare])
    values = [global_cka(h, g, cfg["cka_unbiased"], cfg["cka_scope"]) for h, g in zip(outputs, targets)]
    loss = 1.0 - torch.stack(values).mean()
    loss.backward()
    average_gradients(params)
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return [v.item() for v in values]


def _task_phase(hybrid, label, steps, peak_lr, warmup, is_final, task, batches, cfg, ctx, state, optimizer_state,
                ckpt_path, log):
    hybrid.train().requires_grad_(True)
    # `trained`: the hybrid itself, or (resnet18_to_mlp.py's --shard) a copy sharded over the processes.
    sharded = cfg.get("shard", False) and ctx.world > 1
    trained = _shard(copy.deepcopy(hybrid)) if sharded else hybrid
    # Compiled for the final training only: each stage's fine-tuning is short and meets a new architecture
    # (a compilation each), and alignment stops its forward passes by raising from hooks.
    model = torch.compile(trained) if is_final and cfg["compile"] else trained
    if ctx.world > 1 and not sharded:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    opt = make_optimizer(trained.parameters(), cfg["optimizer"], peak_lr, cfg["weight_decay"], ctx.device)
    opt_state = opt.state_dict
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        # Checkpoints hold the whole hybrid and the whole optimizer state, as unsharded runs do.
        def gathered_state():
            _copy_shards(trained, hybrid)
            return get_optimizer_state_dict(trained, opt, options=StateDictOptions(full_state_dict=True))

        opt_state = gathered_state
        if optimizer_state is not None:
            set_optimizer_state_dict(trained, opt, optimizer_state, options=StateDictOptions(full_state_dict=True))
    elif optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    flops = task.flops_per_example(hybrid) if task.flops_per_example else None
    peak = peak_flops(ctx.device)
    t0, logged = time.time(), state["step"]
    for step in range(state["step"], steps):
        lr = lr_at(step, steps, peak_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        with autocast(ctx.device, cfg["dtype"]):
            loss = task.loss(model, batch)
        loss.backward()
        loss = loss.detach()  # the value for the log line; the graph would keep a sharded copy alive (see below)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["grad_steps"] += 1
        if (step + 1) % cfg["log_interval"] == 0 or step + 1 == steps:
            dt = (time.time() - t0) / (step + 1 - logged)
            t0, logged = time.time(), step + 1
            n = task.inputs(batch).shape[0]
            mfu = ""
            if flops:  # nanoGPT's model FLOPs utilization: this process's FLOP/s over its card's peak
                mfu = f" | mfu {100 * flops * n / dt / peak:.1f}%" if peak else " | mfu n/a"
            log(f"{label} step {step + 1}/{steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{dt * 1000:.1f} ms/step | {n * ctx.world / dt:.0f} samples/s{mfu}")
        _maybe_save(step, steps, ckpt_path, hybrid, opt_state, batches, cfg, ctx, state)
        if is_final and cfg["eval_interval"] and (step + 1) % cfg["eval_interval"] == 0 and step + 1 < steps:
            if sharded:
                _copy_shards(trained, hybrid)
            state["evals"].append([state["grad_steps"], task.evaluate(hybrid)])
            log(f"{label} step {step + 1}/{steps} | {task.metric} {state['evals'][-1][1]:.4f}")
    if sharded:
        _copy_shards(trained, hybrid)
        # fully_shard's hooks hold the sharded copy in reference cycles: without a collection, its shards and its
        # optimizer state would stay allocated until Python's collector next runs, perhaps only at interpreter
        # exit, after the process group they belong to is destroyed.
        del model, trained, opt, opt_state, gathered_state
        gc.collect()


def _shard(model):
    """Shard model over all processes with FSDP (fully_shard): each Linear is a unit of its own (the low-rank maps
    hold nearly all the weights), the rest is the root's. Weights, gradients and optimizer state are then split
    over the processes; each unit's weights are gathered only while it computes."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    return fully_shard(model)


@torch.no_grad()
def _copy_shards(sharded, hybrid):
    """Put the sharded copy's weights, gathered, into the plain hybrid, with rank 0's buffers (BatchNorm
    statistics), which DDP would have broadcast."""
    params = dict(hybrid.named_parameters())
    for name, p in sharded.named_parameters():
        params[name].copy_(p.full_tensor())
    buffers = dict(hybrid.named_buffers())
    for name, b in sharded.named_buffers():
        dist.broadcast(b, 0)
        buffers[name].copy_(b)


def _maybe_save(step, steps, path, hybrid, opt_state, batches, cfg, ctx, state):
    # Phase ends are saved by the schedule itself; mid-phase every ckpt_interval steps.
    if (step + 1) % cfg["ckpt_interval"] == 0 and step + 1 < steps:
        state["step"] = step + 1
        _save(path, hybrid, opt_state, batches, cfg, ctx, state)


def _rng_state():
    # Python values only (bytes for tensors and arrays): they travel through all_gather_object and
    # load back with torch.load(weights_only=True).
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


def _save(path, hybrid, opt_state, batches, cfg, ctx, state):
    """The one checkpoint dict: where the run is, the hybrid, the phase's optimizer, the data position, every
    rank's RNG.

    opt_state: None between phases, else a function returning the optimizer's state dict, called on every
    process (a sharded optimizer gathers its state).
    """
    optimizer = opt_state() if opt_state is not None else None
    rngs = [None] * ctx.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if ctx.master:
        save_atomic({"config": cfg, "state": state, "model": hybrid.state_dict(),
                     "optimizer": optimizer,
                     "batches": batches.state_dict(), "rng": rngs}, path)


def write_results(cfg, state, task, final, status, ctx):
    """results.json: config, per-stage records, the final (and validation-selected) metric, the gradient steps."""
    # "script" names the conversion for `python common.py report`; torchrun keeps the script as argv[0] too.
    # "evals": (gradient step, metric) of the final training's validations; "best" selects among them.
    evals = state["evals"]
    best = (min if task.lower_is_better else max)(evals, key=lambda e: e[1]) if evals else None
    results = {"script": os.path.basename(sys.argv[0]), "status": status, "config": cfg,
               "guide_metric": state["guide_metric"], "stages": state["records"],
               "metric": {"name": task.metric, "value": final, "lower_is_better": task.lower_is_better},
               "grad_steps": state["grad_steps"],
               "evals": evals, "best": {"value": best[1], "step": best[0]} if best else None}
    if ctx.master:
        write_json(os.path.join(cfg["out_dir"], "results.json"), results)
    return results


# -----------------------------------------------------------------------------
# report: python common.py report RUN_DIR... [--out=DIR] [--select=final|best]

# Settings that never make two runs incomparable: the seed, where files go, how often the run logs or evaluates.
_NOT_COMPARED = RESUMABLE_CHANGES | {"seed", "out_dir", "eval_interval", "eval_only", "preset", "guide", "method",
                                     "eval_guide"}
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
        siblings = [json.loads(c) for s, c in groups if s == script]
        mine = json.loads(compared)
        differ = sorted({k for other in siblings for k in set(other) | set(mine) if other.get(k) != mine.get(k)})
        row = {"script": script, "metric": members[0]["metric"]["name"], "runs": members,
               "settings": ", ".join(f"{k}={mine.get(k)}" for k in differ)}
        trained = [r["guide_metric"] for r in members
                   if r["config"]["guide"] != "random" and r["guide_metric"] is not None]
        row["guide"] = _mean_se(trained)
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
        raise ConfigError(f"--select={select}: expected final or best")
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
    lines = ["| conversion | metric | settings | " + " | ".join(headings) + " |",
             "|" + "---|" * (3 + len(headings))]
    csv = ["conversion,metric,settings,column,mean,standard_error,seeds"]
    for row in rows:
        cells = [row["guide"]] + [row.get(h) for h in headings[1:]]
        lines.append(f"| {row['script']} | {row['metric']} | {row['settings']} | "
                     + " | ".join(_fmt(c) for c in cells) + " |")
        for heading, cell in zip(headings, cells):
            if cell is not None:
                se = "" if cell[1] is None else f"{cell[1]:.10g}"
                csv.append(f"{row['script']},{row['metric']},\"{row['settings']}\",{heading},{cell[0]:.10g},{se},"
                           f"{cell[2]}")
    os.makedirs(out_dir, exist_ok=True)
    table = "\n".join(lines) + "\n"
    say(table)
    for name, text in (("table.md", table), ("table.csv", "\n".join(csv) + "\n")):
        with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w") as f:
            f.write(text)
    # One figure per conversion and setting, forward and reverse order together.
    figures = _group(runs, _NOT_COMPARED | {"order"})
    for i, ((script, _), members) in enumerate(sorted(figures.items())):
        several = sum(s == script for s, _ in figures) > 1
        path = os.path.join(out_dir, f"figure1-{os.path.splitext(script)[0]}" + (f"-{i}" if several else "") + ".png")
        if plot_stages(members, path):
            say(f"wrote {path}")


def stage_curves(runs):
    """Figure 1's data: {label: [(stage, mean metric over seeds)]} for NoT runs, {label: value} for the baselines.

    Stage 0 is the guide; stage k the hybrid after the k-th stage (after its task fine-tuning); one more
    point, after the last stage, is the target after its final training.
    """
    curves, lines = {}, {}
    for run in runs:
        guide = "untrained" if run["config"]["guide"] == "random" else "trained"
        name = run["metric"]["name"]
        if run["config"]["method"] == "not":
            label = f"NoT {run['config']['order']}, {guide} guide"
            points = [(0, run["guide_metric"])] if run["guide_metric"] is not None else []
            points += [(s["stage"], s[name]) for s in run["stages"] if name in s]
            points.append((len(run["stages"]) + 1, run["metric"]["value"]))
            curves.setdefault(label, []).append(dict(points))
        else:
            method = run["config"]["method"]
            label = "scratch" if method == "scratch" else f"{method}, {guide} guide"
            lines.setdefault(label, []).append(run["metric"]["value"])
    mean_curves = {}
    for label, per_seed in curves.items():
        stages = sorted(set().union(*per_seed))
        mean_curves[label] = [(k, sum(p[k] for p in per_seed if k in p) / sum(k in p for p in per_seed))
                              for k in stages]
    return mean_curves, {label: sum(v) / len(v) for label, v in lines.items()}


def plot_stages(runs, path, size=(900, 560)):
    """Draw Figure 1 (metric after each stage; baselines as dashed lines) as a PNG; False when there is nothing to
    draw."""
    from PIL import Image, ImageDraw, ImageFont

    curves, lines = stage_curves(runs)
    if not curves:
        return False
    values = [v for c in curves.values() for _, v in c] + list(lines.values())
    # A log axis for a lower-is-better metric (perplexity) whose values span more than a factor of 10 (an untrained
    # guide's against a trained one's); accuracies stay linear.
    log = runs[0]["metric"].get("lower_is_better", False) and min(values) > 0 and max(values) / min(values) > 10
    scale = math.log10 if log else float
    low, high = scale(min(values)), scale(max(values))
    margin = max(high - low, 1e-6) * 0.05
    low, high = low - margin, high + margin
    if not log and min(values) >= 0:
        low = max(low, 0.0)  # no negative axis for accuracies
    stages = max(k for c in curves.values() for k, _ in c)
    left, right, top, bottom = 80, 250, 50, 60
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)

    def xy(stage, value):
        x = left + (width - left - right) * stage / max(stages, 1)
        y = height - bottom - (height - top - bottom) * (scale(value) - low) / (high - low)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        tick = low + (high - low) * i / 4
        value = 10 ** tick if log else tick
        _, y = xy(0, value)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((5, y - 7), f"{value:.4g}", fill="black", font=font)
    for k in range(stages + 1):
        x, _ = xy(k, min(values))
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 4, height - bottom + 8), "final" if k == stages else str(k), fill="black", font=font)
    draw.text((left, 15), f"{runs[0]['script']}: {runs[0]['metric']['name']} after each stage (stage 0: the guide)"
              + (", log scale" if log else ""), fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 60, height - 25), "stage (final: after end-to-end training)",
              fill="black", font=font)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    legend_y = top
    for color, (label, points) in zip(palette, sorted(curves.items())):
        draw.line([xy(k, v) for k, v in points], fill=color, width=3)
        for k, v in points:
            x, y = xy(k, v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.line([width - right + 15, legend_y + 8, width - right + 40, legend_y + 8], fill=color, width=3)
        draw.text((width - right + 45, legend_y), label, fill="black", font=font)
        legend_y += 22
    for color, (label, value) in zip(palette[len(curves):] + palette, sorted(lines.items())):
        _, y = xy(0, value)
        for x in range(left, width - right, 16):
            draw.line([x, y, min(x + 8, width - right), y], fill=color, width=2)
        draw.line([width - right + 15, legend_y + 8, width - right + 40, legend_y + 8], fill=color, width=2)
        draw.text((width - right + 45, legend_y), label + " (final)", fill="black", font=font)
        legend_y += 22
    with atomic_path(path) as tmp:
        image.save(tmp, "PNG")
    return True


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "report":
        sys.exit("usage: python common.py report RUN_DIR... [--out=DIR] [--select=final|best]")
    options = parse_config({"out": ".", "select": "final"}, [a for a in sys.argv[2:] if a.startswith("--")])
    report([a for a in sys.argv[2:] if not a.startswith("--")], options["out"], options["select"])
