"""Loading models, pipelines and samplers, shared by the scripts: a model checked before anything loads (a local
folder, a hub id, a web UI's single file converted once; a preview checkpoint, a text encoder's layers),
from_pretrained with its failures as one line, the VAE, the family's pipeline for sampling, a preview checkpoint's
denoiser with the adapters being trained, xformers, and the samplers by their usual names."""

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

import cli
import families


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def check_model_source(name_or_path, revision=None, single_file_config=None):
    """Fail early, before anything loads, when a local model folder is missing or lacks a component of its family.
    Returns the model as the run records it: a local folder as an absolute path (a record then works from any
    directory), a string shaped like a hub id ("org/name") as it is, left to `from_pretrained`; a single .safetensors
    file (the web UIs' kind) as the diffusers folder it was converted to.
    """
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return single_file_folder(path, single_file_config)
    if path.is_dir():
        if not any((path / name).is_dir() for name in families.DENOISERS):
            cli.fail(f"model folder {path} has no {' or '.join(families.DENOISERS)} subfolder: is it a diffusers pipeline folder?")
        missing = [c for c in families.read_model(str(path))[0].components if not (path / c).is_dir()]
        if missing:
            cli.fail(f"model folder {path} has no {', '.join(missing)} subfolder: is it a diffusers pipeline folder?")
        return str(path.resolve())
    if path.exists():
        cli.fail(f"model path is a file, not a diffusers pipeline folder or a .safetensors single file: {path}")
    # "org/name" could be a hub id; a path that starts like one, or whose first part is a folder here, is a typo
    if name_or_path.startswith((".", "/", "~")) or Path(name_or_path.split("/")[0]).is_dir():
        cli.fail(f"model folder not found: {name_or_path}")
    if not HUB_ID.match(name_or_path):
        cli.fail(f"model not found: {name_or_path} (neither a local folder nor a hub id like 'org/name')")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "model_index.json", revision=revision), str):
        return name_or_path  # in the cache: the library falls back to it if the Hub cannot be reached
    if hub_offline():
        cli.fail(f"{name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
             "with the network on, or give a local folder")
    if not hub_reachable():  # at once, instead of the library's retries (about 30 s) and a long message
        cli.fail(f"cannot reach the Hugging Face Hub to download {name_or_path}: check the network, or give a local folder")
    return name_or_path


def check_out_layers(args, family):
    """--text_encoder_out_layers: hidden states the text encoder has (its embeddings are state 0)."""
    from transformers import AutoConfig

    name = family.text_encoder_names[0]
    try:
        layers = AutoConfig.from_pretrained(args.pretrained_model_name_or_path, subfolder=name,
                                            revision=args.revision).num_hidden_layers
    except (OSError, ValueError) as e:
        load_error(f"the {name} config", args.pretrained_model_name_or_path, e)
    if max(args.text_encoder_out_layers) > layers:
        cli.fail(f"--text_encoder_out_layers {' '.join(map(str, args.text_encoder_out_layers))}: the {name} of "
                 f"{args.pretrained_model_name_or_path} has hidden states 0 to {layers}")


def check_preview_model(args, family):
    """--validation_model_path: a checkpoint of the training model's family, for a LoRA run (a full fine-tune trains
    the model itself: there are no adapters to carry over)."""
    if not args.lora_rank:
        cli.fail("--validation_model_path samples another checkpoint with the LoRA being trained: give --lora_rank "
                 "(a full fine-tune's validation images come from the model it trains)")
    args.validation_model_path = check_model_source(args.validation_model_path)
    preview = families.read_model(args.validation_model_path)
    if preview.family != family:
        cli.fail(f"--validation_model_path {args.validation_model_path} is a {preview.family.pipeline}, and "
                 f"{args.pretrained_model_name_or_path} a {family.pipeline}: the LoRA fits a checkpoint of its own "
                 "family only")


def hub_reachable(timeout=5):
    """A TCP connection to the Hub's host (skipped behind a proxy, which only the HTTP client knows how to use)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_error(what, name_or_path, error):
    """One line for a failure to find or download a model: when the Hub could not be reached, say so and how to work
    offline instead of the library's long message."""
    text = f"{error!r} {error.__cause__!r} {error.__context__!r}".lower()
    if not hub_offline() and not Path(name_or_path).is_dir() and any(
            k in text for k in ("connect", "timeout", "timed out", "name resolution", "network", "offline")):
        cli.fail(f"cannot reach the Hugging Face Hub to load {what} {name_or_path}: check the network, or work offline "
             "with HF_HUB_OFFLINE=1 (models already in the cache) or a local folder")
    cli.fail(f"cannot load {what} from {name_or_path}: {cli.first_line(error)}")


def single_file_folder(path, config=None):
    """A single-file checkpoint as a diffusers pipeline folder: converted once by diffusers' from_single_file and kept
    in the Hugging Face cache (keyed by the file's path, size and time, and the config). `config` is a diffusers
    folder or hub id with the component configs (default: diffusers picks one for the file's architecture on the Hub)."""
    from huggingface_hub import constants
    from safetensors import safe_open

    path, stat = Path(path).resolve(), Path(path).stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{config}".encode()).hexdigest()[:16]
    folder = Path(constants.HF_HOME, "dreambooth-single-file", f"{path.stem}-{key}")
    if (folder / "model_index.json").is_file():
        return str(folder)
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception as e:
        cli.fail(f"cannot read the single-file model {path}: {cli.first_line(e)}")
    family = families.family_of_single_file(keys, path)
    if config and families.read_model(config).family is not family:
        cli.fail(f"{path.name} is a {family.pipeline} checkpoint and --single_file_config {config} a "
                 f"{families.read_model(config).family.pipeline}: give the config of a model of the same family")
    cli.note(f"converting {path.name} ({family.pipeline}) to diffusers' layout once, into {folder}")
    try:
        pipe = family.pipeline_class().from_single_file(str(path), config=config, **dict(family.pipeline_kwargs))
    except Exception as e:  # most often: no config at hand offline
        cli.fail(f"cannot convert the single-file model {path}: {cli.first_line(e)} (--single_file_config takes a diffusers "
             "folder or hub id of the same architecture)")
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    except BaseException:  # a full disk, a signal: no half-written conversion stays behind in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, folder)
    return str(folder)


def from_pretrained(cls, name_or_path, **kwargs):
    """`cls.from_pretrained` with a failure to find or download the model turned into one line."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        load_error(cls.__name__, name_or_path, e)


def load_vae(name_or_path, vae_path=None, revision=None, variant=None, dtype=torch.float32, upcast=False,
             vae_class="AutoencoderKL"):
    """The model's own VAE, or a separate one (--pretrained_vae_model_name_or_path: a folder or hub id of an
    AutoencoderKL, e.g. an fp16-safe SDXL VAE), in `dtype`; in fp32 when `upcast` and the VAE's config says
    force_upcast, as StableDiffusionXLPipeline decodes (SDXL's own VAE overflows in fp16). `vae_class`: the family's
    (FLUX.2's AutoencoderKLFlux2)."""
    import diffusers
    from diffusers import AutoencoderKL

    source, kw = (vae_path, {}) if vae_path else (name_or_path, dict(subfolder="vae", revision=revision))
    try:
        if upcast and AutoencoderKL.load_config(source, **kw).get("force_upcast", True):
            dtype = torch.float32
    except (OSError, ValueError) as e:
        cli.fail(f"cannot read the VAE config of {source}: {cli.first_line(e)}")
    return from_pretrained(getattr(diffusers, vae_class), source, dtype=dtype, **kw,
                           **({} if vae_path else dict(variant=variant)))


# --quantize_base's short forms: BitsAndBytesConfig's arguments (NF4 as diffusers' README for its scripts has it)
QUANTIZE = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}


def quantization(short=None, path=None):
    """--quantize_base or --bnb_quantization_config_path -> BitsAndBytesConfig's arguments (None: no quantization);
    a file that is not such a config is refused in one line."""
    if short and path:
        cli.fail("give one of --quantize_base and --bnb_quantization_config_path (both say how to quantize the base)")
    if not path:
        return dict(QUANTIZE[short]) if short else None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        cli.fail(f"--bnb_quantization_config_path {path}: {cli.first_line(e)}")
    if not isinstance(config, dict) or not (config.get("load_in_4bit") or config.get("load_in_8bit")):
        cli.fail(f"--bnb_quantization_config_path {path} is not a bitsandbytes quantization config (a JSON object with "
                 "load_in_4bit or load_in_8bit true, as BitsAndBytesConfig takes it)")
    try:
        quantized(config, torch.float32, None)
    except (TypeError, ValueError) as e:
        cli.fail(f"--bnb_quantization_config_path {path}: {cli.first_line(e)}")
    return config


def quantized(config, dtype, device, config_class=None):
    """from_pretrained's arguments that load a model quantized by bitsandbytes as it loads (config: quantization()'s;
    {} for none), computing in `dtype`, onto `device`; config_class: diffusers' BitsAndBytesConfig (the default) or
    transformers' (a text encoder). important! diffusers' bitsandbytes quantizer asks for a GPU; bitsandbytes (0.48
    on) runs its 4-bit and 8-bit layers on the CPU too, so on a CPU that check is skipped (transformers' allows it)."""
    from diffusers import BitsAndBytesConfig

    if not config:
        return {}
    quantization_config = (config_class or BitsAndBytesConfig)(**{"bnb_4bit_compute_dtype": dtype, **config})
    if device is not None and torch.device(device).type == "cpu":
        from diffusers.quantizers.bitsandbytes import bnb_quantizer

        for quantizer in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
            quantizer.validate_environment = lambda self, *args, **kwargs: None
    return {"quantization_config": quantization_config, "device_map": {"": str(device)}}


@contextlib.contextmanager
def offloaded(modules, device, offload):
    """--offload: the modules on `device` while the block runs and on the CPU after; without it, where they are."""
    modules = list(modules) if offload else []
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def torch_dtype(precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def check_xformers():
    """xformers only helps on CUDA; when its kernels cannot run, say so instead of silently using another kernel."""
    if not torch.cuda.is_available():
        cli.fail("--enable_xformers_memory_efficient_attention needs a CUDA GPU and none is visible "
             "(drop the flag: PyTorch's SDPA attention is used by default)")
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        cli.fail(f"--enable_xformers_memory_efficient_attention: xformers does not import here ({e})")


def check_fp8(args):
    """--do_fp8_training: a GPU that has fp8 matmuls (compute capability 8.9 on: Ada, Hopper, Blackwell), torchao, and
    a base that is not quantized otherwise; else one line."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        what = (f"{torch.cuda.get_device_name()} (compute capability %d.%d)" % torch.cuda.get_device_capability()
                if torch.cuda.is_available() else "no CUDA GPU")
        cli.fail(f"--do_fp8_training needs a GPU with fp8 matmuls (compute capability 8.9 or later: Ada, Hopper, "
                 f"Blackwell), and this machine has {what}: drop the flag (it buys speed, not memory)")
    if args.quantization:
        cli.fail("give one of --do_fp8_training and a quantized base (--quantize_base, --bnb_quantization_config_path)")
    cli.require("torchao", "--do_fp8_training")


def to_fp8(denoiser):
    """torchao's fp8 training for the denoiser's linear layers whose sides are multiples of 16, its output layer
    excepted (diffusers' scripts' choice)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def convertible(module, name):
        return name != "proj_out" and not (isinstance(module, torch.nn.Linear)
                                           and (module.in_features % 16 or module.out_features % 16))

    convert_to_float8_training(denoiser, module_filter_fn=convertible, config=Float8LinearConfig(pad_inner_dim=True))


def enable_xformers(model):
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as e:  # diffusers runs a test kernel: a build that does not match this torch/GPU fails here
        cli.fail(f"--enable_xformers_memory_efficient_attention: xformers cannot run on this setup ({e})")


def preview_denoiser(args, family, trained, held):
    """--validation_model_path: that checkpoint's denoiser with the trained adapters' present weights (the text
    encoders, the VAE and the sampler stay the training model's: a distilled checkpoint shares them with its base),
    quantized as the trained one (--quantize_base).
    Loaded at the first validation into `held`; the caller moves it off the accelerator between validations."""
    import diffusers
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if "denoiser" not in held:
        with torch.random.fork_rng(devices=[]):  # important! the adapters' random start must not move the training's
            held["denoiser"] = from_pretrained(getattr(diffusers, family.denoiser_class), args.validation_model_path,
                                               subfolder=family.denoiser, dtype=trained.dtype,
                                               **quantized(args.quantization, trained.dtype, trained.device)
                                               ).requires_grad_(False)
            families.add_lora(held["denoiser"], vars(args), args.lora_target_modules)
        cast_training_params(held["denoiser"], dtype=torch.float32)  # the adapters as they train
    set_peft_model_state_dict(held["denoiser"], get_peft_model_state_dict(trained))
    return held["denoiser"].to(trained.device).eval()


def load_pipeline(name_or_path, revision=None, variant=None, dtype=torch.float32, device="cpu", vae_path=None, **components):
    """The model's pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) for sampling: safety checker and
    watermark off, no progress bar. Components given as keywords (in-memory models) are used as they are, not loaded,
    and device None leaves every component where it is."""
    family = families.read_model(name_or_path, revision)[0]
    if vae_path and "vae" not in components:
        components["vae"] = load_vae(name_or_path, vae_path, revision, dtype=dtype, vae_class=family.vae_class)
    pipe = from_pretrained(family.pipeline_class(), name_or_path, revision=revision, variant=variant, dtype=dtype,
                           **dict(family.pipeline_kwargs), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


# ----------------------------------------------------------------------------------------------------------------
# Samplers


# Samplers by their usual short names, each built from the model's own scheduler config so that its betas and
# prediction type (epsilon or v) carry over.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # the flow-matching models' own (FluxPipeline's sigmas:
}  # diffusers' FlowMatchHeunDiscreteScheduler takes none, so it is not offered)
FLOW_SCHEDULERS = ("flow_euler",)


def check_sampler(name, family, flag="--scheduler"):
    """A sampler of the model's kind, or one line: the flow-matching models sample with flow_euler, the others with
    the rest."""
    flow = family.objective == "flow"
    if name and (name in FLOW_SCHEDULERS) != flow:
        cli.fail(f"{flag} {name} does not sample a {family.pipeline}: use one of "
                 + ", ".join(n for n in sorted(SCHEDULERS) if (n in FLOW_SCHEDULERS) == flow))


def make_scheduler(name, config):
    import diffusers

    cls_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **kwargs)


def set_scheduler(pipe, name):
    if name is not None:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
