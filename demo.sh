#!/usr/bin/env bash
# The whole suite end to end with nothing downloaded but Python packages: a tiny Stable Diffusion written locally,
# four generated "photos" of a subject, then class priors -> DreamBooth training -> inference.
# The tiny model's weights are random, so its images are noise: the demo shows the pipeline working, not quality.
# PYTHON=/path/to/python skips the .venv set-up (that interpreter must have the requirements); DEMO_DIR picks the folder.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then bash setup.sh; PYTHON=.venv/bin/python; fi
OUT=${DEMO_DIR:-demo-output}
rm -rf "$OUT"
export HF_HUB_OFFLINE=1

"$PYTHON" tools/make_tiny_model.py --output_dir "$OUT/tiny-sd" --images_dir "$OUT/photos"

"$PYTHON" generate_priors.py --pretrained_model_name_or_path "$OUT/tiny-sd" \
  --class_prompt "a photo of dog" --class_dir "$OUT/priors" --num_class_images 8 \
  --num_inference_steps 10 --resolution 64

"$PYTHON" -m accelerate.commands.launch --config_file accelerate_config.yaml train_dreambooth.py \
  --pretrained_model_name_or_path "$OUT/tiny-sd" --instance_dir "$OUT/photos" --instance_prompt "a photo of sks dog" \
  --with_prior_preservation --class_dir "$OUT/priors" --class_prompt "a photo of dog" --num_class_images 8 \
  --output_dir "$OUT/sks-dog" --resolution 64 --train_batch_size 2 --learning_rate 1e-4 --lr_warmup_steps 0 \
  --max_train_steps 20 --train_text_encoder --mixed_precision no --seed 0

"$PYTHON" infer.py --pretrained_model_name_or_path "$OUT/sks-dog" --prompt "a photo of sks dog on the moon" \
  --num_images_per_prompt 4 --num_inference_steps 20 --height 64 --width 64 --output_dir "$OUT/samples"

echo "demo done: images in $OUT/samples, trained pipeline in $OUT/sks-dog"
