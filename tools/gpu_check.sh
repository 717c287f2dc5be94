#!/usr/bin/env bash
# The GPU rows of docs/performance.md, measured in one call of under 5 minutes on one GPU:
#   bash tools/gpu_check.sh OUT_DIR
# 1. tools/bench.py --size=paper: alignment, fine-tuning and training steps (guide and target), the GPU decoding
#    path's images/s with 1 and 2 workers beside the CPU paths per core, the cost of Table 1, inference;
# 2. the bf16 recurrence against float32: gpt2_to_rnn.py --preset=tiny, 3 seeds each way (perplexity and time),
#    and the step times of a paper-size hybrid both ways.
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
