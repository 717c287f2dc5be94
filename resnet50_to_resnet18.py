"""
Network of Theseus: ResNet-50 -> ResNet-18, one residual stage at a time.

The guide is a torchvision ResNet-50; the target a plain torchvision ResNet-18.
Each NoT stage replaces a whole residual stage of the guide by the ResNet-18
one: the stem with layer1, then layer2, layer3, layer4, and finally the
classifier (or the other way round with --order=reverse). The paper reports
that even an *untrained* ResNet-50 guide converted this way beats training the
ResNet-18 from scratch by about 3 points of ImageNet top-1; the three arms of
this script are how to check that:
    --method=not      Network of Theseus
    --method=naive    all ResNet-18 stages at once, from scratch, task loss only
    --method=scratch  a plain ResNet-18 trained from scratch
All three take the same number of gradient steps. A fourth, --method=guide,
trains a ResNet-50 from scratch as long and writes out_dir/guide.pt, a trained
guide for data that no pretrained one fits (--guide=out_dir/guide.pt).

Run, first on a laptop (CPU, offline, generated images, about a minute):
    python resnet50_to_resnet18.py --preset=tiny
The small study's arms (CPU, a few minutes each; README.md has the whole grid):
    python resnet50_to_resnet18.py --preset=small --seed=1                         # NoT, untrained guide
    python resnet50_to_resnet18.py --preset=small --method=scratch --seed=1
    python resnet50_to_resnet18.py --preset=small --method=guide --out_dir=out-guide   # trains a ResNet-50
    python resnet50_to_resnet18.py --preset=small --guide=out-guide/guide.pt --seed=1  # NoT, trained guide
The paper's job, one node of 8 GPUs (global batch 256, 100 task epochs):
    torchrun --nproc_per_node=8 resnet50_to_resnet18.py --data_dir=/path/to/imagenet --guide=random
    torchrun --nproc_per_node=8 resnet50_to_resnet18.py --data_dir=/path/to/imagenet --method=scratch
Resume a run that stopped (same flags plus):
    ... --resume=True
Evaluate the guide, or a converted ResNet-18:
    python resnet50_to_resnet18.py --data_dir=/path/to/imagenet --eval_only=guide
    python resnet50_to_resnet18.py --data_dir=/path/to/imagenet --eval_only=out-resnet50-resnet18/target.pt

The widths differ: ResNet-50 stages output 256/512/1024/2048 channels, ResNet-18
stages 64/128/256/512. CKA compares representations of different widths
directly, so the CKA loss needs no adapter. The hybrid, though, must run:
where a new ResNet-18 stage meets a remaining ResNet-50 stage, a learned
adapter (1x1 convolution + BatchNorm) maps between the widths. Adapters exist
only at that frontier: forward order puts one after the newest ResNet-18
stage, reverse order one in front of it, and the next stage removes it, so
consecutive ResNet-18 stages connect natively. The final model is a plain
torchvision ResNet-18, nothing of the guide or the adapters left: target.pt
loads into torchvision.models.resnet18(num_classes=...) with strict=True.

Decisions the paper leaves open (and the config key to change each):
- Five stages, `order` forward (stem+layer1 first) or reverse (classifier first).
- CKA compares the guide's stage output with the new ResNet-18 stage's output
  (before any adapter), each image one example; the classifier stage compares
  logits. Under DDP it is computed on the global batch (`cka_scope`).
- During alignment the stage's new modules train (Adam, `align_lr`): the
  ResNet-18 stage and, in reverse order, the adapter in front of it, which
  CKA's gradient reaches. In forward order the adapter after the stage is
  past the compared output: it learns during the stage's task fine-tuning
  (`finetune_steps`, whole hybrid), which also repairs what CKA leaves open
  (scale and rotation) for the frozen layers downstream.
- The naive baseline keeps nothing of the guide (every part is replaced), so
  it differs from `scratch` only in its random initialization draws; both are
  here because both are the paper's baselines.
- On CUDA the runs use bf16 autocast, TF32, fused AdamW, channels_last for
  the convolutions and DataLoader workers with pinned memory. `--compile=True`
  puts the final training's model through torch.compile. Not the per-stage
  fine-tuning (short, and each stage meets a new architecture: a compilation
  each), nor alignment (its forward passes stop by raising from hooks, which
  compiled code does not support).
"""
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
out_dir = "out-resnet50-resnet18"  # checkpoint, results.json and target.pt go here
data_dir = ""  # ImageNet root holding train/ and val/ (one folder per class); "" = generated images
eval_only = ""  # "guide" or a path to a target.pt: evaluate it on val/ and exit
resume = False  # continue the run in out_dir from its last checkpoint
# guide
guide = "random"  # "random" (untrained, the paper's claim), "pretrained" (torchvision ImageNet weights) or a path
# method
method = "not"  # "not", "naive" (all stages at once, task loss only), "scratch" (plain ResNet-18), or
# "guide" (a ResNet-50 from scratch, --guide=random, written to out_dir/guide.pt)
order = "forward"  # "forward": stem+layer1 first, classifier last; "reverse": classifier first
align_steps = 2000  # CKA alignment steps per stage
align_lr = 1e-3  # peak learning rate of the new modules during their alignment
finetune_steps = 200  # task steps on the whole hybrid after each stage's alignment; 0 turns it off
finetune_lr = 1e-4  # peak learning rate of that per-stage fine-tuning
cka_scope = "global"  # "global": CKA on the batch of all processes; "local": per process, no all_gather
cka_unbiased = False  # debiased HSIC estimator in CKA
# task training
epochs = 100  # final end-to-end training, in passes over the training set
batch_size = 256  # global batch, split evenly over processes
optimizer = "sgd"  # "sgd" (torchvision's ResNet recipe) or "adamw"
lr = 0.1  # peak learning rate of the final training (and of the baselines)
weight_decay = 1e-4
warmup_steps = 2500  # linear warmup of the final training, then cosine decay to zero
grad_clip = 0.0  # clip the gradient norm; 0 turns it off
label_smoothing = 0.1
# evaluation, logging, checkpoints
eval_guide = True  # measure the guide's accuracy first
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
preset = ""  # "tiny": the whole conversion on CPU in about a minute; "small": one arm of the laptop study
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

PRESETS = {
    "tiny": dict(out_dir="out-resnet50-resnet18-tiny", image_size=32, synthetic_train=1024, synthetic_val=256,
                 align_steps=20, align_lr=3e-3, finetune_steps=4, finetune_lr=1e-3, epochs=2, batch_size=32,
                 optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=5, eval_interval=0, log_interval=5,
                 ckpt_interval=20, workers=0),
    # The laptop study: 32 x 32 generated images, 100 classes of 30 examples each, class patterns anywhere.
    "small": dict(out_dir="out-resnet50-resnet18-small", image_size=32, num_classes=100, synthetic_train=3000,
                  synthetic_val=1000, synthetic_shift=16, align_steps=40, align_lr=3e-3, finetune_steps=10,
                  finetune_lr=1e-3, epochs=6, batch_size=32, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                  warmup_steps=20, eval_interval=60, log_interval=60, ckpt_interval=200, workers=0),
}
# -----------------------------------------------------------------------------

# Output channels of each residual stage: the guide's (Bottleneck, x4) and the target's (BasicBlock).
GUIDE_WIDTH = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
TARGET_WIDTH = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def adapter(in_channels, out_channels):
    """Maps between the two networks' widths at the frontier of replacement."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def make_stages(order, num_classes, cfg):
    """The five NoT stages in the given order; each swap builds fresh ResNet-18 parts."""

    def fresh():
        return torchvision.models.resnet18(num_classes=num_classes)

    def stage(swap, compare, train):
        return common.Stage(swap, compare, train, cfg["align_steps"], cfg["align_lr"], cfg["finetune_steps"],
                            cfg["finetune_lr"])

    layers = ["layer1", "layer2", "layer3", "layer4"]
    if order == "forward":
        # The new stage's output feeds the next ResNet-50 stage through an adapter placed after it.
        def swap_forward(i):
            def swap(hybrid):
                target = fresh()
                if i == 0:
                    hybrid.conv1, hybrid.bn1 = target.conv1, target.bn1
                else:
                    setattr(hybrid, layers[i - 1], getattr(hybrid, layers[i - 1])[0])
                setattr(hybrid, layers[i], nn.Sequential(getattr(target, layers[i]),
                                                         adapter(TARGET_WIDTH[layers[i]], GUIDE_WIDTH[layers[i]])))

            return swap

        def swap_classifier(hybrid):
            hybrid.layer4 = hybrid.layer4[0]
            hybrid.fc = fresh().fc

        stages = [stage(swap_forward(i), [(layer, f"{layer}.0")], (["conv1", "bn1"] if i == 0 else []) + [layer])
                  for i, layer in enumerate(layers)]
        return stages + [stage(swap_classifier, [("fc", "fc")], ["fc"])]

    # Reverse: an adapter in front of the new stage reads the last ResNet-50 stage's output.
    def swap_classifier_first(hybrid):
        hybrid.layer4 = nn.Sequential(hybrid.layer4, adapter(GUIDE_WIDTH["layer4"], TARGET_WIDTH["layer4"]))
        hybrid.fc = fresh().fc

    def swap_reverse(i):
        def swap(hybrid):
            if i + 1 < len(layers):  # the ResNet-18 stage after this one no longer needs its adapter
                setattr(hybrid, layers[i + 1], getattr(hybrid, layers[i + 1])[1])
            widths = GUIDE_WIDTH[layers[i - 1]], TARGET_WIDTH[layers[i - 1]]
            setattr(hybrid, layers[i], nn.Sequential(adapter(*widths), getattr(fresh(), layers[i])))

        return swap

    def swap_stem(hybrid):
        target = fresh()
        hybrid.layer2 = hybrid.layer2[1]
        hybrid.conv1, hybrid.bn1, hybrid.layer1 = target.conv1, target.bn1, target.layer1

    stages = [stage(swap_classifier_first, [("fc", "fc")], ["layer4.1", "fc"])]
    stages += [stage(swap_reverse(i), [(layers[i], f"{layers[i]}.1")], [layers[i]]) for i in (3, 2, 1)]
    return stages + [stage(swap_stem, [("layer1", "layer1")], ["conv1", "bn1", "layer1"])]


def load_guide(spec, num_classes=1000):
    """The ResNet-50 guide in eval mode: "pretrained", "random", or a path to a checkpoint."""
    if spec == "random":
        return torchvision.models.resnet50(num_classes=num_classes).eval()
    if spec == "pretrained":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise common.ConfigError(
                f"could not get torchvision's ResNet-50 ImageNet weights ({type(e).__name__}: {e}). "
                f"On a machine with internet, download {weights.url} and put it at {cache} "
                f"(or set TORCH_HOME), or pass --guide=PATH to a checkpoint") from None
    else:
        state = common.load_checkpoint(spec)
        state = state.get("model", state)
    if "fc.weight" not in state:
        raise common.ConfigError(f"guide {spec!r} is not a ResNet-50 state dict (no fc.weight)")
    model = torchvision.models.resnet50(num_classes=state["fc.weight"].shape[0])
    problems = common.state_dict_mismatch(state, model.state_dict())
    if problems:
        raise common.ConfigError(f"guide {spec!r} does not fit ResNet-50: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def load_target(path):
    """The converted model saved by a run (out_dir/target.pt): a plain torchvision ResNet-18, in eval mode."""
    saved = common.load_checkpoint(path)
    if not {"config", "model"} <= set(saved):
        raise common.ConfigError(f"{path!r} is not a target.pt written by resnet50_to_resnet18.py")
    model = torchvision.models.resnet18(num_classes=saved["model"]["fc.weight"].shape[0])
    model.load_state_dict(saved["model"], strict=True)
    return model.eval()


def check_config(cfg):
    common.check_choices(cfg, {"method": ("not", "naive", "scratch", "guide"), "order": ("forward", "reverse"),
                               "cka_scope": ("global", "local"), "optimizer": ("adamw", "sgd"),
                               "device": ("auto", "cuda", "cpu"), "dtype": ("bfloat16", "float32")})
    for key in ("batch_size", "image_size", "log_interval", "ckpt_interval"):
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

    stages = make_stages(cfg["order"], num_classes, cfg)
    train_steps = cfg["epochs"] * len(batches)
    if cfg["method"] == "guide":
        # The random guide itself is trained, no stages, for as many steps as a NoT run takes.
        train_steps, stages, cfg["eval_guide"] = common.total_grad_steps(stages, train_steps), [], False
    if cfg["method"] == "scratch":
        # A plain ResNet-18, no stages, trained for as many steps as the NoT run takes in all.
        train_steps = common.total_grad_steps(stages, train_steps)
        guide_model, stages = torchvision.models.resnet18(num_classes=num_classes).to(ctx.device), []
        cfg["eval_guide"] = False
    if ctx.device.type == "cuda":  # cuDNN's fastest layout; common.cka flattens such maps without copying them
        guide_model = guide_model.to(memory_format=torch.channels_last)
    t0 = time.time()
    hybrid, results = common.convert(guide_model, stages, task, batches, cfg, ctx, train_steps, log)
    if ctx.master:
        name, model = "guide.pt", hybrid
        if cfg["method"] != "guide":
            # The hybrid's parameter names are ResNet-18's by construction; strict loading proves nothing else is left.
            name, model = "target.pt", torchvision.models.resnet18(num_classes=num_classes)
            model.load_state_dict(hybrid.state_dict(), strict=True)
        common.save_atomic({"config": cfg, "model": model.state_dict()}, os.path.join(cfg["out_dir"], name))
        log(f"wrote {cfg['out_dir']}/{name} and results.json in {time.time() - t0:.0f} s")
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
