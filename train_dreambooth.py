"""DreamBooth fine-tuning of Stable Diffusion 1.x/2.x and SDXL (Ruiz et al. 2022, https://arxiv.org/abs/2208.12242).

Teaches a model a subject from 3-5 photos, bound to a rare token ("a photo of sks dog"), optionally with the
paper's class-prior preservation loss. The VAE is frozen, the UNet is trained, the text encoder(s) optionally. The
model family is read from the model itself: what differs between families (prompt encoding, the denoiser and its
extra inputs, the pipeline class, file layouts) is its row in families.py, and the objective (objectives.py) comes
from the model's scheduler config; both are chosen once, before the loop, and the step does not know which.

    accelerate launch train_dreambooth.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_dir photos/ --instance_prompt "a photo of sks dog" --output_dir sks-dog \
        --with_prior_preservation --class_dir priors/dog --class_prompt "a photo of dog"

Flags shared with diffusers' examples/dreambooth/train_dreambooth.py keep diffusers' names and meanings.
"""

import contextlib
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import cli
import export
import families
import generate_priors
import imagedata
import loading
import model_calls
import objectives
import runs


# ----------------------------------------------------------------------------------------------------------------
# Arguments


# Flag groups whose settings cannot change the trained weights: a resume warns about a change to any other flag.
RESUME_HARMLESS_GROUPS = ("speed (does not change what is learned)", "checkpoints and exports", "validation images",
                          "output and logging")


def parse_args(argv=None):
    return cli.parse_args_with_config(build_parser(), argv)


# Flags that act only with another flag, declared once: flag -> (what it needs, whether the arguments have it). One
# given without its need (on the command line or in a --config file, which may carry it unused) gets a note at
# start-up naming both; flags that contradict each other are refused in check_args.
PRIOR, EMA, LORA, TI = ("--with_prior_preservation", lambda a: a.with_prior_preservation), (
    "--use_ema", lambda a: a.use_ema), ("--lora_rank", lambda a: a.lora_rank > 0), (
    "--train_text_encoder_ti", lambda a: a.train_text_encoder_ti)
NEEDS = {
    **dict.fromkeys(("class_dir", "class_prompt", "num_class_images", "prior_loss_weight", "sample_batch_size",
                     "prior_generation_precision"), PRIOR),
    **dict.fromkeys(("ema_decay", "ema_warmup", "save_raw_weights"), EMA),
    **dict.fromkeys(("lora_alpha", "lora_dropout", "lora_target_modules", "lora_blocks"), LORA),
    **dict.fromkeys(("token_abstraction", "num_new_tokens_per_abstraction", "initializer_concept"), TI),
    "text_encoder_lr": ("--train_text_encoder or --train_text_encoder_ti",
                        lambda a: a.train_text_encoder or a.train_text_encoder_ti),
    **dict.fromkeys(("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"),
                    ("--optimizer prodigy", lambda a: a.optimizer == "prodigy")),
    **dict.fromkeys(("validation_negative_prompt", "num_validation_images", "validation_steps", "validation_epochs",
                     "validation_scheduler", "validation_guidance_scale", "validation_inference_steps",
                     "validation_model_path"),
                    ("--validation_prompt", lambda a: a.validation_prompt)),
    **dict.fromkeys(("exports_total_limit", "export_precision"), ("--export_steps", lambda a: a.export_steps)),
    "lr_num_cycles": ("--lr_scheduler cosine_with_restarts", lambda a: a.lr_scheduler == "cosine_with_restarts"),
    "lr_power": ("--lr_scheduler polynomial", lambda a: a.lr_scheduler == "polynomial"),
    **dict.fromkeys(("hub_model_id", "hub_token"), ("--push_to_hub", lambda a: a.push_to_hub)),
}


def build_parser():
    p = cli.ArgumentParser(__doc__, __file__)
    cli.add_model_args(p).add_argument("--tokenizer_name", default=None, help="tokenizer to use instead of the model's own")

    g = p.add_argument_group("data")
    g.add_argument("--instance_dir", "--instance_data_dir", dest="instance_dir", default=None,
                   help="folder of subject photos; a photo.txt beside photo.jpg replaces the instance prompt for it, a "
                        "photo.mask.png weighs its loss (--mask_background_weight)")
    g.add_argument("--dataset_name", default=None, help="instead of --instance_dir: a hub dataset id or local imagefolder")
    g.add_argument("--dataset_config_name", default=None, help="config of --dataset_name")
    g.add_argument("--image_column", default="image", help="image column of --dataset_name")
    g.add_argument("--caption_column", default=None, help="caption column of --dataset_name (default: the instance prompt)")
    g.add_argument("--instance_prompt", default=None, help="prompt with the rare identifier, e.g. 'a photo of sks dog'")
    g.add_argument("--resolution", type=cli.SIZE, default=None,
                   help="square training size (default: the model's own: 512 SD 1.5, 768 SD 2.x, 1024 SDXL)")
    g.add_argument("--center_crop", action="store_true", help="crop the centre instead of a random square")
    g.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
    g.add_argument("--caption_dropout", type=cli.number(float, low=0, high=1), default=0.0,
                   help="share of instance examples trained with the empty prompt (unconditionally), for classifier-"
                        "free guidance; class prompts are never dropped (0.1 is common)")
    g.add_argument("--aspect_ratio_buckets", nargs="?", const="auto", default=None,  # checked, kept as text
                   type=lambda text: imagedata.bucket_sizes(text, 64) and text,
                   help="keep each photo's aspect ratio: resize it to the nearest of these sizes 'h,w;h,w;...' "
                        "(diffusers' format; alone: sizes of about --resolution squared pixels in multiples of 64, "
                        "sides at most 2:1) and crop the rest; each batch has one size")
    g.add_argument("--concepts_list", default=None,
                   help="several subjects in one run: a JSON list of {instance_prompt, instance_data_dir, class_prompt, "
                        "class_data_dir} (ShivamShrirao's format; optional validation_prompt), instead of those flags"
                   ).structured = True  # in a --config YAML, the list itself
    g.add_argument("--mask_background_weight", type=cli.FRACTION, default=0.0,
                   help="loss weight of the background of photos that have a mask (photo.mask.png beside photo.jpg, "
                        "white = subject); 0 ignores it (QUALITY.md: at 0.02 or 0.1 busy backgrounds still leak)")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the paper's class-prior loss")
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", default=None,
                   help="folder of class images; missing ones are generated from the base model")
    g.add_argument("--class_prompt", default=None, help="prompt of the class, e.g. 'a photo of dog'")
    g.add_argument("--num_class_images", type=cli.COUNT, default=100, help="class images to use (generated if the folder has fewer)")
    g.add_argument("--prior_loss_weight", type=cli.NONNEGATIVE, default=1.0, help="weight of the prior loss (lambda in the paper)")
    g.add_argument("--sample_batch_size", type=cli.COUNT, default=4, help="batch size when generating class images")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="precision of class-image generation (default: fp16 on a GPU, else fp32)")

    g = p.add_argument_group("training")
    g.add_argument("--train_text_encoder", action="store_true", help="also fine-tune the text encoder (SDXL: both)")
    g.add_argument("--train_text_encoder_frac", "--train_text_encoder_ti_frac", type=cli.number(float, above=0, high=1),
                   default=1.0, help="with --train_text_encoder (or --train_text_encoder_ti): train it (or the new "
                                     "tokens) for this first fraction of the steps, then freeze it")
    g.add_argument("--text_encoder_lr", type=cli.POSITIVE, default=None,
                   help="learning rate of what trains in the text encoders (weights, adapters or new tokens; default: "
                        "--learning_rate)")
    g.add_argument("--train_batch_size", type=cli.COUNT, default=4, help="instance images per device per step")
    g.add_argument("--num_train_epochs", type=cli.COUNT, default=1, help="epochs, unless --max_train_steps is given")
    g.add_argument("--max_train_steps", type=cli.COUNT, default=None, help="optimizer steps; overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=cli.COUNT, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=cli.POSITIVE, default=None,
                   help="peak learning rate (default: 5e-6; 1.0 with Prodigy, which sets its own step size)")
    g.add_argument("--scale_lr", action="store_true", help="multiply the learning rate by the global batch size")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="learning-rate schedule (diffusers' get_scheduler)")
    g.add_argument("--lr_warmup_steps", type=cli.NATURAL, default=500, help="warmup steps of the schedule")
    g.add_argument("--lr_num_cycles", type=cli.COUNT, default=1, help="hard restarts of cosine_with_restarts")
    g.add_argument("--lr_power", type=cli.POSITIVE, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "prodigy"], type=str.lower,
                   help="AdamW, bitsandbytes' 8-bit AdamW, or Prodigy (arxiv 2306.06101; the prodigyopt package); any "
                        "case, as diffusers' scripts take 'AdamW'")
    g.add_argument("--prodigy_beta3", type=cli.FRACTION, default=None, help="Prodigy's beta3 (default: sqrt(beta2))")
    g.add_argument("--prodigy_decouple", type=cli.boolean, default=True, help="Prodigy: decoupled (AdamW-style) weight decay")
    g.add_argument("--prodigy_use_bias_correction", type=cli.boolean, default=True, help="Prodigy: Adam's bias correction")
    g.add_argument("--prodigy_safeguard_warmup", type=cli.boolean, default=True,
                   help="Prodigy: leave the learning-rate warmup out of its step-size estimate")
    g.add_argument("--adam_beta1", type=cli.FRACTION, default=0.9, help="AdamW's first-moment decay")
    g.add_argument("--adam_beta2", type=cli.FRACTION, default=0.999, help="AdamW's second-moment decay")
    g.add_argument("--adam_weight_decay", type=cli.NONNEGATIVE, default=1e-2, help="AdamW's decoupled weight decay")
    g.add_argument("--adam_epsilon", type=cli.POSITIVE, default=1e-8, help="AdamW's epsilon")
    g.add_argument("--max_grad_norm", type=cli.NONNEGATIVE, default=1.0, help="gradient clipping norm (0: no clipping)")
    g.add_argument("--offset_noise", action="store_true", help="add offset noise (crosslabs.org/blog/diffusion-with-offset-noise)")
    g.add_argument("--snr_gamma", type=cli.POSITIVE, default=None,
                   help="min-SNR loss weighting gamma, 5.0 is usual (arxiv 2303.09556; v-prediction: the paper's "
                        "min(SNR, gamma) / (SNR + 1), not diffusers' min(SNR, gamma) / SNR + 1)")
    g.add_argument("--use_ema", action="store_true",
                   help="keep an exponential moving average of the trained weights (full or LoRA) and use it for "
                        "validation, exports and the result")
    g.add_argument("--ema_decay", type=cli.FRACTION, default=0.9999,
                   help="the average's decay, reached after its warm-up (diffusers' EMAModel: (1 + t) / (10 + t))")
    g.add_argument("--ema_warmup", action="store_true", help="EMAModel's other warm-up: 1 - (1 + t) ** -2/3")
    g.add_argument("--save_raw_weights", action="store_true", help="with --use_ema, also save the raw weights in raw/")
    g.add_argument("--seed", type=cli.SEED, default=None, help="seed (default: drawn at random and recorded in run_config.json)")
    g.add_argument("--data_seed", type=cli.SEED, default=None, help="seed of the data alone: the order of the images, "
                   "crops, flips, caption dropout (default: --seed's; LoRA start, noise and timesteps stay --seed's)")

    g = p.add_argument_group("flow matching (FLUX.1, SD 3.5; refused for the DDPM models, --snr_gamma refused for these)")
    g.add_argument("--weighting_scheme", default=None, choices=objectives.WEIGHTING_SCHEMES,
                   help="how timesteps are drawn (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap), as in "
                        "diffusers' scripts (default: none for FLUX.1, logit_normal for SD 3.5)")
    g.add_argument("--logit_mean", type=cli.number(float), default=None, help="mean of the logit-normal draw (default 0.0)")
    g.add_argument("--logit_std", type=cli.POSITIVE, default=None, help="std of the logit-normal draw (default 1.0)")
    g.add_argument("--mode_scale", type=cli.number(float), default=None, help="scale of the mode draw (default 1.29)")
    g.add_argument("--precondition_outputs", type=cli.number(int, low=0, high=1), default=None,
                   help="SD 3.5: compare the clean latents the output implies, not the velocity (default 1, as diffusers)")
    g.add_argument("--guidance_scale", type=cli.NONNEGATIVE, default=None,
                   help="guidance-distilled FLUX.1 (dev): the guidance value fed to the transformer while training "
                        "(default 1.0, the value the trainers settled on: diffusers' 3.5 gives weak LoRAs, as sampling "
                        "adds its guidance again); the sampling guidance is --validation_guidance_scale")
    g.add_argument("--max_sequence_length", type=cli.COUNT, default=None,
                   help="T5's (a language model's) prompt length in tokens (default: 512 FLUX.1, Z-Image and FLUX.2 "
                        "klein, 77 SD 3.5, as diffusers' scripts)")
    g.add_argument("--text_encoder_out_layers", type=cli.NATURAL, nargs="+", default=None,
                   help="FLUX.2 klein: the Qwen3 hidden states its prompt is read from, side by side (default: "
                        "9 18 27, its pipeline's)")

    g = p.add_argument_group("Pivotal tuning (the identifier as new tokens, trained beside the UNet or its LoRA)")
    g.add_argument("--train_text_encoder_ti", "--train_token_embeddings", dest="train_text_encoder_ti",
                   action="store_true", help="replace the identifier in the prompts by new tokens of every tokenizer "
                                             "and train their embeddings (the rest of the text encoders frozen)")
    g.add_argument("--token_abstraction", default="sks", help="the identifier word of the instance prompt")
    g.add_argument("--num_new_tokens_per_abstraction", type=cli.COUNT, default=2, help="new tokens for it: <s0><s1>...")
    g.add_argument("--initializer_concept", default=None,
                   help="word(s) whose embedding the new tokens start from, e.g. the class word (default: random, "
                        "with the embedding matrix's spread)")

    g = p.add_argument_group("LoRA (adapters instead of the full fine-tune)")
    g.add_argument("--lora_rank", "--rank", dest="lora_rank", type=cli.NATURAL, default=0,
                   help="rank of LoRA adapters (0: full fine-tune); use a learning rate of about 1e-4 with LoRA")
    g.add_argument("--lora_alpha", type=cli.POSITIVE, default=None, help="LoRA alpha (default: the rank, a scale of 1)")
    g.add_argument("--lora_dropout", type=cli.FRACTION, default=0.0, help="dropout of the LoRA layers")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA adapters (arxiv 2402.09353: LoRA's direction plus a learned magnitude; peft's use_dora)")
    g.add_argument("--lora_target_modules", "--lora_layers", dest="lora_target_modules", nargs="+", default=None,
                   type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                   help="denoiser modules that get adapters, by name or name ending, spaces or commas between "
                        "(diffusers' --lora_layers 'attn.to_k,attn.to_q'; default: the attention projections, to_k "
                        "to_q to_v to_out.0 for SD and SDXL, of both streams for SD 3.5, plus the feed-forwards for "
                        "FLUX.1; the text encoders' q/k/v/out projections with --train_text_encoder)")
    g.add_argument("--quantize_base", choices=["nf4", "int8"], default=None,
                   help="QLoRA: the frozen denoiser quantized by bitsandbytes as it loads (4-bit NF4 or 8-bit), the "
                        "adapters trained on top in the training precision")
    g.add_argument("--bnb_quantization_config_path", default=None, help="the same from a JSON file of BitsAndBytesConfig's "
                   "arguments, e.g. {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"} (diffusers' flag)")
    g.add_argument("--lora_blocks", default=None, type=lambda text: [cli.NATURAL(b.strip()) for b in text.split(",")],
                   help="SD 3.5: adapters only in these joint blocks, e.g. '12,13' (diffusers' flag)")

    g = p.add_argument_group("precision and memory")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="overrides accelerate's config; trainable weights stay fp32 either way")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (--optimizer adamw8bit)")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA only); PyTorch SDPA is used otherwise")
    g.add_argument("--do_fp8_training", action="store_true", help="the frozen denoiser's matmuls in fp8 through torchao "
                   "(GPUs of compute capability 8.9 on; speed, not memory; diffusers' flag)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every training image once with the VAE (flips cached both ways; without --center_crop "
                        "each image's random crop is drawn once, as diffusers' scripts)")
    g.add_argument("--pre_compute_text_embeddings", type=cli.boolean, nargs="?", const=True, default=None,
                   help="encode the prompts once and take the frozen text encoders off the accelerator (default: on for "
                        "FLUX.1 and SD 3.5 when no text encoder trains: T5-XXL alone is 9.5 GB in bf16)")

    g = p.add_argument_group("speed (does not change what is learned)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--set_grads_to_none", action="store_true", help="free gradients between steps instead of zeroing")
    g.add_argument("--offload", action="store_true", help="the VAE and the frozen text encoders on the CPU except while "
                   "they work (caching, encoding a step's images, validation; diffusers' flag)")
    g.add_argument("--channels_last", action="store_true", help="UNet in channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first steps)")
    g.add_argument("--dataloader_num_workers", type=cli.NATURAL, default=0, help="data loading subprocesses (0: main process)")

    g = p.add_argument_group("checkpoints and exports")
    g.add_argument("--checkpointing_steps", type=cli.COUNT, default=500,
                   help="save the full training state (accelerate's save_state) every N optimizer steps")
    g.add_argument("--checkpoints_total_limit", type=cli.COUNT, default=None, help="keep only the newest K checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest checkpoint in --output_dir, or a fresh start if there is none), a path, "
                        "or a checkpoint-N folder name in --output_dir")
    g.add_argument("--export_steps", type=cli.COUNT, default=None,
                   help="also write an inference pipeline (export-N) every N optimizer steps")
    g.add_argument("--exports_total_limit", type=cli.COUNT, default=None, help="keep only the newest K exports")
    g.add_argument("--export_precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="weights of the exports and of the single files")
    g.add_argument("--upcast_before_saving", action="store_true",
                   help="accepted for diffusers' FLUX and SD3 commands: the trained weights are always saved as they "
                        "trained (fp32), so it changes nothing")
    g.add_argument("--save_single_file", action="store_true",
                   help="also write the pipeline (and each export) as one .safetensors file for the web UIs")

    g = p.add_argument_group("validation images")
    g.add_argument("--validation_prompt", action="append", default=None,
                   help="prompt to sample at step 0, every --validation_steps and at the end (repeatable)")
    g.add_argument("--validation_negative_prompt", default=None, help="negative prompt of the validation images")
    g.add_argument("--validation_model_path", default=None,
                   help="sample them with this checkpoint of the same family plus the LoRA being trained: train on a "
                        "base model, preview on its distilled one (Z-Image-Turbo)")
    g.add_argument("--num_validation_images", type=cli.COUNT, default=4, help="images per validation prompt (fixed seeds)")
    g.add_argument("--validation_steps", type=cli.COUNT, default=100, help="sample every N optimizer steps")
    g.add_argument("--validation_epochs", type=cli.COUNT, default=None, help="instead: every N epochs (diffusers' SDXL flag)")
    g.add_argument("--validation_scheduler", default=None, choices=sorted(loading.SCHEDULERS),
                   help="sampler, built from the model's scheduler config (default: dpm++_2m; flow_euler for FLUX.1 and "
                        "SD 3.5)")
    g.add_argument("--validation_guidance_scale", type=cli.NONNEGATIVE, default=None,
                   help="guidance scale (default: 7.5 SD and SDXL, 7.0 SD 3.5, FLUX.1 dev's embedded guidance 3.5, "
                        "none for schnell)")
    g.add_argument("--validation_inference_steps", type=cli.COUNT, default=None,
                   help="sampling steps per validation image (default: 25; 28 FLUX.1 dev and SD 3.5, 4 schnell)")

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="dreambooth-model",
                   help="where the trained pipeline and run record go ($VARIABLES are expanded, e.g. $WANDB_RUN_ID)")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a non-empty --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                   help="experiment tracker(s), through accelerate")
    g.add_argument("--tracker_project_name", default="dreambooth", help="project name in the tracker")
    g.add_argument("--run_name", default=None, help="run name in W&B (default: W&B's)")
    g.add_argument("--logging_steps", type=cli.COUNT, default=1,
                   help="log every N optimizer steps (the only time a step waits for the GPU)")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--push_to_hub", action="store_true", help="upload the trained pipeline to the Hugging Face Hub")
    g.add_argument("--hub_model_id", default=None, help="hub repository (default: the --output_dir folder name)")
    g.add_argument("--hub_token", default=None,
                   help="hub token (default: the `hf auth login` token or HF_TOKEN); used, never written or logged")
    return p


def check_args(args):
    """Everything that can be checked about the user's input before a model loads, and the config resolved from it
    (the model's family and resolution, subjects, the optimizer and learning rate, the checkpoint to resume, the
    seed): the one place that sets flags' values, with plan() for what follows from the data."""
    if args.use_8bit_adam and args.optimizer not in ("adamw", "adamw8bit"):
        cli.fail(f"--use_8bit_adam is AdamW in 8 bits: not with --optimizer {args.optimizer} (give one of them)")
    if args.optimizer == "prodigy" and args.learning_rate is not None and args.learning_rate < 0.1:
        cli.note(f"--optimizer prodigy with --learning_rate {args.learning_rate:g}: Prodigy estimates the step size "
                 "itself and the learning rate scales it (1.0 is its default; 0.1-1 the usual range), so this run "
                 "will barely move")
    if args.concepts_list:  # several subjects: their prompts and folders come from the list
        given = [flag for flag in ("instance_dir", "dataset_name", "instance_prompt", "class_dir", "class_prompt")
                 if getattr(args, flag)]
        if given:
            cli.fail(f"--concepts_list names each subject's folders and prompts: leave out --{', --'.join(given)}")
        if args.train_text_encoder_ti:
            cli.fail("--train_text_encoder_ti trains one identifier (--token_abstraction): not with --concepts_list")
        args.subjects = imagedata.read_concepts(args.concepts_list, args.with_prior_preservation)
        args.validation_prompt = (args.validation_prompt or []) + [p for s in args.subjects for p in s["validation_prompt"]]
        args.validation_prompt = args.validation_prompt or None
    else:
        if not args.instance_prompt:
            cli.fail("--instance_prompt is required (e.g. 'a photo of sks dog')")
        if (args.instance_dir is None) == (args.dataset_name is None):
            cli.fail("give exactly one of --instance_dir, --dataset_name and --concepts_list")
        if args.with_prior_preservation and not args.class_prompt:
            cli.fail("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
        if args.with_prior_preservation and not args.class_dir:
            cli.fail("--with_prior_preservation needs --class_dir (a folder; missing class images are generated)")
        args.subjects = [{"instance_prompt": args.instance_prompt, "instance_data_dir": args.instance_dir,
                          "class_prompt": args.class_prompt, "class_data_dir": args.class_dir, "validation_prompt": []}]
    cli.note_unneeded(args, build_parser(), NEEDS)
    if args.with_prior_preservation:  # class folders are outputs: checked as --output_dir is
        imagedata.check_class_folders(args.subjects)
        for subject in args.subjects:
            if generate_priors.missing_prior_indices(subject["class_data_dir"], args.num_class_images):
                cli.check_writable(subject["class_data_dir"], "class folder")
    args.output_dir = os.path.expandvars(args.output_dir)
    if unset := re.search(r"\$\{?\w+\}?", args.output_dir):  # expandvars leaves an unset variable as it is
        cli.fail(f"--output_dir uses {unset.group()}, which is not set")
    cli.check_writable(args.output_dir, "--output_dir")
    if args.cache_latents and not args.center_crop:  # as diffusers' scripts, whose random crop is drawn once
        cli.note("--cache_latents without --center_crop: each image's random crop is drawn once and cached (the same "
                 "every epoch, as diffusers' scripts do); add --center_crop for the centre")
    if args.use_dora and not args.lora_rank:
        cli.fail("--use_dora needs --lora_rank: DoRA is a kind of LoRA adapter")
    args.quantization = loading.quantization(args.quantize_base, args.bnb_quantization_config_path)  # read once
    if args.quantization and not args.lora_rank:
        cli.fail("a quantized base is not trained itself: give --lora_rank (QLoRA trains adapters on top of it)")
    if args.use_dora:
        cli.note(export.KOHYA_DORA)
    if args.save_single_file and args.lora_rank:
        cli.fail("--save_single_file writes a whole model: a LoRA run's file for the web UIs is its kohya file "
                 f"(FLUX.1 and SD 3.5: {families.LORA_WEIGHTS} itself)")
    if args.train_text_encoder_ti and args.train_text_encoder:
        cli.fail("give one of --train_text_encoder (the text encoders' weights) and --train_text_encoder_ti (new tokens)")
    if args.train_text_encoder_frac < 1 and not (args.train_text_encoder or args.train_text_encoder_ti):
        cli.fail("--train_text_encoder_frac needs --train_text_encoder or --train_text_encoder_ti")
    if args.text_encoder_lr and args.optimizer == "prodigy" and args.text_encoder_lr != (args.learning_rate or 1.0):
        cli.fail("--optimizer prodigy takes one learning rate for all parameters: leave out --text_encoder_lr")
    args.new_tokens = [f"<s{i}>" for i in range(args.num_new_tokens_per_abstraction)] if args.train_text_encoder_ti else []
    if args.train_text_encoder_ti:  # the validation prompts as the model reads them; instance prompts: load_instance_examples
        if not args.token_abstraction.strip() or args.token_abstraction != args.token_abstraction.strip():
            cli.fail(f"--token_abstraction {args.token_abstraction!r}: give the identifier word of the instance "
                     "prompt, without spaces (e.g. sks)")
        if families.pivot_prompt(args.instance_prompt, args.token_abstraction, args.new_tokens) == args.instance_prompt:
            cli.fail(f"--token_abstraction '{args.token_abstraction}' is not a word of --instance_prompt "
                    f"'{args.instance_prompt}': give the identifier, e.g. --token_abstraction sks")
        args.validation_prompt = [families.pivot_prompt(v, args.token_abstraction, args.new_tokens)
                                  for v in args.validation_prompt or []] or None
    if args.pre_compute_text_embeddings and (args.train_text_encoder or args.train_text_encoder_ti):
        cli.fail("--pre_compute_text_embeddings needs a frozen text encoder: leave out --train_text_encoder(_ti)")
    args.pretrained_model_name_or_path = loading.check_model_source(args.pretrained_model_name_or_path, args.revision,
                                                               args.single_file_config)
    model = families.read_model(args.pretrained_model_name_or_path, args.revision)
    family = model.family
    args.model_family = family.name
    args.resolution = model.resolution if args.resolution is None else args.resolution
    if args.resolution % family.size_multiple:
        cli.fail(f"--resolution {args.resolution}: {family.pipeline} takes sides in multiples of {family.size_multiple}")
    for h, w in imagedata.bucket_sizes(args.aspect_ratio_buckets, args.resolution) if args.aspect_ratio_buckets else []:
        if h % family.size_multiple or w % family.size_multiple:
            cli.fail(f"--aspect_ratio_buckets {h},{w}: {family.pipeline} takes sides in multiples of "
                     f"{family.size_multiple}")
        if h * w > 4 * args.resolution ** 2:  # a typo's 100000,100000 would fail for memory at the first batch
            cli.fail(f"--aspect_ratio_buckets {h},{w} is {h * w / args.resolution ** 2:,.0f} times --resolution "
                     f"{args.resolution}'s area: buckets are shapes of about that area (at most 4 times)")
    check_family_flags(args, model)
    if base := (families.distilled(args.pretrained_model_name_or_path) or ("",))[0]:
        cli.note(f"{args.pretrained_model_name_or_path} is a distilled checkpoint: what is trained on it tends to come "
                 f"out blurry or without effect; train on its base ({base}) and preview on this one with "
                 f"--validation_model_path {args.pretrained_model_name_or_path}")
    if args.validation_model_path:
        loading.check_preview_model(args, family)
    if args.text_encoder_out_layers:
        loading.check_out_layers(args, family)
    if args.validation_negative_prompt and not families.takes_negative_prompt(family):
        cli.note(f"--validation_negative_prompt: {family.pipeline} takes none (it guides against the empty prompt): "
                 "not used")
        args.validation_negative_prompt = None
    if args.train_text_encoder and not family.trained_text_encoders:
        cli.fail(f"--train_text_encoder: {family.pipeline}'s text encoder is a language model this suite does not "
                 "train (nor do diffusers' scripts): leave the flag out")
    if args.save_single_file and not family.single_file_layout:
        cli.fail(f"--save_single_file: this version writes no single file for {family.pipeline}; the pipeline folder "
                 "is saved (diffusers reads it)")
    if args.train_text_encoder_ti and not hasattr(family.pipeline_class(), "load_textual_inversion"):
        cli.fail(f"--train_text_encoder_ti: diffusers' {family.pipeline} has no textual-inversion loader, so the new "
                 "tokens could not be loaded beside the weights (pivotal tuning is for SD, SDXL and FLUX.1)")
    cli.check_launch()
    if args.enable_xformers_memory_efficient_attention:
        loading.check_xformers()
    if args.do_fp8_training:
        loading.check_fp8(args)
    if args.use_8bit_adam:  # diffusers' spelling
        args.optimizer = "adamw8bit"
    args.use_8bit_adam = args.optimizer == "adamw8bit"
    if args.learning_rate is None:
        args.learning_rate = 1.0 if args.optimizer == "prodigy" else 5e-6
    if args.optimizer == "adamw8bit":
        cli.require("bitsandbytes", "--optimizer adamw8bit")
    if args.optimizer == "prodigy":
        cli.require("prodigyopt", "--optimizer prodigy")
    if args.report_to in ("wandb", "all"):
        cli.check_wandb(f"--report_to {args.report_to}")
    if args.push_to_hub:
        export.check_hub_login(args.hub_token)
    out = Path(args.output_dir)
    runs.check_output_dir_free(out)  # another run's folder: say whose, before its contents are judged
    runs.clear_unstarted_run(out, args.logging_dir)
    args.resume_record = None
    if args.resume_from_checkpoint == "latest":
        checkpoints = runs.list_checkpoints(out)
        if checkpoints:
            args.resume_from_checkpoint = str(checkpoints[-1][1])
        else:  # the same command can start a preemptible job and restart it
            cli.note(f"no checkpoint in {out} yet: starting a new run")
            args.resume_from_checkpoint = None
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).exists() and (out / args.resume_from_checkpoint).is_dir():
        args.resume_from_checkpoint = str(out / args.resume_from_checkpoint)  # a bare "checkpoint-N", as diffusers takes it
    if args.resume_from_checkpoint:
        args.resume_record = runs.check_checkpoint(args.resume_from_checkpoint)
    elif out.exists() and any(p.name != runs.LOCK for p in out.iterdir()) and not args.overwrite_output_dir:
        hint = "--resume_from_checkpoint latest to continue it, " if runs.list_checkpoints(out) else ""
        cli.fail(f"output folder is not empty: {out} (pass {hint}another --output_dir, or --overwrite_output_dir)")
    if args.resume_record:
        check_resume_structure(args, args.resume_record["config"])
    # the run's seed: a resumed run keeps its own, an unseeded one draws one and records it (the same on every process)
    if args.seed is None and args.resume_record:
        args.seed = args.resume_record["config"].get("seed")
    if args.seed is None:
        from accelerate.utils import broadcast_object_list

        args.seed = int.from_bytes(os.urandom(3), "little")
        if cli.partial_state().num_processes > 1:
            args.seed = broadcast_object_list([args.seed])[0]
    if args.data_seed is None:  # as transformers' Trainer's data_seed: the run's seed unless given
        args.data_seed = (args.resume_record["config"] if args.resume_record else {}).get("data_seed", args.seed)


# What a checkpoint's saved state is shaped by: a resume cannot change these (the model's parameters, the optimizer's
# state, the moving average, pivotal tuning's tokens). Other settings may change, with a note (resume()).
RESUME_FIXED = ("lora_rank", "use_dora", "lora_target_modules", "train_text_encoder", "train_text_encoder_ti",
                "num_new_tokens_per_abstraction", "optimizer", "use_ema", "quantize_base", "bnb_quantization_config_path")


def check_resume_structure(args, saved):
    """Refuse, before anything loads, a resume whose settings change what the checkpoint's state holds, or whose
    checkpoint is past the run's last step (the result would be a later step's weights under a record of fewer); one
    line naming the setting, the checkpoint's value and the value given."""
    made_with, family = families.family_of_record(saved), families.FAMILIES[args.model_family]
    if made_with is not family:
        cli.fail(f"checkpoint {args.resume_from_checkpoint} was made from the model "
                 f"{saved.get('pretrained_model_name_or_path')}, not {args.pretrained_model_name_or_path}: resume with "
                 f"that model (a {made_with.pipeline}'s state does not fit a {family.pipeline})")
    for key in RESUME_FIXED:
        if key in saved and saved[key] != getattr(args, key, None) and not (key == "lora_target_modules" and not args.lora_rank):
            cli.fail(f"cannot resume {args.resume_from_checkpoint} with --{key} {getattr(args, key)!r}: the checkpoint "
                     f"was made with {saved[key]!r}, and its saved state has that shape (resume with the same value, "
                     "or start a new run)")
    step = int(Path(args.resume_from_checkpoint).name.rsplit("-", 1)[-1]) if \
        Path(args.resume_from_checkpoint).name.rsplit("-", 1)[-1].isdigit() else None
    if step is not None and args.max_train_steps and args.max_train_steps < step:  # equal: a finished run restarted
        cli.fail(f"cannot resume {args.resume_from_checkpoint} with --max_train_steps {args.max_train_steps}: the "
                 f"checkpoint is at step {step}, past it (give at least {step} steps, or start a new run)")


def check_family_flags(args, model):
    """The flags whose default or meaning depends on the model: the family row's defaults fill those left unset, and
    a flag the family does not read is refused in one line, as are the DDPM-only options on a flow-matching model."""
    family, defaults = model.family, model.family.training_defaults(model.config)
    preview = args.validation_model_path or args.pretrained_model_name_or_path  # a distilled one samples its own way
    defaults = {**defaults, **(families.distilled(preview) or ("", {}))[1]}
    if model.sequence_length and "max_sequence_length" in defaults:  # never past the model's own tokenizer (toy FLUX.1)
        defaults = {**defaults, "max_sequence_length": min(defaults["max_sequence_length"], model.sequence_length)}
    for flag in families.FAMILY_FLAGS:
        if defaults.get(flag) is families.IGNORED:  # diffusers' script for the family takes it and never reads it
            if getattr(args, flag) is not None:
                cli.note(f"--{flag} is not read when training a {family.pipeline} (accepted, as diffusers' script for "
                         "it accepts it)")
            setattr(args, flag, None)
        elif flag in defaults and getattr(args, flag) is None:
            setattr(args, flag, defaults[flag])
        elif flag not in defaults and getattr(args, flag) is not None:
            cli.fail(f"--{flag} is for {families.FLAG_SCOPES.get(flag, families.FLAG_SCOPES['flow'])}, and "
                     f"{args.pretrained_model_name_or_path} is a {family.pipeline}"
                     + (" without one" if flag == "guidance_scale" and family.objective == "flow" else ""))
    if args.snr_gamma and family.objective == "flow":
        cli.fail(f"--snr_gamma (min-SNR weighting) is defined for noise prediction; {family.pipeline} is trained with "
                 "flow matching: weigh its loss with --weighting_scheme")
    loading.check_sampler(args.validation_scheduler, family, "--validation_scheduler")
    args.lora_target_modules = [m for part in args.lora_target_modules or [family.lora_targets]
                                for m in ([part] if isinstance(part, str) else part)]
    if args.lora_blocks:  # diffusers' SD3 script: the modules of these joint blocks only
        args.lora_target_modules = [f"transformer_blocks.{b}.{m}" for b in args.lora_blocks for m in args.lora_target_modules]
    # the text encoders --train_text_encoder trains (T5 never: as diffusers' scripts)
    args.trained_text_encoders = list(family.trained_text_encoders) if args.train_text_encoder else []
    frozen = [name for name in family.text_encoder_names if name not in family.trained_text_encoders]
    if args.train_text_encoder and frozen:
        cli.note(f"--train_text_encoder trains {', '.join(family.trained_text_encoders)} of {family.pipeline}; "
                 f"{', '.join(frozen)} (T5) stays frozen, as in diffusers' scripts")
    if args.train_text_encoder or args.train_text_encoder_ti:  # explicitly asked for: refused in check_args
        args.pre_compute_text_embeddings = False


def load_subjects(args):
    """Each subject's photos as (image, prompt, mask): from a folder (paths, sorted; with photo.txt captions and
    photo.mask.png masks) or a `datasets` dataset (PIL images). Pivotal tuning: the identifier is the new tokens."""
    subjects = []
    for subject in args.subjects:
        folder = subject["instance_data_dir"]
        photos = [(path, imagedata.read_caption(path, subject["instance_prompt"]), imagedata.find_mask(path))
                  for path in imagedata.list_images(folder, "instance image")] if folder else imagedata.read_dataset(
            args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column, args.instance_prompt)
        if not photos:
            cli.fail(f"no images in instance folder {folder}")
        if folder:  # masks that would weigh nothing: without a photo, or whose subject the centre crop cuts away
            imagedata.note_unused_masks(folder, [path for path, _, _ in photos])
            if not args.aspect_ratio_buckets:
                imagedata.note_cropped_out_masks(photos, (args.resolution, args.resolution), args.center_crop)
        subjects.append(pivot_prompts(args, photos))
        if args.with_prior_preservation and Path(subject["class_data_dir"]).exists():
            class_images = imagedata.list_images(subject["class_data_dir"], "class image")  # a corrupt one named now
            imagedata.note_unused_masks(subject["class_data_dir"], class_images, photos=False)
    return subjects


def pivot_prompts(args, examples):
    """Pivotal tuning: each photo's prompt with the identifier as the new tokens; a prompt without the identifier, or
    one the new tokens push past a text encoder's length (the words after them would be cut off), is refused."""
    if not args.train_text_encoder_ti:
        return examples
    from transformers import AutoTokenizer

    family = families.FAMILIES[args.model_family]
    tokenizers = [loading.from_pretrained(AutoTokenizer, args.pretrained_model_name_or_path, subfolder=sub,
                                          revision=args.revision) for sub in family.tokenizers]
    for i, (image, prompt, _) in enumerate(examples):
        if families.pivot_prompt(prompt, args.token_abstraction, args.new_tokens) == prompt:  # no identifier in it
            cli.fail(f"the caption of {image if isinstance(image, Path) else f'example {i}'} has no "
                    f"'{args.token_abstraction}' (--token_abstraction) for pivotal tuning's tokens: '{prompt}'")
        families.check_token_budget(family, tokenizers, prompt, args.token_abstraction, len(args.new_tokens),
                                    args.max_sequence_length)
    return [(image, families.pivot_prompt(prompt, args.token_abstraction, args.new_tokens), mask)
            for image, prompt, mask in examples]


# ----------------------------------------------------------------------------------------------------------------
# Models


class DreamBoothModel(torch.nn.Module):
    """The denoiser and the text encoders as one module, so that one `accelerator.prepare` and one `accumulate` cover
    them all: gradient accumulation then works on any number of processes. The text encoders keep their pipeline
    names (unet, text_encoder, text_encoder_2) as attributes, so the checkpoint's keys are the pipeline's. The family
    row says how a prompt becomes embeddings (`encode_prompt`: its function with the run's encoding flags) and how the
    denoiser is called."""

    def __init__(self, family, denoiser, text_encoders, trained_text_encoders, new_token_ids=(), guidance=None,
                 encode_prompt=None):
        super().__init__()
        self.family, self.trained_text_encoders = family, list(trained_text_encoders)
        self.encode_prompt = encode_prompt or family.encode_prompt
        self.train_text_encoder, self.guidance = bool(self.trained_text_encoders), guidance
        self.text_encoder_names, self.new_token_ids = list(text_encoders), list(new_token_ids)
        setattr(self, family.denoiser, denoiser)
        for name, encoder in text_encoders.items():
            setattr(self, name, encoder)
        # FSDP's shard units when its config names none: each block class the denoiser and text encoders declare
        self._no_split_modules = sorted({n for m in (denoiser, *text_encoders.values())
                                         for n in getattr(m, "_no_split_modules", None) or []})

    @property
    def denoiser(self):
        return getattr(self, self.family.denoiser)

    def trainable_parameters(self):
        """How many numbers train: pivotal tuning's matrix counts with its new rows only."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad) - sum(
            getattr(self, name).get_input_embeddings().weight.numel() - rows.numel()
            for name, rows in zip(self.text_encoder_names, self.token_embeddings() or []))

    def token_embeddings(self):
        """Pivotal tuning's rows of each text encoder's embedding matrix (None without pivotal tuning)."""
        return [getattr(self, name).get_input_embeddings().weight[ids].detach() for name, ids in
                zip(self.text_encoder_names, self.new_token_ids)] or None

    @torch.no_grad()
    def set_token_embeddings(self, rows):
        for name, ids, row in zip(self.text_encoder_names, self.new_token_ids, rows):
            getattr(self, name).get_input_embeddings().weight[ids] = row.to(torch.float32)

    def freeze_text_encoders(self):
        """--train_text_encoder_frac: from this step on the text encoders (or their adapters) run without gradients,
        and their gradients are dropped, so the optimizer, which skips a parameter without one, leaves them as they
        are (its state for them stays, unused)."""
        if self.train_text_encoder:
            self.train_text_encoder = False
            for name in self.text_encoder_names:
                for p in getattr(self, name).parameters():
                    p.grad = None
            self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for name in self.text_encoder_names:
            if not (self.train_text_encoder and name in self.trained_text_encoders):
                getattr(self, name).eval()  # a frozen text encoder never runs its dropout (T5's is 0.1)
        return self

    def forward(self, noisy_latents, timesteps, texts, time_ids):
        """texts: token ids per text encoder, or (prompt embeddings, pooled embeddings) when they were pre-computed
        (the model then holds no text encoder); time_ids: SDXL's size and crop of each image; the guidance value fed
        to a guidance-distilled transformer (FLUX.1 dev), if any."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            encoders = [getattr(self, name) for name in self.text_encoder_names]
            prompt_embeds, pooled = self.encode_prompt(encoders, texts) if encoders else texts
        dtype = noisy_latents.dtype  # frozen text encoders run in the half-precision weight dtype: one dtype here
        return self.family.denoise(self.denoiser, noisy_latents, timesteps, prompt_embeds.to(dtype), pooled.to(dtype),
                                   time_ids.to(dtype), self.guidance)


# ----------------------------------------------------------------------------------------------------------------
# Validation images


def validation_pipeline(args, family, model, vae, tokenizers, text_encoders, noise_scheduler, denoiser=None):
    """The family's pipeline around the in-memory models (nothing loads but the pipeline's config); `denoiser`: the
    preview model's instead of the trained one."""
    trained = {name: getattr(model, name) for name in model.text_encoder_names}
    return loading.load_pipeline(args.pretrained_model_name_or_path, args.revision, device=None, vae=vae,
                                  scheduler=loading.make_scheduler(args.validation_scheduler, noise_scheduler.config),
                                  **{family.denoiser: denoiser or model.denoiser},
                                  **dict(zip(family.tokenizers, tokenizers)),
                                  **{**text_encoders, **trained})


def log_validation(accelerator, args, family, pipe, embeddings, step):
    """Sample the validation prompts at fixed seeds (image j of every prompt has the same seed at every step, so the
    images are comparable across steps); a PNG grid in output_dir/validation and images in the trackers. Its random
    draws come from its own generators inside fork_rng, so the training random state is untouched: the same command
    with and without validation trains the same weights."""
    n, rows, negative = args.num_validation_images, [], args.validation_negative_prompt
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
        guidance = families.guidance_arguments(family, getattr(pipe, family.denoiser).config,
                                               args.validation_guidance_scale, negative, n)
        negatives = guidance.pop("negative_prompt", None)
        for prompt in args.validation_prompt:
            text = dict(prompt=[prompt] * n, **({"negative_prompt": negatives} if negatives else {}))
            if embeddings:  # pre-computed: the text encoders are not on the accelerator
                text = {}
                for key, p in (("", prompt), ("negative_", negative or "")):
                    embeds, pooled = (e.expand(n, *e.shape).to(accelerator.device) for e in embeddings[p])
                    if key and not negative and pipe.config.get("force_zeros_for_empty_prompt"):
                        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)  # as the pipeline does
                    text.update(family.embedding_arguments(embeds, pooled, key))
            if family.sequence_tokenizer:  # T5's prompt length as in training
                text["max_sequence_length"] = args.max_sequence_length
            text.update(families.encoding_arguments(family, vars(args)))  # FLUX.2 klein's layers, as in training
            rows.append(pipe(**text, **guidance, num_inference_steps=args.validation_inference_steps,
                             height=args.resolution, width=args.resolution,
                             generator=[torch.Generator().manual_seed(imagedata.image_seed(args.seed, j)) for j in range(n)]).images)
    Path(args.output_dir, "validation").mkdir(parents=True, exist_ok=True)
    imagedata.grid(sum(rows, []), columns=n).save(Path(args.output_dir, "validation", f"step-{step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for r, images in enumerate(rows):
                tracker.writer.add_images(f"validation/{r}", np.stack([np.asarray(im) for im in images]), step,
                                          dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{j}: {prompt}") for prompt, images in
                                        zip(args.validation_prompt, rows) for j, im in enumerate(images)]}, step=step)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the whole training state through accelerate, so that a resumed run is bit-identical to one that was
# never interrupted (same batches, same noise, same weights)


class Averager:
    """--use_ema: the exponential moving average of the trained weights (diffusers' EMAModel: fp32, its warm-up),
    taken after every optimizer step and saved in checkpoints (register_for_checkpointing), so a resume is exact;
    `applied()` swaps it into the model for validation, exports and the result. Without --use_ema it does nothing,
    so the loop reads the same either way."""

    def __init__(self, params, args):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=args.ema_warmup) if args.use_ema else None

    def step(self):
        if self.ema:
            self.ema.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        if self.ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            yield
        finally:
            if self.ema:
                self.ema.restore(self.params)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


class TrainState:
    """Where the loop is. Saved in every checkpoint by accelerate's register_for_checkpointing, beside the model,
    optimizer, schedule, gradient scaler and the random state of every process."""

    def __init__(self):
        self.global_step, self.epoch, self.batches_in_epoch = 0, 0, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def changed_settings(saved, current):
    """Settings that differ from the checkpoint's record, leaving out the flag groups that cannot change the weights."""
    harmless = {a.dest for g in build_parser()._action_groups if g.title in RESUME_HARMLESS_GROUPS for a in g._group_actions}
    return sorted(k for k in current if k not in harmless | {"config"} and k in saved and saved[k] != current[k])


# ----------------------------------------------------------------------------------------------------------------


def param_groups(args, model):
    """The UNet's and the text encoders' trained parameters as two optimizer groups when they differ: the text
    encoders' at --text_encoder_lr, and pivotal tuning's embedding matrix without weight decay (its frozen rows must
    not shrink). Otherwise one group, as before."""
    params = [p for p in model.parameters() if p.requires_grad]
    text = {id(p) for name in model.text_encoder_names for p in getattr(model, name).parameters()}
    if not (args.text_encoder_lr or args.train_text_encoder_ti) or not any(id(p) in text for p in params):
        return params
    return [{"params": [p for p in params if id(p) not in text]},
            {"params": [p for p in params if id(p) in text], "lr": args.text_encoder_lr or args.learning_rate,
             **({"weight_decay": 0.0, "frozen_rows": True} if args.train_text_encoder_ti else {})}]


def make_optimizer(args, params):
    """AdamW, bitsandbytes' 8-bit AdamW, or Prodigy (Mishchenko & Defazio 2023), which estimates its own step size:
    its learning rate is a multiplier, 1.0 as usual. Each keeps its state in the optimizer's state dict, which
    accelerate checkpoints, so a resume is exact."""
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=args.learning_rate, beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                       use_bias_correction=args.prodigy_use_bias_correction,
                       safeguard_warmup=args.prodigy_safeguard_warmup, **adam)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=args.learning_rate, **adam)
        for group in optimizer.param_groups:  # an 8-bit state block shared with a new row would move frozen rows
            if group.get("frozen_rows"):
                bnb.optim.GlobalOptimManager.get_instance().override_config(group["params"], "optim_bits", 32)
        return optimizer
    return torch.optim.AdamW(params, lr=args.learning_rate, **adam)


def load_models(args, accelerator, family):
    """Tokenizers, the objective, text encoders and VAE through from_pretrained: the VAE frozen, the text encoders
    trained with --train_text_encoder. The denoiser and the adapters come after the caches (load_denoiser)."""
    import transformers
    from transformers import AutoTokenizer

    model, kw = args.pretrained_model_name_or_path, dict(revision=args.revision)
    tokenizers = [loading.from_pretrained(AutoTokenizer, model, subfolder=sub, **kw) for sub in family.tokenizers]
    if args.tokenizer_name:
        tokenizers[0] = loading.from_pretrained(AutoTokenizer, args.tokenizer_name, **kw)
    if family.sequence_tokenizer:  # T5's prompt length (--max_sequence_length)
        tokenizers[family.tokenizers.index(family.sequence_tokenizer)].model_max_length = args.max_sequence_length
    # the objective comes with the model: its row names it, its scheduler config sets it up (DDPM for SD 1.x/2.x and
    # SDXL, flow matching with the scheduler's shift for FLUX.1 and SD 3.5)
    objective = objectives.load(model, family, args.revision, args.snr_gamma, args.offset_noise, flow={
        **{k: getattr(args, k) for k in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                                         "precondition_outputs")}, "patch_size": family.patch_size})
    kw["variant"] = args.variant
    # important! Frozen weights load in the half-precision weight dtype; trained ones stay fp32, or the fp16 grad
    # scaler fails with "Attempting to unscale FP16 gradients". With LoRA the base weights are frozen (half precision)
    # and only the adapters train (fp32).
    weight_dtype = loading.torch_dtype(accelerator.mixed_precision)
    lora, trained = args.lora_rank > 0, args.trained_text_encoders
    # a quantized base: the denoiser, and the text encoders when they run in the training step (pre-computed ones run
    # once, at the training precision, and are freed); the run records which
    args.quantized_modules = [family.denoiser, *([] if args.pre_compute_text_embeddings else family.text_encoder_names)] \
        if args.quantization else []
    quantized = loading.quantized(args.quantization, weight_dtype, accelerator.device, transformers.BitsAndBytesConfig)
    text_encoders = {name: loading.from_pretrained(getattr(transformers, cls), model, subfolder=name, **kw,
                                                    dtype=torch.float32 if name in trained and not lora else weight_dtype,
                                                    **(quantized if name in args.quantized_modules else {}))
                     for name, cls in family.text_encoders}
    # important! SDXL's own VAE overflows in fp16: fp32 then, as its pipeline does (or give an fp16-safe VAE)
    vae = loading.load_vae(model, args.pretrained_vae_model_name_or_path, args.revision, args.variant, weight_dtype,
                           family.upcast_vae, family.vae_class)
    vae.requires_grad_(False).eval().to("cpu" if args.offload else accelerator.device)  # --offload: on the device
    for name, encoder in text_encoders.items():  # only while it works (text encoders: while pre-computing)
        encoder.requires_grad_(name in trained and not lora)
        if name not in trained:
            encoder.eval().to("cpu" if args.offload and args.pre_compute_text_embeddings else accelerator.device)
    if args.train_text_encoder_ti:
        families.add_new_tokens(tokenizers, text_encoders.values(), args.new_tokens, args.initializer_concept)
    if args.gradient_checkpointing:
        for encoder in [text_encoders[name] for name in trained]:
            # transformers 5 renamed gradient_checkpointing_enable; take whichever this version has
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
    return tokenizers, objective, text_encoders, vae


def load_denoiser(args, accelerator, family, text_encoders):
    """The denoiser, trained (or its LoRA adapters, then the trained text encoders' adapters), with the run's memory and
    speed options. Loaded after the caches: a quantized (or fp8) one goes to the device as it loads, and the text
    encoders that pre-computed the prompts have left it by then, so the two never share the device."""
    import diffusers
    from diffusers.training_utils import cast_training_params

    weight_dtype, lora = loading.torch_dtype(accelerator.mixed_precision), args.lora_rank > 0
    quantized = loading.quantized(args.quantization, weight_dtype, accelerator.device, diffusers.BitsAndBytesConfig)
    denoiser = loading.from_pretrained(getattr(diffusers, family.denoiser_class), args.pretrained_model_name_or_path,
                                       subfolder=family.denoiser, revision=args.revision, variant=args.variant,
                                       dtype=weight_dtype if lora else torch.float32, **quantized)
    denoiser.requires_grad_(not lora)
    if args.do_fp8_training:  # before the adapters: they wrap the fp8 layers and stay in the training precision
        loading.to_fp8(denoiser.to(accelerator.device))
    if lora:
        families.add_lora(denoiser, vars(args), args.lora_target_modules)
        for name in args.trained_text_encoders:
            families.add_lora(text_encoders[name], vars(args), families.TEXT_ENCODER_LORA_TARGETS)
        cast_training_params([denoiser, *text_encoders.values()], dtype=torch.float32)  # the adapters train in fp32
    if args.train_text_encoder and family.freeze_unread:
        family.freeze_unread(text_encoders)  # SDXL: layers of the first encoder that never reach the loss
    if args.enable_xformers_memory_efficient_attention:
        loading.enable_xformers(denoiser)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if args.compile:
        denoiser.compile()  # in place: the state dict keeps its keys for checkpoints and saving
    return denoiser


def make_accelerator(args):
    """The Accelerator, seeded with the run's seed: each process draws its own noise and timesteps (seed + process
    index)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # the text encoders' parameters stop getting gradients at --train_text_encoder_frac: DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder_frac < 1)],
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)),
        # the shuffle order of epoch e is a function of (data seed, e) alone: a resumed run can replay it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.data_seed))
    cli.check_deepspeed(accelerator, args.use_8bit_adam)
    runs.hold_output_dir(accelerator, args.output_dir)  # before anything in it is written or removed
    set_seed(args.seed, device_specific=True)
    if args.overwrite_output_dir and not args.resume_from_checkpoint and accelerator.is_main_process:
        for _, stale in runs.list_checkpoints(args.output_dir):  # or `latest` and the rotation would mix two runs
            cli.note(f"--overwrite_output_dir: removing {stale} of an earlier run")
            shutil.rmtree(stale)
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32  # off is PyTorch's default; no effect without CUDA
    return accelerator


def resume(accelerator, args, config, params, state):
    """--resume_from_checkpoint: the whole training state, with a note on settings that changed since."""
    changed = changed_settings(args.resume_record["config"], config)
    if changed:
        cli.note(f"resuming with changed settings ({', '.join(changed)}): the result will differ from an "
                "uninterrupted run")
    try:
        accelerator.load_state(args.resume_from_checkpoint)
    except Exception as e:
        made_from = args.resume_record["config"].get("pretrained_model_name_or_path")
        if made_from != args.pretrained_model_name_or_path:
            cli.fail(f"checkpoint {args.resume_from_checkpoint} was made from the model {made_from}, not "
                    f"{args.pretrained_model_name_or_path}: resume with that model ({cli.first_line(e, 120)})")
        cli.fail(f"cannot load checkpoint {args.resume_from_checkpoint}: {cli.first_line(e)}")
    # important! the loaded weights are copied into the fp32 trainable parameters: fp16 grads can't appear
    assert all(p.dtype == torch.float32 for p in params)
    accelerator.print(f"resumed from {args.resume_from_checkpoint} at step {state.global_step}")


def make_data(args, accelerator, subjects, tokenizers, family, vae, text_encoders):
    """The dataset, with the optional caches (then the VAE and the text encoders have nothing left to do in a step),
    and its loader. important! The loader gets its own generator: by default each new iterator draws a seed from
    the global torch RNG, and a resumed run (which starts a new iterator mid-epoch) would then draw different noise.
    With buckets, a batch sampler keeps each batch to one size (with its own (data seed, epoch) order)."""
    buckets = imagedata.bucket_sizes(args.aspect_ratio_buckets, args.resolution) if args.aspect_ratio_buckets else None
    dataset = imagedata.DreamBoothDataset(subjects, tokenizers, args.resolution, args.center_crop, args.random_flip,
                                          args.data_seed, buckets, family.tokenize, args.caption_dropout)
    if args.cache_latents:
        with loading.offloaded([vae], accelerator.device, args.offload):
            imagedata.cache_latents(dataset, family.encode_images, vae, accelerator.device, accelerator.is_local_main_process)
        if not args.validation_prompt:  # validation still decodes with it
            vae.to("cpu")
    if args.pre_compute_text_embeddings:
        prompts = [p for images, _, _ in subjects for _, p, _ in images] + [prompt for _, paths, prompt in subjects if paths]
        prompts += (args.validation_prompt or []) + [args.validation_negative_prompt or ""] + [""]  # "": dropout
        with loading.offloaded(text_encoders.values(), accelerator.device, args.offload):
            imagedata.cache_embeddings(dataset, prompts, families.prompt_encoder(family, vars(args)),
                                       list(text_encoders.values()), accelerator.device)
        for encoder in text_encoders.values():
            encoder.to("cpu")
    batching = (dict(batch_sampler=imagedata.BucketBatchSampler(dataset, args.train_batch_size, args.data_seed))
                if buckets else dict(batch_size=args.train_batch_size, shuffle=True))
    dataloader = torch.utils.data.DataLoader(dataset, collate_fn=imagedata.collate, num_workers=args.dataloader_num_workers,
                                             pin_memory=accelerator.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(args.data_seed), **batching)
    return dataset, dataloader


def plan(args, num_batches, num_processes):
    """What follows from the data and the launch: the global batch, the learning rates (--scale_lr), the number of
    optimizer steps and epochs, when the text encoders freeze, and the validation interval (--validation_epochs).
    Steps per epoch count after sharding across processes."""
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    steps_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scale = global_batch if args.scale_lr else 1
    return {"global_batch_size": global_batch, "total_optimizer_steps": max_train_steps,
            "num_epochs": math.ceil(max_train_steps / steps_per_epoch),
            "learning_rate": args.learning_rate * scale, "text_encoder_lr": args.text_encoder_lr and args.text_encoder_lr * scale,
            "text_encoder_steps": max(1, round(args.train_text_encoder_frac * max_train_steps)),  # then they freeze
            "validation_steps": args.validation_epochs * steps_per_epoch if args.validation_epochs else args.validation_steps}


def run_config(args, accelerator, model, objective, instances, class_paths, dataset):
    """The resolved config the run records (run_config.json, the trackers, every checkpoint): every flag as resolved,
    plus what the data and the model made of them."""
    unwrapped = accelerator.unwrap_model(model)
    config = {**vars(args), "num_instance_images": len(instances), "num_class_images_used": len(class_paths),
              "num_processes": accelerator.num_processes, "mixed_precision_resolved": accelerator.mixed_precision,
              "distributed_type": accelerator.distributed_type.value,
              "text_encoder_steps": min(args.text_encoder_steps, args.total_optimizer_steps) * unwrapped.train_text_encoder,
              "prediction_type": objective.prediction_type, "trainable_parameters": unwrapped.trainable_parameters(),
              "instance_images": [str(image) if isinstance(image, Path) else f"{args.dataset_name}[{i}]"
                                  for i, (image, _, _) in enumerate(instances)],
              "masks": [str(mask) for _, _, mask in instances if mask],
              "buckets": {f"{h}x{w}": n for (h, w), n in sorted(Counter(sum(dataset.sizes, [])).items())}
              if args.aspect_ratio_buckets else None}
    del config["resume_record"]
    return config


def banner(args, accelerator, family, photos, config):
    data = imagedata.data_summary(args.subjects, args.mask_background_weight, photos, config)
    accelerator.print(
        f"DreamBooth: {family.pipeline.removesuffix('Pipeline')}, {data}, "
        f"{accelerator.num_processes} process(es), global batch {args.global_batch_size} "
        f"({args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes}), "
        f"{args.total_optimizer_steps} optimizer steps, {config['trainable_parameters']:,} trainable parameters, "
        f"mixed precision {accelerator.mixed_precision}, {config['prediction_type']} target"
        + (f", text encoder(s) frozen after step {args.text_encoder_steps}" if args.train_text_encoder_frac < 1 else "")
        + (f", pivotal tuning: '{args.token_abstraction}' is {''.join(args.new_tokens)}" if args.new_tokens else ""))


def save_result(accelerator, args, model, averager, record):
    """The pipeline (the trained modules in fp32; the frozen ones re-read from the base model) or the adapters; with
    --use_ema the average, and with --save_raw_weights the raw weights as well in raw/; the model card; the upload."""
    accelerator.wait_for_everyone()
    name = Path(args.output_dir).resolve().name
    if args.use_ema and args.save_raw_weights:
        trained = export.trained_weights(accelerator, args, model)
        if accelerator.is_main_process:
            export.save_weights(args, Path(args.output_dir, "raw"), torch.float32, trained, f"{name}-raw",
                                accelerator.unwrap_model(model).token_embeddings())
    with averager.applied():
        trained = export.trained_weights(accelerator, args, model)
        if accelerator.is_main_process:
            export.save_weights(args, args.output_dir, torch.float32, trained, name,
                                accelerator.unwrap_model(model).token_embeddings())
    if accelerator.is_main_process:
        export.model_card(args.output_dir, record["config"]).save(Path(args.output_dir, "README.md"))
        accelerator.print(f"saved the fine-tuned {'LoRA adapters' if args.lora_rank else 'pipeline'} to {args.output_dir}")
        if args.push_to_hub:
            export.push_to_hub(args.output_dir, args.hub_model_id or name, args.hub_token, args.logging_dir)


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    check_args(args)
    photos = load_subjects(args)

    from diffusers.optimization import get_scheduler

    accelerator = make_accelerator(args)

    # ---- class images for prior preservation, each subject its own
    subjects = [(images, generate_priors.training_class_images(args, accelerator, subject), subject["class_prompt"])
                for subject, images in zip(args.subjects, photos)]
    instances = [photo for images in photos for photo in images]
    class_paths = [path for _, paths, _ in subjects for path in paths]

    # ---- models (VAE frozen, denoiser trained, text encoders trained or frozen) and the objective, from the family row
    family = families.FAMILIES[args.model_family]
    tokenizers, objective, text_encoders, vae = load_models(args, accelerator, family)

    # ---- data; then what follows from it joins the resolved config (the schedule, --scale_lr, --validation_epochs)
    dataset, dataloader = make_data(args, accelerator, subjects, tokenizers, family, vae, text_encoders)
    denoiser = load_denoiser(args, accelerator, family, text_encoders)
    vars(args).update(plan(args, len(dataloader), accelerator.num_processes))
    model = DreamBoothModel(family, denoiser, {} if args.pre_compute_text_embeddings else text_encoders,
                            args.trained_text_encoders or (family.text_encoder_names if args.train_text_encoder_ti else []),
                            [t.convert_tokens_to_ids(args.new_tokens) for t in tokenizers] if args.new_tokens else [],
                            args.guidance_scale, families.prompt_encoder(family, vars(args)))

    # ---- optimizer, schedule, accelerate; the checkpoints' contents
    optimizer = make_optimizer(args, param_groups(args, model))
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.total_optimizer_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    params = [p for p in model.parameters() if p.requires_grad]  # after prepare: FSDP2 replaces them with shards
    runs.diffusers_checkpoints(accelerator, family, args.lora_rank > 0,  # checkpoint-N/unet, as diffusers has it
                               [family.denoiser, *args.trained_text_encoders])
    state, averager = TrainState(), Averager(params, args)
    accelerator.register_for_checkpointing(state)
    if args.use_ema:
        accelerator.register_for_checkpointing(averager)

    # ---- the run records itself
    config = run_config(args, accelerator, model, objective, instances, class_paths, dataset)
    record = runs.run_record(config, __file__)
    if args.resume_from_checkpoint:
        resume(accelerator, args, config, params, state)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.resume_from_checkpoint:  # records of versions that wrote secrets in plain text
            runs.scrub_records(args.output_dir, Path(args.resume_from_checkpoint).parent)
        runs.write_json(Path(args.output_dir, "run_config.json"), record)
        runs.save_code(args.output_dir, __file__)
        runs.start_trackers(accelerator, args, record)

    previews = {}  # --validation_model_path's denoiser, loaded at the first validation

    def validate(step):  # on the main process only; the others wait at the next collective
        if args.validation_prompt and accelerator.is_main_process:
            model.eval()
            with averager.applied():
                trained = accelerator.unwrap_model(model)
                preview = (loading.preview_denoiser(args, family, trained.denoiser, previews)
                           if args.validation_model_path else None)
                pipe = validation_pipeline(args, family, trained, vae, tokenizers, text_encoders, objective.scheduler,
                                           preview)
                with loading.offloaded([vae], accelerator.device, args.offload):
                    log_validation(accelerator, args, family, pipe, dataset.embeddings, step)
            if preview is not None:
                preview.to("cpu")
            model.train()

    encode = model_calls.latent_sampler(family.encode_images, vae, args.cache_latents)
    # ---- training loop. Signals are caught from before the banner: one may come as soon as the run says it started
    with runs.stop_requests() as stop_signals:
        if accelerator.is_main_process:  # notes on the data plan as a whole, before the banner
            imagedata.note_data_plan(args.subjects, photos, args.resolution, args.total_optimizer_steps,
                                     args.global_batch_size)
        banner(args, accelerator, family, photos, config)
        if state.global_step == 0:
            validate(0)  # the base model's images: the baseline the later ones are compared with
        images_per_step = args.global_batch_size * (2 if class_paths else 1)
        progress = tqdm(total=args.total_optimizer_steps, initial=state.global_step, desc="steps",
                        disable=not accelerator.is_local_main_process)
        window, grad_norm = runs.Window(accelerator.device), None
        for epoch in range(state.epoch, args.num_epochs):
            if state.global_step >= args.total_optimizer_steps:
                break
            state.epoch = epoch
            dataset.set_epoch(epoch)
            model.train()
            # the epoch's batch order is a function of (seed, epoch); a resumed run skips the batches already used
            loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch) if state.batches_in_epoch else dataloader
            loader.set_epoch(epoch)
            for batch in loader:
                if state.global_step >= args.text_encoder_steps:  # --train_text_encoder_frac (a resumed run too)
                    accelerator.unwrap_model(model).freeze_text_encoders()
                state.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    # encode: images -> latents with the frozen VAE (or from the cache)
                    with torch.no_grad(), loading.offloaded([vae], accelerator.device, args.offload and not args.cache_latents):
                        latents = family.prepare_latents(encode(batch["images"]).float(), vae)  # fp32 from here
                    # the objective's draw: noisy latents at random timesteps, the target, per-example weights
                    draw = objective.draw(latents)
                    # predict and compare: instance loss + lambda * prior loss (masked photos: the background weighs less)
                    model_pred = draw.prediction(model(draw.noisy_latents, draw.timesteps, batch["texts"], batch["time_ids"]))
                    pixel_weights = (objectives.mask_weights(batch["masks"], latents.shape[-2:], args.mask_background_weight)
                                     if "masks" in batch else None)
                    num_instance = latents.shape[0] // 2 if class_paths else latents.shape[0]
                    losses = dict(zip(objectives.LOSSES, objectives.dreambooth_loss(model_pred, draw.target, num_instance,
                                                                         args.prior_loss_weight, draw.weights, pixel_weights)))
                    # backward and update (accelerate skips the update until the last micro-batch of a step)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=args.set_grads_to_none)
                    window.add(losses)
                if not accelerator.sync_gradients:
                    continue
                # ---- end of an optimizer step; every --logging_steps the window's means go to the trackers
                state.global_step += 1
                window.step_done()
                progress.update(1)
                stop = False
                if state.global_step % args.logging_steps == 0 or state.global_step >= args.total_optimizer_steps:
                    means = window.means(accelerator, bool(stop_signals))
                    logs = {"loss": means["loss"], "instance_loss": means["instance_loss"],
                            "lr": lr_scheduler.get_last_lr()[0], "seconds_per_step": means["seconds_per_step"],
                            "images_per_second": images_per_step / means["seconds_per_step"]}
                    if torch.cuda.is_available():
                        logs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    if class_paths:
                        logs["prior_loss"] = means["prior_loss"]
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    accelerator.log(logs, step=state.global_step)
                    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                    stop = means["stop"] > 0
                # ---- validation images, checkpoint, export, stop
                averager.step()
                if state.global_step % args.validation_steps == 0:
                    validate(state.global_step)
                if state.global_step % args.checkpointing_steps == 0 or stop:
                    checkpoint = runs.save_checkpoint(accelerator, args, state, record)
                if args.export_steps and state.global_step % args.export_steps == 0:
                    with averager.applied():
                        export.export_pipeline(accelerator, args, model, state.global_step)
                if stop:
                    progress.close()
                    accelerator.print(f"stopped by {stop_signals[0] if stop_signals else 'a signal to another process'} "
                                      f"after step {state.global_step}; the training state is in {checkpoint}. "
                                      "Continue with the same command plus --resume_from_checkpoint latest")
                    accelerator.end_training()
                    runs.release_output_dir(args.output_dir)
                    return
                window.t0 = time.perf_counter()
                if state.global_step >= args.total_optimizer_steps:
                    break
            state.batches_in_epoch = 0
        progress.close()
        if state.global_step % args.validation_steps:
            validate(state.global_step)  # the final model's images

    # ---- save the result
    save_result(accelerator, args, model, averager, record)
    accelerator.end_training()
    runs.release_output_dir(args.output_dir)


if __name__ == "__main__":
    cli.run(main)
