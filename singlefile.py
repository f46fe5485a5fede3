"""Single files: a diffusers pipeline folder as one .safetensors file in the original key layout that AUTOMATIC1111,
ComfyUI, Forge, InvokeAI and diffusers' from_single_file read (LDM's for SD 1.x/2.x, SGM's for SDXL; the transformer
alone for FLUX.1 and SD 3.5: the family row's single_file_layout), with the run in its header. export.py --single_file and train_dreambooth.py --save_single_file
write them."""

import json
import re
from pathlib import Path

import torch

import cli
import families
import runs


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
    """A CLIP text model's weights under transformers 4's names, as the original layouts nest them."""
    return {k: v for k, v in families.file_keys(state, "CLIPTextModel").items() if not k.endswith("position_ids")}


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


# ----------------------------------------------------------------------------------------------------------------
# The flow transformers alone, in their original layout: FLUX.1's as Black Forest Labs ships flux1-dev.safetensors
# (no prefix), SD 3.5's MMDiT as Stability's files hold it (model.diffusion_model.). The inverse of diffusers'
# convert_flux/sd3_transformer_checkpoint_to_diffusers: (original name, diffusers names) per block, several diffusers
# tensors fused into one (q, k, v; FLUX's single blocks also the MLP input), the final modulation's halves back in the
# original (shift, scale) order. ComfyUI loads these with its diffusion-model loader.

FLUX_TOP = (("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
            ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
            ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
            ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out"))
FLUX_DOUBLE = (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
               ("img_attn.qkv", "attn.to_q attn.to_k attn.to_v"),
               ("txt_attn.qkv", "attn.add_q_proj attn.add_k_proj attn.add_v_proj"),
               ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
               ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"),
               ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"), ("txt_mlp.0", "ff_context.net.0.proj"),
               ("txt_mlp.2", "ff_context.net.2"), ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"))
FLUX_SINGLE = (("modulation.lin", "norm.linear"), ("linear1", "attn.to_q attn.to_k attn.to_v proj_mlp"),
               ("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k"), ("linear2", "proj_out"))
MMDIT_TOP = (("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
             ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out"))
MMDIT_BLOCK = (("x_block.attn.qkv", "attn.to_q attn.to_k attn.to_v"),
               ("context_block.attn.qkv", "attn.add_q_proj attn.add_k_proj attn.add_v_proj"),
               ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
               ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
               ("x_block.attn.proj", "attn.to_out.0"), ("context_block.attn.proj", "attn.to_add_out"),
               ("x_block.attn2.qkv", "attn2.to_q attn2.to_k attn2.to_v"), ("x_block.attn2.ln_q", "attn2.norm_q"),
               ("x_block.attn2.ln_k", "attn2.norm_k"), ("x_block.attn2.proj", "attn2.to_out.0"),
               ("x_block.adaLN_modulation.1", "norm1.linear"), ("x_block.mlp.fc1", "ff.net.0.proj"),
               ("x_block.mlp.fc2", "ff.net.2"), ("context_block.mlp.fc1", "ff_context.net.0.proj"),
               ("context_block.mlp.fc2", "ff_context.net.2"))


def swap_halves(tensor):
    """(scale, shift) <-> (shift, scale): diffusers' AdaLayerNormContinuous splits the projection the other way."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def renamed(state, table, original_prefix="", diffusers_prefix=""):
    """Move the tensors of `table` out of `state` under their original names (fused where it names several)."""
    out = {}
    for original, names in table:
        for suffix in ("weight", "bias"):
            keys = [f"{diffusers_prefix}{n}.{suffix}" for n in names.split()]
            if all(k in state for k in keys):
                name = "scale" if original.endswith("_norm") else suffix  # BFL's RMS norms keep a `scale`
                out[f"{original_prefix}{original}.{name}"] = torch.cat([state.pop(k) for k in keys])
    return out


def blocks(state, prefix):
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix + ".")})


def flux_state(transformer):
    state = dict(transformer)
    out = renamed(state, FLUX_TOP)
    for i in blocks(state, "transformer_blocks"):
        out.update(renamed(state, FLUX_DOUBLE, f"double_blocks.{i}.", f"transformer_blocks.{i}."))
    for i in blocks(state, "single_transformer_blocks"):
        out.update(renamed(state, FLUX_SINGLE, f"single_blocks.{i}.", f"single_transformer_blocks.{i}."))
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = swap_halves(state.pop(f"norm_out.linear.{suffix}"))
    return out, state


def mmdit_state(transformer):
    state, prefix = dict(transformer), "model.diffusion_model."
    out = {prefix + "pos_embed": state.pop("pos_embed.pos_embed"), **renamed(state, MMDIT_TOP, prefix)}
    last = blocks(state, "transformer_blocks")[-1]
    for i in blocks(state, "transformer_blocks"):
        if i == last:  # the last block's text side is an AdaLayerNormContinuous: its halves swapped
            for suffix in ("weight", "bias"):
                out[f"{prefix}joint_blocks.{i}.context_block.adaLN_modulation.1.{suffix}"] = swap_halves(
                    state.pop(f"transformer_blocks.{i}.norm1_context.linear.{suffix}"))
        else:
            out.update(renamed(state, (("context_block.adaLN_modulation.1", "norm1_context.linear"),),
                               f"{prefix}joint_blocks.{i}.", f"transformer_blocks.{i}."))
        out.update(renamed(state, MMDIT_BLOCK, f"{prefix}joint_blocks.{i}.", f"transformer_blocks.{i}."))
    for suffix in ("weight", "bias"):
        out[f"{prefix}final_layer.adaLN_modulation.1.{suffix}"] = swap_halves(state.pop(f"norm_out.linear.{suffix}"))
    return out, state


# a family row's single_file_layout for a transformer alone -> (writer, ModelSpec architecture)
TRANSFORMER_LAYOUTS = {"bfl": (flux_state, "flux-1"), "mmdit": (mmdit_state, "stable-diffusion-v3-5")}


def single_file_metadata(config, title, architecture, v_prediction):
    """The header the web UIs show: Stability's ModelSpec keys (what kohya's scripts write), and the run's settings;
    `v_prediction` None for the flow models (no prediction type in the spec)."""
    settings = {k: config.get(k) for k in ("instance_prompt", "class_prompt", "with_prior_preservation",
                                           "train_text_encoder", "learning_rate", "resolution", "seed", "lora_rank")}
    settings["optimizer_steps"] = config.get("total_optimizer_steps") or config.get("max_train_steps")
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "diffusers", "modelspec.title": title,
            **({} if v_prediction is None else {"modelspec.prediction_type": "v" if v_prediction else "epsilon"}),
            "modelspec.resolution": f"{config.get('resolution')}x{config.get('resolution')}",
            "dreambooth.base_model": str(config.get("pretrained_model_name_or_path")),
            "dreambooth.instance_prompt": "; ".join(runs.subject_prompts(config)), "dreambooth.settings": json.dumps(settings)}


def save_single_file(pipeline_folder, path, dtype=torch.float16, config=None):
    """A diffusers pipeline folder (a full fine-tune's output or export) -> one .safetensors file in the original
    layout, in `dtype`, with the run's `config` in its header. Read from the folder's files: no model is built."""
    from safetensors.torch import load_file

    def read(name):  # a component's weights; a damaged file is named, not a traceback
        state = {}
        for f in sorted(Path(folder, name).glob("*.safetensors")):
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors' own error type for a truncated or corrupt file
                cli.fail(f"cannot read {f}: {cli.first_line(e)} (truncated or damaged: copy it again, or export "
                         "another step)")
        return state

    folder = Path(pipeline_folder)
    family = families.read_model(str(folder))[0]
    if family.single_file_layout in TRANSFORMER_LAYOUTS:  # FLUX.1, SD 3.5: the transformer alone
        write, architecture = TRANSFORMER_LAYOUTS[family.single_file_layout]
        state, left = write(read(family.denoiser))
        if left:
            cli.fail(f"cannot write {family.pipeline}'s transformer in its original layout: {len(left)} tensors have "
                     f"no place in it, e.g. {next(iter(left))}")
        return write_file(path, state, dtype, single_file_metadata(config or {}, Path(path).stem, architecture, None))
    names = [family.denoiser, "vae", *family.text_encoder_names]
    parts = {name: read(name) for name in names}
    configs = {name: json.loads(Path(folder, name, "config.json").read_text()) for name in names}
    scheduler = json.loads(Path(folder, "scheduler", "scheduler_config.json").read_text())
    v_prediction = scheduler.get("prediction_type") == "v_prediction"
    state, architecture = ldm_state(parts, configs, family, v_prediction)
    return write_file(path, state, dtype, single_file_metadata(config or {}, Path(path).stem, architecture, v_prediction))


def write_file(path, state, dtype, metadata):
    """Under a temporary name, then moved into place: a killed write never leaves a file with the real name."""
    from safetensors.torch import save_file

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    tmp.replace(path)
    return path
