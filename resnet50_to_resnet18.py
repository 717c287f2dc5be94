"""
Network of Theseus: ResNet-50 -> ResNet-18, one residual stage at a time. The paper: converted from an
*untrained* ResNet-50, the ResNet-18 beats one trained from scratch by about 3 points of ImageNet top-1.

Each stage replaces a whole residual stage of a torchvision ResNet-50 guide by ResNet-18's: the stem with
layer1, then layer2, layer3, layer4, and the classifier (--order=reverse: the classifier first). The result is
a plain torchvision ResNet-18: target.pt loads into torchvision.models.resnet18 with strict=True. The arms:
--method=not, --method=naive (every ResNet-18 stage at once, task loss only), --method=scratch (a plain
ResNet-18), all with the same number of gradient steps; --method=guide trains a ResNet-50 as long.

    python resnet50_to_resnet18.py --preset=tiny                                   # CPU, generated images
    python resnet50_to_resnet18.py --preset=small --seed=1                         # the laptop study's arms:
    python resnet50_to_resnet18.py --preset=small --method=scratch --seed=1        # (README: the study)
    torchrun --nproc_per_node=8 resnet50_to_resnet18.py --data_dir=/path/to/imagenet              # the paper's
    torchrun --nproc_per_node=8 resnet50_to_resnet18.py --data_dir=/path/to/imagenet --method=scratch
    ... --guide=pretrained    ... --resume=True    ... --eval_only=out-resnet50_to_resnet18/target.pt
"""
import os

import torch
import torch.nn as nn
import torchvision

import common

# -----------------------------------------------------------------------------
# config: this script's settings, over common.SETTINGS and common.IMAGE_SETTINGS; each is a flag --name=value
SETTINGS = dict(
    common.IMAGE_SETTINGS,
    guide="random",  # "random" (untrained: the paper's claim), "pretrained" (torchvision's weights), or a path
    method="not",  # also "scratch": a plain ResNet-18, trained as long
    align_steps=2000,
    finetune_steps=200,
    optimizer="sgd",  # torchvision's ResNet recipe
    lr=0.1,
    weight_decay=1e-4,
    grad_clip=0.0,
)
PRESETS = {
    "tiny": dict(image_size=32, synthetic_train=1024, synthetic_val=256, align_steps=20, align_lr=3e-3,
                 finetune_steps=4, finetune_lr=1e-3, epochs=2, batch_size=32, optimizer="adamw", lr=1e-3,
                 weight_decay=0.05, warmup_steps=5, log_interval=5, ckpt_interval=20, workers=0),
    # The laptop study (docs/study.md): 32 x 32 generated images whose patterns (2 a class) sit anywhere, with colour
    # and a shared distractor, 10 classes of 300 examples; the difficulty chosen from guide runs alone (its
    # ResNet-50 guide: 82.5%). 100 alignment and 25 fine-tuning steps per stage, as for ResNet-18 -> MLP; 10 epochs
    # of final training.
    "small": dict(image_size=32, num_classes=10, synthetic_train=3000, synthetic_val=1000, synthetic_shift=16,
                  synthetic_modes=2, synthetic_colour=0.25, synthetic_distractors=4, synthetic_noise=1.5,
                  align_steps=100, align_lr=3e-3, finetune_steps=25, finetune_lr=1e-3, epochs=10, batch_size=32,
                  optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=50, eval_interval=93, log_interval=93,
                  ckpt_interval=500, workers=0),
}
# -----------------------------------------------------------------------------

# Output channels of each residual stage: the guide's (Bottleneck, x4) and the target's (BasicBlock).
GUIDE_WIDTH = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
TARGET_WIDTH = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def adapter(in_channels, out_channels):
    """Maps between the two networks' widths where a new ResNet-18 stage meets a remaining ResNet-50 stage."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def make_stages(guide, cfg):
    """The five stages in cfg.order; each swap builds fresh ResNet-18 parts.

    CKA compares representations of different widths, so the loss needs no adapter, but the hybrid must run:
    adapters sit only at the frontier of replacement (forward order: after the newest ResNet-18 stage; reverse:
    in front of it), and the next stage removes it, so consecutive ResNet-18 stages connect natively. CKA reads
    the new stage's output before any adapter (the classifier stage: the logits). In forward order the adapter
    is past the compared output: it learns in the stage's fine-tuning; in reverse order alignment trains it.
    """
    fresh = lambda: torchvision.models.resnet18(num_classes=guide.fc.out_features)  # noqa: E731
    if cfg.order == "forward":
        def swap_forward(i):
            def swap(hybrid):
                target = fresh()
                if i == 0:
                    hybrid.conv1, hybrid.bn1 = target.conv1, target.bn1
                else:  # the previous ResNet-18 stage's adapter goes
                    setattr(hybrid, LAYERS[i - 1], getattr(hybrid, LAYERS[i - 1])[0])
                setattr(hybrid, LAYERS[i], nn.Sequential(getattr(target, LAYERS[i]),
                                                         adapter(TARGET_WIDTH[LAYERS[i]], GUIDE_WIDTH[LAYERS[i]])))

            return swap

        def swap_classifier(hybrid):
            hybrid.layer4, hybrid.fc = hybrid.layer4[0], fresh().fc

        stages = [common.Stage(swap_forward(i), [(layer, f"{layer}.0")], (["conv1", "bn1"] if i == 0 else []) + [layer])
                  for i, layer in enumerate(LAYERS)]
        return stages + [common.Stage(swap_classifier, [("fc", "fc")], ["fc"])]

    def swap_classifier_first(hybrid):
        hybrid.layer4 = nn.Sequential(hybrid.layer4, adapter(GUIDE_WIDTH["layer4"], TARGET_WIDTH["layer4"]))
        hybrid.fc = fresh().fc

    def swap_reverse(i):
        def swap(hybrid):
            if i + 1 < len(LAYERS):  # the next ResNet-18 stage no longer needs its adapter
                setattr(hybrid, LAYERS[i + 1], getattr(hybrid, LAYERS[i + 1])[1])
            widths = GUIDE_WIDTH[LAYERS[i - 1]], TARGET_WIDTH[LAYERS[i - 1]]
            setattr(hybrid, LAYERS[i], nn.Sequential(adapter(*widths), getattr(fresh(), LAYERS[i])))

        return swap

    def swap_stem(hybrid):
        target = fresh()
        hybrid.layer2 = hybrid.layer2[1]
        hybrid.conv1, hybrid.bn1, hybrid.layer1 = target.conv1, target.bn1, target.layer1

    stages = [common.Stage(swap_classifier_first, [("fc", "fc")], ["layer4.1", "fc"])]
    stages += [common.Stage(swap_reverse(i), [(LAYERS[i], f"{LAYERS[i]}.1")], [LAYERS[i]]) for i in (3, 2, 1)]
    return stages + [common.Stage(swap_stem, [("layer1", "layer1")], ["conv1", "bn1", "layer1"])]


def load_guide(spec, num_classes=1000):
    """The ResNet-50 guide in eval mode: "pretrained", "random", or the path of a state dict (or checkpoint)."""
    if spec == "random":
        return torchvision.models.resnet50(num_classes=num_classes).eval()
    if spec == "pretrained":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise common.ConfigError(f"could not get torchvision's ResNet-50 ImageNet weights ({type(e).__name__}: "
                                     f"{e}). On a machine with internet, download {weights.url} and put it at "
                                     f"{cache} (or set TORCH_HOME), or pass --guide=PATH to a checkpoint") from None
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
    """The converted model a run saved (out_dir/target.pt): a plain torchvision ResNet-18, in eval mode."""
    saved = common.load_checkpoint(path, ("config", "model"), "target.pt")
    model = torchvision.models.resnet18(num_classes=saved["model"]["fc.weight"].shape[0])
    model.load_state_dict(saved["model"], strict=True)
    return model.eval()


def main(argv):
    cfg = common.configure(SETTINGS, argv, PRESETS, checks={"method": ("not", "naive", "scratch", "guide")})
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
    stages = make_stages(guide, cfg)
    run = common.Run(cfg, ctx, task, batches)
    train_steps = cfg.epochs * len(batches)
    steps = common.total_steps(stages, cfg, train_steps)  # what every arm takes

    if cfg.method == "not":
        run.evaluate_guide(guide)
        model = common.convert(guide, stages, train_steps, task, run)
    elif cfg.method == "naive":  # every ResNet-18 stage at once, task loss only: nothing of the guide is left
        run.evaluate_guide(guide)
        model = common.swapped(guide, stages, cfg.seed)
        common.train(model, "train", steps, cfg.lr, task, run)
    elif cfg.method == "scratch":  # a plain ResNet-18
        model = torchvision.models.resnet18(num_classes=num_classes)
        common.train(model, "train", steps, cfg.lr, task, run)
    else:  # "guide": a ResNet-50 from scratch, for --guide= of later runs
        model = guide
        common.train(model, "train", steps, cfg.lr, task, run)
    run.finish(model)
    if ctx.master:
        name, saved = "guide.pt", model
        if cfg.method != "guide":
            # The hybrid's parameter names are ResNet-18's by construction: strict loading proves nothing else is left.
            name, saved = "target.pt", torchvision.models.resnet18(num_classes=num_classes)
            saved.load_state_dict(model.state_dict(), strict=True)
        common.save_atomic({"config": vars(cfg), "model": saved.state_dict()}, os.path.join(cfg.out_dir, name))
        ctx.log(f"wrote {cfg.out_dir}/{name} and results.json")
    common.finish_processes()


if __name__ == "__main__":
    common.launch(main)
