"""Turn a DreamBooth run into what other tools load, and publish it: the LoRA files (diffusers' format, and kohya's for
the web UIs) and the Hub upload of a run folder. train_dreambooth.py calls the same functions at the end of a run;
from the shell, this publishes a finished run without training it again.

    python export.py sks-dog --push_to_hub --hub_model_id me/sks-dog
"""

import json
from pathlib import Path

import torch

import dreambooth_utils as du

# ----------------------------------------------------------------------------------------------------------------
# LoRA files


def save_lora(folder, family, dtype, trained):
    """Adapters of {name: (module, state dict)} ("unet", "text_encoder", "text_encoder_2") in diffusers' format
    (`pipe.load_lora_weights(folder)` of the family's pipeline; the LoRA config, alpha included, rides along as
    metadata), and a copy with kohya's key names (lora_unet_, lora_te1_, lora_te2_) for the web UIs, made by
    diffusers' own converter."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft = {name: {k: v.to(dtype) for k, v in get_peft_model_state_dict(module, state_dict=state).items()}
            for name, (module, state) in trained.items()}
    family.pipeline_class().save_lora_weights(
        folder, safe_serialization=True,
        **{f"{name}_lora_layers": convert_state_dict_to_diffusers(sd) for name, sd in peft.items()},
        **{f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict() for name, (module, _) in trained.items()})
    kohya = convert_state_dict_to_kohya({f"{name}.{k}": v for name, sd in peft.items() for k, v in sd.items()})
    alpha = trained["unet"][0].peft_config["default"].lora_alpha  # the converter writes alpha = rank; ours may differ
    kohya = {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    save_file(kohya, Path(folder, du.LORA_WEIGHTS.replace(".safetensors", "_kohya.safetensors")))


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

    family, lora, base = du.FAMILIES[config.get("model_family", "sd")], bool(config.get("lora_rank")), \
        config["pretrained_model_name_or_path"]
    hub_base = base if du.HUB_ID.match(base) and not Path(base).exists() else None
    tags = ["text-to-image", "diffusers", "diffusers-training", "dreambooth",
            "stable-diffusion-xl" if family is du.SDXL else "stable-diffusion"] + (["lora"] if lora else [])
    data = ModelCardData(base_model=hub_base, license=base_license(base), library_name="diffusers", tags=tags,
                         instance_prompt=config["instance_prompt"])
    method = (f"LoRA (rank {config['lora_rank']}, alpha {config['lora_alpha'] or config['lora_rank']})" if lora
              else "full fine-tune") + (" of the UNet and the text encoder(s)" if config.get("train_text_encoder")
                                        else " of the UNet")
    prior = (f"with prior preservation ({config['num_class_images_used']} images of \"{config['class_prompt']}\", "
             f"weight {config['prior_loss_weight']})" if config.get("with_prior_preservation") else "without prior preservation")
    load = (f"pipe = {family.pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.float16).to(\"cuda\")\n"
            "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\")" if lora else
            f"pipe = {family.pipeline}.from_pretrained(\"THIS_REPO_OR_FOLDER\", torch_dtype=torch.float16).to(\"cuda\")")
    grids = sorted(Path(folder, "validation").glob("step-*.png"))
    body = f"""
# DreamBooth: {config['instance_prompt']}

A DreamBooth ([Ruiz et al. 2022](https://arxiv.org/abs/2208.12242)) {method} of `{base}`, {prior}:
{config['total_optimizer_steps']} optimizer steps at a global batch of {config['global_batch_size']}, learning rate
{config['learning_rate']}, {config['resolution']} px, seed {config['seed']}. Every setting is in `run_config.json`, the
code that ran in `code/`.

Prompt the subject as it was trained: **{config['instance_prompt']}**.
""" + (f"""
![validation images at step {int(grids[-1].stem.split('-')[1])}](validation/{grids[-1].name})
""" if grids else "") + f"""
## How to use

```python
import torch
from diffusers import {family.pipeline}

{load}
image = pipe("{config['instance_prompt']}", num_inference_steps=30).images[0]
```
""" + ("""
`pytorch_lora_weights_kohya.safetensors` holds the same adapters under kohya's names, for AUTOMATIC1111, ComfyUI and
the other web UIs.
""" if lora else "") + f"""
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
        du.fail("--push_to_hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN")


def push_to_hub(folder, repo_id, token=None, logging_dir="logs", message="DreamBooth fine-tune"):
    """Upload a run folder to a model repository in one commit, without its training state and logs. Refuses, before
    any network call, when a file to upload holds the token (the check that the suite's records never carry one)."""
    from huggingface_hub import create_repo, get_token, upload_folder

    ignore, secret = hub_ignore_patterns(logging_dir), (token or get_token() or "").encode()
    leaking = [f for f in hub_files(folder, ignore) if secret and Path(f).suffix not in (".safetensors", ".bin")
               and secret in Path(folder, f).read_bytes()]
    if leaking:
        du.fail(f"not pushing {folder}: {leaking[0]} holds the Hub token in plain text (delete the file, revoke the token)")
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=ignore, commit_message=message, token=token)
    except Exception as e:  # network, auth or permission: the local files are saved either way
        du.fail(f"the results are saved in {folder}, but pushing them to {repo_id} failed: {du.first_line(e)}")
    print(f"pushed {folder} to the hub as {repo_id}")


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    return du.parse_args_with_config(build_parser(), argv)


def build_parser():
    p = du.ArgumentParser(__doc__, __file__)
    p.add_argument("run", help="a finished training output folder (a pipeline or LoRA files, and run_config.json)")
    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload the run to the Hugging Face Hub")
    g.add_argument("--hub_model_id", default=None, help="hub repository (default: the run folder's name)")
    g.add_argument("--hub_token", default=None,
                   help="hub token (default: the `hf auth login` token or HF_TOKEN); used, never written or logged")
    return p


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything is sent
    run = Path(args.run)
    if not (run / "run_config.json").is_file():
        du.fail(f"{run} is not a training output folder (no run_config.json)")
    if not ((run / "model_index.json").is_file() or (run / du.LORA_WEIGHTS).is_file()):
        du.fail(f"{run} holds no finished result yet (no model_index.json or {du.LORA_WEIGHTS})")
    if not args.push_to_hub:
        du.fail("nothing to do: give --push_to_hub")
    check_hub_login(args.hub_token)
    config = json.loads((run / "run_config.json").read_text())["config"]
    # ---- publish, with a model card if the run has none yet
    if not (run / "README.md").is_file():
        model_card(run, config).save(run / "README.md")
    push_to_hub(run, args.hub_model_id or run.resolve().name, args.hub_token, config.get("logging_dir", "logs"))


if __name__ == "__main__":
    du.run(main)
