#!/usr/bin/env bash
# The whole suite end to end with nothing downloaded but Python packages, on a toy model of toyworld/ (pretrained from
# scratch on a world of coloured shapes, in the repository): four photos of a subject it has never seen (a circle with
# a red top and a yellow bottom, on white and green) -> class images -> DreamBooth with prior preservation -> images
# of "sks circle" on a blue background, which none of the photos had, and the world's evaluator reading them back
# beside the base model's.
#   bash demo.sh         the toy Stable Diffusion (toyworld/toy-sd): LoRA rank 16 and pivotal tuning, QUALITY.md's best
#   bash demo.sh flux    the toy FLUX.1 (toyworld/toy-flux): the same data through the flow-matching family
# PYTHON=/path/to/python skips the .venv set-up (that interpreter must have the requirements); DEMO_DIR picks the folder.
set -euo pipefail
cd "$(dirname "$0")"
FAMILY=${1:-sd}
case "$FAMILY" in
  sd)   MODEL=toyworld/toy-sd; SAMPLER=ddim; PRIOR_GUIDANCE=4; GUIDANCE=10
        RECIPE=(--lora_rank 16 --train_text_encoder_ti --initializer_concept circle --learning_rate 2e-3
                --max_train_steps 600) ;;
  flux) MODEL=toyworld/toy-flux; SAMPLER=flow_euler; PRIOR_GUIDANCE=4; GUIDANCE=5
        RECIPE=(--lora_rank 16 --train_text_encoder_ti --initializer_concept circle --learning_rate 1e-3
                --max_train_steps 1200) ;;
  *)    echo "usage: bash demo.sh [sd|flux]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then bash setup.sh; PYTHON=.venv/bin/python; fi
OUT=${DEMO_DIR:-demo-output}
rm -rf "$OUT"
export HF_HUB_OFFLINE=1

"$PYTHON" toyworld/world.py photos "$OUT/photos"

# 100 images of the class ("a photo of a circle") from the base model, for prior preservation
"$PYTHON" generate_priors.py --pretrained_model_name_or_path $MODEL --class_prompt "a photo of a circle" \
  --class_dir "$OUT/priors" --num_class_images 100 --sample_batch_size 10 --num_inference_steps 25 \
  --guidance_scale $PRIOR_GUIDANCE --scheduler $SAMPLER

"$PYTHON" -m accelerate.commands.launch --config_file accelerate_config.yaml train_dreambooth.py \
  --pretrained_model_name_or_path $MODEL --instance_dir "$OUT/photos" --instance_prompt "a photo of sks circle" \
  --with_prior_preservation --class_dir "$OUT/priors" --class_prompt "a photo of a circle" "${RECIPE[@]}" \
  --output_dir "$OUT/sks-circle" --resolution 32 --train_batch_size 2 \
  --lr_warmup_steps 0 --mixed_precision no --seed 0

# the same prompt and seeds on the fine-tuned model and on the base model
SAMPLE=(--prompt "a photo of sks circle on a blue background" --num_images_per_prompt 8 --num_inference_steps 25
        --guidance_scale $GUIDANCE --scheduler $SAMPLER)
"$PYTHON" infer.py --pretrained_model_name_or_path "$OUT/sks-circle" "${SAMPLE[@]}" --grid --output_dir "$OUT/samples"
"$PYTHON" infer.py --pretrained_model_name_or_path $MODEL "${SAMPLE[@]}" --output_dir "$OUT/base-samples"

"$PYTHON" toyworld/world.py read --background blue "$OUT"/samples/*.png
echo "the base model, same prompt and seeds: $("$PYTHON" toyworld/world.py read --background blue "$OUT"/base-samples/*.png | tail -1)"
echo "demo done: images in $OUT/samples, trained pipeline in $OUT/sks-circle"
