#!/usr/bin/env bash
# The suite's GPU check: one call on a GPU machine (the device tool), under 8 minutes, everything written to $OUT.
#   1. tests on the GPU: fp16 grad scaler with fp32 trainables, 8-bit Adam on CUDA, an SDXL fine-tune, the
#      xformers refusal when xformers is absent, exact resume (fp32: are CUDA kernels bit-identical?), and the
#      flow families (a FLUX.1 LoRA resumed, an SD 3.5 full fine-tune), the language-model families' encodings and
#      calls against their pipelines on CUDA, a LoRA on an NF4 base (bitsandbytes' CUDA kernels), fp8 training (torchao)
#   2. bench/benchmark.py on the SDXL (1024 px) and SD 1.5 (512 px) architectures: the rows the targets name
#   3. a profile of the first SDXL target row's step (torch.profiler), for whatever the numbers miss
# The device image has torch, accelerate, transformers, peft, tensorboard and pytest, not diffusers or bitsandbytes:
# their wheels travel with the call (49 MB; git ignores tools/wheels). xformers' wheel is too large to carry, so the
# xformers rows are left out and the refusal line is tested instead; DeepSpeed cannot be installed there either.
#
#   bash tools/gpu_check.sh --fetch     # here, where the package index is: the wheels into tools/wheels
#   device run: command "bash tools/gpu_check.sh", carry ["tools/wheels"], timeout_s 560
#   STAGES="tests sdxl" bash tools/gpu_check.sh   # a subset (stages: tests sdxl sd15 profile)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=tools/wheels
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch" ]; then  # the device machine: Python 3.12 on x86-64
  exec "$PY" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 --python-version 3.12 \
    -d "$WHEELS" "diffusers==0.42.1" "bitsandbytes==0.50.2" "importlib_metadata" "torchao"
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "error: no CUDA GPU visible: tools/gpu_check.sh runs on a GPU machine (see its header)" >&2; exit 1
fi
if ! ls "$WHEELS"/diffusers-*.whl "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; then
  echo "error: no wheels in $WHEELS: run 'bash tools/gpu_check.sh --fetch' where the package index is, then carry $WHEELS" >&2
  exit 1
fi
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
STAGES=${STAGES:-tests sdxl sd15 profile}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -3
{ nvidia-smi; "$PY" -c "import torch, diffusers, transformers, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', b.__version__)"; } > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*"; }

if stage tests; then  # about 3 minutes
  say "tests"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    "tests/test_train.py::test_prior_preservation_with_text_encoder_8bit_adam_and_accumulation" \
    "tests/test_train.py::test_v_prediction_fp16_mixed_precision_and_generated_class_images" \
    "tests/test_resume.py::test_fp16_resume_exports_and_a_corrupt_checkpoint" \
    "tests/test_resume.py::test_resume_mid_epoch_is_bit_identical" \
    "tests/test_sdxl.py::test_full_fine_tune_with_priors_both_text_encoders_and_a_separate_vae" \
    "tests/test_bad_input.py::test_xformers_that_cannot_run_is_refused" \
    "tests/test_flow.py::test_flux_pivotal_lora_resume_mid_run_is_bit_identical" \
    "tests/test_flow.py::test_sd3_full_fine_tune_with_priors_saves_a_pipeline_that_loads" \
    "tests/test_language_model_families.py::test_qwen_image_prompts_latents_and_call_are_the_pipelines_own" \
    "tests/test_language_model_families.py::test_flux2_klein_prompts_latents_and_call_are_the_pipelines_own" \
    "tests/test_quantization.py::test_nf4_base_trains_only_the_adapters_resumes_exactly_and_loads_on_the_unquantized_base" \
    "tests/test_quantization.py::test_fp8_training_on_a_gpu_that_has_it" \
    "tests/test_distributed.py::test_gpu_configs_train_unet_and_text_encoder[configs/accelerate-fsdp2.yaml]" \
    > "$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
fi
if stage sdxl; then  # about 3 minutes: the model is made once on the GPU, then a training process per row
  say "benchmark sdxl"
  timeout 240 "$PY" bench/benchmark.py --model sdxl --steps 5 --warmup 3 > "$OUT/bench-sdxl.md" 2> "$OUT/bench-sdxl.log"
  cat "$OUT/bench-sdxl.md"
fi
if stage sd15; then  # about 1.5 minutes
  say "benchmark sd15"
  timeout 150 "$PY" bench/benchmark.py --model sd15 --steps 10 --warmup 3 --only "least memory" --only fastest \
    > "$OUT/bench-sd15.md" 2> "$OUT/bench-sd15.log"
  cat "$OUT/bench-sd15.md"
fi
if stage profile; then  # what the step spends its time and memory on, SDXL LoRA row
  say "profile"
  timeout 120 "$PY" bench/benchmark.py --model sdxl --steps 2 --warmup 2 --only "SDXL LoRA rank 4 UNet," --profile "$OUT" \
    > "$OUT/profile.md" 2> "$OUT/profile.log"
  ls "$OUT"
fi
say "done: $OUT"
