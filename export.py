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
import shutil
from pathlib import Path

import torch

import cli
import families
import loading
import runs
import singlefile

# ----------------------------------------------------------------------------------------------------------------
# LoRA files


KOHYA_DORA = ("DoRA adapters get no kohya-format copy: the web UIs' DoRA readers disagree on the magnitude's axis "
              "(AUTOMATIC1111 takes the input axis, peft trains the output axis) and diffusers' kohya reader drops it; "
              "the diffusers-format file holds them whole")


def save_lora(folder, family, dtype, trained):
    """Adapters of {name: (module, state dict)} ("unet", "text_encoder", "text_encoder_2") in diffusers' format
    (`pipe.load_lora_weights(folder)` of the family's pipeline; the LoRA config, alpha included, rides along as
    metadata), and a copy in kohya's format for the web UIs. Text encoders' keys in the files' layout (families.file_keys),
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
                     for k, v in (sd if name == family.denoiser and family.peft_lora_keys
                                  else convert_state_dict_to_diffusers(sd)).items()} for name, sd in peft.items()}
    family.pipeline_class().save_lora_weights(
        folder, safe_serialization=True, **{f"{name}_lora_layers": sd for name, sd in layers.items()},
        **{f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict() for name, (module, _) in trained.items()})
    if trained[family.denoiser][0].peft_config["default"].use_dora or not family.kohya_prefixes:
        return  # no kohya copy: see KOHYA_DORA; FLUX.1 and SD 3.5: ComfyUI reads diffusers' file as it is
    alphas = {name: module.peft_config["default"].lora_alpha for name, (module, _) in trained.items()}
    save_file(kohya_state(family, peft, alphas), Path(folder, families.KOHYA_WEIGHTS))


def read_lora(folder, family):
    """A diffusers-format LoRA folder as {model: peft's state}, text encoders under the files' layout: files written
    with transformers 4's text_model level (as now) or without it (earlier versions under transformers 5) alike."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    state, classes, peft = family.pipeline_class().lora_state_dict(str(folder)), dict(family.text_encoders), {}
    state = state[0] if isinstance(state, tuple) else state  # (state, alphas) for the UNet families, FLUX's alone
    for name in (family.denoiser, *classes):
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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    family, path = families.FAMILIES.get(config.get("model_family")), Path(folder, families.KOHYA_WEIGHTS)
    if family is None:
        cli.fail(f"the run config of {folder} names no model family this version knows ({config.get('model_family')})")
    if not family.kohya_prefixes:
        cli.fail(f"{folder} is a {family.pipeline} LoRA: its {families.LORA_WEIGHTS} is the file ComfyUI and the other "
                 "UIs load (no kohya-format copy is made for this family)")
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
    prefixes, matrices, kohya = dict(family.kohya_prefixes), {"lora_A": "lora_down", "lora_B": "lora_up"}, {}
    for name, state in peft.items():
        for key, value in state.items():
            module, matrix, _ = key.rsplit(".", 2)
            stem = f"{prefixes[name]}_{module.replace('.', '_')}"
            kohya[f"{stem}.{matrices[matrix]}.weight"] = value.contiguous()
            kohya[f"{stem}.alpha"] = torch.tensor(float(alphas[name]))
    return kohya


def save_token_embeddings(path, family, rows, dtype):
    """Pivotal tuning's new tokens, one tensor of rows per text encoder, in the embedding format AUTOMATIC1111 and
    ComfyUI read (SD 1.x/2.x: emb_params; SDXL: clip_l and clip_g), which diffusers' load_textual_inversion takes
    tensor by tensor (families.load_token_embeddings)."""
    from safetensors.torch import save_file

    save_file({key: row.to(dtype).contiguous().cpu() for key, row in zip(family.embedding_keys, rows)}, path)


# ----------------------------------------------------------------------------------------------------------------
# What a run writes: the result, exports and validation images during the run


def trained_weights(accelerator, args, model):
    """{name: (module, full state dict)} of the trained modules. Call it on every process: under FSDP (or DeepSpeed
    ZeRO-3) accelerator.get_state_dict gathers the sharded weights onto the main process."""
    state, unwrapped = accelerator.get_state_dict(model), accelerator.unwrap_model(model)
    names = [unwrapped.family.denoiser] + (list(unwrapped.family.trained_text_encoders) if args.train_text_encoder else [])
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
        pipe = loading.load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype, None,
                                args.pretrained_vae_model_name_or_path)
        for module, (_, state) in trained.items():
            getattr(pipe, module).load_state_dict(state)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if args.save_single_file:
            singlefile.save_single_file(tmp, tmp / f"{name}.safetensors", loading.torch_dtype(args.export_precision),
                                        vars(args))
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
        save_weights(args, folder, loading.torch_dtype(args.export_precision), trained,
                     f"{Path(args.output_dir).resolve().name}-step-{step}", accelerator.unwrap_model(model).token_embeddings())
        runs.remove_oldest(args.output_dir, "export", args.exports_total_limit)
    accelerator.wait_for_everyone()


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
    hub_base = base if loading.HUB_ID.match(base) and not Path(base).exists() else None
    tags = ["text-to-image", "diffusers", "diffusers-training", "dreambooth",
            family.hub_tag] + (["lora"] if lora else [])
    data = ModelCardData(base_model=hub_base, license=base_license(base), library_name="diffusers", tags=tags,
                         instance_prompt="; ".join(runs.subject_prompts(config)))
    method = (f"{'DoRA' if config.get('use_dora') else 'LoRA'} (rank {config['lora_rank']}, alpha "
              f"{config['lora_alpha'] or config['lora_rank']})" if lora
              else "full fine-tune") + f" of the {family.denoiser_class}" + (
        f" and {', '.join(family.trained_text_encoders)}" if config.get("train_text_encoder") else "")
    prior = (f"with prior preservation ({config['num_class_images_used']} images of "
             + ", ".join(f'"{p}"' for p in runs.subject_prompts(config, "class_prompt")) + ", "
             f"weight {config['prior_loss_weight']})" if config.get("with_prior_preservation") else "without prior preservation")
    load = (f"pipe = {family.pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.float16).to(\"cuda\")\n"
            "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\")" if lora else
            f"pipe = {family.pipeline}.from_pretrained(\"THIS_REPO_OR_FOLDER\", torch_dtype=torch.float16).to(\"cuda\")")
    prompt = runs.subject_prompts(config)[0]
    if config.get("train_text_encoder_ti"):  # pivotal tuning: the new tokens' embeddings load beside the weights
        prompt = families.pivot_prompt(prompt, config["token_abstraction"], config["new_tokens"])
        embeddings = families.EMBEDDINGS.format(name=Path(folder).resolve().name)
        load = "from safetensors.torch import load_file\n\n" + load + (f"\nstate = load_file(\"{embeddings}\")" + "".join(
            f"\npipe.load_textual_inversion(state[\"{key}\"], token={config['new_tokens']}, text_encoder=pipe.{encoder}, "
            f"tokenizer=pipe.{tokenizer})" for key, (encoder, _), tokenizer in
            zip(family.embedding_keys, family.text_encoders, family.tokenizers)))
    grids = sorted(Path(folder, "validation").glob("step-*.png"))
    body = f"""
# DreamBooth: {' and '.join(runs.subject_prompts(config))}

A DreamBooth ([Ruiz et al. 2022](https://arxiv.org/abs/2208.12242)) {method} of `{base}`, {prior}:
{config['total_optimizer_steps']} optimizer steps at a global batch of {config['global_batch_size']}, learning rate
{config['learning_rate']}, {config['resolution']} px, seed {config['seed']}. Every setting is in `run_config.json`, the
code that ran in `code/`.

Prompt {'each subject' if len(runs.subject_prompts(config)) > 1 else 'the subject'} as it was trained: \
{', '.join(f'**{p}**' for p in runs.subject_prompts(config))}.
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
""" if lora and not config.get("use_dora") and family.kohya_prefixes else "") + ("""
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
        if (folder / "random_states_0.pkl").is_file():  # a full run's checkpoint: training state, no pipeline
            cli.fail(f"{folder} is a training checkpoint (the state to resume from, not a pipeline): export the run's "
                     "folder once it has finished, or an export-N folder (--export_steps saves pipelines of "
                     "intermediate steps)")
        cli.fail(f"{folder} holds no finished result yet (no model_index.json or {families.LORA_WEIGHTS})")
    if not (args.single_file or args.kohya or args.push_to_hub):
        cli.fail("nothing to do: give --single_file, --kohya or --push_to_hub")
    if args.kohya and not (folder / families.LORA_WEIGHTS).is_file():
        cli.fail(f"--kohya rewrites a LoRA run's kohya-format file, and {folder} holds a whole model (no {families.LORA_WEIGHTS})")
    config = json.loads(record.read_text())["config"]
    family = families.family_of_record(config)
    if args.single_file and not (folder / "model_index.json").is_file():
        cli.fail(f"--single_file writes a whole model, and {folder} holds LoRA adapters: their file for the web UIs is "
                 f"{families.KOHYA_WEIGHTS if family.kohya_prefixes else families.LORA_WEIGHTS}")
    if args.single_file and not family.single_file_layout:
        cli.fail(f"--single_file: this version writes no single file for {family.pipeline}; {folder} is its "
                 "diffusers folder")
    if args.push_to_hub:
        check_hub_login(args.hub_token)
    # ---- the single file (named after the run, and the step for an export), the kohya file, the card, the upload
    if args.kohya:
        print(f"wrote {write_kohya(folder, config)}")
    if args.single_file:
        name = folder.resolve().name if record.parent == folder else \
            f"{folder.resolve().parent.name}-{folder.name.replace('export-', 'step-')}"
        path = singlefile.save_single_file(folder, folder / f"{name}.safetensors", loading.torch_dtype(args.precision), config)
        print(f"wrote {path}")
    if args.push_to_hub:
        if not (folder / "README.md").is_file():
            model_card(folder, config).save(folder / "README.md")
        push_to_hub(folder, args.hub_model_id or folder.resolve().name, args.hub_token, config.get("logging_dir", "logs"))


if __name__ == "__main__":
    cli.run(main)
