"""
Network of Theseus: ResNet-18 -> MLP on ImageNet. Table 1: guide 69.66, NoT 62.12 (trained guide) and 60.85
(untrained guide), naive 40.01 top-1.

Every Conv2d of a ResNet-18 guide (20, the three 1x1 downsamples included) becomes a low-rank linear map of the
flattened feature map, Linear(C*H*W -> rank) then Linear(rank -> C'*H'*W'). BatchNorm, ReLU, the residual
additions, the pooling and the classifier stay: no convolution is left, an MLP with residual connections.
One convolution per stage, in the order they run (--order=reverse: last first).

    python resnet18_to_mlp.py --preset=tiny                                # CPU, generated images, about a minute
    python resnet18_to_mlp.py --preset=small --method=guide --out_dir=g    # the laptop study's guide, then
    python resnet18_to_mlp.py --preset=small --guide=g/guide.pt --seed=1   # NoT with it (README: the study)
    torchrun --nproc_per_node=8 resnet18_to_mlp.py --data_dir=/path/to/imagenet          # the paper's run
    ... --method=naive    ... --guide=random    ... --resume=True    ... --rank=1024 --shard=True
    python resnet18_to_mlp.py --data_dir=/path/to/imagenet --eval_only=out-resnet18_to_mlp/target.pt

Weights offline: torchvision's resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints, or --guide=PATH.
"""
import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torchvision

import common

# -----------------------------------------------------------------------------
# config: this script's settings, over common.SETTINGS and common.IMAGE_SETTINGS; each is a flag --name=value
SETTINGS = dict(
    common.IMAGE_SETTINGS,
    guide="pretrained",  # "pretrained" (torchvision's ImageNet weights), "random", or a state dict's path
    rank=256,  # r, the inner width of each low-rank map (the paper: 256 to 1024)
    shard=False,  # task phases under FSDP, each Linear a unit: at rank 1024 the MLP holds 4.8 B parameters
    # (76 GB with AdamW per GPU under DDP, 9.6 GB sharded over 8; bench.py prints the table)
)
PRESETS = {
    "tiny": dict(guide="random", image_size=32, synthetic_train=1024, synthetic_val=256, rank=32, align_steps=20,
                 align_lr=3e-3, finetune_steps=4, finetune_lr=1e-3, epochs=2, batch_size=32, warmup_steps=5,
                 log_interval=4, ckpt_interval=20, workers=0),
    # The laptop study (docs/study.md): 32 x 32 generated images whose class patterns (2 a class) sit anywhere
    # (rolled by up to 16 pixels), which a convolution handles and an MLP must learn position by position, with
    # colour and a shared distractor: the guide's difficulty, chosen from guide runs alone (its guide: 77.0%).
    # Alignment: 100 steps, where CKA plateaued on the earlier task (200 steps tried: CKA at 100 within 0.01-0.04 of
    # its value at 200 in every stage, 0.86-0.98); 25 fine-tuning steps; the final training 40 epochs (1560 steps).
    "small": dict(guide="random", image_size=32, synthetic_train=2500, synthetic_val=1000, synthetic_shift=16,
                  synthetic_modes=2, synthetic_colour=0.25, synthetic_distractors=4, synthetic_noise=1.5,
                  rank=64, align_steps=100, align_lr=3e-3, finetune_steps=25, finetune_lr=1e-3, epochs=40,
                  batch_size=64, warmup_steps=100, eval_interval=390, log_interval=100, ckpt_interval=500, workers=0),
}
# -----------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """The replacement of one Conv2d: flatten, Linear(C*H*W -> rank), Linear(rank -> C'*H'*W'), reshape."""

    def __init__(self, in_shape, out_shape, rank):
        super().__init__()
        self.out_shape = out_shape
        self.down = nn.Linear(math.prod(in_shape), rank, bias=False)
        self.up = nn.Linear(rank, math.prod(out_shape))

    def forward(self, x):
        return self.up(self.down(x.flatten(1))).view(x.shape[0], *self.out_shape)


def make_stages(guide, example, cfg):
    """One stage per convolution; `example` (one input image) gives each its input and output shape."""
    convolutions = [name for name, module in guide.named_modules() if isinstance(module, nn.Conv2d)]

    def stage(name):
        def swap(hybrid):
            common.replace(hybrid, name, lambda conv, in_shape, out_shape: LowRankLinear(in_shape, out_shape,
                                                                                         cfg.rank), example)

        return common.Stage(swap, compare=[(name, name)], train=[name])

    return [stage(name) for name in (convolutions if cfg.order == "forward" else convolutions[::-1])]


def shard(model):
    """FSDP over all processes (`--shard=True`), each Linear a unit: the low-rank maps hold nearly every weight."""
    from torch.distributed.fsdp import fully_shard

    # FSDP shards contiguous parameters only; model is a copy, and the weights copied back keep the model's format.
    model.to(memory_format=torch.contiguous_format)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    return fully_shard(model)


def load_guide(spec, num_classes=1000):
    """The ResNet-18 guide in eval mode: "pretrained", "random", or the path of a state dict (or checkpoint)."""
    if spec == "random":
        return torchvision.models.resnet18(num_classes=num_classes).eval()
    if spec == "pretrained":
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise common.ConfigError(f"could not get torchvision's ResNet-18 ImageNet weights ({type(e).__name__}: "
                                     f"{e}). On a machine with internet, download {weights.url} and put it at "
                                     f"{cache} (or set TORCH_HOME), or pass --guide=PATH to a checkpoint") from None
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


def load_target(path):
    """The converted model a run saved (out_dir/target.pt): the guide's architecture with every stage swapped."""
    saved = common.load_checkpoint(path, ("config", "model"), "target.pt")
    cfg = SimpleNamespace(**saved["config"])
    guide = torchvision.models.resnet18(num_classes=saved["model"]["fc.weight"].shape[0])
    target = common.swapped(guide, make_stages(guide, torch.zeros(1, 3, cfg.image_size, cfg.image_size), cfg))
    target.load_state_dict(saved["model"])
    return target.eval()


def main(argv):
    cfg = common.configure(SETTINGS, argv, PRESETS, checks={"rank": common.positive})
    ctx = common.start(cfg, __file__)
    train_set, val_set, num_classes = common.image_data(cfg, ctx)
    task = common.classification_task(cfg, ctx, train_set, val_set)
    if cfg.eval_only:
        model = load_guide(cfg.guide, num_classes) if cfg.eval_only == "guide" else load_target(cfg.eval_only)
        ctx.log(f"{cfg.eval_only} top1 {task.evaluate(model.to(ctx.device)):.2f}")
        return common.finish_processes()
    guide = common.rank0_first(lambda: load_guide(cfg.guide, num_classes)).to(ctx.device)
    if guide.fc.out_features != num_classes:
        raise common.ConfigError(f"the guide has {guide.fc.out_features} classes, the data {num_classes}")
    if ctx.device.type == "cuda":  # cuDNN's fastest layout; common.cka reads such maps without copying them
        guide = guide.to(memory_format=torch.channels_last)
    batches = common.Batches(train_set, cfg, ctx)
    stages = make_stages(guide, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=ctx.device), cfg)
    run = common.Run(cfg, ctx, task, batches, shard=shard if cfg.shard else None)
    train_steps = cfg.epochs * len(batches)
    steps = common.total_steps(stages, cfg, train_steps)  # what every arm takes

    if cfg.method == "not":
        run.evaluate_guide(guide)
        model = common.convert(guide, stages, train_steps, task, run)
    elif cfg.method == "naive":  # every convolution replaced at once, task loss only
        run.evaluate_guide(guide)
        model = common.swapped(guide, stages, cfg.seed)
        common.train(model, "train", steps, cfg.lr, task, run)
    else:  # "guide": a ResNet-18 from scratch, for --guide= of later runs
        model = guide
        common.train(model, "train", steps, cfg.lr, task, run)
    run.finish(model)
    if ctx.master:
        name = "guide.pt" if cfg.method == "guide" else "target.pt"
        common.save_atomic({"config": vars(cfg), "model": model.state_dict()}, os.path.join(cfg.out_dir, name))
        ctx.log(f"wrote {cfg.out_dir}/{name} and results.json")
    common.finish_processes()


if __name__ == "__main__":
    common.launch(main)
