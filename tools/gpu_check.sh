#!/usr/bin/env bash
# The GPU rows of docs/performance.md, measured in one call of under 5 minutes on one GPU:
#   bash tools/gpu_check.sh OUT_DIR
# 1. tools/bench.py --size=paper: alignment, fine-tuning and training steps (guide and target), the GPU decoding
#    path's images/s with 1 and 2 workers beside the CPU paths per core, the cost of Table 1, inference;
# 2. the bf16 recurrence against float32: gpt2_to_rnn.py --preset=tiny, 3 seeds each way (perplexity and time),
#    and the step times of a paper-size hybrid both ways;
# 3. top-1 evaluated under bf16 autocast against float32, on a ResNet-18 trained here on the generated images;
# 4. the GPU decoder: pytorch/vision#9606's reproduction (a decode handed memory that queued kernels still read) run
#    against common.ImageFiles.prepare, and its batches against the CPU path's;
# 5. NCCL: one process under torchrun, its process group made with --dist_timeout.
# Everything lands in OUT_DIR (bench.json, log.txt, the runs' results.json).
set -euo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
export PYTHONUNBUFFERED=1
time timeout 200 python tools/bench.py --size=paper --repeats=3 --warmup=1 --out="$out/bench.json"
for dtype in float32 bfloat16; do
  for seed in 1 2 3; do
    timeout 40 python gpt2_to_rnn.py --preset=tiny --rnn_dtype=$dtype --seed=$seed --out_dir="$out/tiny-$dtype-$seed" \
        --cache_dir="$out/cache" | grep -E "final|test_ppl"
  done
done
python - "$out" <<'EOF'
import json, statistics, sys
for dtype in ("float32", "bfloat16"):
    runs = [json.load(open(f"{sys.argv[1]}/tiny-{dtype}-{s}/results.json")) for s in (1, 2, 3)]
    ppl = [r["metric"]["value"] for r in runs]
    print(f"tiny, rnn_dtype={dtype}: val_ppl {statistics.mean(ppl):.3f} +- {statistics.stdev(ppl) / 3 ** 0.5:.3f} "
          f"(seeds 1-3), {statistics.mean(r['seconds'] for r in runs):.1f} s per run")
EOF
timeout 60 python - <<'EOF'
# A paper-size GPT-2 hybrid with every attention an RNN: one training step, float32 recurrence against bf16.
import statistics, time, types, torch, torch.nn.functional as F
import common, gpt2_to_rnn
guide = gpt2_to_rnn.load_guide("random").cuda()
x = torch.randint(50257, (32, 129), device="cuda")
for dtype in ("float32", "bfloat16"):
    cfg = types.SimpleNamespace(rnn_dtype=dtype, order="forward")
    model = common.swapped(guide, gpt2_to_rnn.make_stages(guide, x[:1, :-1], cfg)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(8):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.transformer.h[0].attn(torch.randn(2, 8, 768, device="cuda"))
    print(f"paper-size target train step, rnn_dtype={dtype}: {statistics.median(times[3:]) * 1e3:.1f} ms "
          f"(batch 32 x 128), mixer output {out.dtype}")
EOF
# 3. top-1 under bf16 autocast (the default) against float32: one guide, two evaluations of it
python resnet18_to_mlp.py --preset=small --method=guide --guide=random --align_steps=0 --finetune_steps=0 --epochs=20 \
    --device=cuda --out_dir="$out/guide18" | tail -1
for dtype in bfloat16 float32; do
  /usr/bin/time -f "eval $dtype: %e s" python resnet18_to_mlp.py --preset=small --device=cuda --dtype=$dtype \
      --guide="$out/guide18/guide.pt" --eval_only=guide | tail -1
done
# 4. the GPU decoder: queued reductions of freed blocks must read what they read before the decode
timeout 120 python - "$out" <<'EOF2'
import io, os, sys, torch
from PIL import Image
import common
folder = os.path.join(sys.argv[1], "jpegs", "c0")
os.makedirs(folder, exist_ok=True)
for j in range(32):
    Image.effect_mandelbrot((500, 375), (-2, -1.2, 1, 1.2), 40 + j).convert("RGB").save(f"{folder}/{j}.JPEG", quality=90)
data = common.ImageFiles(os.path.dirname(folder), True, 224, "bilinear", "gpu", common.Context(device=torch.device("cuda")))
batch = data.collate([data[i] for i in range(len(data))])
cpu = common.ImageFiles(os.path.dirname(folder), True, 224, "bilinear", "cpu", common.Context())
reference = cpu.prepare(cpu.collate([cpu[i] for i in range(len(cpu))]), torch.device("cpu"))
print(f"decode gpu against cpu: mean |difference| {(data.prepare(batch, torch.device('cuda')).cpu() - reference).abs().mean():.4f} (normalized units)")
corrupted = 0
for trial in range(200):
    blocks = [torch.full((3 * 500 * 375,), float(k), device="cuda") for k in range(16)]
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)  # a long kernel ahead of the reductions
    sums = [b.sum() for b in blocks]
    del blocks  # freed while the reductions are still queued
    data.prepare(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    corrupted += sum(s.item() != k * 3 * 500 * 375 for k, s in enumerate(sums))
print(f"decode gpu, queued reductions of freed memory: {corrupted} corrupted of {200 * 16}")
EOF2
# 5. NCCL under torchrun, with the run's timeout
timeout 120 torchrun --standalone --nproc_per_node=1 dinov2_to_patchmlp.py --preset=tiny --device=cuda --dist_timeout=1 \
    --out_dir="$out/nccl" | grep -E "^final"
