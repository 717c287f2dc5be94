"""Every number the suite asserts a training run reaches, in one place: the run (script and flags), the number read
from its results.json, the bound it must clear, and that number's spread over seeds 0-4 and 1 and 2 threads.

A short run's floating point differs between CPUs of one kind as much as between seeds, so a bound is set from
that spread, never from one run: `python tools/margins.py` reruns every entry below and prints each bound's
margin against its worst run. Run it when adding or changing an entry, and write its numbers in `measured`.
"""
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import common


def top1(results):
    return results["metric"]["value"]


def cka_rise(results):
    """How far alignment raised CKA: each stage's last point of its CKA curve less its first, averaged."""
    rises = [last[1][k] - first[1][k] for s in results["stages"] for first, last in [(s["cka_curve"][0],
                                                                                      s["cka_curve"][-1])]
             for k in first[1]]
    return sum(rises) / len(rises)


def unigram_ppl(data):
    """Perplexity per byte of a split's bytes under the training split's byte frequencies (add-one): what a model
    that learned nothing but how often each byte occurs would score."""
    def tokens(split):
        if data == "generated":
            lines = common.generated_lines(split)
        else:
            with open(os.path.join(data, common.SPLITS[split]), encoding="utf-8") as f:
                lines = [line if line.strip() else "" for line in f]
        return [b for line in lines for b in line.encode("utf-8")]

    counts, val = Counter(tokens("train")), tokens("val")
    total = sum(counts.values()) + 256
    return math.exp(-sum(math.log((counts[b] + 1) / total) for b in val) / len(val))


def over_unigram(results):
    """The run's validation perplexity as a fraction of the unigram's: below 1, it learned more than byte counts."""
    return results["metric"]["value"] / unigram_ppl(results["config"]["data"])


@dataclass
class Learned:
    script: str  # a script of the repository, or (with `copy`) of a copy that copy(folder) writes
    args: list  # its flags; "{data}" stands for the text folder runs.write_text_folder writes, "{cache}" a cache
    number: Callable  # results.json -> the number asserted
    bound: float
    below: bool = False  # the number must be below the bound, else above it
    measured: str = ""  # its spread, by tools/margins.py
    copy: str = ""  # the function of tests/test_copy.py that writes the copy

    def check(self, results):
        number = self.number(results)
        passed = number < self.bound if self.below else number > self.bound
        assert passed, f"{number:.4g} is not {'below' if self.below else 'above'} {self.bound} ({self.measured})"


RESNET18 = ["--preset=tiny", "--device=cpu", "--align_steps=4", "--finetune_steps=2", "--epochs=3",
            "--bn_recal_batches=2", "--synthetic_train=512", "--synthetic_val=64"]
DINOV2 = ["--preset=tiny", "--device=cpu", "--align_steps=4", "--finetune_steps=2", "--epochs=1",
          "--bn_recal_batches=2", "--synthetic_val=64"]
RESNET50 = ["--preset=tiny", "--device=cpu", "--align_steps=3", "--finetune_steps=1", "--epochs=1",
            "--bn_recal_batches=2", "--synthetic_train=512", "--synthetic_val=64"]
GPT2_FLAGS = ["--preset=tiny", "--device=cpu", "--align_steps=6", "--finetune_steps=2", "--train_steps=40",
              "--batch_size=8", "--seq_len=32", "--log_interval=2"]
GPT2 = [*GPT2_FLAGS, "--data={data}", "--cache_dir={cache}"]

LEARNED = {
    "resnet18_to_mlp forward": Learned(
        "resnet18_to_mlp.py", RESNET18, top1, 30,
        measured="seeds 0-4: 1 thread 87.5-100, 2 threads 95.3-100"),
    "resnet18_to_mlp reverse": Learned(
        "resnet18_to_mlp.py", [*RESNET18, "--order=reverse"], top1, 30,
        measured="seeds 0-4: 1 thread 100-100, 2 threads 100-100"),
    "resnet18_to_mlp naive": Learned(
        "resnet18_to_mlp.py", [*RESNET18, "--method=naive"], top1, 30,
        measured="seeds 0-4: 1 thread 67.2-100, 2 threads 89.1-100"),
    "resnet18_to_mlp guide": Learned(
        "resnet18_to_mlp.py", [*RESNET18, "--method=guide", "--align_steps=1", "--finetune_steps=1", "--epochs=1"],
        top1, 30,
        measured="seeds 0-4: 1 thread 100-100, 2 threads 100-100"),
    "dinov2_to_patchmlp not": Learned(
        "dinov2_to_patchmlp.py", DINOV2, top1, 30,
        measured="seeds 0-4: 1 thread 51.6-75, 2 threads 51.6-75"),
    "dinov2_to_patchmlp naive": Learned(
        "dinov2_to_patchmlp.py", [*DINOV2, "--method=naive"], top1, 30,
        measured="seeds 0-4: 1 thread 51.6-76.6, 2 threads 51.6-76.6"),
    "dinov2_to_patchmlp guide": Learned(
        "dinov2_to_patchmlp.py", [*DINOV2, "--method=guide"], top1, 30,
        measured="seeds 0-4: 1 thread 96.9-100, 2 threads 96.9-100"),
    "resnet50_to_resnet18 not": Learned(
        "resnet50_to_resnet18.py", RESNET50, top1, 30,
        measured="seeds 0-4: 1 thread 85.9-100, 2 threads 95.3-100"),
    "resnet50_to_resnet18 reverse": Learned(
        "resnet50_to_resnet18.py", [*RESNET50, "--order=reverse"], top1, 30,
        measured="seeds 0-4: 1 thread 78.1-100, 2 threads 76.6-100"),
    "resnet50_to_resnet18 naive": Learned(
        "resnet50_to_resnet18.py", [*RESNET50, "--method=naive"], top1, 30,
        measured="seeds 0-4: 1 thread 100-100, 2 threads 100-100"),
    "resnet50_to_resnet18 scratch": Learned(
        "resnet50_to_resnet18.py", [*RESNET50, "--method=scratch"], top1, 30,
        measured="seeds 0-4: 1 thread 100-100, 2 threads 100-100"),
    "resnet50_to_resnet18 guide": Learned(
        "resnet50_to_resnet18.py", [*RESNET50, "--method=guide", "--epochs=2"], top1, 30,
        measured="seeds 0-4: 1 thread 75-82.8, 2 threads 75-82.8 (--epochs=1: 21.9-57.8)"),
    "gpt2_to_rnn not": Learned(
        "gpt2_to_rnn.py", GPT2, over_unigram, 0.8, below=True,
        measured="seeds 0-4: 1 thread 0.237-0.409, 2 threads 0.237-0.409"),
    "gpt2_to_rnn not cka": Learned(
        "gpt2_to_rnn.py", GPT2, cka_rise, 0,
        measured="seeds 0-4: 1 thread 0.225-0.426, 2 threads 0.225-0.426"),
    "gpt2_to_rnn naive": Learned(
        "gpt2_to_rnn.py", [*GPT2, "--method=naive"], over_unigram, 0.8, below=True,
        measured="seeds 0-4: 1 thread 0.115-0.154, 2 threads 0.115-0.154"),
    "gpt2_to_rnn guide": Learned(
        "gpt2_to_rnn.py", [*GPT2, "--method=guide"], over_unigram, 0.8, below=True,
        measured="seeds 0-4: 1 thread 0.298-0.638, 2 threads 0.298-0.638"),
    "gpt2_to_rnn tiny": Learned(
        "gpt2_to_rnn.py", ["--preset=tiny", "--cache_dir={cache}"], over_unigram, 0.8, below=True,
        measured="seeds 0-4: 1 thread 0.277-0.382, 2 threads 0.276-0.385"),
    "gpt2_to_gru tiny": Learned(
        "gpt2_to_gru.py", ["--preset=tiny", "--cache_dir={cache}"], over_unigram, 0.8, below=True, copy="gru_copy",
        measured="seeds 0-4: 1 thread 0.348-0.415, 2 threads 0.348-0.416"),
    "resnet18_to_separable": Learned(
        "resnet18_to_separable.py", ["--preset=tiny", "--align_steps=3", "--finetune_steps=1", "--epochs=1",
        "--bn_recal_batches=2", "--synthetic_train=512", "--synthetic_val=64"], top1, 30, copy="separable_copy",
        measured="seeds 0-4: 1 thread 90.6-100, 2 threads 95.3-98.4"),
}
