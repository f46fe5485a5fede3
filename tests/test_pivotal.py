"""Pivotal tuning (--train_text_encoder_ti): the identifier becomes new tokens whose embeddings train beside the
UNet or its LoRA. The mechanism in-process (only the new rows move, under each optimizer), then whole runs of both
families: the embeddings file loads with diffusers' load_textual_inversion, and infer.py makes the run's own
validation image from it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import families
import loading
import imagedata
from test_lora_files import assert_kohya_names
from test_train import train_args


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "prodigy"])
def test_only_the_new_rows_of_the_embedding_matrix_train(tiny_model, photos, tmp_path, optimizer):
    """The tokens join the tokenizer, their rows start from the initializer's embedding, and after a few steps with
    weight decay they alone have changed: every other row is bit-identical (the gradient is masked to them, and their
    group has no weight decay)."""
    from transformers import AutoTokenizer, CLIPTextModel

    import train_dreambooth

    args = train_dreambooth.parse_args([str(a) for a in train_args(
        tiny_model, photos, tmp_path / "o", "--train_text_encoder_ti", "--initializer_concept", "dog",
        "--optimizer", optimizer, "--adam_weight_decay", 0.5)])
    train_dreambooth.check_args(args)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").requires_grad_(False)  # as load_models
    base = encoder.get_input_embeddings().weight.detach().clone()
    [ids] = families.add_new_tokens([tokenizer], [encoder], args.new_tokens, args.initializer_concept)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s0>", "<s1>"] and ids == [base.shape[0], base.shape[0] + 1]
    tokens = tokenizer("a photo of <s0><s1> dog").input_ids
    assert tokens[tokens.index(ids[0]):][:2] == ids  # one token each, side by side
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    weight = encoder.get_input_embeddings().weight
    assert weight.dtype == torch.float32 and torch.equal(weight[ids[0]], base[dog].mean(0))

    model = train_dreambooth.DreamBoothModel(families.SD, torch.nn.Linear(1, 1), {"text_encoder": encoder}, ["text_encoder"], [ids])
    optimizer = train_dreambooth.make_optimizer(args, train_dreambooth.param_groups(args, model))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[1]["params"] == [weight]
    prompt = tokenizer(["a photo of <s0><s1> dog", "a photo of dog"], padding="max_length", return_tensors="pt").input_ids
    for _ in range(3):
        encoder(prompt).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = weight.detach()
    assert torch.equal(after[: base.shape[0]], base)  # the vocabulary's rows, weight decay or not
    assert not torch.equal(after[ids], torch.stack([base[dog].mean(0)] * 2))
    assert torch.equal(model.token_embeddings()[0], after[ids])


def validation_image(out, step):
    with Image.open(out / "validation" / f"step-{step:06d}.png") as grid:
        return np.asarray(grid.convert("RGB"))


# SDXL's in the slow set for CI time: pivotal tuning over two text encoders is tested by default with FLUX.1's
# (test_flow.py: CLIP and T5, resumed mid-run)
@pytest.mark.parametrize("family", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_pivotal_tuning_saves_embeddings_that_diffusers_and_infer_load(run, tiny_model, tiny_sdxl, photos, tmp_path,
                                                                       family):
    """A LoRA run with pivotal tuning, stopped at its checkpoint and resumed (bit-identical), writes NAME_emb.safetensors
    in the web UIs' format; diffusers' load_textual_inversion reads it beside load_lora_weights and gives the image
    the run's own validation made, and so does infer.py from the run folder, with the prompt written as trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    model = tiny_model if family == "sd" else tiny_sdxl
    common = ["--lora_rank", 4, "--learning_rate", 1e-2, "--train_text_encoder_ti", "--initializer_concept", "dog",
              "--text_encoder_lr", 5e-2, "--train_batch_size", 1, "--max_train_steps", 4, "--checkpointing_steps", 2,
              "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
              "--validation_inference_steps", 2, "--validation_steps", 4, "--report_to", "none"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    one = {"OMP_NUM_THREADS": "1"}  # one thread everywhere: another count sums floats in another order
    proc = run("train_dreambooth.py", *train_args(model, photos, reference, *common), launch=False, env=one)
    assert "pivotal tuning: 'sks' is <s0><s1>" in proc.stdout
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    run("train_dreambooth.py", *train_args(model, photos, out, *common, "--resume_from_checkpoint", "latest"),
        launch=False, env=one)
    embeddings = load_file(out / "run_emb.safetensors")
    assert embeddings.keys() == set(families.FAMILIES[family].embedding_keys)
    ref = load_file(reference / "reference_emb.safetensors")
    assert all(torch.equal(ref[k], embeddings[k]) for k in ref)  # the resume is exact, the new rows included
    ref_lora, lora = (load_file(f / families.LORA_WEIGHTS) for f in (reference, out))
    assert all(torch.equal(ref_lora[k], lora[k]) for k in ref_lora)
    assert_kohya_names(out / "pytorch_lora_weights_kohya.safetensors", model, family, ["unet"])  # the UNet's alone
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["new_tokens"] == ["<s0>", "<s1>"] and record["validation_prompt"] == ["a photo of <s0><s1> dog"]

    pipe = (StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline).from_pretrained(model)
    pipe.load_lora_weights(out)
    families.load_token_embeddings(pipe, out / "run_emb.safetensors", families.FAMILIES[family], ["<s0>", "<s1>"])
    loading.set_scheduler(pipe, "dpm++_2m")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = pipe("a photo of <s0><s1> dog", num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(imagedata.image_seed(record["seed"], 0))).images[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(image), validation_image(out, 4))

    run("infer.py", "--model", out, "--prompt", "a photo of sks dog", "--num_images_per_prompt", 1, "--seed",
        record["seed"], "--num_inference_steps", 2, "--scheduler", "dpm++_2m", "--height", 64, "--width", 64,
        "--output_dir", tmp_path / "images", launch=False, env=one)
    [made] = (tmp_path / "images").glob("p00-a_photo_of_sks_dog-*.png")  # named and recorded as written
    assert np.array_equal(np.asarray(Image.open(made).convert("RGB")), validation_image(out, 4))
    assert Image.open(made).text["parameters"].startswith("a photo of sks dog\n")
