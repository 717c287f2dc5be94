"""
Network of Theseus: ResNet-18 -> MLP on ImageNet.

Every Conv2d of a ResNet-18 guide (all 20, the 1x1 downsample convolutions
included) becomes a low-rank linear map on the flattened feature map,
Linear(C*H*W -> r) then Linear(r -> C'*H'*W'), reshaped back. BatchNorm, ReLU,
the residual additions, the pooling and the classifier stay. The result has no
convolution left: an MLP with residual connections. Paper (Table 1): guide
69.66, NoT 62.12 (trained guide) / 60.85 (untrained guide), naive 40.01 top-1.

Run, first on a laptop (CPU, offline, generated images, under two minutes):
    python resnet18_to_mlp.py --preset=tiny
The small study's arms (CPU, a few minutes each; README.md has the whole grid):
    python resnet18_to_mlp.py --preset=small --method=guide --out_dir=out-guide   # trains a ResNet-18
    python resnet18_to_mlp.py --preset=small --guide=out-guide/guide.pt --seed=1  # NoT, trained guide
The paper's job, one node of 8 GPUs (global batch 256, 100 task epochs):
    torchrun --nproc_per_node=8 resnet18_to_mlp.py --data_dir=/path/to/imagenet
Several nodes (run on each, with its --node_rank):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        resnet18_to_mlp.py --data_dir=/path/to/imagenet
The baseline and the untrained guide:
    ... --method=naive        ... --guide=random
Resume a run that stopped (same flags plus):
    ... --resume=True
Only evaluate the guide, or a converted model:
    python resnet18_to_mlp.py --data_dir=/path/to/imagenet --eval_only=guide
    python resnet18_to_mlp.py --data_dir=/path/to/imagenet --eval_only=out-resnet18-mlp/target.pt

Decisions the paper leaves open (and the config key to change each):
- One convolution per stage, first to last (`order`): 20 stages.
- CKA treats each image as one example and flattens its feature map; at batch
  256 the 256 x 256 Gram form is the cheap one. Under DDP it is computed on the
  global batch (`cka_scope`), so 8 processes align exactly like one.
- During alignment only the new module trains (Adam, `align_lr`, warmup then
  cosine); everything else, the earlier new modules included, is frozen and in
  eval mode, so BatchNorm running statistics keep the guide's values.
- CKA ignores rotation, offset and scale, so a module with CKA near 1 can
  still feed the frozen layers after it outputs of a very different scale and
  basis; on small models the hybrid then fell to chance accuracy. Each stage
  therefore ends with `finetune_steps` task steps of the whole hybrid (0 turns
  this off), before the hybrid's accuracy is measured for that stage.
- Final training: AdamW, warmup then cosine, `epochs` over the training set.
  The naive baseline trains for exactly as many gradient steps as NoT took in
  all (alignment, fine-tuning and final training together).
- `--method=guide` trains the guide's own architecture (a ResNet-18) from
  scratch for that many steps too, and writes out_dir/guide.pt for `--guide=`:
  a trained guide for data that no pretrained one fits (generated images).
- On CUDA the runs use bf16 autocast, TF32, fused AdamW, channels_last for
  the convolutions and DataLoader workers with pinned memory. `--compile=True`
  puts the final training's model through torch.compile. Not the per-stage
  fine-tuning (short, and each stage meets a new architecture: a compilation
  each), nor alignment (its forward passes stop by raising from hooks, which
  compiled code does not support).
- `--shard=True` (under torchrun) shards the task phases with FSDP
  (fully_shard, each Linear a unit) instead of DDP. At rank r the MLP holds
  about 4.67 million x r parameters, 1.2 billion at r = 256 and 4.8 billion at
  r = 1024; float32 weights, gradients and AdamW's two moments take 16 bytes
  each, 19 to 76 GB per GPU under DDP before activations, an eighth of that
  sharded over 8 GPUs. Each process still keeps the whole hybrid once,
  unsharded (19 GB at r = 1024), for alignment, where only the new module
  trains, and for evaluation; checkpoints hold everything whole, as unsharded
  runs do, so --shard cannot change on --resume. bench.py prints the table.
"""
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torchvision

import common

# -----------------------------------------------------------------------------
# config: every name below can be set on the command line as --name=value
# I/O
out_dir = "out-resnet18-mlp"  # checkpoint, results.json and target.pt go here
data_dir = ""  # ImageNet root holding train/ and val/ (one folder per class); "" = generated images
eval_only = ""  # "guide" or a path to a target.pt: evaluate it on val/ and exit
resume = False  # continue the run in out_dir from its last checkpoint
# guide and target
guide = "pretrained"  # "pretrained" (torchvision ImageNet weights), "random" (untrained), or a checkpoint path
rank = 256  # r, the inner width of each low-rank linear map (the paper: 256 to 1024)
# method
method = "not"  # "not": Network of Theseus; "naive": all convolutions replaced at once, task loss only;
# "guide": train a ResNet-18 from scratch (--guide=random) and write out_dir/guide.pt
order = "forward"  # "forward": first convolution first; "reverse": last first
align_steps = 1000  # CKA alignment steps per stage
align_lr = 1e-3  # peak learning rate of the new module during its alignment
finetune_steps = 100  # task steps on the whole hybrid after each stage's alignment; 0 turns it off
finetune_lr = 1e-4  # peak learning rate of that per-stage fine-tuning
cka_scope = "global"  # "global": CKA on the batch of all processes; "local": per process, no all_gather
cka_unbiased = False  # debiased HSIC estimator in CKA
# task training
epochs = 100  # final end-to-end training, in passes over the training set
batch_size = 256  # global batch, split evenly over processes
optimizer = "adamw"  # "adamw" or "sgd"
lr = 1e-3  # peak learning rate of the final training (and of the naive baseline)
weight_decay = 0.05
warmup_steps = 2500  # linear warmup of the final training, then cosine decay to zero
grad_clip = 1.0  # clip the gradient norm; 0 turns it off
label_smoothing = 0.1
# evaluation, logging, checkpoints
eval_guide = True  # measure the guide's accuracy first (the "guide" column of Table 1)
eval_interval = 5005  # steps between validation runs during the final training; 0: only at the end
log_interval = 50
ckpt_interval = 1000
# generated images (data_dir == "")
num_classes = 10
image_size = 224  # the crop size for ImageNet too
synthetic_train = 10000
synthetic_val = 1000
synthetic_shift = 0  # each generated image moves its class pattern by up to this many pixels
# system
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast dtype on CUDA ("float32" to turn autocast off); CPU always runs float32
workers = 8  # DataLoader processes per GPU
seed = 0
compile = False  # torch.compile the model of the final training (see the docstring)
shard = False  # task phases under FSDP (fully_shard), not DDP: weights, gradients, AdamW state split over processes
preset = ""  # "tiny": the whole conversion on CPU in under two minutes; "small": one arm of the laptop study
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

PRESETS = {
    "tiny": dict(out_dir="out-resnet18-mlp-tiny", guide="random", image_size=32, synthetic_train=1024,
                 synthetic_val=256, rank=32, align_steps=20, align_lr=3e-3, finetune_steps=4, finetune_lr=1e-3,
                 epochs=2, batch_size=32, warmup_steps=5, eval_interval=0, log_interval=4, ckpt_interval=20,
                 workers=0),
    # The laptop study: 32 x 32 generated images whose class pattern may sit anywhere (rolled by up to 16
    # pixels), which a convolution handles and an MLP must learn position by position.
    "small": dict(out_dir="out-resnet18-mlp-small", guide="random", image_size=32, synthetic_train=2500,
                  synthetic_val=1000, synthetic_shift=16, rank=64, align_steps=20, align_lr=3e-3, finetune_steps=5,
                  finetune_lr=1e-3, epochs=8, batch_size=64, lr=1e-3, warmup_steps=20, eval_interval=40,
                  log_interval=40, ckpt_interval=200, workers=0),
}
# -----------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """The replacement of one Conv2d: flatten, Linear(C*H*W -> r), Linear(r -> C'*H'*W'), reshape."""

    def __init__(self, in_shape, out_shape, rank):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.down = nn.Linear(math.prod(in_shape), rank, bias=False)
        self.up = nn.Linear(rank, math.prod(out_shape))

    def forward(self, x):
        return self.up(self.down(x.flatten(1))).view(x.shape[0], *self.out_shape)


def conv_names(model):
    """The Conv2d modules of a ResNet-18 in the order they run (definition order)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def load_guide(spec, num_classes=1000):
    """The ResNet-18 guide in eval mode: "pretrained", "random", or a path to a checkpoint."""
    if spec == "random":
        return torchvision.models.resnet18(num_classes=num_classes).eval()
    if spec == "pretrained":
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise common.ConfigError(
                f"could not get torchvision's ResNet-18 ImageNet weights ({type(e).__name__}: {e}). "
                f"On a machine with internet, download {weights.url} and put it at {cache} "
                f"(or set TORCH_HOME), or pass --guide=PATH to a checkpoint") from None
    else:
        state = common.load_checkpoint(spec)
        state = state.get("model", state)
    if "fc.weight" not in state:
        raise common.ConfigError(f"guide {spec!r} is not a ResNet-18 state dict (no fc.weight)")
    model = torchvision.models.resnet18(num_classes=state["fc.weight"].shape[0])
    problems = common.state_dict_mismatch(state, model.state_dict())
    if problems:
        raise common.ConfigError(f"guide {spec!r} does not fit ResNet-18: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def build_target(num_classes, image_size, rank):
    """A ResNet-18 whose every convolution is a LowRankLinear sized for image_size inputs."""
    model = torchvision.models.resnet18(num_classes=num_classes).eval()
    names = conv_names(model)
    shapes = common.io_shapes(model, torch.zeros(1, 3, image_size, image_size), names)
    for name in names:
        common.replace(model, name, LowRankLinear(*shapes[name], rank), *shapes[name])
    return model


def make_stages(cfg, guide, example):
    """One stage per convolution, in cfg["order"]; `example`, one input [1, 3, S, S], gives the shapes."""
    names = conv_names(guide)
    if cfg["order"] == "reverse":
        names = names[::-1]
    shapes = common.io_shapes(guide, example, names)

    def conv_stage(name):
        def swap(hybrid):
            common.replace(hybrid, name, LowRankLinear(*shapes[name], cfg["rank"]), *shapes[name])

        return common.Stage(swap, compare=[(name, name)], train=[name], align_steps=cfg["align_steps"],
                            align_lr=cfg["align_lr"], finetune_steps=cfg["finetune_steps"],
                            finetune_lr=cfg["finetune_lr"])

    return [conv_stage(name) for name in names]


def load_target(path):
    """The converted model saved by a run (out_dir/target.pt), in eval mode."""
    saved = common.load_checkpoint(path)
    if not {"config", "model"} <= set(saved):
        raise common.ConfigError(f"{path!r} is not a target.pt written by resnet18_to_mlp.py")
    cfg = saved["config"]
    model = build_target(saved["model"]["fc.weight"].shape[0], cfg["image_size"], cfg["rank"])
    model.load_state_dict(saved["model"])
    return model.eval()


def check_config(cfg):
    common.check_choices(cfg, {"method": ("not", "naive", "guide"), "order": ("forward", "reverse"),
                               "cka_scope": ("global", "local"), "optimizer": ("adamw", "sgd"),
                               "device": ("auto", "cuda", "cpu"), "dtype": ("bfloat16", "float32")})
    for key in ("rank", "batch_size", "image_size", "log_interval", "ckpt_interval"):
        if cfg[key] <= 0:
            raise common.ConfigError(f"--{key} must be positive, got {cfg[key]}")
    if cfg["eval_only"] not in ("", "guide") and not os.path.isfile(cfg["eval_only"]):
        raise common.ConfigError(f"--eval_only={cfg['eval_only']}: expected 'guide' or the path of a target.pt")
    if cfg["data_dir"] == "" and cfg["guide"] == "pretrained":
        raise common.ConfigError("generated images (empty --data_dir) have their own classes; "
                                 "use --guide=random (or a checkpoint path) with them, or give --data_dir")
    if cfg["method"] == "guide" and cfg["guide"] != "random":
        raise common.ConfigError(f"--method=guide trains a guide from scratch: pass --guide=random, "
                                 f"not {cfg['guide']!r}")
    if cfg["synthetic_shift"] < 0 or cfg["synthetic_shift"] >= cfg["image_size"]:
        raise common.ConfigError(f"--synthetic_shift={cfg['synthetic_shift']}: expected 0 to image_size - 1")


def main(argv):
    cfg = common.parse_config(config, argv, PRESETS)
    check_config(cfg)
    ctx, log, cfg = common.start(cfg)

    # data
    train_set, val_set, num_classes = common.image_data(cfg)
    pin = ctx.device.type == "cuda"
    per_rank = cfg["batch_size"] // ctx.world
    val_loader = common.eval_loader(val_set, per_rank, ctx.rank, ctx.world, cfg["workers"], pin)
    task = common.classification_task(val_loader, ctx.device, cfg["dtype"], cfg["label_smoothing"])

    if cfg["eval_only"]:
        model = load_guide(cfg["guide"], num_classes) if cfg["eval_only"] == "guide" else load_target(cfg["eval_only"])
        log(f"{cfg['eval_only']} top1 {task.evaluate(model.to(ctx.device)):.2f}")
        common.cleanup_distributed()
        return

    guide_model = common.rank0_first(lambda: load_guide(cfg["guide"], num_classes)).to(ctx.device)
    if guide_model.fc.out_features != num_classes:
        raise common.ConfigError(f"the guide has {guide_model.fc.out_features} classes, the data {num_classes}")
    batches = common.Batches(train_set, per_rank, cfg["seed"], ctx.rank, ctx.world, cfg["workers"], pin)

    stages = make_stages(cfg, guide_model, val_set[0][0].unsqueeze(0).to(ctx.device))
    train_steps = cfg["epochs"] * len(batches)
    if cfg["method"] == "guide":
        # The random guide itself is trained, no stages, for as many steps as a NoT run takes.
        train_steps, stages, cfg["eval_guide"] = common.total_grad_steps(stages, train_steps), [], False
    if ctx.device.type == "cuda":  # cuDNN's fastest layout; common.cka flattens such maps without copying them
        guide_model = guide_model.to(memory_format=torch.channels_last)
    t0 = time.time()
    model, results = common.convert(guide_model, stages, task, batches, cfg, ctx, train_steps, log)
    if ctx.master:
        name = "guide.pt" if cfg["method"] == "guide" else "target.pt"
        common.save_atomic({"config": cfg, "model": model.state_dict()}, os.path.join(cfg["out_dir"], name))
        log(f"wrote {cfg['out_dir']}/{name} and results.json in {time.time() - t0:.0f} s")
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
