#!/usr/bin/env bash
# One device call's worth of GPU checks and benchmarks; every part logs under $WORK and has its own
# time limit so one slow part cannot starve the rest. Usage (on the GPU machine, repo root):
#   bash bench/gpu_suite.sh PART...   parts: env tests handoff engine trainer dryrun e2e1 e2e2 e2e4 longctx soak curves
#     family family_eagle3 family_dflash dflash_trainer dflash_flex dflash_e2e moe_engine varlen_kernels
#     moe_e2e regen decode_step moe_parts moe_capture moe_final moe_inductor family_steps small_steps draft_e2e
set -uo pipefail
# Parts write under WORK; at exit everything small (logs, tables, metrics, charts; no weights) goes into
# $OUT/suite.tar.gz, since the device tool brings back only a few files.
OUT=${OUT:-/tmp/gpu_suite_out}
WORK=${WORK:-/tmp/gpu_suite}
mkdir -p "$OUT" "$WORK"
pack() { (cd "$WORK" && find . -type f -size -4M \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
  -o -name '*.png' -o -name '*.txt' \) -print0 | tar czf "$OUT/suite.tar.gz" --null -T -) ; }
trap pack EXIT
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHON=python3
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; local t=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t))s"; tail -n "${TAIL:-15}" "$WORK/$name.log"; }
for p in "$@"; do case $p in
  env) part env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count())"' ;;
  tests) part tests "${TESTS_LIMIT:-420}" python3 -m pytest -q -m gpu ${TESTS:-tests} ${PYTEST_ARGS:-} ;;  # every test marked gpu, in one process
  handoff) part handoff 120 python3 bench/handoff.py --out "$WORK/handoff.json" --engine-work-ms 10 --trainer-work-ms 20 ;;
  engine) part engine 240 python3 bench/engine.py --out "$WORK/engine.json" ;;
  trainer) part trainer 240 python3 bench/trainer.py --out "$WORK/trainer.json" ${TRAINER_ARGS:-} ;;
  dryrun) part dryrun 120 bash launch.sh train.max_steps=0 mps=on run.dir="$WORK/dryrun" ;;
  e2e1) part e2e1 "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite one_gpu --out-dir "$WORK/e2e1" --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" ${E2E_EXTRA:-} ${E2E_ONLY:+--only $E2E_ONLY} ;;
  e2e2) part e2e2 "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite two_gpu --out-dir "$WORK/e2e2" --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" ${E2E_EXTRA:-} ${E2E_ONLY:+--only $E2E_ONLY} ;;
  e2e4) part e2e4 "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite four_gpu --out-dir "$WORK/e2e4" --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" ${E2E_EXTRA:-} ${E2E_ONLY:+--only $E2E_ONLY} ;;
  # Long contexts: one sample of L tokens per step (L = token budget), trainer step and engine capture,
  # peak memory against the 0.45 shares of the GPU (docs/benchmarks.md, "Long contexts").
  longctx) for L in ${LONGCTX_LENGTHS:-8192 16384 32768}; do
      part "trainer_$L" 240 python3 bench/trainer.py --out "$WORK/trainer_$L.json" --tokens "$L" --min-len "$L" \
        --max-len "$L" --steps 3 --warmup 1
      part "trainer_recompute_$L" 240 python3 bench/trainer.py --out "$WORK/trainer_recompute_$L.json" --tokens "$L" \
        --min-len "$L" --max-len "$L" --steps 3 --warmup 1 --recompute
      part "engine_$L" 240 python3 bench/engine.py --out "$WORK/engine_$L.json" --tokens "$L" --min-len "$L" \
        --max-len "$L" --steps 2 --warmup 1 --paths varlen
    done ;;
  soak) part soak 590 python3 bench/e2e.py --suite soak --out-dir "$WORK/soak" --steps 1000 --skip 20 ;;
  curves) part curves 590 python3 bench/e2e.py --suite curves --out-dir "$WORK/curves" --steps 200 --skip 20 ;;
  # DFlash (issue 16): the same-wall-clock quality A/B on the tiny target, the 8B-shape trainer step,
  # colocate+MPS vs sequential with draft=dflash.
  family) part family 590 python3 bench/family_ab.py --out-dir "$WORK/family" --eagle-steps "${FAMILY_STEPS:-1500}" \
      --limit-s 280 ;;
  # The same in two device calls (about 250 s and 300 s on the H200): EAGLE-3 prints its training time,
  # which the DFlash half takes as FAMILY_EAGLE_TRAIN_S when the first call's $WORK is gone.
  family_eagle3) part family_eagle3 400 python3 bench/family_ab.py --out-dir "$WORK/family" --phase eagle3 \
      --eagle-steps "${FAMILY_STEPS:-1500}" --limit-s 280 ;;
  family_dflash) part family_dflash 540 python3 bench/family_ab.py --out-dir "$WORK/family" --phase dflash \
      ${FAMILY_EAGLE_TRAIN_S:+--eagle-train-s $FAMILY_EAGLE_TRAIN_S} --limit-s 280 ;;
  dflash_trainer) part dflash_trainer 240 python3 bench/dflash_trainer.py --out "$WORK/dflash_trainer.json" \
      --profile "$WORK/dflash_trainer_profile.txt" ;;
  # The DFlash step's flex attention (backward 4.3x its forward on the H200): Inductor's autotuned tiles,
  # then explicit backward tiles; each line is one process, compared with dflash_trainer's default.
  dflash_flex)
    part dflash_flex_autotune 300 python3 bench/dflash_trainer.py --out "$WORK/dflash_flex_autotune.json" \
      --flex-mode max-autotune-no-cudagraphs
    n=0
    for opts in ${FLEX_OPTIONS:-'{"BLOCK_M1":64,"BLOCK_N1":128,"BLOCK_M2":128,"BLOCK_N2":64,"num_warps":8}' \
        '{"BLOCK_M1":32,"BLOCK_N1":128,"BLOCK_M2":128,"BLOCK_N2":32,"num_warps":4,"num_stages":3}'}; do
      part "dflash_flex_$((++n))" 150 python3 bench/dflash_trainer.py --out "$WORK/dflash_flex_$n.json" --flex-options "$opts"
    done ;;
  dflash_e2e) part dflash_e2e "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite one_gpu --out-dir "$WORK/dflash_e2e" \
      --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" draft=dflash ${E2E_ONLY:+--only $E2E_ONLY} ;;
  # Issues 33/34: the trainer step (ms, MFU) of every draft family and variant at the Qwen3-8B shape, in one
  # process (bench/trainer.py --variants); the table goes to $OUT/family_steps.md, rewritten after each row.
  # FAMILY_TABLE_VARIANTS: all, or a comma list of bench/trainer.py VARIANTS (to split it over two calls).
  family_steps) part family_steps "${FAMILY_TABLE_LIMIT:-540}" python3 bench/trainer.py \
      --variants "${FAMILY_TABLE_VARIANTS:-all}" --out "$WORK/family_steps.json" --table "$WORK/family_steps.md" \
      --steps "${FAMILY_TABLE_STEPS:-10}" --warmup "${FAMILY_TABLE_WARMUP:-4}" ${FAMILY_TABLE_ARGS:-}
    cp "$WORK/family_steps.md" "$WORK/family_steps.json" "$OUT/" 2>/dev/null ;;
  # The SmolLM2-135M shape's trainer step at 8k, 16k and 32k tokens per step (the real-target runs take
  # 0.06-0.09 s per 8k-token EAGLE-3 step, far above its FLOPs: a larger engine.token_budget may buy
  # tokens/s there). SMALL_STEP_VARIANTS: bench/trainer.py presets.
  small_steps) for T in ${SMALL_STEP_TOKENS:-8192 16384 32768}; do
      part "small_steps_$T" 240 python3 bench/trainer.py --shape smollm2_135m --tokens "$T" \
        --variants "${SMALL_STEP_VARIANTS:-eagle3,dflash,dspark,peagle}" --out "$WORK/small_steps_$T.json" \
        --table "$WORK/small_steps_$T.md" --steps 10 --warmup 4
    done ;;
  # Colocate+MPS vs sequential on one GPU for another draft family (E2E_DRAFT, default peagle: issue 34).
  draft_e2e) part draft_e2e "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite one_gpu --out-dir "$WORK/draft_e2e" \
      --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" draft="${E2E_DRAFT:-peagle}" \
      --only ${E2E_ONLY:-sequential colocate+MPS} ;;
  # MoE (issue 17): capture of the 30B-A3B and gpt-oss-20b shapes (grouped experts vs transformers'), end to
  # end on one GPU.
  moe_engine) part moe_engine 300 python3 bench/engine.py --out "$WORK/moe_engine.json" --shape qwen3-30b-a3b \
      --moe-impl grouped,hf --profile "$WORK/moe_profile"
    part moe_engine_gpt_oss 240 python3 bench/engine.py --out "$WORK/moe_engine_gpt_oss.json" --shape gpt-oss-20b \
      --moe-impl grouped,hf --paths varlen+compile ;;
  # The varlen attention kernels (engine.varlen_kernel), compiled capture: the 30B-A3B and the dense 8B shape.
  varlen_kernels) part moe_kernels 240 python3 bench/engine.py --out "$WORK/moe_kernels.json" --shape qwen3-30b-a3b \
      --paths varlen+compile --moe-impl grouped --varlen-kernel flash,cudnn --profile "$WORK/varlen_profile"
    part dense_kernels 200 python3 bench/engine.py --out "$WORK/dense_kernels.json" --shape qwen3-8b \
      --paths varlen+compile --varlen-kernel flash,cudnn ;;
  # The MoE block's parts alone (old vs new kernels; Inductor's default GEMMs vs max_autotune_gemm).
  moe_parts) part moe_parts 200 python3 bench/moe_parts.py --out "$WORK/moe_parts.json" ;;
  # The 30B-A3B capture with the cuDNN kernel, profiled with its GPU timeline (MOE_ARGS: extra flags,
  # e.g. --inductor max_autotune_gemm=1).
  moe_capture) part moe_capture 300 python3 bench/engine.py --out "$WORK/moe_capture.json" --shape qwen3-30b-a3b \
      --paths varlen+compile --moe-impl grouped --varlen-kernel cudnn \
      --profile "$WORK/moe_capture_profile" ${MOE_ARGS:-} ;;
  # The 30B-A3B cuDNN capture once per Inductor setting (INDUCTOR_VARIANTS: space-separated key=value,...
  # lists; "base" is none), one process each, profiled; each variant's generated Triton kernels are kept
  # as text (inductor_VARIANT/) so the kernels a setting changed can be read.
  moe_inductor) n=0
    for v in ${INDUCTOR_VARIANTS:-base coordinate_descent_tuning=1}; do n=$((n + 1)); cache="$WORK/inductor_cache_$n"
      flags=(); [[ $v != base ]] && flags=(--inductor "$v")
      part "moe_inductor_$n" 300 env TORCHINDUCTOR_CACHE_DIR="$cache" python3 bench/engine.py --out "$WORK/moe_inductor_$n.json" \
        --shape qwen3-30b-a3b --paths varlen+compile --moe-impl grouped --varlen-kernel cudnn \
        --profile "$WORK/moe_inductor_profile_$n" "${flags[@]}"
      mkdir -p "$WORK/inductor_$n"; grep -rl --include='*.py' '@triton.jit' "$cache" 2>/dev/null | head -200 \
        | while read -r f; do cp "$f" "$WORK/inductor_$n/$(basename "$f" .py).txt"; done
    done ;;
  # The 30B-A3B capture with either varlen kernel, with and without the fused q/k norm + rope
  # (FINAL_VARIANTS: bench/engine.py --variants, default previous; FINAL_KERNELS: default flash,cudnn), and
  # the gpt-oss-20b capture (issue 17's figures).
  moe_final) part moe_final 300 python3 bench/engine.py --out "$WORK/moe_final.json" --shape qwen3-30b-a3b \
      --paths varlen+compile --moe-impl grouped --varlen-kernel "${FINAL_KERNELS:-flash,cudnn}" --variants "${FINAL_VARIANTS:-previous}"
    part moe_final_gpt_oss 120 python3 bench/engine.py --out "$WORK/moe_final_gpt_oss.json" --shape gpt-oss-20b \
      --paths varlen+compile --moe-impl grouped ;;
  moe_e2e) part moe_e2e "${E2E_LIMIT:-540}" python3 bench/e2e.py --suite moe_one_gpu --out-dir "$WORK/moe_e2e" \
      --steps "${E2E_STEPS:-30}" --skip "${E2E_SKIP:-10}" ;;
  # Regeneration throughput of the built-in path (issue 19), Qwen3-8B shape with Qwen3's tokenizer.
  regen) part regen "${REGEN_LIMIT:-450}" python3 bench/regen.py --shape qwen3_8b --out "$WORK/regen.json" --work "$WORK/regen" ${REGEN_ARGS:-} ;;
  # One decode step of the lean path alone (no refills), eager and compiled, profiled.
  decode_step) part decode_step 240 python3 bench/decode_step.py --shape qwen3_8b --out "$WORK/decode_step.json" \
      --profile "$WORK/decode_profile" ${DECODE_ARGS:-} ;;
  *) echo "unknown part $p" ;;
esac; done
