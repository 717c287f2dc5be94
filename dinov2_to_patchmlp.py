"""
Network of Theseus: DINOv2 ViT-S/14 -> Patch-MLP on ImageNet. Table 1: guide 81.03, NoT 72.56 (trained guide)
and 70.39 (untrained guide), naive 68.72 top-1.

In every block of a DINOv2 ViT-S/14 guide (384 wide, 12 blocks, with DINOv2's official linear classifier) the
self-attention becomes a token-wise MLP, Linear(384 -> token_mlp_width), GELU, Linear(-> 384), applied to each
token alone. Everything else stays. No token reads another: the converted model sees each 14 x 14 patch (and
its position) on its own. One block per stage, first to last (--order=reverse: last first).

    python dinov2_to_patchmlp.py --preset=tiny                                # CPU, a small ViT, generated images
    python dinov2_to_patchmlp.py --preset=small --method=guide --out_dir=g    # the laptop study's guide, then
    python dinov2_to_patchmlp.py --preset=small --guide=g/guide.pt --seed=1   # NoT with it (README: the study)
    torchrun --nproc_per_node=8 dinov2_to_patchmlp.py --data_dir=/path/to/imagenet       # the paper's run
    ... --method=naive    ... --guide=random    ... --head_layers=1    ... --resume=True
    python dinov2_to_patchmlp.py --data_dir=/path/to/imagenet --eval_only=guide   # published: 81.1

Weights offline: dinov2_vits14_pretrain.pth and dinov2_vits14_linear4_head.pth (_linear_head.pth for
--head_layers=1) from https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/ in $TORCH_HOME/hub/checkpoints,
or --guide=FOLDER holding them. The guide is `dinov2_vits14_lc` of facebookresearch/dinov2, exactly (tested
against timm's); its evaluation is the official linear one (bicubic resize to 256, center crop 224).
"""
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# config: this script's settings, over common.SETTINGS and common.IMAGE_SETTINGS; each is a flag --name=value
SETTINGS = dict(
    common.IMAGE_SETTINGS,
    guide="pretrained",  # "pretrained" (the official weights), "random", a folder holding the official files, or
    # a guide.pt written by --method=guide
    head_layers=4,  # the official classifier: 4 (dinov2_vits14_linear4_head.pth) or 1 (_linear_head.pth)
    embed_dim=384,  # the size of a random guide (weights files carry their own); heads are 64 wide
    depth=12,
    patch_size=14,
    token_mlp_width=1536,  # hidden width of each token-wise MLP, as wide as the blocks' own MLPs
    lr=5e-4,
    warmup_steps=5000,  # about one ImageNet epoch
)
PRESETS = {
    # A 4-block, 128-wide ViT with 8 x 8 patches on 32 x 32 generated images: 16 patches and a class token.
    "tiny": dict(guide="random", embed_dim=128, depth=4, patch_size=8, token_mlp_width=256, image_size=32,
                 synthetic_train=1024, synthetic_val=256, align_steps=20, align_lr=3e-3, finetune_steps=4,
                 finetune_lr=1e-3, epochs=2, batch_size=32, lr=1e-3, warmup_steps=5, log_interval=4,
                 ckpt_interval=20, workers=0),
    # The laptop study (docs/study.md): the same ViT, 10 classes of 300 images whose patterns (2 a class) sit
    # anywhere (rolled by up to 16 pixels): attention relates the patches, a token-wise MLP sees each alone; colour
    # and a shared distractor set the guide's difficulty, chosen from guide runs alone (its guide: 81.5%). CKA
    # plateaued by 40 alignment steps on the earlier task (0.16-0.45 at 40, 0.18-0.48 at 200).
    "small": dict(guide="random", embed_dim=128, depth=4, patch_size=8, token_mlp_width=256, image_size=32,
                  num_classes=10, synthetic_train=3000, synthetic_val=1000, synthetic_shift=16, synthetic_modes=2,
                  synthetic_colour=0.125, synthetic_distractors=2, synthetic_noise=1.5, align_steps=40,
                  align_lr=3e-3, finetune_steps=10, finetune_lr=1e-3, epochs=20, batch_size=64, lr=1e-3,
                  warmup_steps=20, eval_interval=94, log_interval=94, ckpt_interval=500, workers=0),
}
# -----------------------------------------------------------------------------


class TokenMLP(nn.Module):
    """The replacement of one attention: Linear, GELU, Linear on each token alone; token rows [B*T, C] out, as
    the attention returns them (the unit CKA compares: each token one example)."""

    def __init__(self, dim, width):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.reshape(-1, x.shape[-1]))))


def make_stages(guide, example, cfg):
    """One stage per block's attention; `example` (one input image) gives the shapes."""
    attentions = [f"blocks.{i}.attn" for i in range(guide.cfg.depth)]

    def stage(name):
        def swap(hybrid):
            common.replace(hybrid, name, lambda attn, in_shape, out_shape: TokenMLP(in_shape[-1],
                                                                                    cfg.token_mlp_width), example)

        return common.Stage(swap, compare=[(name, name)], train=[name])

    return [stage(name) for name in (attentions if cfg.order == "forward" else attentions[::-1])]


# -----------------------------------------------------------------------------
# the guide: DINOv2's ViT with its linear classifier, the official parameter names


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


class Attention(nn.Module):
    """Multi-head self-attention, qkv with bias; returns token rows [B*T, C]."""

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


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))): LayerNorm eps 1e-6, exact GELU, LayerScale."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim), act=nn.GELU(),
                                             fc2=nn.Linear(4 * cfg.embed_dim, cfg.embed_dim)))
        self.ls2 = LayerScale(cfg.embed_dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)).view_as(x))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Images [B, 3, S, S] -> logits. The classifier reads the class tokens of the last head_layers blocks, each
    through the final LayerNorm, and the mean of the last block's normed patch tokens. No register tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear((1 + cfg.head_layers) * cfg.embed_dim, cfg.num_classes)
        # torch.hub's dinov2_vits14(pretrained=False): truncated-normal 0.02 linear layers and position embedding.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        if images.shape[-2:] != (self.cfg.image_size,) * 2:
            raise ValueError(f"this model reads {self.cfg.image_size} x {self.cfg.image_size} images (its position "
                             f"embedding is sized for them), got {tuple(images.shape[-2:])}")
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        last = [self.norm(x) for x in outputs[-self.cfg.head_layers:]]
        return self.head(torch.cat([x[:, 0] for x in last] + [last[-1][:, 1:].mean(dim=1)], dim=1))


def resample_pos_embed(pos_embed, grid):
    """The official interpolation of a position embedding [1, 1 + M*M, C] to grid x grid patches, done once when
    the weights load (the checkpoint's is for 518 px, 37 x 37 patches): bicubic, no antialiasing."""
    M, C = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[2]
    if M == grid:
        return pos_embed
    # DINOv2's "historical kludge": a scale factor of (grid + 0.1) / M, not an output size. PyTorch places the
    # samples by the scale factor, so this changes the numbers; it is what the weights expect.
    patch_pos = F.interpolate(pos_embed[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2).float(),
                              scale_factor=(grid + 0.1) / M, mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, C)], dim=1)


WEIGHTS_URL, BACKBONE_FILE = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14", "dinov2_vits14_pretrain.pth"


def head_file(layers):
    return f"dinov2_vits14_linear{4 if layers == 4 else ''}_head.pth"


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
    if image_size % patch:
        raise common.ConfigError(f"--image_size={image_size} is not a multiple of the guide's patch size {patch}")
    if math.isqrt(backbone["pos_embed"].shape[1] - 1) ** 2 != backbone["pos_embed"].shape[1] - 1:
        raise common.ConfigError(f"guide {spec!r}: pos_embed of shape {tuple(backbone['pos_embed'].shape)} is not "
                                 f"a class token and a square grid of patches")
    model = ViT(ViTConfig(embed_dim, depth, patch, image_size, head_layers, head["weight"].shape[0]
                          if "weight" in head else 1000))
    # The iBOT mask token is not used for classification.
    backbone = {k: v.float() for k, v in backbone.items() if k != "mask_token"}
    backbone["pos_embed"] = resample_pos_embed(backbone["pos_embed"], model.cfg.grid)
    expected = model.state_dict()
    problems = [f"{BACKBONE_FILE}: {p}" for p in common.state_dict_mismatch(
        backbone, {k: v for k, v in expected.items() if not k.startswith("head.")})]
    problems += [f"{head_file(head_layers)}: {p}" for p in common.state_dict_mismatch(
        head, {k.removeprefix("head."): v for k, v in expected.items() if k.startswith("head.")})]
    if problems:
        raise common.ConfigError(f"guide {spec!r} does not fit a DINOv2 ViT ({embed_dim} wide, {depth} blocks, "
                                 f"patch {patch}, {head_layers}-layer classifier): " + "; ".join(problems))
    model.load_state_dict({**backbone, **{"head." + k: v.float() for k, v in head.items()}})
    return model


def load_guide(spec, image_size=224, head_layers=4, num_classes=1000, embed_dim=384, depth=12, patch_size=14):
    """The DINOv2 guide in eval mode: "pretrained" (ViT-S/14 and its ImageNet classifier), "random" (of the given
    size), a folder holding the official files, or a guide.pt written by --method=guide."""
    if spec == "random":
        if image_size % patch_size:
            raise common.ConfigError(f"--image_size={image_size} is not a multiple of the patch size {patch_size}")
        return ViT(ViTConfig(embed_dim, depth, patch_size, image_size, head_layers, num_classes)).eval()
    if os.path.isfile(spec):
        saved = common.load_checkpoint(spec, ("config", "arch", "model"))
        if saved["config"].get("method") != "guide":
            raise common.ConfigError(f"--guide={spec}: not a guide.pt written by dinov2_to_patchmlp.py "
                                     f"--method=guide")
        if saved["arch"]["image_size"] != image_size:
            raise common.ConfigError(f"--guide={spec} was trained on {saved['arch']['image_size']} px images, "
                                     f"--image_size is {image_size}")
        model = ViT(ViTConfig(**saved["arch"]))
        model.load_state_dict(saved["model"])
        return model.eval()
    return guide_from_official(*official_weights(spec, head_layers), spec, image_size, head_layers).eval()


def load_target(path):
    """The converted model a run saved (out_dir/target.pt): the guide's architecture with every stage swapped."""
    saved = common.load_checkpoint(path, ("config", "arch", "model"), "target.pt")
    guide = ViT(ViTConfig(**saved["arch"]))
    example = torch.zeros(1, 3, guide.cfg.image_size, guide.cfg.image_size)
    target = common.swapped(guide, make_stages(guide, example, SimpleNamespace(**saved["config"])))
    target.load_state_dict(saved["model"])
    return target.eval()


def main(argv):
    cfg = common.configure(SETTINGS, argv, PRESETS, checks={"head_layers": (4, 1), "token_mlp_width": common.positive,
                                                         "embed_dim": common.positive, "patch_size": common.positive},
                           rows_per_example=lambda cfg: 1 + (cfg.image_size // cfg.patch_size) ** 2)  # its tokens
    if cfg.embed_dim % 64:
        raise common.ConfigError(f"--embed_dim={cfg.embed_dim}: must be a multiple of 64 (heads are 64 wide)")
    if cfg.depth < cfg.head_layers:
        raise common.ConfigError(f"--depth={cfg.depth}: the {cfg.head_layers}-layer classifier reads the last "
                                 f"{cfg.head_layers} blocks")
    if cfg.guide not in ("pretrained", "random") and not os.path.exists(cfg.guide):
        raise common.ConfigError(f"--guide={cfg.guide}: expected pretrained, random, a folder holding "
                                 f"{BACKBONE_FILE} and {head_file(cfg.head_layers)}, or a guide.pt")
    if not cfg.data_dir and os.path.isdir(cfg.guide):
        raise common.ConfigError("generated images (empty --data_dir) have their own classes; use --guide=random "
                                 "or a guide.pt trained on them (--method=guide), or give --data_dir")
    ctx = common.start(cfg, __file__)
    train_set, val_set, num_classes = common.image_data(cfg, ctx, interpolation="bicubic")
    task = common.classification_task(cfg, ctx, train_set, val_set)

    def get_guide():
        model = common.rank0_first(lambda: load_guide(cfg.guide, cfg.image_size, cfg.head_layers, num_classes,
                                                      cfg.embed_dim, cfg.depth, cfg.patch_size)).to(ctx.device)
        if model.cfg.num_classes != num_classes:
            raise common.ConfigError(f"the guide has {model.cfg.num_classes} classes, the data {num_classes}")
        return model

    if cfg.eval_only:
        model = get_guide() if cfg.eval_only == "guide" else load_target(cfg.eval_only).to(ctx.device)
        ctx.log(f"{cfg.eval_only} top1 {task.evaluate(model):.2f}")
        return common.finish_processes()
    guide = get_guide()
    batches = common.Batches(train_set, cfg, ctx)
    stages = make_stages(guide, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=ctx.device), cfg)
    run = common.Run(cfg, ctx, task, batches)
    train_steps = cfg.epochs * len(batches)
    steps = common.total_steps(stages, cfg, train_steps)  # what every arm takes

    if cfg.method == "not":
        run.evaluate_guide(guide)
        model = common.convert(guide, stages, train_steps, task, run)
    elif cfg.method == "naive":  # every attention replaced at once, task loss only
        run.evaluate_guide(guide)
        model = common.swapped(guide, stages, cfg.seed)
        common.train(model, "train", steps, cfg.lr, task, run)
    else:  # "guide": the guide's ViT from scratch, for --guide= of later runs
        model = guide
        common.train(model, "train", steps, cfg.lr, task, run)
    run.finish(model)
    if ctx.master:
        name = "guide.pt" if cfg.method == "guide" else "target.pt"
        common.save_atomic({"config": vars(cfg), "arch": asdict(guide.cfg), "model": model.state_dict()},
                           os.path.join(cfg.out_dir, name))
        ctx.log(f"wrote {cfg.out_dir}/{name} and results.json")
    common.finish_processes()


if __name__ == "__main__":
    common.launch(main)
