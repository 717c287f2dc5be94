"""README's seven paper commands, each run as its smoke run (--preset=smoke) under `torchrun --nproc_per_node=2` on
CPU (gloo), with --shard=True, --eval_only and --resume=True beside them: what a command does that is not CUDA's own
fails here before it fails on a node of GPUs.

Offline, what a command would download is put where its loader looks first, as random weights of small models (the
loaders read a model's size from its file): torchvision's ResNet-18 and DINOv2's official files in $TORCH_HOME's
cache, GPT-2 in the Hugging Face cache ($HF_HOME, offline), GPT-2's BPE from whisper's copy. ImageNet is a folder of
generated JPEGs, Wikitext-103 a folder of generated text; the models are small (flags the paper leaves at their
defaults)."""
import importlib.util
import os
import re

import pytest
import torch

from runs import ROOT, TORCHRUN_2, read_results, run_script, write_text_folder
from test_dinov2_to_patchmlp import official_checkpoint, save_official
from test_ranks import image_folder

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    PAPER = [line.split("#")[0].split()[2:] for line in f if line.startswith("torchrun --nproc_per_node=8 ")]

SMALL = {"resnet18_to_mlp.py": ["--rank=16"], "dinov2_to_patchmlp.py": [], "resnet50_to_resnet18.py": [],
         "gpt2_to_rnn.py": ["--data=text", "--seq_len=32"]}
IMAGES = ["--image_size=32", "--decode=cpu", "--workers=0"]
pytestmark = pytest.mark.commands  # about 3 minutes: outside the suite (pytest.ini)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A folder holding the data and the downloads' caches, and the environment that points at them."""
    root = tmp_path_factory.mktemp("paper")
    image_folder(root / "imagenet", classes=2, per_class=8)
    write_text_folder(root / "text")
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(),  # the folder's classes
               checkpoints / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url))
    save_official(checkpoints, *official_checkpoint(dim=64, depth=4, patch=8, grid=5, classes=2))
    from transformers import GPT2Config, GPT2LMHeadModel

    import gpt2_to_rnn

    snapshot = root / "hf" / "hub" / f"models--{gpt2_to_rnn.GPT2_REPO.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.save(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=1, n_positions=64)).state_dict(),
               snapshot / "snapshots" / ("0" * 40) / "pytorch_model.bin")
    whisper = importlib.util.find_spec("whisper")  # its BPE file only (importing it needs its dependencies)
    bpe = os.path.join(os.path.dirname(whisper.origin), "assets", "gpt2.tiktoken")
    env = dict(os.environ, TORCH_HOME=str(root / "torch"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1",
               GPT2_TIKTOKEN_FILE=bpe)
    return root, env


def smoke(command, root, env, *more):
    """The command as README gives it, /path/to/imagenet the generated folder, as a smoke run of two processes."""
    script, *args = command
    args = [a.replace("/path/to/imagenet", "imagenet") for a in args]
    flags = ["--preset=smoke", "--device=cpu", "--batch_size=8", *SMALL[script],
             *(IMAGES if script != "gpt2_to_rnn.py" else []), *args, *more]
    return run_script(script, flags, root, launcher=TORCHRUN_2, env=env)


@pytest.mark.parametrize("command", PAPER, ids=[" ".join(c) for c in PAPER])
def test_a_paper_command_runs_its_smoke_run_on_two_processes(machine, command):
    root, env = machine
    out = f"out-{len(os.listdir(root))}"
    log = smoke(command, root, env, f"--out_dir={out}").stdout
    res = read_results(root / out)
    assert res["status"] == "done" and res["smoke"]["disk_needed_bytes"] > 0
    assert re.search(r"^smoke: checkpoint [\d.]+ MB written, read back and resumed from", log, re.MULTILINE)
    assert re.search(r"^smoke: the full run \(.*\) projected at \d+:\d\d:\d\d", log, re.MULTILINE)
    assert os.path.isfile(root / out / "target.pt")


def test_sharded_resumed_and_evaluated_on_two_processes(machine):
    """--shard=True's task phases under FSDP, the finished run given again with --resume=True (nothing is left to
    do), and --eval_only of the targets runs wrote, each under torchrun."""
    root, env = machine
    resnet, gpt = PAPER[0], next(c for c in PAPER if c[0] == "gpt2_to_rnn.py")
    smoke(resnet, root, env, "--out_dir=sharded", "--shard=True")
    assert read_results(root / "sharded")["status"] == "done"
    log = smoke(resnet, root, env, "--out_dir=sharded", "--shard=True", "--resume=True").stdout
    assert read_results(root / "sharded")["status"] == "done" and not re.search(r"step \d+/", log)  # nothing left to do
    assert "smoke: no step ran (a finished run resumed)" in log
    smoke(gpt, root, env, "--out_dir=gpt")
    for command, out, printed in ((resnet, "sharded", "top1"), (gpt, "gpt", "val_ppl")):
        log = smoke(command, root, env, f"--out_dir={out}-eval", f"--eval_only={out}/target.pt").stdout
        evaluated = re.search(rf"^{out}/target.pt {printed} ([\d.]+)", log, re.MULTILINE)
        # the model the run ended with, on the same validation data: its final metric to the printed digits
        assert evaluated and float(evaluated[1]) == pytest.approx(read_results(root / out)["metric"]["value"],
                                                                  rel=1e-5, abs=0.006), log[-2000:]
