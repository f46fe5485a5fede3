"""Turn a DreamBooth run into what other tools load, and publish it: the LoRA files (diffusers' format, and kohya's for
the web UIs), a single-file checkpoint in the original layout (AUTOMATIC1111, ComfyUI, Forge, InvokeAI), a model card,
and the Hub upload. train_dreambooth.py calls the same functions during a run, and writes its result, exports and
validation images with the ones below; from the shell, this converts or publishes a finished run or export without
training it again.

    python export.py sks-dog --single_file                          # sks-dog/sks-dog.safetensors, fp16
    python export.py sks-lora --kohya                               # its kohya-format LoRA file, made again
    python export.py sks-dog --push_to_hub --hub_model_id me/sks-dog
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch

import cli
import families
import runs

# ----------------------------------------------------------------------------------------------------------------
# LoRA files


KOHYA_DORA = ("DoRA adapters get no kohya-format copy: the web UIs' DoRA readers disagree on the magnitude's axis "
              "(AUTOMATIC1111 takes the input axis, peft trains the output axis) and diffusers' kohya reader drops it; "
              "the diffusers-format file holds them whole")


def save_lora(folder, family, dtype, trained):
    """Adapters of {name: (module, state dict)} ("unet", "text_encoder", "text_encoder_2") in diffusers' format
    (`pipe.load_lora_weights(folder)` of the family's pipeline; the LoRA config, alpha included, rides along as
    metadata), and a copy in kohya's format for the web UIs. Text encoders' keys in the files' layout (du.file_keys),
    whatever the installed transformers names its modules."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    classes = dict(family.text_encoders)
    peft = {name: families.file_keys({k: v.to(dtype) for k, v in get_peft_model_state_dict(module, state_dict=state).items()},
                                     classes.get(name, ""))
            for name, (module, state) in trained.items()}
    # DoRA's magnitudes of a text encoder are written as "...lora_magnitude_vector.weight": transformers' load_adapter
    # (which load_lora_weights calls for text encoders) skips the key without ".weight", peft reads both spellings
    layers = {name: {(k + ".weight" if name in classes and k.endswith(".lora_magnitude_vector") else k): v
                     for k, v in convert_state_dict_to_diffusers(sd).items()} for name, sd in peft.items()}
    family.pipeline_class().save_lora_weights(
        folder, safe_serialization=True, **{f"{name}_lora_layers": sd for name, sd in layers.items()},
        **{f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict() for name, (module, _) in trained.items()})
    if trained[family.denoiser][0].peft_config["default"].use_dora:
        return  # no kohya copy: see KOHYA_DORA
    alphas = {name: module.peft_config["default"].lora_alpha for name, (module, _) in trained.items()}
    save_file(kohya_state(family, peft, alphas), Path(folder, families.LORA_WEIGHTS.replace(".safetensors", "_kohya.safetensors")))


def read_lora(folder, family):
    """A diffusers-format LoRA folder as {model: peft's state}, text encoders under the files' layout: files written
    with transformers 4's text_model level (as now) or without it (earlier versions under transformers 5) alike."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    state, classes, peft = family.pipeline_class().lora_state_dict(str(folder))[0], dict(family.text_encoders), {}
    for name, _ in family.kohya_prefixes:
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if own:
            peft[name] = (convert_unet_state_dict_to_peft(own) if name == family.denoiser else
                          families.file_keys(convert_state_dict_to_peft(convert_state_dict_to_diffusers(own)), classes[name]))
    return peft


def load_lora(folder, family, modules):
    """A LoRA folder's adapters into {name: module} whose adapters are already in place (resume). One line, no
    traceback, when a key has no module or a module no key."""
    from peft import set_peft_model_state_dict

    peft = read_lora(folder, family)
    for name, module in modules.items():
        result = set_peft_model_state_dict(module, families.module_keys(peft.get(name, {}), module), adapter_name="default")
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            cli.fail(f"cannot load the adapters of {folder} into the {name}: "
                    + (f"unexpected {result.unexpected_keys[0]}" if result.unexpected_keys else f"missing {missing[0]}"))


def write_kohya(folder, config):
    """A LoRA run's kohya-format file made again from its diffusers-format file (export.py --kohya): runs of earlier
    versions wrote first-text-encoder keys that ComfyUI drops."""
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    family, path = families.FAMILIES.get(config.get("model_family")), Path(folder, families.LORA_WEIGHTS.replace(".safetensors", "_kohya.safetensors"))
    if family is None:
        cli.fail(f"the run config of {folder} names no model family this version knows ({config.get('model_family')})")
    try:
        peft = read_lora(folder, family)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        cli.fail(f"cannot read {Path(folder, families.LORA_WEIGHTS)}: {cli.first_line(e)}")
    if any("lora_magnitude_vector" in k for state in peft.values() for k in state):
        cli.fail(KOHYA_DORA)
    alpha = config.get("lora_alpha") or config["lora_rank"]
    tmp = path.with_name(path.name + ".tmp")
    save_file(kohya_state(family, peft, dict.fromkeys(peft, alpha)), tmp)
    os.replace(tmp, path)
    return path


def kohya_state(family, peft, alphas):
    """peft's adapters {model: {"<module>.lora_A.weight": down, "<module>.lora_B.weight": up}} under kohya's names, as
    sd-scripts writes them and the web UIs map them: "<prefix>_<module, dots as underscores>" with .lora_down.weight,
    .lora_up.weight and .alpha, the prefix from the family row (SD 1.x/2.x: lora_unet, lora_te; SDXL: lora_unet,
    lora_te1, lora_te2)."""
    prefixes, kohya = dict(family.kohya_prefixes), {}
    for name, state in peft.items():
        for key, value in state.items():
            module, matrix, _ = key.rsplit(".", 2)
            stem = f"{prefixes[name]}_{module.replace('.', '_')}"
            kohya[f"{stem}.{ {'lora_A': 'lora_down', 'lora_B': 'lora_up'}[matrix]}.weight"] = value.contiguous()
            kohya[f"{stem}.alpha"] = torch.tensor(float(alphas[name]))
    return kohya


def save_token_embeddings(path, family, rows, dtype):
    """Pivotal tuning's new tokens, one tensor of rows per text encoder, in the embedding format AUTOMATIC1111 and
    ComfyUI read (SD 1.x/2.x: emb_params; SDXL: clip_l and clip_g), which diffusers' load_textual_inversion takes
    tensor by tensor (du.load_token_embeddings)."""
    from safetensors.torch import save_file

    save_file({key: row.to(dtype).contiguous().cpu() for key, row in zip(family.embedding_keys, rows)}, path)


# ----------------------------------------------------------------------------------------------------------------
# What a run writes: the result, exports and validation images during the run


def trained_weights(accelerator, args, model):
    """{name: (module, full state dict)} of the trained modules. Call it on every process: under FSDP (or DeepSpeed
    ZeRO-3) accelerator.get_state_dict gathers the sharded weights onto the main process."""
    state, unwrapped = accelerator.get_state_dict(model), accelerator.unwrap_model(model)
    names = [unwrapped.family.denoiser] + (unwrapped.text_encoder_names if args.train_text_encoder else [])
    return {n: (getattr(unwrapped, n), {k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})
            for n in names}


def save_weights(args, output_dir, dtype, trained, name, embeddings=None):
    """What a run produces, in safetensors: the base pipeline (with the separate VAE, if one was given) in `dtype`
    with the trained weights copied in (cast on the way), and with --save_single_file the same as `name`.safetensors
    in the web UIs' layout; or with LoRA the adapter files alone; and pivotal tuning's `name`_emb.safetensors.
    Written to a temporary folder and moved into place with model_index.json (or the LoRA file) last, so a folder
    that has one holds the whole result."""
    tmp = Path(output_dir) / ".save.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora_rank:
        save_lora(tmp, families.FAMILIES[args.model_family], dtype, trained)
    else:
        pipe = families.load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype, None,
                                args.pretrained_vae_model_name_or_path)
        for module, (_, state) in trained.items():
            getattr(pipe, module).load_state_dict(state)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if args.save_single_file:
            save_single_file(tmp, tmp / f"{name}.safetensors", families.torch_dtype(args.export_precision), vars(args))
    if embeddings:
        save_token_embeddings(tmp / families.EMBEDDINGS.format(name=name), families.FAMILIES[args.model_family], embeddings, dtype)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name in ("model_index.json", families.LORA_WEIGHTS)):
        dest = Path(output_dir) / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    tmp.rmdir()


def export_pipeline(accelerator, args, model, step):
    """An inference-ready pipeline or LoRA file (export-N, --export_precision) beside the checkpoints; infer.py loads
    it."""
    trained = trained_weights(accelerator, args, model)
    if accelerator.is_main_process:
        folder = Path(args.output_dir, f"export-{step}")
        folder.mkdir(exist_ok=True)
        save_weights(args, folder, families.torch_dtype(args.export_precision), trained,
                     f"{Path(args.output_dir).resolve().name}-step-{step}", accelerator.unwrap_model(model).token_embeddings())
        runs.remove_oldest(args.output_dir, "export", args.exports_total_limit)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# Single file: the original (LDM / SGM) key layout that AUTOMATIC1111, ComfyUI, Forge, InvokeAI and diffusers'
# from_single_file read. diffusers ships only the other direction (its loader, and a conversion script outside the
# package), so this mapping is ours; its proof is the test: diffusers' own loader reads the file back to the same
# weights and the same image. Block indices come from the model's config, so any layout of the two families works.

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key, config, up_attention):
    """A diffusers UNet key -> its LDM key (without model.diffusion_model.). `up_attention`: the up blocks that have
    attentions (their upsampler sits one place later)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as LDM

    fixed = {**LDM["unet"]["layers"], **LDM["unet"]["addition_embed_type"]}
    if key in fixed:
        return fixed[key]
    step = config["layers_per_block"] + 1  # an LDM block per resnet, and one for the down- or upsampler

    def part(kind, rest):
        if kind == "attentions":
            return f"1.{rest}"
        return "0." + next((ldm + rest[len(ours):] for ours, ldm in RESNET if rest.startswith(ours + ".")), rest)

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"input_blocks.{int(m[1]) * step + int(m[3]) + 1}.{part(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * step + int(m[3])}.{part(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"output_blocks.{int(m[1]) * step + step - 1}.{2 if int(m[1]) in up_attention else 1}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{part(m[1], m[3])[2:]}"
    raise KeyError(f"no LDM name for the UNet weight {key}")


def ldm_vae_key(key, config):
    """A diffusers VAE key -> its LDM key (without first_stage_model.); the decoder's blocks count the other way."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as LDM

    if key in LDM["vae"]:
        return LDM["vae"][key]
    last, key = len(config["block_out_channels"]) - 1, key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key):
        return f"encoder.down.{m[1]}.{f'block.{m[3]}' if m[3] else 'downsample'}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key):
        return f"decoder.up.{last - int(m[1])}.{f'block.{m[3]}' if m[3] else 'upsample'}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name for the VAE weight {key}")


def open_clip_state(state):
    """A transformers CLIP text model's weights in OpenCLIP's layout (SD 2.x's encoder, SDXL's second): q, k and v
    fused into in_proj, the projection transposed."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"token_embedding.weight": s["embeddings.token_embedding.weight"],
           "positional_embedding": s["embeddings.position_embedding.weight"],
           "ln_final.weight": s["final_layer_norm.weight"], "ln_final.bias": s["final_layer_norm.bias"]}
    if "text_projection.weight" in s:
        out["text_projection"] = s["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([s[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out.update({f"{theirs}{new}.{kind}": s[f"{ours}{old}.{kind}"] for old, new in names.items()})
    return out


def clip_state(state):
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def ldm_text_encoders(parts, configs, v_prediction):
    """SD 1.x/2.x: (text encoder's keys, ModelSpec architecture). SD 2.x's OpenCLIP ViT-H (width 1024, gelu; OpenAI's
    CLIP has quick_gelu) in OpenCLIP's layout."""
    if configs["text_encoder"].get("hidden_act") == "gelu":
        return ({"cond_stage_model.model." + k: v for k, v in open_clip_state(parts["text_encoder"]).items()},
                f"stable-diffusion-v2-{'768-v' if v_prediction else '512'}")
    return {"cond_stage_model.transformer." + k: v for k, v in clip_state(parts["text_encoder"]).items()}, "stable-diffusion-v1"


def sgm_text_encoders(parts, configs, v_prediction):
    """SDXL: (both encoders' keys under the conditioner's embedders, ModelSpec architecture)."""
    return ({**{"conditioner.embedders.0.transformer." + k: v for k, v in clip_state(parts["text_encoder"]).items()},
             **{"conditioner.embedders.1.model." + k: v for k, v in open_clip_state(parts["text_encoder_2"]).items()}},
            "stable-diffusion-xl-v1-base")


TEXT_LAYOUTS = {"ldm": ldm_text_encoders, "sgm": sgm_text_encoders}  # a family row's single_file_layout


def ldm_state(parts, configs, family, v_prediction):
    """{name: diffusers state dict} of the unet, vae and text encoder(s) -> (one state dict in the original layout,
    its ModelSpec architecture): LDM's keys, or SGM's for SDXL (the family row's single_file_layout). A v-prediction
    model gets the `v_pred` key that ComfyUI reads."""
    unet, vae = parts[family.denoiser], parts["vae"]
    up_attention = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {"model.diffusion_model." + ldm_unet_key(k, configs[family.denoiser], up_attention): v for k, v in unet.items()}
    for key, value in vae.items():
        name = ldm_vae_key(key, configs["vae"])
        out["first_stage_model." + name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value

    text, architecture = TEXT_LAYOUTS[family.single_file_layout](parts, configs, v_prediction)
    out.update(text)
    if v_prediction:
        out["v_pred"] = torch.tensor([])
    return out, architecture


def single_file_metadata(config, title, architecture, v_prediction):
    """The header the web UIs show: Stability's ModelSpec keys (what kohya's scripts write), and the run's settings."""
    settings = {k: config.get(k) for k in ("instance_prompt", "class_prompt", "with_prior_preservation",
                                           "train_text_encoder", "learning_rate", "resolution", "seed", "lora_rank")}
    settings["optimizer_steps"] = config.get("total_optimizer_steps") or config.get("max_train_steps")
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "diffusers", "modelspec.title": title,
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
            "modelspec.resolution": f"{config.get('resolution')}x{config.get('resolution')}",
            "dreambooth.base_model": str(config.get("pretrained_model_name_or_path")),
            "dreambooth.instance_prompt": "; ".join(subject_prompts(config)), "dreambooth.settings": json.dumps(settings)}


def subject_prompts(config, key="instance_prompt"):
    """Each subject's instance (or class) prompt: several with --concepts_list, else the run's one."""
    return [str(s.get(key)) for s in config.get("subjects") or [config]]


def save_single_file(pipeline_folder, path, dtype=torch.float16, config=None):
    """A diffusers pipeline folder (a full fine-tune's output or export) -> one .safetensors file in the original
    layout, in `dtype`, with the run's `config` in its header. Read from the folder's files: no model is built."""
    from safetensors.torch import load_file, save_file

    folder = Path(pipeline_folder)
    family = families.read_model(str(folder))[0]
    names = [family.denoiser, "vae", *family.text_encoder_names]
    parts = {name: {k: v for f in sorted(Path(folder, name).glob("*.safetensors")) for k, v in load_file(f).items()}
             for name in names}
    configs = {name: json.loads(Path(folder, name, "config.json").read_text()) for name in names}
    scheduler = json.loads(Path(folder, "scheduler", "scheduler_config.json").read_text())
    v_prediction = scheduler.get("prediction_type") == "v_prediction"
    state, architecture = ldm_state(parts, configs, family, v_prediction)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp,
              metadata=single_file_metadata(config or {}, Path(path).stem, architecture, v_prediction))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The model card: what the Hub shows, and what a user needs to load the result


def base_license(base):
    """The base model's license from its own card, when that card is at hand (a local folder's README.md, or the hub
    model's in the local cache); None otherwise (the card then points to the base model)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    path = Path(base, "README.md") if Path(base).is_dir() else try_to_load_from_cache(base, "README.md")
    try:
        return ModelCard.load(path).data.license if isinstance(path, (str, Path)) and Path(path).is_file() else None
    except Exception:  # a README that is no model card
        return None


def model_card(folder, config):
    """A README.md model card (huggingface_hub's ModelCard): metadata the Hub reads (base model, license, tags,
    instance prompt), the method and its settings, the newest validation grid, and how to load the result."""
    from huggingface_hub import ModelCard, ModelCardData

    family, lora, base = families.family_of_record(config), bool(config.get("lora_rank")), \
        config["pretrained_model_name_or_path"]
    hub_base = base if families.HUB_ID.match(base) and not Path(base).exists() else None
    tags = ["text-to-image", "diffusers", "diffusers-training", "dreambooth",
            family.hub_tag] + (["lora"] if lora else [])
    data = ModelCardData(base_model=hub_base, license=base_license(base), library_name="diffusers", tags=tags,
                         instance_prompt="; ".join(subject_prompts(config)))
    method = (f"{'DoRA' if config.get('use_dora') else 'LoRA'} (rank {config['lora_rank']}, alpha "
              f"{config['lora_alpha'] or config['lora_rank']})" if lora
              else "full fine-tune") + (" of the UNet and the text encoder(s)" if config.get("train_text_encoder")
                                        else " of the UNet")
    prior = (f"with prior preservation ({config['num_class_images_used']} images of "
             + ", ".join(f'"{p}"' for p in subject_prompts(config, "class_prompt")) + ", "
             f"weight {config['prior_loss_weight']})" if config.get("with_prior_preservation") else "without prior preservation")
    load = (f"pipe = {family.pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.float16).to(\"cuda\")\n"
            "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\")" if lora else
            f"pipe = {family.pipeline}.from_pretrained(\"THIS_REPO_OR_FOLDER\", torch_dtype=torch.float16).to(\"cuda\")")
    prompt = subject_prompts(config)[0]
    if config.get("train_text_encoder_ti"):  # pivotal tuning: the new tokens' embeddings load beside the weights
        prompt = families.pivot_prompt(prompt, config["token_abstraction"], config["new_tokens"])
        embeddings = families.EMBEDDINGS.format(name=Path(folder).resolve().name)
        load = "from safetensors.torch import load_file\n\n" + load + (f"\nstate = load_file(\"{embeddings}\")" + "".join(
            f"\npipe.load_textual_inversion(state[\"{key}\"], token={config['new_tokens']}, text_encoder=pipe.{encoder}, "
            f"tokenizer=pipe.{tokenizer})" for key, (encoder, _), tokenizer in
            zip(family.embedding_keys, family.text_encoders, family.tokenizers)))
    grids = sorted(Path(folder, "validation").glob("step-*.png"))
    body = f"""
# DreamBooth: {' and '.join(subject_prompts(config))}

A DreamBooth ([Ruiz et al. 2022](https://arxiv.org/abs/2208.12242)) {method} of `{base}`, {prior}:
{config['total_optimizer_steps']} optimizer steps at a global batch of {config['global_batch_size']}, learning rate
{config['learning_rate']}, {config['resolution']} px, seed {config['seed']}. Every setting is in `run_config.json`, the
code that ran in `code/`.

Prompt {'each subject' if len(subject_prompts(config)) > 1 else 'the subject'} as it was trained: \
{', '.join(f'**{p}**' for p in subject_prompts(config))}.
""" + (f"""
![validation images at step {int(grids[-1].stem.split('-')[1])}](validation/{grids[-1].name})
""" if grids else "") + f"""
## How to use

```python
import torch
from diffusers import {family.pipeline}

{load}
image = pipe("{prompt}", num_inference_steps=30).images[0]
```
""" + ("""
`pytorch_lora_weights_kohya.safetensors` holds the same adapters under kohya's names, for AUTOMATIC1111, ComfyUI and
the other web UIs.
""" if lora and not config.get("use_dora") else "") + ("""
Pivotal tuning: the identifier is new tokens, whose embeddings are in `*_emb.safetensors` (AUTOMATIC1111 and ComfyUI
read that file as a textual-inversion embedding named after it; write its name where the identifier was).
""" if config.get("train_text_encoder_ti") else "") + f"""
The license is the base model's{'' if data.license else f' (see `{base}`)'}.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ----------------------------------------------------------------------------------------------------------------
# The Hub


def hub_ignore_patterns(logging_dir="logs"):
    """What the upload of a run folder leaves out, as huggingface_hub patterns: training state (checkpoints are
    gigabytes of optimizer moments), exports, logs, tracker files and hidden files."""
    return ["checkpoint-*", "export-*", "wandb/*", f"{logging_dir.strip('/')}/*", ".*", "*/.*"]


def hub_files(folder, ignore_patterns):
    """The files upload_folder sends with these patterns: huggingface_hub's own filter over the folder's files."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=ignore_patterns))


def check_hub_login(token):
    from huggingface_hub import get_token

    if not (token or get_token()):
        cli.fail("--push_to_hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN")


def push_to_hub(folder, repo_id, token=None, logging_dir="logs", message="DreamBooth fine-tune"):
    """Upload a run folder to a model repository in one commit, without its training state and logs. Refuses, before
    any network call, when a file to upload holds the token (the check that the suite's records never carry one)."""
    from huggingface_hub import create_repo, get_token, upload_folder

    ignore, secret = hub_ignore_patterns(logging_dir), (token or get_token() or "").encode()
    leaking = [f for f in hub_files(folder, ignore) if secret and Path(f).suffix not in (".safetensors", ".bin")
               and secret in Path(folder, f).read_bytes()]
    if leaking:
        cli.fail(f"not pushing {folder}: {leaking[0]} holds the Hub token in plain text (delete the file, revoke the token)")
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=ignore, commit_message=message, token=token)
    except Exception as e:  # network, auth or permission: the local files are saved either way
        cli.fail(f"the results are saved in {folder}, but pushing them to {repo_id} failed: {cli.first_line(e)}")
    print(f"pushed {folder} to the hub as {repo_id}")


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    return cli.parse_args_with_config(build_parser(), argv)


def build_parser():
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("run", help="a finished training output folder, or one of its export-N folders")
    g = p.add_argument_group("single file")
    g.add_argument("--single_file", action="store_true",
                   help="write the pipeline as one .safetensors file in the web UIs' layout, beside it")
    g.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="weights of the single file")
    g = p.add_argument_group("LoRA")
    g.add_argument("--kohya", action="store_true", help="write a LoRA run's kohya-format file again from its diffusers-"
                   "format file (earlier versions of this suite wrote first-text-encoder keys that ComfyUI drops)")
    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload the run to the Hugging Face Hub")
    g.add_argument("--hub_model_id", default=None, help="hub repository (default: the run folder's name)")
    g.add_argument("--hub_token", default=None,
                   help="hub token (default: the `hf auth login` token or HF_TOKEN); used, never written or logged")
    return p


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything is written or sent
    folder = Path(args.run)
    record = next((p for p in (folder / "run_config.json", folder.parent / "run_config.json") if p.is_file()), None)
    if record is None:
        cli.fail(f"{folder} is not a training output folder or an export of one (no run_config.json in it or beside it)")
    if not ((folder / "model_index.json").is_file() or (folder / families.LORA_WEIGHTS).is_file()):
        cli.fail(f"{folder} holds no finished result yet (no model_index.json or {families.LORA_WEIGHTS})")
    if not (args.single_file or args.kohya or args.push_to_hub):
        cli.fail("nothing to do: give --single_file, --kohya or --push_to_hub")
    if args.kohya and not (folder / families.LORA_WEIGHTS).is_file():
        cli.fail(f"--kohya rewrites a LoRA run's kohya-format file, and {folder} holds a whole model (no {families.LORA_WEIGHTS})")
    if args.single_file and not (folder / "model_index.json").is_file():
        cli.fail(f"--single_file writes a whole model, and {folder} holds LoRA adapters: their file for the web UIs is "
                f"{families.LORA_WEIGHTS.replace('.safetensors', '_kohya.safetensors')}")
    if args.push_to_hub:
        check_hub_login(args.hub_token)
    config = json.loads(record.read_text())["config"]
    # ---- the single file (named after the run, and the step for an export), the kohya file, the card, the upload
    if args.kohya:
        print(f"wrote {write_kohya(folder, config)}")
    if args.single_file:
        name = folder.resolve().name if record.parent == folder else \
            f"{folder.resolve().parent.name}-{folder.name.replace('export-', 'step-')}"
        path = save_single_file(folder, folder / f"{name}.safetensors", families.torch_dtype(args.precision), config)
        print(f"wrote {path}")
    if args.push_to_hub:
        if not (folder / "README.md").is_file():
            model_card(folder, config).save(folder / "README.md")
        push_to_hub(folder, args.hub_model_id or folder.resolve().name, args.hub_token, config.get("logging_dir", "logs"))


if __name__ == "__main__":
    cli.run(main)
