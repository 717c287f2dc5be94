"""
What Network of Theseus costs and what it buys, for all four conversions, measured side by side in one
process (in the manner of nanoGPT's bench.py). Writes bench.json and prints a table.

    python tools/bench.py                    # --size=tiny: the presets' models, on CPU, about a minute
    python tools/bench.py --size=paper       # the paper's models, on a GPU
    python tools/bench.py --out=PATH         # bench.json elsewhere (default: the current folder)

Every timing is the median of `repeats` runs after `warmup` runs (CUDA synchronized around each).
1. cka_over_gram: common.cka on ResNet-18's layer1 and layer2 outputs at 224 px for 64 images
   (64 x 200704 against 64 x 100352) over one plain x @ x.T of the larger (each in seconds: cka_s,
   gram_s), and the peak memory CKA adds beyond its inputs (cka_peak_extra_bytes against cka_input_bytes).
2. first_over_last_stage: the alignment step (common.align_step) of the first stage over that of the
   last, same batch; early exit makes early stages cheap.
3. align_over_train: the mean alignment step over all stages over one training step of the guide
   (forward, backward, AdamW step) at the same batch.
4. inference: guide against target: parameters, FLOPs per example, examples per second and peak memory
   (weights, input and activations) at the bench batch. GPT-2 generates instead: one decoding step at
   position context - 1 for a batch of sequences, GPT-2 reading a key-value cache of `context` positions,
   the RNN its state; tokens per second, FLOPs per token and the cache or state bytes per sequence.
5. scale: ResNet-18 -> MLP at 224 px, parameters and per-GPU training memory (float32 weights and
   gradients and AdamW's two moments: 16 bytes a parameter, before activations) by rank, DDP (a whole
   copy per GPU) against sharded over 8 GPUs (resnet18_to_mlp.py --shard=True). The 16 holds because
   DDP's gradients are views of its buckets (gradient_as_bucket_view): ddp_bytes_per_param measures a
   process's resident memory per parameter after two DDP steps with AdamW (two gloo processes, CPU,
   33.6 M parameters), with and without it; the difference is the second copy of every gradient.

--size=tiny takes each script's tiny preset, except that the two transformers get 12 blocks (their
presets have 4 and 2) so that the early-exit ratio is about 12-block models; the images of the DINOv2
rows are 32 and 72 px there (for 224 and 518). --size=paper takes the scripts' defaults with random
weights (timings do not depend on them) and a batch of 32, one GPU's share of the global 256 on 8 GPUs.
Peak memory comes from CUDA's allocator on a GPU; on CPU from counting every tensor created while the
measured code runs, for as long as it lives. FLOPs are counted by torch.utils.flop_counter with
attention and RNNs in their plain matrix-product forms, which it can see.
"""
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import dinov2_to_patchmlp  # noqa: E402
import gpt2_to_rnn  # noqa: E402
import resnet18_to_mlp  # noqa: E402
import resnet50_to_resnet18  # noqa: E402

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
size = "tiny"  # "tiny" (the presets, CPU) or "paper" (the paper's models, a GPU)
out = "bench.json"
batch_size = 0  # examples per batch; 0: the preset's at tiny, 32 at paper
repeats = 10  # timed runs per measurement (the median is reported)
warmup = 3  # untimed runs before them
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast dtype on CUDA; CPU always runs float32
seed = 0
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# -----------------------------------------------------------------------------

CKA_SHAPES = ((64, 64 * 56 * 56), (64, 128 * 28 * 28))  # ResNet-18's layer1 and layer2 outputs, 64 images at 224 px
CONTEXTS = (128, 512, 1024)
MLP_RANKS = (256, 512, 1024)
SHARDS = 8
BYTES_PER_PARAM = 16  # float32 weight, gradient, and AdamW's two moments


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats, warmup):
    """The median wall time of fn() in seconds, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors that operations create inside the block, at their peak, each counted while it lives.

    Outputs that share an input's storage (views) are not new memory; a storage counts once.
    """

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()

    def _free(self, ptr, nbytes):
        self.live.discard(ptr)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(result):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and ptr not in inputs and ptr not in self.live:
                self.live.add(ptr)
                self.now += nbytes
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._free, ptr, nbytes)
        return result


def peak_extra_memory(fn, device):
    """Bytes that fn() allocates beyond what exists when it starts, at their peak."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorMemory() as memory:
        fn()
    return memory.peak


def count_flops(fn):
    """Floating-point operations of fn() (a multiply-add counts 2), attention and RNNs as plain matrix products."""
    with sdpa_kernel(SDPBackend.MATH), torch.backends.cudnn.flags(enabled=False), \
            FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def num_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def nbytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -----------------------------------------------------------------------------
# the four conversions, built at a size


@dataclass
class Conversion:
    cfg: dict  # the script's config at this size
    guide: nn.Module
    stages: list
    x: torch.Tensor  # one batch of model input
    loss: Callable  # loss(model, x): the task loss of the batch (random targets)
    inference: Callable  # inference(bench): the rows of item 4


def script_config(script, size, *tiny_flags):
    """The script's settings at this size: its defaults (paper), or its tiny preset with these flags."""
    return common.configure(script.SETTINGS, ["--preset=tiny", *tiny_flags] if size == "tiny" else [], script.PRESETS)


def classification_loss(num_classes, x):
    labels = torch.randint(num_classes, (x.shape[0],), device=x.device)
    return lambda model, x: F.cross_entropy(model(x), labels)


def images(batch, image_size, device):
    return torch.randn(batch, 3, image_size, image_size, device=device)


def image_rows(bench, guide, target, x, setting):
    """Item 4 for an image classifier pair on the batch x."""
    rows = []
    for name, model in (("guide", guide), ("target", target)):
        model = model.to(bench.device).eval()

        @torch.no_grad()
        def forward(batch=x):
            with common.autocast(bench.device, bench.dtype):
                return model(batch)

        seconds = median_time(forward, bench.device, bench.repeats, bench.warmup)
        rows.append({"model": name, "setting": setting, "params": num_params(model),
                     "flops_per_example": count_flops(lambda: forward(x[:1])),
                     "examples_per_s": x.shape[0] / seconds,
                     "peak_memory_bytes": nbytes(model) + x.nbytes + peak_extra_memory(forward, bench.device)})
    return rows


def resnet18_mlp(bench):
    cfg = script_config(resnet18_to_mlp, bench.size)
    classes = cfg.num_classes if bench.size == "tiny" else 1000
    guide = resnet18_to_mlp.load_guide("random", classes).to(bench.device)
    x = images(bench.batch(cfg), cfg.image_size, bench.device)

    def inference(bench):
        target = common.swapped(guide, stages)
        return image_rows(bench, guide, target, x, f"{cfg.image_size} px, rank {cfg.rank}")

    stages = resnet18_to_mlp.make_stages(guide, x[:1], cfg)
    return Conversion(cfg, guide, stages, x, classification_loss(classes, x), inference)


def resnet50_resnet18(bench):
    cfg = script_config(resnet50_to_resnet18, bench.size)
    classes = cfg.num_classes if bench.size == "tiny" else 1000
    guide = resnet50_to_resnet18.load_guide("random", classes).to(bench.device)
    x = images(bench.batch(cfg), cfg.image_size, bench.device)

    def inference(bench):
        return image_rows(bench, guide, torchvision.models.resnet18(num_classes=classes), x, f"{cfg.image_size} px")

    return Conversion(cfg, guide, resnet50_to_resnet18.make_stages(guide, cfg), x,
                      classification_loss(classes, x), inference)


def dinov2_patchmlp(bench):
    cfg = script_config(dinov2_to_patchmlp, bench.size, "--depth=12")
    classes = cfg.num_classes if bench.size == "tiny" else 1000

    def guide_at(image_size):
        return dinov2_to_patchmlp.load_guide("random", image_size, cfg.head_layers, classes, cfg.embed_dim,
                                             cfg.depth, cfg.patch_size).to(bench.device)

    guide = guide_at(cfg.image_size)
    x = images(bench.batch(cfg), cfg.image_size, bench.device)

    def inference(bench):
        rows = []
        # 224 and 518 px, the second as many patches a side larger at tiny size as 518 is over 224
        large = 518 if bench.size == "paper" else cfg.patch_size * round(518 / 224 * cfg.image_size /
                                                                            cfg.patch_size)
        for image_size in (cfg.image_size, large):
            model = guide_at(image_size)
            target = common.swapped(model, dinov2_to_patchmlp.make_stages(model, images(1, image_size, bench.device),
                                                                          cfg))
            rows += image_rows(bench, model, target, images(x.shape[0], image_size, bench.device), f"{image_size} px")
        return rows

    return Conversion(cfg, guide, dinov2_to_patchmlp.make_stages(guide, x[:1], cfg), x,
                      classification_loss(classes, x), inference)


def gpt2_rnn(bench):
    cfg = script_config(gpt2_to_rnn, bench.size, "--n_layer=12")
    vocab = common.ByteTokenizer.n_vocab if cfg.tokenizer == "bytes" else 50257
    guide = gpt2_to_rnn.load_guide("random", cfg.n_layer, cfg.n_embd, vocab).to(bench.device)
    tokens = torch.randint(vocab, (bench.batch(cfg), cfg.seq_len + 1), device=bench.device)
    x = tokens[:, :-1]
    stages = gpt2_to_rnn.make_stages(guide, x[:1], cfg)

    def loss(model, x):
        return F.cross_entropy(model(x).flatten(0, 1), tokens[:, 1:].flatten())

    def inference(bench):
        target = common.swapped(guide, stages).to(bench.device).eval()
        cache_dtype = getattr(torch, bench.dtype) if bench.device.type == "cuda" else torch.float32
        rows = []
        for context in CONTEXTS:
            pos = context - 1
            for name, model in (("guide", guide), ("target", target)):
                if name == "guide":
                    memory = kv_cache(guide, x.shape[0], context, cache_dtype, bench.device)
                    step = lambda batch: gpt_cached_step(guide, batch, pos, memory)
                else:
                    memory = [torch.zeros(2, x.shape[0], cfg.n_embd, device=bench.device)
                              for _ in guide.transformer.h]
                    step = lambda batch: target.step(batch, pos, [s[:, :batch.shape[0]] for s in memory])

                @torch.no_grad()
                def decode(batch=x[:, 0]):
                    with common.autocast(bench.device, bench.dtype):
                        return step(batch)

                seconds = median_time(decode, bench.device, bench.repeats, bench.warmup)
                memory_bytes = sum(t.nbytes for t in tree_leaves(memory))
                rows.append({"model": name, "setting": f"context {context}", "params": num_params(model),
                             "flops_per_token": count_flops(lambda: decode(x[:1, 0])),
                             "tokens_per_s": x.shape[0] / seconds,
                             "memory_per_sequence_bytes": memory_bytes // x.shape[0],
                             "peak_memory_bytes": (nbytes(model) + memory_bytes
                                                   + peak_extra_memory(decode, bench.device))})
        return rows

    return Conversion(cfg, guide, stages, x, loss, inference)


def kv_cache(model, batch, context, dtype, device):
    """GPT-2's key-value cache for `context` positions: per block, keys and values [batch, heads, context, 64]."""
    shape = (batch, model.cfg.n_head, context, model.cfg.n_embd // model.cfg.n_head)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in model.transformer.h]


def gpt_cached_step(model, tokens, pos, cache):
    """GPT-2's logits [B, vocab] after tokens [B] at position pos, reading (and writing) the cache's first pos + 1."""
    x = (model.transformer.wte(tokens) + model.transformer.wpe.weight[pos])[:, None]
    B, _, C = x.shape
    for block, (keys, values) in zip(model.transformer.h, cache):
        attn = block.attn
        q, k, v = (t.view(B, 1, attn.n_head, C // attn.n_head).transpose(1, 2)
                   for t in attn.c_attn(block.ln_1(x)).split(C, dim=2))
        keys[:B, :, pos], values[:B, :, pos] = k[:, :, 0], v[:, :, 0]
        y = F.scaled_dot_product_attention(q, keys[:B, :, :pos + 1], values[:B, :, :pos + 1])
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x[:, 0]))


CONVERSIONS = {"resnet18_to_mlp": resnet18_mlp, "dinov2_to_patchmlp": dinov2_patchmlp, "gpt2_to_rnn": gpt2_rnn,
               "resnet50_to_resnet18": resnet50_resnet18}


# -----------------------------------------------------------------------------
# measurements


@dataclass
class Bench:
    size: str
    device: torch.device
    dtype: str
    repeats: int
    warmup: int
    batch_size: int

    def batch(self, cfg):
        return self.batch_size or (cfg.batch_size if self.size == "tiny" else 32)


def cka_cost(bench):
    """Item 1: (cka seconds, x @ x.T seconds, CKA's peak extra bytes, the inputs' bytes)."""
    x, y = (torch.randn(shape, device=bench.device) for shape in CKA_SHAPES)
    cka_s = median_time(lambda: common.cka(x, y), bench.device, bench.repeats, bench.warmup)
    gram_s = median_time(lambda: x @ x.T, bench.device, bench.repeats, bench.warmup)
    return cka_s, gram_s, peak_extra_memory(lambda: common.cka(x, y), bench.device), x.nbytes + y.nbytes


def stage_times(bench, conv):
    """Items 2 and 3: each stage's median alignment step and fine-tuning step (a task step of the whole hybrid), one
    training step of the guide, and one of the target (the hybrid after the last stage)."""
    guide = conv.guide.eval().requires_grad_(False)
    align_cfg = SimpleNamespace(**{**vars(conv.cfg), "dtype": bench.dtype, "similarity_scope": "local"})
    hybrid, align, finetune = copy.deepcopy(guide), [], []
    for stage in conv.stages:
        stage.swap(hybrid)
        hybrid.to(bench.device).eval().requires_grad_(False)
        params = [p for name in stage.train
                  for p in hybrid.get_submodule(name).train().requires_grad_(True).parameters()]
        opt = common.make_optimizer(params, "adamw", conv.cfg.align_lr, 0.0, bench.device)
        align.append(median_time(lambda: common.align_step(guide, hybrid, stage, conv.x, opt, align_cfg),
                                 bench.device, bench.repeats, bench.warmup))
        finetune.append(train_step_time(bench, conv, hybrid))
    return align, finetune, train_step_time(bench, conv, copy.deepcopy(guide)), finetune[-1]


def train_step_time(bench, conv, model):
    """The median task step (forward, backward, AdamW step) of every parameter of model on the bench batch."""
    model.train().requires_grad_(True)
    opt = common.make_optimizer(model.parameters(), "adamw", 1e-4, 0.0, bench.device)

    def step():
        with common.autocast(bench.device, bench.dtype):
            loss = conv.loss(model, conv.x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_time(step, bench.device, bench.repeats, bench.warmup)
    model.eval().requires_grad_(False)
    return seconds


def mlp_params(rank, image_size=224):
    """Parameters of resnet18_to_mlp.py's target: each convolution Linear(in -> r, no bias) + Linear(r -> out)."""
    model = torchvision.models.resnet18().eval()
    convolutions, shapes = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}, []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape[1:], o.shape[1:])) and None)
             for m in convolutions.values()]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    others = num_params(model) - sum(num_params(m) for m in convolutions.values())
    return others + sum(rank * (math.prod(i) + math.prod(o)) + math.prod(o) for i, o in shapes)


IMAGENET_TRAIN = 1281167  # ILSVRC-2012 training images
# Wikitext-103's training split in GPT-2 tokens: its 103,227,021 words times 1.209 tokens a word, GPT-2's BPE on the
# Wikitext-2 text in shared/data (258,659 tokens of 213,886 words); not tokenized here (no Wikitext-103 offline).
WIKITEXT103_TRAIN_TOKENS = round(103_227_021 * 1.209)


def table1_cost(name, align, finetune, target):
    """Item 6: one arm's wall time on 8 GPUs (each doing one GPU's share, the bench batch), from the measured step
    times and the script's own defaults: each stage's alignment and fine-tuning steps, then the final training
    (100 epochs of ImageNet, or of Wikitext-103's tokens for GPT-2, at batch 256); the naive arm (and scratch) trains
    the target for as many steps. The 5-seed grid: 5 x (NoT trained, NoT untrained, naive). Evaluations are left out."""
    script = {"resnet18_to_mlp": resnet18_to_mlp, "dinov2_to_patchmlp": dinov2_to_patchmlp, "gpt2_to_rnn": gpt2_to_rnn,
              "resnet50_to_resnet18": resnet50_to_resnet18}[name]
    cfg = common.configure(script.SETTINGS, [])
    per_epoch = (WIKITEXT103_TRAIN_TOKENS // (cfg.batch_size * cfg.seq_len) if name == "gpt2_to_rnn" else
                 IMAGENET_TRAIN // cfg.batch_size)
    train_steps = getattr(cfg, "train_steps", 0) or cfg.epochs * per_epoch
    stage_s = sum(cfg.align_steps * a + cfg.finetune_steps * f for a, f in zip(align, finetune))
    not_s = stage_s + train_steps * target
    naive_s = (len(align) * (cfg.align_steps + cfg.finetune_steps) + train_steps) * target
    return {"train_steps": train_steps, "stage_steps": cfg.align_steps + cfg.finetune_steps, "gpus": SHARDS,
            "not_hours": not_s / 3600, "naive_hours": naive_s / 3600,
            "grid_gpu_hours": SHARDS * 5 * (2 * not_s + naive_s) / 3600}


def jpeg_folder(root, count, size=(500, 375)):
    """count JPEGs of ImageNet's typical size (500 x 375, quality 90: about ImageNet's bytes per image) in
    root/train/a: smooth random pictures with some noise."""
    from PIL import Image

    folder = os.path.join(root, "train", "a")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        picture = F.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 255, size=size[::-1], mode="bicubic")[0]
        picture = (picture + 12 * torch.randn(picture.shape, generator=g)).clamp(0, 255).byte()
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.JPEG"), quality=90)
    return os.path.join(root, "train")


def loader_rows(bench, results, count=48):
    """Item 7: training images per second of each decoding path (common.ImageFiles, RandomResizedCrop to 224) on a
    folder of ImageNet-sized JPEGs: the CPU paths per core (one thread, no workers: decode, crop, collate,
    normalize), side by side; on CUDA the GPU path with 1 and 2 DataLoader workers. Beside them each image
    model's training images/s per GPU (its guide's training step) and the cores 8 GPUs need to be kept fed."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as root:
        train = jpeg_folder(root, count)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for decode in ("pil", "cpu"):
            data = common.ImageFiles(train, True, 224, "bilinear", decode, common.Context(device=bench.device))
            batch = lambda: data.prepare(data.collate([data[i] for i in range(count)]), bench.device)  # noqa: E731
            seconds = median_time(batch, bench.device, bench.repeats, max(bench.warmup, 1))
            rows.append({"decode": decode, "workers": 0, "images_per_s_per_core": count / seconds})
        torch.set_num_threads(threads)
        if bench.device.type == "cuda":
            data = common.ImageFiles(train, True, 224, "bilinear", "gpu", common.Context(device=bench.device))
            for workers in (1, 2):
                sampler = torch.utils.data.RandomSampler(data, num_samples=20 * count)
                loader = torch.utils.data.DataLoader(data, 16, num_workers=workers, collate_fn=data.collate,
                                                     sampler=sampler)
                batches = iter(loader)
                data.prepare(next(batches), bench.device)
                sync(bench.device)
                t0, seen = time.perf_counter(), 0
                for batch in batches:
                    seen += data.prepare(batch, bench.device).shape[0]
                sync(bench.device)
                rows.append({"decode": "gpu", "workers": workers, "images_per_s": seen / (time.perf_counter() - t0)})
    best = max(r["images_per_s_per_core"] for r in rows if "images_per_s_per_core" in r)
    for row in rows:
        print(f"loader {row['decode']:3} | " + (f"{row['images_per_s_per_core']:.0f} images/s per core" if "workers"
              in row and row["workers"] == 0 else f"{row['workers']} workers: {row['images_per_s']:.0f} images/s"))
    models = []
    for name in ("resnet18_to_mlp", "dinov2_to_patchmlp", "resnet50_to_resnet18"):
        per_gpu = results["batch"][name] / results["train_step_s"][name]
        models.append({"guide_of": name, "train_images_per_s_per_gpu": per_gpu,
                       "cores_for_8_gpus": SHARDS * per_gpu / best})
        print(f"  {name}'s guide trains {per_gpu:.0f} images/s per GPU: 8 GPUs need {SHARDS * per_gpu / best:.0f} "
              f"cores of the fastest CPU path")
    return {"paths": rows, "models": models}


def scale_rows():
    """Item 5: the MLP's parameters and per-GPU training memory by rank, DDP against sharded."""
    rows = []
    for r in MLP_RANKS:
        params = mlp_params(r)
        rows.append({"rank": r, "params": params, "ddp_bytes_per_gpu": BYTES_PER_PARAM * params,
                     "sharded_bytes_per_gpu": BYTES_PER_PARAM * params // SHARDS, "gpus": SHARDS})
    return rows


def _ddp_resident_bytes(rank, init_method, bucket_view, queue):
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    before = resident()
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(32)])
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        ddp(torch.randn(2, 1024)).square().sum().backward()
        opt.step()
    if rank == 0:
        queue.put((resident() - before) / num_params(model))
    dist.barrier()
    dist.destroy_process_group()


def ddp_bytes_per_param():
    """Item 5's 16 bytes: a DDP process's resident bytes per parameter, gradients as bucket views or copied (Linux)."""
    measured = {}
    for bucket_view in (True, False):
        queue = mp.get_context("spawn").SimpleQueue()
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_ddp_resident_bytes, args=(f"file://{folder}/init", bucket_view, queue), nprocs=2)
        measured["bucket_view" if bucket_view else "copied"] = queue.get()
    return measured


def main(argv):
    cfg = common.parse_flags(config, argv)
    for key, allowed in {"size": ("tiny", "paper"), "device": ("auto", "cuda", "cpu"),
                         "dtype": ("bfloat16", "float32")}.items():
        if cfg[key] not in allowed:
            raise common.ConfigError(f"--{key}={cfg[key]}: expected one of {', '.join(allowed)}")
    if cfg["repeats"] <= 0 or cfg["warmup"] < 0:
        raise common.ConfigError(f"--repeats={cfg['repeats']} --warmup={cfg['warmup']}: need at least one timed run "
                                 f"and no negative warm-up")
    device = cfg["device"] if cfg["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    ctx = common.Context(device=device)
    common.seed_everything(cfg["seed"])
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bench = Bench(cfg["size"], ctx.device, cfg["dtype"] if ctx.device.type == "cuda" else "float32",
                  cfg["repeats"], cfg["warmup"], cfg["batch_size"])
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    print(f"bench --size={bench.size} on {device_name}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    cka_s, gram_s, cka_peak, cka_inputs = cka_cost(bench)
    ratio = cka_s / gram_s
    print(f"cka / x @ x.T {ratio:.2f} ({cka_s * 1e6:.0f} us / {gram_s * 1e6:.0f} us) | cka peak extra memory "
          f"{cka_peak / 2**20:.1f} MiB "
          f"(inputs {cka_inputs / 2**20:.1f} MiB) | shapes {CKA_SHAPES}")
    results = {"size": bench.size, "device": device_name, "dtype": bench.dtype, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "repeats": bench.repeats, "cka_over_gram": ratio,
               "cka_s": cka_s, "gram_s": gram_s,
               "cka_peak_extra_bytes": cka_peak, "cka_input_bytes": cka_inputs, "first_over_last_stage": {},
               "align_over_train": {}, "align_step_s": {}, "train_step_s": {}, "batch": {}, "inference": {}}
    results.update(finetune_step_s={}, target_train_step_s={}, align_over_target_train={}, table1_cost={})
    for name, build in CONVERSIONS.items():
        conv = build(bench)
        times, finetune, train, target = stage_times(bench, conv)
        results["batch"][name] = conv.x.shape[0]
        results["align_step_s"][name], results["finetune_step_s"][name] = times, finetune
        results["train_step_s"][name], results["target_train_step_s"][name] = train, target
        results["first_over_last_stage"][name] = times[0] / times[-1]
        results["align_over_train"][name] = statistics.mean(times) / train
        results["align_over_target_train"][name] = statistics.mean(times) / target
        print(f"{name}: batch {conv.x.shape[0]} | align step first {times[0] * 1e3:.1f} ms, last "
              f"{times[-1] * 1e3:.1f} ms, mean {statistics.mean(times) * 1e3:.1f} ms over {len(times)} stages | "
              f"guide train step {train * 1e3:.1f} ms, target's {target * 1e3:.1f} ms | first/last "
              f"{times[0] / times[-1]:.2f} | align/train {statistics.mean(times) / train:.2f} | align/target train "
              f"{statistics.mean(times) / target:.2f}")
        cost = results["table1_cost"][name] = table1_cost(name, times, finetune, target)
        print(f"  Table 1 at the paper's settings on {SHARDS} such GPUs: NoT {cost['not_hours']:.1f} h, naive "
              f"{cost['naive_hours']:.1f} h per arm; the 5-seed grid {cost['grid_gpu_hours']:.0f} GPU-hours "
              f"({cost['train_steps']} final steps, {len(times)} stages of {cost['stage_steps']})")
        results["inference"][name] = conv.inference(bench)
        for row in results["inference"][name]:
            speed = (f"{row['tokens_per_s']:.0f} tokens/s | {row['flops_per_token'] / 1e6:.1f} MFLOP/token | "
                     f"{row['memory_per_sequence_bytes'] / 2**10:.1f} KiB/sequence" if "tokens_per_s" in row else
                     f"{row['examples_per_s']:.0f} examples/s | {row['flops_per_example'] / 1e6:.1f} MFLOP/example")
            print(f"  {row['model']:6} {row['setting']:18} | {row['params'] / 1e6:8.2f} M params | {speed} | "
                  f"peak {row['peak_memory_bytes'] / 2**20:.1f} MiB")
        del conv
    results["loader"] = loader_rows(bench, results)
    results["scale"] = scale_rows()
    measured = results["ddp_bytes_per_param"] = ddp_bytes_per_param()
    print(f"DDP with AdamW on CPU: {measured['bucket_view']:.1f} bytes/param resident with gradients as bucket views, "
          f"{measured['copied']:.1f} copied (the difference: a second copy of every gradient)")
    print(f"resnet18_to_mlp at 224 px: training memory per GPU ({BYTES_PER_PARAM} bytes/param, before activations)")
    for row in results["scale"]:
        print(f"  rank {row['rank']:5} | {row['params'] / 1e9:.2f} B params | DDP "
              f"{row['ddp_bytes_per_gpu'] / 1e9:.1f} GB | sharded over {row['gpus']} "
              f"{row['sharded_bytes_per_gpu'] / 1e9:.1f} GB")
    common.write_json(cfg["out"], results)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
