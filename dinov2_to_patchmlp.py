"""
Network of Theseus: DINOv2 ViT-S/14 -> Patch-MLP on ImageNet.

In every block of a DINOv2 ViT-S/14 guide (384 wide, 12 blocks, 6 heads, with
DINOv2's official ImageNet linear classifier) the multi-head self-attention
becomes a token-wise MLP: Linear(384 -> token_mlp_width), GELU, Linear(-> 384),
applied to each token on its own. The patch embedding, class token, position
embedding, LayerNorms, LayerScales, the blocks' MLPs, the residual additions
and the classifier stay. No token ever reads another: the converted model sees
each 14 x 14 patch (and its position) alone, and its logits are a constant plus
the mean of one function per patch. Paper (Table 1): guide 81.03, NoT 72.56
(trained guide) / 70.39 (untrained guide), naive 68.72 top-1.

Run, first on a laptop (CPU, offline, a small ViT on generated images, under two minutes):
    python dinov2_to_patchmlp.py --preset=tiny
The small study's arms (CPU, a few minutes each; README.md has the whole grid):
    python dinov2_to_patchmlp.py --preset=small --method=guide --out_dir=out-guide   # trains the small ViT
    python dinov2_to_patchmlp.py --preset=small --guide=out-guide/guide.pt --seed=1  # NoT, trained guide
The paper's job, one node of 8 GPUs (global batch 256, 100 task epochs):
    torchrun --nproc_per_node=8 dinov2_to_patchmlp.py --data_dir=/path/to/imagenet
Several nodes (run on each, with its --node_rank):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        dinov2_to_patchmlp.py --data_dir=/path/to/imagenet
The baseline, the untrained guide, and the official 1-layer classifier instead of the 4-layer one:
    ... --method=naive        ... --guide=random        ... --head_layers=1
Offline compute nodes: a folder holding the official files under their official names
(dinov2_vits14_pretrain.pth and dinov2_vits14_linear4_head.pth, or _linear_head.pth
for --head_layers=1, from https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/):
    ... --guide=/path/to/folder
Resume a run that stopped (same flags plus):
    ... --resume=True
Only evaluate the guide (published: 81.1 top-1), or a converted model:
    python dinov2_to_patchmlp.py --data_dir=/path/to/imagenet --eval_only=guide
    python dinov2_to_patchmlp.py --data_dir=/path/to/imagenet --eval_only=out-dinov2-patchmlp/target.pt

The guide, exactly (as facebookresearch/dinov2 defines `dinov2_vits14_lc`):
- Blocks: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); LayerNorm eps
  1e-6, qkv with bias, heads 64 wide, exact GELU, LayerScale (a learned
  per-channel gain), no register tokens. The iBOT mask token of the checkpoint
  is not used for classification and is dropped.
- Classifier with `head_layers=4`: Linear over the class tokens of the last 4
  blocks, each through the final LayerNorm, and the mean of the last block's
  normed patch tokens (5 x 384 = 1920 features); with 1: the last class token
  and that mean (768).
- The checkpoint's position embedding is for 518 px (37 x 37 patches). It is
  resampled once, when the weights load, to image_size / 14 patches a side
  with the official interpolation (bicubic, no antialiasing, scale factor
  (16 + 0.1) / 37 rather than an output size), so the numbers are the
  official model's at 224 px; the model then reads image_size images only.
- A random guide is what torch.hub's dinov2_vits14(pretrained=False) builds
  (LayerScale 1, truncated-normal 0.02 linear layers and position embedding,
  zero biases; the classifier alike), its position embedding drawn at the
  training grid.
- Evaluation as the official linear evaluation: bicubic resize to 256,
  center crop 224, ImageNet normalization (common.image_folders).

Decisions the paper leaves open (and the config key to change each):
- One block per stage, first to last (`order`): 12 stages. The token-wise MLP
  is 4 x 384 = 1536 wide (`token_mlp_width`), like the blocks' own MLPs.
- CKA treats each token as an example: the attention module (and the token MLP
  that replaces it) returns its output as rows [B*T, C], before LayerScale,
  and the block reshapes it back. common.cka takes the first dimension as
  examples, so it sees the 256 x 257 tokens of a global batch (the class
  token included) with 384 features each and uses the 384 x 384
  cross-covariance form. Under DDP it is computed on the global batch
  (`cka_scope`), so 8 processes align exactly like one.
- During alignment only the new MLP trains (Adam, `align_lr`, warmup then
  cosine); everything else, the earlier MLPs included, is frozen. Each stage
  ends with `finetune_steps` task steps of the whole hybrid (CKA ignores
  scale and rotation; the frozen layers after the MLP need to adapt), then the
  hybrid's accuracy is measured for that stage.
- Final training: the whole target, backbone and classifier, AdamW (`lr`
  5e-4, weight decay 0.05, label smoothing 0.1), one epoch of warmup then
  cosine, `epochs` over the training set, with common.image_folders'
  augmentation (RandomResizedCrop and flip). The naive baseline trains for
  exactly as many gradient steps as NoT took in all. No dropout or stochastic
  depth anywhere.
- `--method=guide` trains the guide's own ViT from scratch for that many steps
  too and writes out_dir/guide.pt for `--guide=`: a trained guide for data that
  no pretrained one fits (generated images).
- On CUDA the runs use bf16 autocast, TF32, fused AdamW and DataLoader
  workers with pinned memory. `--compile=True` puts the final training's model
  through torch.compile. Not the per-stage fine-tuning (short, and each stage
  meets a new architecture: a compilation each), nor alignment (its forward
  passes stop by raising from hooks, which compiled code does not support).
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
# I/O
out_dir = "out-dinov2-patchmlp"  # checkpoint, results.json and target.pt go here
data_dir = ""  # ImageNet root holding train/ and val/ (one folder per class); "" = generated images
eval_only = ""  # "guide" or a path to a target.pt: evaluate it on val/ and exit
resume = False  # continue the run in out_dir from its last checkpoint
# guide and target
guide = "pretrained"  # "pretrained" (the official weights), "random" (untrained), a folder holding the
# official files under their official names, or a guide.pt written by --method=guide
head_layers = 4  # the official classifier to use: 4 (dinov2_vits14_linear4_head.pth) or 1 (_linear_head.pth)
embed_dim = 384  # size of a random guide (weights files carry their own); heads are 64 wide
depth = 12
patch_size = 14
token_mlp_width = 1536  # hidden width of each token-wise MLP that replaces an attention
# method
method = "not"  # "not": Network of Theseus; "naive": all attentions replaced at once, task loss only;
# "guide": train the guide's ViT from scratch (--guide=random) and write out_dir/guide.pt
order = "forward"  # "forward": first block first; "reverse": last first
align_steps = 1000  # CKA alignment steps per stage
align_lr = 1e-3  # peak learning rate of the new MLP during its alignment
finetune_steps = 100  # task steps on the whole hybrid after each stage's alignment; 0 turns it off
finetune_lr = 1e-4  # peak learning rate of that per-stage fine-tuning
cka_scope = "global"  # "global": CKA on the batch of all processes; "local": per process, no all_gather
cka_unbiased = False  # debiased HSIC estimator in CKA
# task training
epochs = 100  # final end-to-end training, in passes over the training set
batch_size = 256  # global batch, split evenly over processes
optimizer = "adamw"  # "adamw" or "sgd"
lr = 5e-4  # peak learning rate of the final training (and of the naive baseline)
weight_decay = 0.05
warmup_steps = 5000  # linear warmup of the final training (about one ImageNet epoch), then cosine decay to zero
grad_clip = 1.0  # clip the gradient norm; 0 turns it off
label_smoothing = 0.1
# evaluation, logging, checkpoints
eval_guide = True  # measure the guide's accuracy first (the "guide" column of Table 1)
eval_interval = 5005  # steps between validation runs during the final training; 0: only at the end
log_interval = 50
ckpt_interval = 1000
# generated images (data_dir == "")
num_classes = 10
image_size = 224  # the crop size for ImageNet too; a multiple of the patch size
synthetic_train = 10000
synthetic_val = 1000
synthetic_shift = 0  # each generated image moves its class pattern by up to this many pixels
# system
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast dtype on CUDA ("float32" to turn autocast off); CPU always runs float32
workers = 8  # DataLoader processes per GPU
seed = 0
compile = False  # torch.compile the model of the final training (see the docstring)
preset = ""  # "tiny": the whole conversion on CPU in under two minutes; "small": one arm of the laptop study
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

PRESETS = {
    # A 4-block, 128-wide ViT with 8 x 8 patches on 32 x 32 generated images: 16 patches and a class token.
    "tiny": dict(out_dir="out-dinov2-patchmlp-tiny", guide="random", embed_dim=128, depth=4, patch_size=8,
                 token_mlp_width=256, image_size=32, synthetic_train=1024, synthetic_val=256, align_steps=20,
                 align_lr=3e-3, finetune_steps=4, finetune_lr=1e-3, epochs=2, batch_size=32, lr=1e-3,
                 warmup_steps=5, eval_interval=0, log_interval=4, ckpt_interval=20, workers=0),
    # The laptop study: the same ViT on 32 x 32 generated images, 100 classes of 30 examples each, whose class
    # pattern may sit anywhere (rolled by up to 16 pixels): attention relates the patches, a token-wise MLP sees
    # each one alone. (With 10 classes every arm reached 99.7-100%.)
    "small": dict(out_dir="out-dinov2-patchmlp-small", guide="random", embed_dim=128, depth=4, patch_size=8,
                  token_mlp_width=256, image_size=32, num_classes=100, synthetic_train=3000, synthetic_val=1000,
                  synthetic_shift=16, align_steps=40, align_lr=3e-3, finetune_steps=10, finetune_lr=1e-3, epochs=10,
                  batch_size=64, lr=1e-3, warmup_steps=20, eval_interval=40, log_interval=40, ckpt_interval=200,
                  workers=0),
}
# -----------------------------------------------------------------------------

WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14"
BACKBONE_FILE = "dinov2_vits14_pretrain.pth"


def head_file(layers):
    return f"dinov2_vits14_linear{4 if layers == 4 else ''}_head.pth"


@dataclass
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    patch_size: int = 14
    image_size: int = 224
    head_layers: int = 4
    num_classes: int = 1000

    @property
    def heads(self):
        return self.embed_dim // 64

    @property
    def grid(self):
        return self.image_size // self.patch_size


class PatchEmbed(nn.Module):
    """Each patch_size x patch_size square of the image to one token: [B, 3, H, W] -> [B, patches, C]."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; returns one row per token, [B*T, C] (the unit CKA compares)."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B * T, C))


class TokenMLP(nn.Module):
    """The replacement of one attention: Linear, GELU, Linear on each token alone; rows [B*T, C] out like it."""

    def __init__(self, dim, width):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.reshape(-1, x.shape[-1]))))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim)
        self.fc2 = nn.Linear(4 * cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = MLP(cfg)
        self.ls2 = LayerScale(cfg.embed_dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)).view_as(x))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """DINOv2's ViT with its linear classifier (the official parameter names): images [B, 3, S, S] -> logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.embed_dim))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear((1 + cfg.head_layers) * cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"this model reads {size} x {size} images (its position embedding is sized for "
                             f"them), got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        last = [self.norm(x) for x in outputs[-self.cfg.head_layers:]]
        features = torch.cat([x[:, 0] for x in last] + [last[-1][:, 1:].mean(dim=1)], dim=1)
        return self.head(features)


def resample_pos_embed(pos_embed, grid):
    """The official interpolation of a position embedding [1, 1 + M*M, C] to grid x grid patches."""
    M = math.isqrt(pos_embed.shape[1] - 1)
    if M == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    C = pos_embed.shape[2]
    # DINOv2's "historical kludge": a scale factor of (grid + 0.1) / M rather than an output size of grid.
    # PyTorch places the samples by the scale factor, so this changes the numbers; it is what the weights expect.
    patch_pos = F.interpolate(patch_pos.reshape(1, M, M, C).permute(0, 3, 1, 2).float(),
                              scale_factor=(grid + 0.1) / M, mode="bicubic", antialias=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, C)], dim=1)


def official_weights(spec, head_layers):
    """The official backbone and classifier state dicts: downloaded ("pretrained") or read from a folder."""
    names = [BACKBONE_FILE, head_file(head_layers)]
    if spec == "pretrained":
        urls = [f"{WEIGHTS_URL}/{name}" for name in names]
        try:
            return [torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
                    for url in urls]
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise common.ConfigError(
                f"could not get DINOv2's weights ({type(e).__name__}: {e}). On a machine with internet, download "
                f"{' and '.join(urls)} and put them in {cache} (or set TORCH_HOME), or pass --guide=PATH to a "
                f"folder holding {' and '.join(names)}") from None
    missing = [name for name in names if not os.path.isfile(os.path.join(spec, name))]
    if missing:
        raise common.ConfigError(f"--guide={spec}: expected pretrained, random, or a folder holding "
                                 f"{' and '.join(names)}; not found there: {', '.join(missing)}")
    return [common.load_checkpoint(os.path.join(spec, name)) for name in names]


def guide_from_official(backbone, head, spec, image_size, head_layers):
    """Our ViT holding the official state dicts, its size read from them, its position embedding resampled."""
    needed = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in backbone]
    if needed:
        raise common.ConfigError(f"guide {spec!r}: {BACKBONE_FILE} is not a DINOv2 backbone (missing keys {needed})")
    embed_dim, patch = backbone["cls_token"].shape[-1], backbone["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    num_classes = head["weight"].shape[0] if "weight" in head else 1000
    if image_size % patch:
        raise common.ConfigError(f"--image_size={image_size} is not a multiple of the guide's patch size {patch}")
    if math.isqrt(backbone["pos_embed"].shape[1] - 1) ** 2 != backbone["pos_embed"].shape[1] - 1:
        raise common.ConfigError(f"guide {spec!r}: pos_embed of shape {tuple(backbone['pos_embed'].shape)} is not "
                                 f"a class token and a square grid of patches")
    cfg = ViTConfig(embed_dim, depth, patch, image_size, head_layers, num_classes)
    model = ViT(cfg)
    backbone = {k: v.float() for k, v in backbone.items() if k != "mask_token"}
    backbone["pos_embed"] = resample_pos_embed(backbone["pos_embed"], cfg.grid)
    expected = model.state_dict()
    files = {BACKBONE_FILE: (backbone, {k: v for k, v in expected.items() if not k.startswith("head.")}),
             head_file(head_layers): (head, {k.removeprefix("head."): v for k, v in expected.items()
                                             if k.startswith("head.")})}
    problems = []
    for file, (state, ours) in files.items():
        problems += [f"{file}: {problem}" for problem in common.state_dict_mismatch(state, ours)]
    if problems:
        raise common.ConfigError(f"guide {spec!r} does not fit a DINOv2 ViT ({embed_dim} wide, {depth} blocks, "
                                 f"patch {patch}, {head_layers}-layer classifier): " + "; ".join(problems))
    model.load_state_dict({**backbone, **{"head." + k: v.float() for k, v in head.items()}})
    return model


def load_guide(spec, image_size=224, head_layers=4, num_classes=1000, embed_dim=384, depth=12, patch_size=14):
    """The DINOv2 guide in eval mode, images [B, 3, image_size, image_size] -> logits [B, num_classes].

    spec: "pretrained" (official ViT-S/14 and ImageNet classifier, 1000 classes),
    "random" (untrained, of the given size), or a folder holding the official
    files. Files carry their own size; the other arguments size a random guide.
    """
    if spec == "random":
        if image_size % patch_size:
            raise common.ConfigError(f"--image_size={image_size} is not a multiple of the patch size {patch_size}")
        return ViT(ViTConfig(embed_dim, depth, patch_size, image_size, head_layers, num_classes)).eval()
    if os.path.isfile(spec):
        return trained_guide(spec, image_size)
    backbone, head = official_weights(spec, head_layers)
    return guide_from_official(backbone, head, spec, image_size, head_layers).eval()


def trained_guide(path, image_size):
    """The ViT in a guide.pt written by --method=guide, in eval mode."""
    saved = common.load_checkpoint(path)
    if not {"config", "arch", "model"} <= set(saved) or saved["config"].get("method") != "guide":
        raise common.ConfigError(f"--guide={path}: not a guide.pt written by dinov2_to_patchmlp.py --method=guide")
    if saved["arch"]["image_size"] != image_size:
        raise common.ConfigError(f"--guide={path} was trained on {saved['arch']['image_size']} px images, "
                                 f"--image_size is {image_size}")
    model = ViT(ViTConfig(**saved["arch"]))
    model.load_state_dict(saved["model"])
    return model.eval()


def build_target(arch, token_mlp_width):
    """A ViT whose every attention is a TokenMLP: the architecture a conversion ends with."""
    model = ViT(arch)
    for block in model.blocks:
        block.attn = TokenMLP(arch.embed_dim, token_mlp_width)
    return model


def make_stages(cfg, guide, example):
    """One stage per block's attention, in cfg["order"]; `example`, one input image [1, 3, S, S], gives the shapes."""
    names = [f"blocks.{i}.attn" for i in range(guide.cfg.depth)]
    if cfg["order"] == "reverse":
        names = names[::-1]
    shapes = common.io_shapes(guide, example, names)

    def attention_stage(name):
        def swap(hybrid):
            common.replace(hybrid, name, TokenMLP(guide.cfg.embed_dim, cfg["token_mlp_width"]), *shapes[name])

        return common.Stage(swap, compare=[(name, name)], train=[name], align_steps=cfg["align_steps"],
                            align_lr=cfg["align_lr"], finetune_steps=cfg["finetune_steps"],
                            finetune_lr=cfg["finetune_lr"])

    return [attention_stage(name) for name in names]


def load_target(path):
    """The converted model saved by a run (out_dir/target.pt), in eval mode."""
    saved = common.load_checkpoint(path)
    if not {"config", "arch", "model"} <= set(saved):
        raise common.ConfigError(f"{path!r} is not a target.pt written by dinov2_to_patchmlp.py")
    model = build_target(ViTConfig(**saved["arch"]), saved["config"]["token_mlp_width"])
    model.load_state_dict(saved["model"])
    return model.eval()


def check_config(cfg):
    common.check_choices(cfg, {"method": ("not", "naive", "guide"), "order": ("forward", "reverse"),
                               "cka_scope": ("global", "local"), "optimizer": ("adamw", "sgd"),
                               "device": ("auto", "cuda", "cpu"), "dtype": ("bfloat16", "float32"),
                               "head_layers": (4, 1)})
    for key in ("embed_dim", "depth", "patch_size", "token_mlp_width", "batch_size", "image_size", "num_classes",
                "log_interval", "ckpt_interval"):
        if cfg[key] <= 0:
            raise common.ConfigError(f"--{key} must be positive, got {cfg[key]}")
    if cfg["embed_dim"] % 64:
        raise common.ConfigError(f"--embed_dim={cfg['embed_dim']}: must be a multiple of 64 (heads are 64 wide)")
    if cfg["depth"] < cfg["head_layers"]:
        raise common.ConfigError(f"--depth={cfg['depth']}: the {cfg['head_layers']}-layer classifier reads the "
                                 f"last {cfg['head_layers']} blocks")
    if cfg["eval_only"] not in ("", "guide") and not os.path.isfile(cfg["eval_only"]):
        raise common.ConfigError(f"--eval_only={cfg['eval_only']}: expected 'guide' or the path of a target.pt")
    if cfg["guide"] not in ("pretrained", "random") and not os.path.exists(cfg["guide"]):
        raise common.ConfigError(f"--guide={cfg['guide']}: expected pretrained, random, a folder holding "
                                 f"{BACKBONE_FILE} and {head_file(cfg['head_layers'])}, or a guide.pt")
    if cfg["method"] == "guide" and cfg["guide"] != "random":
        raise common.ConfigError(f"--method=guide trains a guide from scratch: pass --guide=random, "
                                 f"not {cfg['guide']!r}")
    if cfg["data_dir"] == "" and (cfg["guide"] == "pretrained" or os.path.isdir(cfg["guide"])):
        raise common.ConfigError("generated images (empty --data_dir) have their own classes; use --guide=random "
                                 "or a guide.pt trained on them (--method=guide), or give --data_dir")
    if cfg["synthetic_shift"] < 0 or cfg["synthetic_shift"] >= cfg["image_size"]:
        raise common.ConfigError(f"--synthetic_shift={cfg['synthetic_shift']}: expected 0 to image_size - 1")


def main(argv):
    cfg = common.parse_config(config, argv, PRESETS)
    check_config(cfg)
    ctx, log, cfg = common.start(cfg)

    # data
    train_set, val_set, num_classes = common.image_data(cfg, interpolation="bicubic")
    pin = ctx.device.type == "cuda"
    per_rank = cfg["batch_size"] // ctx.world
    val_loader = common.eval_loader(val_set, per_rank, ctx.rank, ctx.world, cfg["workers"], pin)
    task = common.classification_task(val_loader, ctx.device, cfg["dtype"], cfg["label_smoothing"])

    def get_guide():
        model = common.rank0_first(lambda: load_guide(cfg["guide"], cfg["image_size"], cfg["head_layers"],
                                                      num_classes, cfg["embed_dim"], cfg["depth"],
                                                      cfg["patch_size"])).to(ctx.device)
        if model.cfg.num_classes != num_classes:
            raise common.ConfigError(f"the guide has {model.cfg.num_classes} classes, the data {num_classes}")
        return model

    if cfg["eval_only"]:
        model = get_guide() if cfg["eval_only"] == "guide" else load_target(cfg["eval_only"]).to(ctx.device)
        log(f"{cfg['eval_only']} top1 {task.evaluate(model):.2f}")
        common.cleanup_distributed()
        return

    guide_model = get_guide()
    batches = common.Batches(train_set, per_rank, cfg["seed"], ctx.rank, ctx.world, cfg["workers"], pin)

    stages = make_stages(cfg, guide_model, val_set[0][0].unsqueeze(0).to(ctx.device))
    train_steps = cfg["epochs"] * len(batches)
    if cfg["method"] == "guide":
        # The random guide itself is trained, no stages, for as many steps as a NoT run takes.
        train_steps, stages, cfg["eval_guide"] = common.total_grad_steps(stages, train_steps), [], False
    t0 = time.time()
    model, results = common.convert(guide_model, stages, task, batches, cfg, ctx, train_steps, log)
    if ctx.master:
        name = "guide.pt" if cfg["method"] == "guide" else "target.pt"
        common.save_atomic({"config": cfg, "arch": asdict(guide_model.cfg), "model": model.state_dict()},
                           os.path.join(cfg["out_dir"], name))
        log(f"wrote {cfg['out_dir']}/{name} and results.json in {time.time() - t0:.0f} s")
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
