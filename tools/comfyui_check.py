"""Load a run's files with ComfyUI's own loaders and say what ComfyUI detected, patched and dropped.

ComfyUI never refuses a LoRA key it cannot place: it logs "lora key not loaded" and samples without it. This runs
ComfyUI's loader functions headless (CPU is enough, no server, no nodes) on the files a run wrote:
  - a single file (`NAME.safetensors`, from --save_single_file or export.py --single_file): the architecture and
    prediction type ComfyUI detects, and every key it could not place;
  - the kohya-format LoRA (and the diffusers-format one, for information) on that checkpoint or on --checkpoint:
    layers patched in the UNet and in the text encoders, keys dropped;
  - pivotal tuning's `NAME_emb.safetensors`: how many embedding vectors `embedding:NAME_emb` puts in each encoder's
    prompt.
It is not part of the test suite (ComfyUI is no package). Exit status 1 when anything was dropped or left over.

    python tools/comfyui_check.py --comfyui ~/ComfyUI sks-dog                               # a full fine-tune
    python tools/comfyui_check.py --comfyui ~/ComfyUI sks-lora --checkpoint base.safetensors  # a LoRA run
"""

import argparse
import logging
import sys
from pathlib import Path


class Log(logging.Handler):
    """Every line ComfyUI logs, kept to be counted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def take(self):
        lines, self.lines = self.lines, []
        return lines


def load_checkpoint(path, embeddings, log):
    import comfy.sd

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                                 embedding_directory=str(embeddings))[:4]
    lines = log.take()
    config = model.model.model_config
    print(f"{path.name}: detected {type(config).__name__}, prediction {model.model.model_type.name}")
    bad = [line for line in lines if line.startswith(("left over keys", "unet missing", "unet unexpected",
                                                      "clip missing", "clip unexpected", "Missing VAE keys",
                                                      "Leftover VAE keys"))]
    for line in bad:
        print(f"  {line[:300]}")
    print(f"  {len(bad)} lines of keys missing or left over")
    return model, clip, len(bad)


def check_lora(path, model, clip, log):
    import comfy.lora
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    try:  # what comfy.sd.load_lora_for_models does first, where this ComfyUI has it
        import comfy.lora_convert

        lora = comfy.lora_convert.convert_lora(lora)
    except ImportError:
        pass
    log.take()
    patches = comfy.lora.load_lora(lora, key_map)
    dropped = [line for line in log.take() if line.startswith("lora key not loaded")]
    unet = sum(str(k).startswith("diffusion_model.") for k in patches)
    print(f"{path.name}: {len(patches)} layers patched ({unet} in the UNet, {len(patches) - unet} in the text "
          f"encoders), {len(dropped)} keys dropped")
    for line in dropped[:5]:
        print(f"  {line}")
    return len(dropped)


def check_embeddings(path, clip):
    import torch

    tokens = clip.tokenize(f"a photo of embedding:{path.stem}")
    counts = {name: sum(isinstance(t[0], torch.Tensor) for batch in chunks for t in batch)
              for name, chunks in tokens.items()}
    print(f"{path.name}: embedding vectors in the prompt per encoder: {counts}")
    return 0 if counts and all(counts.values()) else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training output folder (or export-N, checkpoint-N)")
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout (the folder holding comfy/)")
    p.add_argument("--checkpoint", default=None,
                   help="the base model as a single file, for a LoRA run (default: the run's own NAME.safetensors)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run, comfyui = Path(args.run), Path(args.comfyui).expanduser()
    if not (comfyui / "comfy" / "sd.py").is_file():
        sys.exit(f"error: {comfyui} is not a ComfyUI checkout (no comfy/sd.py)")
    if not run.is_dir():
        sys.exit(f"error: run folder not found: {run}")
    singles = [f for f in run.glob("*.safetensors") if not f.name.startswith("pytorch_lora_weights")
               and not f.name.endswith("_emb.safetensors")]
    checkpoint = Path(args.checkpoint) if args.checkpoint else (singles[0] if len(singles) == 1 else None)
    if checkpoint is None or not checkpoint.is_file():
        sys.exit(f"error: no single file to load in {run}: give the base model's with --checkpoint")

    sys.path.insert(0, str(comfyui))
    log = Log()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.DEBUG)
    import comfy  # noqa: F401  (from the checkout given)

    version = (comfyui / "comfyui_version.py").read_text().split('"')[1] if (comfyui / "comfyui_version.py").is_file() else "?"
    print(f"ComfyUI {version} from {comfyui}")
    model, clip, bad = load_checkpoint(checkpoint, run, log)
    for name in ("pytorch_lora_weights_kohya.safetensors", "pytorch_lora_weights.safetensors"):
        if (run / name).is_file():
            dropped = check_lora(run / name, model, clip, log)
            bad += dropped if "kohya" in name else 0  # the diffusers file is read by diffusers, not promised here
    for path in run.glob("*_emb.safetensors"):
        bad += check_embeddings(path, clip)
    print("nothing dropped" if not bad else f"{bad} problems above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
