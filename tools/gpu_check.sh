#!/usr/bin/env bash
# What only a GPU can tell, in one call on one GPU (docs/performance.md quotes its summary):
#   bash tools/gpu_check.sh OUT_DIR          # on a GPU: about 8 minutes on one H200 (an estimate: the sum of the
#                                            # parts' timeouts is 10; nothing to install, it needs no network)
#   bash tools/gpu_check.sh --cpu OUT_DIR    # every part at tiny sizes on the CPU: the suite runs it
# Each part runs on its own: a failure is reported and the next part runs. OUT_DIR/summary.md: one row a part.
# 1. bench: tools/bench.py (paper sizes on a GPU): step times, decoding paths, inference.
# 2. rnn_dtype: gpt2_to_rnn.py --preset=tiny with each --rnn_dtype, and one training step of a paper-size hybrid
#    each way, with the dtype the recurrence itself returns under autocast (a hook on the nn.RNN).
# 3. eval_dtype: top-1 of one trained guide evaluated under bf16 autocast and in float32.
# 4. decode: pytorch/vision#9606's race (a decode handed memory that queued kernels still read), run through
#    common.ImageFiles.prepare (guarded) and through decode_jpeg directly (unguarded, the control), and the GPU
#    path's batch against the CPU path's.
# 5. smoke: resnet50_to_resnet18.py --preset=smoke under torchrun --nproc_per_node=1 (NCCL on a GPU):
#    channels_last, SGD, statistics, the checkpoint round trip, the peak-memory line.
# 6. compile: one --compile=True tiny run.
# 7. peaks: each conversion's smoke run at one GPU's share of the paper batch (32): its peak reserved memory lines.
# Runs on the GPU machine's torch 2.11 / torchvision 0.26 as on 2.14.
set -uo pipefail
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
out=${1:?usage: bash tools/gpu_check.sh [--cpu] OUT_DIR}
self=$(realpath "$0")
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WANDB_MODE=disabled OUT=$out
if [ $cpu = 1 ]; then
  export DEVICE=cpu
  bench=(--size=tiny --repeats=1 --warmup=0)
  images=(--image_size=32 --synthetic_train=64 --synthetic_val=32 --batch_size=16 --workers=0)
  share=(--batch_size=16)
  seeds="1"
  steps=(--align_steps=2 --finetune_steps=1 --train_steps=4)  # every line, not a measurement
else
  export DEVICE=cuda
  bench=(--size=paper --repeats=3 --warmup=1)
  images=(--batch_size=64)
  share=(--batch_size=32)
  seeds="1 2"
  steps=()
fi

part() {  # part NAME TIMEOUT_S FUNCTION: the function in a process of its own, a summary row whatever it does
  local name=$1 limit=$2 t0=$SECONDS rc
  echo "=== part $name"
  PART=$3 timeout "$limit" bash "$self" $([ $cpu = 1 ] && echo --cpu) "$out"
  rc=$?
  if [ $rc = 0 ]; then outcome=passed; elif [ $rc = 124 ]; then outcome="FAILED (over ${limit} s)"; failed=1
  else outcome="FAILED (exit $rc)"; failed=1; fi
  echo "| $name | $outcome | $(( SECONDS - t0 )) |" >> "$summary"
}

bench_part() {
  python tools/bench.py "${bench[@]}" --device="$DEVICE" --out="$out/bench.json"
}

rnn_part() {
  for dtype in float32 bfloat16; do
    for seed in $seeds; do
      python gpt2_to_rnn.py --preset=tiny --device="$DEVICE" --rnn_dtype=$dtype --seed=$seed "${steps[@]}" \
          --out_dir="$out/tiny-$dtype-$seed" --cache_dir="$out/cache" | grep -E "^final" || return 1
    done
  done
  python - <<'EOF'
# One training step of a hybrid with every attention an RNN, built as the script builds it, each --rnn_dtype.
import os, statistics, time, torch, torch.nn.functional as F
import common, gpt2_to_rnn
device = torch.device(os.environ["DEVICE"])
paper = device.type == "cuda"  # the paper's GPT-2 small; on the CPU the tiny preset's
for dtype in ("float32", "bfloat16"):
    cfg = common.configure(gpt2_to_rnn.SETTINGS, [*([] if paper else ["--preset=tiny"]), f"--rnn_dtype={dtype}"],
                           gpt2_to_rnn.PRESETS)
    guide = gpt2_to_rnn.load_guide("random", n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    x = torch.randint(guide.cfg.vocab_size, (32, 129) if paper else (4, cfg.seq_len + 1), device=device)
    model = common.swapped(guide, gpt2_to_rnn.make_stages(guide, x[:1, :-1].cpu(), cfg)).to(device).train()
    returned = []
    for m in model.modules():
        if isinstance(m, torch.nn.RNN):
            m.register_forward_hook(lambda m, args, result: returned.append(result[0].dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(8 if paper else 2):
        if paper:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=paper):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if paper:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert set(returned) == {getattr(torch, dtype)}, (dtype, set(returned))
    print(f"{'paper' if paper else 'tiny'}-size hybrid train step, rnn_dtype={dtype}: "
          f"{statistics.median(times[len(times) // 2:]) * 1e3:.1f} ms (batch {x.shape[0]} x {x.shape[1] - 1}), "
          f"the recurrence returns {returned[0]}")
EOF
}

eval_part() {
  python resnet18_to_mlp.py --preset=tiny --method=guide --guide=random --align_steps=0 --finetune_steps=0 \
      --epochs=1 --device="$DEVICE" "${images[@]}" --out_dir="$out/guide18" | tail -1 || return 1
  for dtype in bfloat16 float32; do
    python resnet18_to_mlp.py --preset=tiny --device="$DEVICE" --dtype=$dtype "${images[@]}" \
        --guide="$out/guide18/guide.pt" --eval_only=guide --out_dir="$out/eval-$dtype" | tail -1 || return 1
  done
}

decode_part() {
  python - <<'EOF'
# The race needs a GPU; on the CPU every line runs but the queued kernel and its wait (cuda only) do not.
import os, torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
import common
device, out = torch.device(os.environ["DEVICE"]), os.environ["OUT"]
cuda = device.type == "cuda"
folder = os.path.join(out, "jpegs", "c0")
os.makedirs(folder, exist_ok=True)
side = (500, 375) if cuda else (64, 48)
for j in range(32 if cuda else 4):
    Image.effect_mandelbrot(side, (-2, -1.2, 1, 1.2), 40 + j).convert("RGB").save(f"{folder}/{j}.JPEG", quality=90)
size = 224 if cuda else 32
gpu = common.ImageFiles(os.path.dirname(folder), True, size, "bilinear", "gpu", common.Context(device=device))
batch = gpu.collate([gpu[i] for i in range(len(gpu))])
cpu = common.ImageFiles(os.path.dirname(folder), True, size, "bilinear", "cpu", common.Context())
reference = cpu.prepare(cpu.collate([cpu[i] for i in range(len(cpu))]), torch.device("cpu"))
print(f"decode gpu against cpu: mean |difference| "
      f"{(gpu.prepare(batch, device).cpu() - reference).abs().mean():.4f} (normalized units)")
compressed = [image for image in batch[0] if image.dim() == 1]


def guarded():
    gpu.prepare(batch, device)


def unguarded():  # the same decode without prepare's wait for the queued kernels
    decode_jpeg(compressed, mode=ImageReadMode.RGB, device=device)


pixels = side[0] * side[1] * 3
for name, decode in (("guarded (common.ImageFiles.prepare)", guarded), ("unguarded (decode_jpeg)", unguarded)):
    corrupted, trials = 0, 200 if cuda else 2
    for trial in range(trials):
        blocks = [torch.full((pixels,), float(k), device=device) for k in range(16)]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(20_000_000)  # a long kernel ahead of the reductions
        sums = [b.sum() for b in blocks]
        del blocks  # freed while the reductions are still queued
        decode()
        if cuda:
            torch.cuda.synchronize()
        corrupted += sum(s.item() != k * pixels for k, s in enumerate(sums))
    print(f"decode {name}, queued reductions of freed memory: {corrupted} corrupted of {trials * 16}")
    if name.startswith("guarded"):
        assert corrupted == 0
EOF
}

smoke_part() {
  torchrun --standalone --nproc_per_node=1 resnet50_to_resnet18.py --preset=smoke --guide=random \
      --device="$DEVICE" "${images[@]}" --out_dir="$out/smoke-resnet50" | grep -E "^smoke|^final"
}

compile_part() {
  python gpt2_to_rnn.py --preset=tiny --device="$DEVICE" --compile=True --train_steps=10 "${steps[@]}" \
      --out_dir="$out/compile" --cache_dir="$out/cache" | grep -E "^final"
}

peaks_part() {  # --preset=smoke is the run as configured: on the CPU each script's tiny sizes as flags
  declare -A tiny=(
    [resnet18_to_mlp]="--rank=16 ${images[*]}" [resnet50_to_resnet18]="${images[*]}"
    [dinov2_to_patchmlp]="--embed_dim=128 --depth=4 --patch_size=8 --token_mlp_width=256 ${images[*]}"
    [gpt2_to_rnn]="--n_layer=2 --n_embd=128 --seq_len=64 --batch_size=8")
  for script in resnet18_to_mlp resnet50_to_resnet18 dinov2_to_patchmlp gpt2_to_rnn; do
    # GPT-2 on generated text read as bytes: the machine has no network for the BPE file or Wikitext
    extra=(); [ $script = gpt2_to_rnn ] && extra=(--data=generated --tokenizer=bytes --train_steps=2
                                                  --cache_dir="$out/cache")
    if [ $cpu = 1 ]; then size=(${tiny[$script]}); else size=("${share[@]}"); fi
    python $script.py --preset=smoke --guide=random --device="$DEVICE" "${extra[@]}" "${size[@]}" \
        --out_dir="$out/peak-$script" | grep -E "^smoke: (align|finetune|train)" || return 1
  done
}

if [ -n "${PART:-}" ]; then  # one part, called by part()
  $PART
  exit
fi
exec > >(tee "$out/log.txt") 2>&1
[ $cpu = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
summary="$out/summary.md"
printf "| part | outcome | seconds |\n|---|---|---|\n" > "$summary"
failed=0
part bench 150 bench_part
part rnn_dtype 90 rnn_part
part eval_dtype 60 eval_part
part decode 60 decode_part
part smoke 60 smoke_part
part compile 60 compile_part
part peaks 120 peaks_part
cat "$summary"
exit $failed
