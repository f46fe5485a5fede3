"""Generate images from a fine-tuned DreamBooth model: a training output folder, an export (export-N), a training
checkpoint (checkpoint-N), a LoRA run's folder (the base model of a checkpoint or LoRA run is read from its
run_config.json), or any Stable Diffusion 1.x/2.x or SDXL pipeline folder or hub id, optionally with --lora adapters.

    python infer.py --pretrained_model_name_or_path sks-dog --prompt "a photo of sks dog on the moon" --seed 0

Image j of each prompt uses its own generator seeded from (--seed, j) and is always made in batch j // --batch_size,
so `--image_index j` with the same command makes that one image again, byte for byte. Each PNG carries its settings
in a `parameters` text chunk (the format AUTOMATIC1111 and Civitai read) and as JSON in a `dreambooth` chunk.
"""

import contextlib
import json
import os
import re
import time
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import cli
import families
import loading
import imagedata
import runs


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    return cli.parse_args_with_config(build_parser(), argv)


def build_parser():
    p = cli.ArgumentParser(__doc__, __file__)
    g = cli.add_model_args(p, "the model to sample: a training output folder, an export, a checkpoint, or any pipeline "
                             "folder or hub id")
    g.add_argument("--lora", default=None, help="LoRA weights (a file, or a folder with pytorch_lora_weights.safetensors)")
    g.add_argument("--lora_scale", type=cli.number(float), default=1.0, help="strength of the LoRA adapters (0: the base model)")
    g.add_argument("--fuse_lora", action="store_true", help="fuse the adapters into the weights (faster sampling)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="prompt; repeat the flag for several")
    g.add_argument("--prompts_file", default=None, help="a text file of prompts, one a line (after any --prompt)")
    g.add_argument("--negative_prompt", default=None, help="negative prompt of every image")
    g.add_argument("--num_images_per_prompt", type=cli.COUNT, default=4, help="images of each prompt")
    g.add_argument("--seed", type=cli.NATURAL, default=0, help="image j of a prompt uses a generator seeded from (seed, j)")
    g.add_argument("--image_index", type=cli.NATURAL, action="append", default=None,
                   help="make only image j of each prompt (repeatable); the same bytes as in the full run")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=cli.COUNT, default=None,
                   help="sampling steps (default: 30; 28 FLUX.1 dev and SD 3.5, 4 FLUX.1 schnell)")
    g.add_argument("--guidance_scale", type=cli.NONNEGATIVE, default=None,
                   help="guidance scale (default: 7.5; FLUX.1 dev's embedded guidance 3.5, none for schnell, 7.0 SD 3.5)")
    g.add_argument("--scheduler", default=None, choices=sorted(loading.SCHEDULERS), help="sampler (default: the model's own)")
    g.add_argument("--height", type=cli.SIZE, default=None, help="default: the model's")
    g.add_argument("--width", type=cli.SIZE, default=None, help="default: the model's")
    g.add_argument("--batch_size", type=cli.COUNT, default=4, help="images per forward pass")
    g = p.add_argument_group("device and memory")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--cpu_threads", type=cli.COUNT, default=None,
                   help="threads on a CPU (default: OMP_NUM_THREADS, else half the cores: other work does not starve it)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, else fp32")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention (CUDA only)")
    g.add_argument("--attention_slicing", action="store_true", help="compute attention in slices (less memory, slower)")
    g.add_argument("--cpu_offload", action="store_true", help="keep models on the CPU, each moved to the GPU when used")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first batch, faster after)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="samples", help="where the PNGs go")
    g.add_argument("--grid", action="store_true", help="also write a grid image of each prompt's images")
    return p


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8-sig")  # a byte-order mark is not the prompt's
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            cli.fail(f"cannot read prompts file {args.prompts_file}: {e.strerror if isinstance(e, OSError) else e}")
        if len(prompts) == len(args.prompt):
            cli.fail(f"prompts file {args.prompts_file} has no prompts")
    if not prompts:
        cli.fail("give --prompt (repeatable) or --prompts_file")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Models: a pipeline (folder or hub id), or a training checkpoint on top of the base model it was trained from


def base_of(path, config):
    base = config["pretrained_model_name_or_path"]
    if not loading.HUB_ID.match(base) and not Path(base).is_dir():
        cli.fail(f"the base model of {path}, {base} (from its run_config.json), is not found")
    loading.check_model_source(base, config.get("revision"))
    return config


def check_model(args):
    """What the model path is, checked before anything loads: ("pipeline", name), ("checkpoint", run config) or
    ("lora", run config); and that --lora, if given, exists."""
    if args.lora and not Path(args.lora).exists():
        cli.fail(f"LoRA weights not found: {args.lora}")
    if args.lora and Path(args.lora).is_dir() and not (Path(args.lora) / families.LORA_WEIGHTS).is_file():
        cli.fail(f"LoRA folder {args.lora} has no {families.LORA_WEIGHTS}")
    path = Path(args.pretrained_model_name_or_path).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        if ((path / "model.safetensors").is_file() or any((path / d).is_dir() for d in families.DENOISERS)) \
                and (path / "run_config.json").is_file():
            return "checkpoint", base_of(path, runs.check_checkpoint(path)["config"])
        if (path / families.LORA_WEIGHTS).is_file() and (path / "run_config.json").is_file():
            if args.lora:
                cli.fail(f"{path} is a LoRA run already; give its base model with --lora, or leave --lora out")
            args.lora = str(path)
            return "lora", base_of(path, json.loads((path / "run_config.json").read_text())["config"])
        checkpoints = runs.list_checkpoints(path)
        if checkpoints:
            cli.fail(f"{path} holds no pipeline yet (the run has not finished); its newest checkpoint is {checkpoints[-1][1]}")
        cli.fail(f"{path} is neither a diffusers pipeline folder (no model_index.json) nor a training checkpoint")
    return "pipeline", loading.check_model_source(args.pretrained_model_name_or_path, args.revision, args.single_file_config)


def run_records(args):
    """(folder, run config) of the run folders (or exports, or checkpoints) given as the model or as --lora; the config
    is {} where no run_config.json is in the folder or beside it."""
    for folder in dict.fromkeys([Path(args.pretrained_model_name_or_path)] + ([Path(args.lora)] if args.lora else [])):
        folder = folder if folder.is_dir() else folder.parent
        record = next((r for r in (folder / "run_config.json", folder.parent / "run_config.json") if r.is_file()), None)
        yield folder, json.loads(record.read_text())["config"] if record else {}


def check_run_family(args, family):
    """Adapters or new tokens of a run go on a model of the family they were trained on (the run's record says which),
    or one line instead of a size-mismatch traceback."""
    for folder, config in run_records(args):
        trained = families.family_of_record(config) if config else family
        if trained is not family and (config.get("lora_rank") or config.get("train_text_encoder_ti")):
            cli.fail(f"{folder} was trained on a {trained.pipeline} ({config['pretrained_model_name_or_path']}); the model "
                     f"here is a {family.pipeline}: give a model of that family")


def find_token_embeddings(args):
    """Pivotal tuning's embeddings file and its record, from the run folder (or export, or checkpoint) given as the
    model or as --lora: (file, run config), or None when the run had no new tokens."""
    for folder, config in run_records(args):
        if config.get("train_text_encoder_ti"):
            files = sorted(folder.glob(families.EMBEDDINGS.format(name="*")))
            if len(files) != 1:
                cli.fail(f"{folder} was trained with pivotal tuning but holds {len(files)} *_emb.safetensors files, not 1")
            return files[0], config
    return None


def load_model(args, kind, source, dtype, device):
    if kind == "pipeline":
        pipe = loading.load_pipeline(source, args.revision, args.variant, dtype, device, args.pretrained_vae_model_name_or_path)
    else:
        pipe = loading.load_pipeline(source["pretrained_model_name_or_path"], source["revision"], source["variant"], dtype,
                                device, args.pretrained_vae_model_name_or_path or source.get("pretrained_vae_model_name_or_path"))
    if kind == "checkpoint":
        from safetensors.torch import load_file

        # the trained models in diffusers' layout (checkpoint-N/unet, text_encoder...), or, from older versions, as
        # accelerate saved them: "unet.*", "text_encoder.*", "text_encoder_2.*" with any LoRA adapters in place
        folder, family = Path(args.pretrained_model_name_or_path), families.family_of(pipe)
        if (folder / family.denoiser).is_dir():
            for name in [n for n in (family.denoiser, *family.text_encoder_names) if (folder / n).is_dir()]:
                getattr(pipe, name).load_state_dict(families.module_keys(
                    {k: v for f in sorted((folder / name).glob("*.safetensors")) for k, v in load_file(f).items()},
                    getattr(pipe, name)))
                getattr(pipe, name).to(device, dtype)
            state = {}
        else:
            state = load_file(folder / "model.safetensors")
        for name in sorted({k.split(".")[0] for k in state}):
            module = getattr(pipe, name)
            if source.get("lora_rank") and (name == family.denoiser or source["train_text_encoder"]):
                families.add_lora(module, source, source["lora_target_modules"] if name == family.denoiser
                                  else families.TEXT_ENCODER_LORA_TARGETS)
            module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            module.to(device, dtype)  # the injected adapters start in fp32
    if args.lora:
        folder, name = (args.lora, families.LORA_WEIGHTS) if Path(args.lora).is_dir() else (str(Path(args.lora).parent), Path(args.lora).name)
        try:
            with quiet_missing_text_encoder_adapters():
                pipe.load_lora_weights(folder, weight_name=name, adapter_name="dreambooth")
        except RuntimeError as e:  # adapters of another model's layer sizes (another family, or SD 1.x on SD 2.x)
            if not (mismatch := re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^]]*\])\)"
                                          r".*?current model is torch.Size\((\[[^]]*\])\)", str(e))):
                raise
            cli.fail(f"the LoRA {args.lora} does not fit {args.pretrained_model_name_or_path}: its adapters are "
                     f"shaped for another model's layers ({mismatch[1]}: {mismatch[2]}, the model's {mismatch[3]}); a "
                     "LoRA goes on a model of the family and size it was trained on")
        except (ValueError, KeyError, OSError) as e:
            cli.fail(f"cannot load LoRA weights {args.lora}: {cli.first_line(e)}")
        if args.fuse_lora:
            pipe.fuse_lora(lora_scale=args.lora_scale)
        else:
            pipe.set_adapters(["dreambooth"], adapter_weights=[args.lora_scale])
    return pipe


@contextlib.contextmanager
def quiet_missing_text_encoder_adapters():
    """diffusers warns "No LoRA keys associated to CLIPTextModel found ... open an issue" for every LoRA without
    text-encoder adapters (most of them, the demo's included): expected, so not shown; nor its log of a load error
    that infer.py then names in one line."""
    import logging

    def expected(record):  # and the error diffusers logs before raising it: the caller names it in one line
        return not record.getMessage().startswith(("No LoRA keys associated to", "Loading dreambooth was unsuccessful"))

    loggers = [logging.getLogger(f"diffusers.loaders.{name}") for name in ("lora_base", "peft", "lora_pipeline")]
    for logger in loggers:
        logger.addFilter(expected)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(expected)


def warn_if_truncated(tokenizer, prompt, which):
    """CLIP reads 77 tokens; say which words of a longer prompt it never sees (in place of transformers' warning of
    "indexing errors", which the pipeline's own untruncated tokenization would print: there are none, it truncates)."""
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids = tokenizer(prompt, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        cut = tokenizer.decode(ids[limit - 1:-1])  # keep the start token and the end token out of the cut part
        cli.note(f"{which} is longer than the text encoder's {limit} tokens; this part is cut: '{cut}'")


# diffusers' schedulers under the names AUTOMATIC1111 writes (and Civitai and the other UIs read)
A1111_SAMPLERS = {"DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "EulerDiscreteScheduler": "Euler",
                  "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
                  "UniPCMultistepScheduler": "UniPC", "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun",
                  "FlowMatchEulerDiscreteScheduler": "Euler"}  # Forge's name for FLUX's sampler


def a1111_sampler(scheduler):
    name = A1111_SAMPLERS.get(scheduler.__class__.__name__, scheduler.__class__.__name__)
    return name + (" Karras" if scheduler.config.get("use_karras_sigmas") else "")


def model_hash(model):
    """AUTOMATIC1111's "Model hash" (the first 10 hex digits of the file's sha256), when the model is a single file or
    a folder holding one of its own name (`--save_single_file`); None otherwise."""
    import hashlib

    path = Path(model)
    path = path if path.is_file() else path / f"{path.resolve().name}.safetensors"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def a1111_parameters(prompt, negative_prompt, steps, sampler, cfg, seed, index, width, height, model, lora=None,
                     hash_=None):
    """Generation settings as AUTOMATIC1111 writes them into a PNG's `parameters` chunk. The seed is the one given to
    infer.py, with the image's index: the UIs draw their noise another way, so the same seed makes the same image
    only here (`infer.py --seed S --image_index J`)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, "
                 + (f"Model hash: {hash_}, " if hash_ else "") + f"Model: {model}, Image index: {index}"
                 + (f", Lora: {lora}" if lora else ""))
    return "\n".join(lines)


def slug(text, n=40):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    prompts = read_prompts(args)
    n = args.num_images_per_prompt
    wanted = sorted(set(args.image_index)) if args.image_index else list(range(n))
    if wanted[0] < 0 or wanted[-1] >= n:
        cli.fail(f"--image_index must be between 0 and --num_images_per_prompt - 1 ({n - 1})")
    kind, source = check_model(args)
    model = families.read_model(source if kind == "pipeline" else source["pretrained_model_name_or_path"],
                                args.revision if kind == "pipeline" else source.get("revision"))
    loading.check_sampler(args.scheduler, model.family)
    check_run_family(args, model.family)
    own = families.sampling_defaults(model)  # FLUX.1 and SD 3.5 have their own steps and guidance
    args.num_inference_steps = args.num_inference_steps or own.get("validation_inference_steps", 30)
    args.guidance_scale = own.get("validation_guidance_scale", 7.5) if args.guidance_scale is None else args.guidance_scale
    if args.negative_prompt and not families.takes_negative_prompt(model.family):
        cli.note(f"--negative_prompt: {model.family.pipeline} takes none (it guides against the empty prompt): not "
                 "used, nor recorded")
        args.negative_prompt = None
    elif args.negative_prompt and not families.guides_with_negative(model.family, model.config, args.guidance_scale):
        cli.note(f"--negative_prompt has no effect on a {model.family.pipeline} at --guidance_scale "
                 f"{args.guidance_scale:g} (no classifier-free guidance pass reads it): not used, nor recorded")
        args.negative_prompt = None
    pivotal = find_token_embeddings(args)
    model_prompts = prompts  # what the text encoder reads; files and their records keep the prompts as written
    if pivotal:  # the identifier is new tokens: write it as trained ("sks"), the model reads its tokens
        tokens, word = pivotal[1]["new_tokens"], pivotal[1]["token_abstraction"]
        model_prompts = [families.pivot_prompt(prompt, word, tokens) for prompt in prompts]
        cli.note(f"pivotal tuning: '{word}' in the prompts is read as {''.join(tokens)} ({pivotal[0].name})")
    if args.lora_scale != 1.0 and not args.lora:
        cli.note("--lora_scale has no effect without LoRA adapters (--lora, or a LoRA run's folder)")
    cli.check_writable(args.output_dir, "--output_dir")
    if args.enable_xformers_memory_efficient_attention:
        loading.check_xformers()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind_of_device = torch.device(device)
    except RuntimeError:
        cli.fail(f"--device {device} is not a device: auto, cpu, cuda, cuda:N or mps")
    if kind_of_device.type == "cuda" and (kind_of_device.index or 0) >= torch.cuda.device_count():
        cli.fail(f"--device {device}: {torch.cuda.device_count()} CUDA GPU(s) are visible here")
    if kind_of_device.type == "mps" and not torch.backends.mps.is_available():
        cli.fail(f"--device {device}: Apple's MPS is not available here")
    if args.cpu_offload and not device.startswith("cuda"):
        cli.fail("--cpu_offload needs a CUDA GPU: it keeps the models on the CPU and moves each to the GPU when used")
    precision = args.dtype if args.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    if device == "cpu":  # PyTorch takes every core by default, and then slows to a crawl beside any other busy process
        torch.set_num_threads(args.cpu_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or
                              max(1, len(os.sched_getaffinity(0)) // 2))

    # ---- load
    pipe = load_model(args, kind, source, loading.torch_dtype(precision), "cpu" if args.cpu_offload else device)
    if pivotal:
        families.load_token_embeddings(pipe, pivotal[0], families.FAMILIES[pivotal[1]["model_family"]], tokens)
    loading.set_scheduler(pipe, args.scheduler)
    if args.enable_xformers_memory_efficient_attention:
        loading.enable_xformers(pipe)
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    denoiser = families.family_of(pipe).denoiser
    if args.compile:
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser)))
    height, width = (size or model.resolution for size in (args.height, args.width))
    sampler = a1111_sampler(pipe.scheduler)
    model_name = Path(args.pretrained_model_name_or_path.rstrip("/")).name
    hash_ = model_hash(args.pretrained_model_name_or_path)

    # ---- generate: image j of a prompt always in batch j // batch_size, so that it can be made again alone
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = sorted({j // args.batch_size for j in wanted})
    written, t0 = [], time.perf_counter()
    bar = tqdm(total=len(prompts) * len(blocks) * args.num_inference_steps, desc="sampling", unit="step")

    family = families.family_of(pipe)
    config = getattr(pipe, family.denoiser).config

    trained = {k: v for _, record in run_records(args) for k, v in families.encoding_arguments(family, record).items()}

    def guidance(n):  # the scale where the family's pipeline reads it, the negative prompt, T5's prompt length, and
        # the run's encoding flags (FLUX.2 klein's layers) as it trained
        return {**families.guidance_arguments(family, config, args.guidance_scale, args.negative_prompt, n),
                **families.sampling_sequence_length(family, pipe), **trained}

    def step_done(pipe, i, t, tensors):  # the pipeline's own per-step callback: the bar is right from the first step
        bar.update(1)
        return tensors

    if args.negative_prompt:
        warn_if_truncated(pipe.tokenizer, args.negative_prompt, "the negative prompt")
    for p_idx, (prompt, model_prompt) in enumerate(zip(prompts, model_prompts)):
        warn_if_truncated(pipe.tokenizer, model_prompt, f"prompt {p_idx}")
        made = []
        for block in blocks:
            js = list(range(block * args.batch_size, min((block + 1) * args.batch_size, n)))
            seeds = [imagedata.image_seed(args.seed, j) for j in js]
            images = pipe(prompt=[model_prompt] * len(js), **guidance(len(js)), height=height, width=width,
                          num_inference_steps=args.num_inference_steps, callback_on_step_end=step_done,
                          generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
            if p_idx == 0 and block == blocks[0]:  # some samplers take a step more than asked: count the real ones
                bar.total = bar.n * len(prompts) * len(blocks)
                bar.refresh()
            for j, seed, image in zip(js, seeds, images):
                if j not in wanted:
                    continue
                settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "image_index": j,
                            "image_seed": seed, "num_images_per_prompt": n, "batch_size": args.batch_size,
                            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                            "sampler": sampler, "scheduler": args.scheduler or pipe.scheduler.__class__.__name__,
                            "width": width, "height": height,
                            "model": args.pretrained_model_name_or_path, "dtype": precision, **trained}
                if args.lora:
                    settings.update(lora=args.lora, lora_scale=args.lora_scale)
                info = PngInfo()
                lora = f"{Path(args.lora).name}:{args.lora_scale:g}" if args.lora else None
                info.add_text("parameters", a1111_parameters(prompt, args.negative_prompt, args.num_inference_steps, sampler,
                                                             args.guidance_scale, args.seed, j, width, height, model_name, lora,
                                                             hash_))
                info.add_text("dreambooth", json.dumps(settings))
                path = out / f"p{p_idx:02d}-{slug(prompt)}-i{j:03d}-seed{args.seed}.png"
                image.save(path, pnginfo=info)
                written.append(path)
                made.append(image)
        if args.grid:
            imagedata.grid(made).save(out / f"p{p_idx:02d}-{slug(prompt)}-grid-seed{args.seed}.png")
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"wrote {len(written)} images to {out} ({len(written) / seconds:.2f} images/s)")


if __name__ == "__main__":
    cli.run(main)
