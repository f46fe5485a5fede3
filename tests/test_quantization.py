"""A quantized frozen base (QLoRA): the denoiser loaded as bitsandbytes' 4-bit NF4 or 8-bit layers (which run on the
CPU too), LoRA trained on top; the adapters load on the unquantized base."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import families
import loading
from test_bad_input_table import outcome

PROMPT = "a photo of sks dog"


def lora_run(run, model, photos, out, *extra):
    return run("train_dreambooth.py", "--model", model, "--instance_dir", photos, "--instance_prompt", PROMPT,
               "--output_dir", out, "--resolution", 32, "--rank", 4, "--learning_rate", "1e-3", "--max_train_steps", 2,
               "--checkpointing_steps", 1, "--seed", 0, "--report_to", "none", *extra, launch=False)


def trainable_parameters(proc):
    return int(proc.stdout.split(" trainable parameters")[0].rsplit(", ", 1)[1].replace(",", ""))


def test_nf4_base_trains_only_the_adapters_resumes_exactly_and_loads_on_the_unquantized_base(run, tiny_model, photos,
                                                                                                tmp_path):
    """SD with an NF4 base and --train_text_encoder: the UNet's and the text encoder's linear layers are bitsandbytes'
    4-bit ones; only the adapters train (the run's trainable parameters are the LoRA file's numbers, the text
    encoder's included); resumed after step 1 it ends with the same adapters, bit for bit; the file loads on the
    unquantized base and changes its image."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out, resumed = tmp_path / "nf4", tmp_path / "resumed"
    proc = lora_run(run, tiny_model, photos, out, "--quantize_base", "nf4", "--train_text_encoder")
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert config["quantize_base"] == "nf4" and config["quantized_modules"] == ["unet", "text_encoder"]
    state = load_file(out / families.LORA_WEIGHTS)
    assert any(k.startswith("text_encoder.") for k in state)
    assert trainable_parameters(proc) == sum(v.numel() for v in state.values())
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")  # as if the run had died after step 1
    shutil.copy(out / "run_config.json", resumed)
    lora_run(run, tiny_model, photos, resumed, "--quantize_base", "nf4", "--train_text_encoder", "--resume_from_checkpoint",
             "latest")
    again = load_file(resumed / families.LORA_WEIGHTS)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)

    import bitsandbytes as bnb

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet",
                                                **loading.quantized(loading.QUANTIZE["nf4"], torch.float32, "cpu"))
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, bnb.nn.Linear4bit)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)

    def sample():
        return pipe(PROMPT, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = sample()
    pipe.load_lora_weights(out)
    assert not (before == sample()).all()


@pytest.mark.parametrize("pre_computed", [False, True])
def test_a_quantized_base_quantizes_the_text_encoders_that_run_in_the_step(tiny_model, photos, tmp_path,
                                                                            make_accelerator, pre_computed):
    """With a quantized base, a text encoder that runs in every step (LoRA-trained here, or frozen without
    pre-computed prompts) loads as 4-bit layers too, only its adapters train, and the run records it; pre-computed
    prompts come from the text encoder at the training precision."""
    import bitsandbytes as bnb

    import train_dreambooth

    extra = ["--pre_compute_text_embeddings"] if pre_computed else ["--train_text_encoder"]
    args = train_dreambooth.parse_args(["--model", tiny_model, "--instance_dir", photos, "--instance_prompt", PROMPT,
                                        "--output_dir", str(tmp_path / "out"), "--rank", "4", "--quantize_base", "nf4",
                                        *extra])
    train_dreambooth.check_args(args)
    accelerator = make_accelerator()
    _, _, encoders, _ = train_dreambooth.load_models(args, accelerator, families.SD)
    unet = train_dreambooth.load_denoiser(args, accelerator, families.SD, encoders)
    q_proj = next(m for n, m in encoders["text_encoder"].named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    assert args.quantized_modules == ["unet"] + ([] if pre_computed else ["text_encoder"])
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer, bnb.nn.Linear4bit)
    if pre_computed:
        assert type(q_proj) is torch.nn.Linear and not any(p.requires_grad for p in encoders["text_encoder"].parameters())
    else:
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
        trainable = [n for n, p in encoders["text_encoder"].named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_int8_base_from_diffusers_json_config_with_offloading_and_validation(run, tiny_qwen_image, photos, tmp_path):
    """Qwen-Image with an 8-bit base given as diffusers' --bnb_quantization_config_path JSON, --offload, cached latents
    and validation images after every step (sampled by the quantized model): trains the same adapters bit for bit as
    the run without offloading and validation, and they load on the unquantized base. (On a CPU --offload moves
    nothing: what it saves on a GPU is not measured here.)"""
    from diffusers import QwenImagePipeline

    config, out, plain = tmp_path / "int8.json", tmp_path / "out", tmp_path / "plain"
    config.write_text(json.dumps({"load_in_8bit": True}))
    common = ["--bnb_quantization_config_path", config, "--max_sequence_length", 32, "--cache_latents"]
    lora_run(run, tiny_qwen_image, photos, out, *common, "--validation_prompt", PROMPT, "--num_validation_images", 1,
             "--validation_inference_steps", 2, "--validation_steps", 1, "--offload")
    assert (out / "validation" / "step-000001.png").exists() and (out / "validation" / "step-000002.png").exists()
    lora_run(run, tiny_qwen_image, photos, plain, *common)
    state, again = load_file(out / families.LORA_WEIGHTS), load_file(plain / families.LORA_WEIGHTS)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image)
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


def test_quantization_and_fp8_bad_input_is_one_line(tiny_model, photos, tmp_path, capsys):
    base = ["--model", tiny_model, "--instance_dir", photos, "--instance_prompt", PROMPT, "--output_dir",
            tmp_path / "out", "--resolution", 32]
    assert outcome("train", base + ["--quantize_base", "nf4"], capsys) == (
        1, "error: a quantized base is not trained itself: give --lora_rank (QLoRA trains adapters on top of it)")
    config = tmp_path / "q.json"
    config.write_text("{")
    line = outcome("train", base + ["--rank", 4, "--bnb_quantization_config_path", config], capsys)
    assert line[0] == 1 and line[1].startswith(f"error: --bnb_quantization_config_path {config}: ")
    config.write_text(json.dumps({"bnb_4bit_quant_type": "nf4"}))
    assert outcome("train", base + ["--rank", 4, "--bnb_quantization_config_path", config], capsys) == (
        1, f"error: --bnb_quantization_config_path {config} is not a bitsandbytes quantization config (a JSON object "
           "with load_in_4bit or load_in_8bit true, as BitsAndBytesConfig takes it)")
    assert outcome("train", base + ["--rank", 4, "--quantize_base", "int8", "--bnb_quantization_config_path",
                                    config], capsys) == (
        1, "error: give one of --quantize_base and --bnb_quantization_config_path (both say how to quantize the base)")
    if not torch.cuda.is_available():
        assert outcome("train", base + ["--rank", 4, "--do_fp8_training"], capsys) == (
            1, "error: --do_fp8_training needs a GPU with fp8 matmuls (compute capability 8.9 or later: Ada, Hopper, "
               "Blackwell), and this machine has no CUDA GPU: drop the flag (it buys speed, not memory)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3", "z-image", "flux2-klein"])
def test_every_family_trains_a_lora_on_an_nf4_base(run, family, tiny_sdxl, tiny_flux, tiny_sd3, tiny_z_image,
                                                   tiny_klein, photos, tmp_path):
    model = {"sdxl": tiny_sdxl, "flux": tiny_flux, "sd3": tiny_sd3, "z-image": tiny_z_image,
             "flux2-klein": tiny_klein}[family]
    out = tmp_path / "out"
    proc = lora_run(run, model, photos, out, "--quantize_base", "nf4",
                    *(["--max_sequence_length", 32] if family != "sdxl" else []))
    state = load_file(out / families.LORA_WEIGHTS)
    assert trainable_parameters(proc) == sum(v.numel() for k, v in state.items())
    ups = [v for k, v in state.items() if "lora_B" in k or "lora.up" in k]  # (SD3's last text query never reaches
    assert sum(not torch.equal(v, torch.zeros_like(v)) for v in ups) >= len(ups) - 1  # the loss: its B stays 0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 training needs a GPU of compute capability 8.9 or later")
def test_fp8_training_on_a_gpu_that_has_it(run, tiny_flux, photos, tmp_path):
    """--do_fp8_training (torchao) on a FLUX.1 LoRA in bf16: trains, and the adapters load on the base as any LoRA."""
    pytest.importorskip("torchao")
    from diffusers import FluxPipeline

    out = tmp_path / "out"
    proc = lora_run(run, tiny_flux, photos, out, "--do_fp8_training", "--mixed_precision", "bf16",
                    "--max_sequence_length", 32)
    state = load_file(out / families.LORA_WEIGHTS)
    assert trainable_parameters(proc) == sum(v.numel() for v in state.values())
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_the_memory_model_counts_a_quantized_base_as_bitsandbytes_stores_it(tiny_flux, base):
    """bench/memory.py's bytes for a quantized base (int8: a byte and an fp32 scale per row; NF4: half a byte and an
    fp32 scale per 64 weights) against what bitsandbytes allocates for a FLUX.1 transformer: every linear layer
    quantized, the same number of bytes."""
    import sys

    import bitsandbytes as bnb
    from diffusers import FluxTransformer2DModel

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer",
                                                   **loading.quantized(loading.QUANTIZE[base], torch.float32, "cpu"))
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in layers)
    stored = n = rows = 0
    for layer in layers:
        weight = layer.weight
        scales = weight.quant_state.absmax if base == "nf4" else weight.SCB
        shape = weight.quant_state.shape if base == "nf4" else weight.shape
        stored += weight.numel() * weight.element_size() + scales.numel() * scales.element_size()
        n, rows = n + shape.numel(), rows + shape[0]
    assert memory.BASE_BYTES[base](n, rows) == stored
