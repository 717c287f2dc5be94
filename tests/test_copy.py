"""A new conversion is a copy of a script with a handful of changed lines: tried as a new user would, in a copy
beside the original's imports, run on its tiny preset, its target loaded back and checked."""
import difflib
import importlib.util
import os

import torch
import torch.nn as nn

from learning import LEARNED
from runs import ROOT, read_results, run_main


def copy_with(tmp_path, script, name, edits):
    """Copy ROOT/script to tmp_path/name with each (old, new) edit made once; returns (path, changed lines): the
    lines of the difference, a replaced line counted once."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    original = text.splitlines()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    opcodes = difflib.SequenceMatcher(None, original, text.splitlines(), autojunk=False).get_opcodes()
    return path, sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag != "equal")


def run_copy(path, args, cwd):
    """The copy's main(args) in cwd, in this process (which imports common as the copy would beside the
    original); returns its log."""
    return run_main(load_module(path), args, cwd)


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gru_copy(folder):
    """gpt2_to_rnn.py with one GRU per attention: (its path, the lines changed)."""
    return copy_with(folder, "gpt2_to_rnn.py", "gpt2_to_gru.py", [
        ("two stacked Elman RNN layers (tanh), then", "one GRU layer, then"),
        ('self.rnn = nn.RNN(width, width, num_layers=2, nonlinearity="tanh", batch_first=True)',
         "self.rnn = nn.GRU(width, width, batch_first=True)"),
    ])


def test_gpt2_to_rnn_becomes_gpt2_to_gru_by_changing_the_replacement_module(tmp_path):
    path, changed = gru_copy(tmp_path)
    assert changed <= 6
    log = run_copy(path, [a.format(cache="cache") for a in LEARNED["gpt2_to_gru tiny"].args], tmp_path)
    out_dir = tmp_path / "out-gpt2_to_gru-tiny"  # named after the copy, with no edit for it
    res = read_results(out_dir)
    assert res["script"] == "gpt2_to_gru.py" and "final val_ppl" in log
    LEARNED["gpt2_to_gru tiny"].check(res)
    target = load_module(path).load_target(str(out_dir / "target.pt"))
    assert [type(block.attn.rnn) for block in target.transformer.h] == [nn.GRU, nn.GRU]
    # Recurrent generation, one token at a time carrying each GRU's state, equals the full forward pass.
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = target(ids)
        states = [None] * len(target.transformer.h)
        for pos in range(ids.shape[1]):
            logits, states = target.step(ids[:, pos], pos, states)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-4, rtol=1e-4)
    generated = target.generate(ids[:, :4], 12, generator=torch.Generator().manual_seed(1))
    expected, draws = ids[:, :4], torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(12):
            probs = torch.softmax(target(expected)[:, -1], dim=-1)
            expected = torch.cat([expected, torch.multinomial(probs, 1, generator=draws)], dim=1)
    assert torch.equal(generated, expected)


DEPTHWISE_SEPARABLE = '''class DepthwiseSeparable(nn.Module):
    """The replacement of one Conv2d: a depthwise convolution with its kernel and stride, then a 1x1 one."""

    def __init__(self, conv):
        super().__init__()
        self.depthwise = nn.Conv2d(conv.in_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                                   groups=conv.in_channels, bias=False)
        self.pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
'''


def separable_copy(folder):
    """resnet18_to_mlp.py with depthwise-separable convolutions: (its path, the lines changed)."""
    with open(os.path.join(ROOT, "resnet18_to_mlp.py")) as f:
        text = f.read()
    low_rank = text[text.index("class LowRankLinear"):text.index("def make_stages")].rstrip("\n") + "\n"
    return copy_with(folder, "resnet18_to_mlp.py", "resnet18_to_separable.py", [
        (low_rank, DEPTHWISE_SEPARABLE),
        (text[text.index("            common.replace(hybrid, name, lambda conv"):
              text.index("cfg.rank), example)") + 19],
         "            common.replace(hybrid, name, lambda conv, in_shape, out_shape: DepthwiseSeparable(conv), "
         "example)"),
        ('    rank=256,  # r, the inner width of each low-rank map (the paper: 256 to 1024)\n', ""),
        ('checks={"rank": common.positive}', "checks={}"),
        ("rank=32, ", ""),
        ("rank=64, ", ""),
    ])


def test_resnet18_to_mlp_becomes_depthwise_separable_convolutions(tmp_path):
    path, changed = separable_copy(tmp_path)
    assert changed <= 20
    run_copy(path, LEARNED["resnet18_to_separable"].args, tmp_path)
    out_dir = tmp_path / "out-resnet18_to_separable-tiny"
    res = read_results(out_dir)
    assert res["script"] == "resnet18_to_separable.py" and len(res["stages"]) == 20
    LEARNED["resnet18_to_separable"].check(res)
    copy = load_module(path)
    target = copy.load_target(str(out_dir / "target.pt"))
    assert sum(isinstance(m, copy.DepthwiseSeparable) for m in target.modules()) == 20
    assert all(m.kernel_size == (1, 1) or m.groups == m.in_channels for m in target.modules()
               if isinstance(m, nn.Conv2d))
    # The saved target scores what the run reported, recomputed from scratch on the generated validation set.
    import common

    _, val = common.synthetic_images(512, 64, 10, 32)
    images, labels = val.tensors
    with torch.no_grad():
        top1 = 100.0 * (target(images).argmax(1) == labels).float().mean().item()
    assert abs(top1 - res["metric"]["value"]) < 1e-6
