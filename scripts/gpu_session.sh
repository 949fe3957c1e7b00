#!/usr/bin/env bash
# One GPU device call (15 device minutes a session), most wanted first:
#   1. the CUDA bench with today's default guard (shared rows + the stability test; issue #8);
#   2. issue #6's "fit time <= 10 s on one GPU": a CIFAR-10 guard fitted on CUDA from the clean
#      seed-0 model (carried: runs/cifar10/models/none-0.safetensors, 1.2 MB), timed by the fit itself;
#   3. CIFAR-10 models named in QUEUES ("attack:seed" pairs, e.g. QUEUES="wanet-noise:3"), one per
#      process (15 processes time-sliced one H100 to under one epoch each in 7 minutes; one process
#      trains a CIFAR-10 model in about 6 minutes). Every epoch's checkpoint is packed, so the next
#      call resumes where this one stopped. Empty by default: wanet-noise seeds 1-2, the earlier
#      queue, were trained on CPU in session 22. RECIPE=sgd-bf16 EPOCHS=80 WORK=runs/cifar10-sgdbf16-e80
#      trains the SGD recipe's models under bfloat16 autocast instead (issue #6's 88 %), e.g.
#      QUEUES="none:1 badnets:1 trojan-square:1 none:2 badnets:2 trojan-square:2".
# Run from the repository root with the data carried in .device/data (git-ignored):
#
#   mkdir -p .device/data && cp -r ../shared/data/cifar10 .device/data/
#   device run: bash scripts/gpu_session.sh   (carry: .device/data, runs/cifar10/models/none-0.safetensors)
#
# Unpack $OUT/cifar10-runs.tar into $WORK here; then `linkbreaker reproduce --dataset cifar10
# --attacks <attack> --seeds <seeds>` (with the same --work, --recipe and --epochs) on CPU rebuilds
# the table from the cached reports.
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-500}   # seconds of this call spent training before the last pack
WORK=${WORK:-runs/cifar10} RECIPE=${RECIPE:-adam} EPOCHS=${EPOCHS:-}
T0=$(date +%s); el(){ echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT" /tmp/logs
python -m pip install --no-build-isolation --no-deps --no-index -e . -q > /tmp/logs/build.log 2>&1 \
  || { tail -30 /tmp/logs/build.log; exit 1; }
echo "built at $(el) s"
# issue #8's GPU rows first (the shared-row guard, graphs included): a minute at most
timeout 120 python -m linkbreaker_ext.cli bench --device cuda --json "$OUT/bench-cuda.json" \
  --profile "$OUT/bench-cuda-profile.md" > /tmp/logs/bench.log 2>&1
echo "bench done at $(el) s"
# the offline fit on one GPU (its report's fit_s and per-stage times are in the guard's diagnostics)
# (runs/ is not committed and a new checkout starts without it: no model, no fit, and the log says so)
FIT_MODEL=${FIT_MODEL:-runs/cifar10/models/none-0.safetensors}
if [ -f "$FIT_MODEL" ]; then
  timeout 180 python -m linkbreaker_ext.cli fit --data .device/data --device cuda --quiet \
    --model "$FIT_MODEL" --out "$OUT/fit-cuda-none-0.safetensors" > /tmp/logs/fit.log 2>&1
  echo "fit done at $(el) s"
else
  echo "no $FIT_MODEL here: the fit on CUDA is skipped (train it, or carry another with FIT_MODEL=...)"
fi
# two processes, each one (attack, seed) run
read -r -a queues <<< "${QUEUES:-}"
for q in "${queues[@]}"; do
  OMP_NUM_THREADS=2 python -m linkbreaker_ext.cli reproduce --dataset cifar10 --attacks ${q%%:*} \
    --seeds ${q##*:} --data .device/data --device cuda --quiet --results "/tmp/res/${q/:/-}" \
    --work "$WORK" --recipe "$RECIPE" ${EPOCHS:+--epochs $EPOCHS} \
    > "/tmp/logs/${q/:/-}.log" 2>&1 &
done
queued(){  # the files of the queued runs that exist so far (model or checkpoint, guard, report)
  for q in "${queues[@]}"; do
    r=${q/:/-}; ls models/$r.safetensors models/$r.ckpt guards/$r.safetensors reports/heldout-$r.json 2>/dev/null || true
  done
}
pack(){
  [ "${#queues[@]}" -gt 0 ] && (cd "$WORK" 2>/dev/null && files=$(queued) && [ -n "$files" ] \
    && tar cf "$OUT/cifar10-runs.tar" $files 2>/dev/null)
  tar czf "$OUT/logs.tgz" -C /tmp logs 2>/dev/null
}
while [ "$(jobs -r | wc -l)" -gt 0 ] && [ "$(el)" -lt "$DEADLINE" ]; do
  sleep 20
  echo "$(el) s: $(jobs -r | wc -l) running; queued files so far: $(cd "$WORK" 2>/dev/null && queued | wc -l)"
  pack
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv > "$OUT/gpu.txt" 2>&1
pack; ls -la "$OUT"; echo "done at $(el) s"
