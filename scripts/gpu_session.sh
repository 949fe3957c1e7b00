#!/usr/bin/env bash
# One GPU device call (15 device minutes a session): the CUDA bench (issue #8), then CIFAR-10 seeds 1-2,
# trained, fitted and measured by `linkbreaker reproduce`, a few models per process (15 processes
# time-sliced one H100 to under one epoch each in 7 minutes; one process trains a CIFAR-10 model in
# about 6 minutes). Every epoch's checkpoint is packed too, so the next call resumes where this one
# stopped. Run from the repository root with the data carried in .device/data (git-ignored):
#
#   mkdir -p .device/data && cp -r ../shared/data/cifar10 .device/data/
#   device run: bash scripts/gpu_session.sh      (carry: .device/data; to resume, also runs/cifar10/models)
#
# Unpack $OUT/cifar10-runs.tar into runs/cifar10/ here; then `linkbreaker reproduce --dataset cifar10
# --attacks ... --seeds 0 1 2` on CPU rebuilds the table from the cached reports.
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-500}   # seconds of this call spent training before the last pack
T0=$(date +%s); el(){ echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT" /tmp/logs
python -m pip install --no-build-isolation --no-deps --no-index -e . -q > /tmp/logs/build.log 2>&1 \
  || { tail -30 /tmp/logs/build.log; exit 1; }
echo "built at $(el) s"
# issue #8's GPU rows first (the shared-row guard, graphs included): a minute at most
timeout 120 python -m linkbreaker_ext.cli bench --device cuda --json "$OUT/bench-cuda.json" \
  --profile "$OUT/bench-cuda-profile.md" > /tmp/logs/bench.log 2>&1
echo "bench done at $(el) s"
# four processes, each a short queue of (attack, seed) runs, most wanted first
queues=("wanet trojan-square" "badnets blended" "sig none" "source-specific")
for q in "${queues[@]}"; do
  OMP_NUM_THREADS=2 python -m linkbreaker_ext.cli reproduce --dataset cifar10 --attacks $q --seeds 1 2 \
    --data .device/data --device cuda --quiet --results "/tmp/res/${q// /_}" > "/tmp/logs/${q// /_}.log" 2>&1 &
done
pack(){
  (cd runs/cifar10 2>/dev/null && tar cf "$OUT/cifar10-runs.tar" \
     $(ls models/*-[12].safetensors models/*-[12].ckpt guards/*-[12].safetensors reports/*-[12].json 2>/dev/null) \
     2>/dev/null)
  tar czf "$OUT/logs.tgz" -C /tmp logs 2>/dev/null
}
while [ "$(jobs -r | wc -l)" -gt 0 ] && [ "$(el)" -lt "$DEADLINE" ]; do
  sleep 20
  echo "$(el) s: $(jobs -r | wc -l) running; models $(ls runs/cifar10/models/*-[12].safetensors 2>/dev/null | wc -l)," \
       "checkpoints $(ls runs/cifar10/models/*-[12].ckpt 2>/dev/null | wc -l)"
  pack
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv > "$OUT/gpu.txt" 2>&1
pack; ls -la "$OUT"; echo "done at $(el) s"
