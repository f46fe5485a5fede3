"""The LoRA files under the names other tools map: every key of the kohya file names a layer the web UIs know
(ComfyUI's and AUTOMATIC1111's key maps: the UNet's diffusers paths, CLIP's layers under transformers 4's text_model
level), every key of the diffusers file a module under diffusers' canonical names, counted both ways, whatever the
installed transformers calls its modules; and files of the older layout (text encoders without the text_model level)
still load wherever the suite reads LoRA."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import families
import export

# The CLIP layers the web UIs map for a LoRA (ComfyUI's LORA_CLIP_MAP), and the prefixes kohya's sd-scripts writes.
# Written out here rather than read from the family rows: the test is that the suite matches what the UIs expect.
CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
KOHYA = {"sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
         "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
DIFFUSERS_SUFFIXES = {"unet": ("lora.down.weight", "lora.up.weight", "lora_magnitude_vector"),
                      "text": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
                               "lora_magnitude_vector.weight")}


def layers(model_dir, family):
    """{(model, module path under the files' names)} of every layer the UIs map a LoRA onto: the UNet's Linear and
    Conv2d modules by their diffusers paths, and each text encoder's CLIP layers from its config."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    found = {("unet", n) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name in KOHYA[family]:
        if name != "unet":
            config = CLIPTextConfig.from_pretrained(model_dir, subfolder=name)
            found |= {(name, f"text_model.encoder.layers.{b}.{c}") for b in range(config.num_hidden_layers)
                      for c in CLIP_LAYERS}
    return found


def trained_layers(model_dir, family, models, unet_targets=families.UNET_LORA_TARGETS):
    """The layers a run puts adapters on: the UNet's target modules, the text encoders' attention projections."""
    return {(model, path) for model, path in layers(model_dir, family) if model in models and any(
        path.endswith("." + t) for t in (unet_targets if model == "unet" else families.TEXT_ENCODER_LORA_TARGETS))}


def assert_kohya_names(path, model_dir, family, models, unet_targets=families.UNET_LORA_TARGETS):
    """Every key of a kohya file names a layer the UIs map, and every trained layer has its three keys. Returns the
    number of layers per model."""
    state = load_file(path)
    ui = {f"{KOHYA[family][model]}_{p.replace('.', '_')}": (model, p) for model, p in layers(model_dir, family)}
    stems = {}
    for key in state:
        stem, part = key.split(".", 1)
        stems.setdefault(stem, set()).add(part)
    unknown = sorted(set(stems) - set(ui))
    assert not unknown, f"{len(unknown)} keys name no layer the web UIs map, e.g. {unknown[0]}"
    trained = trained_layers(model_dir, family, models, unet_targets)
    expected = {name for name, layer in ui.items() if layer in trained}
    assert set(stems) == expected, f"trained layers without a key: {sorted(expected - set(stems))[:3]}"
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in stems.values())
    return {model: sum(ui[s][0] == model for s in stems) for model in models}


def assert_diffusers_names(path, model_dir, family, models, dora=False):
    """Every key of a diffusers-format file is a trained module under diffusers' names plus a LoRA suffix, and every
    trained module has its matrices (and DoRA's magnitude)."""
    state = load_file(path)
    canonical = {f"{model}.{p}" for model, p in layers(model_dir, family)}
    modules = {}
    for key in state:
        model = key.split(".")[0]
        suffixes = DIFFUSERS_SUFFIXES["unet" if model == "unet" else "text"]
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        assert suffix, f"{key}: not a LoRA key of diffusers' format"
        module = key[:-len(suffix) - 1]
        assert module in canonical, f"{key}: no module {module} under diffusers' names"
        modules.setdefault(module, set()).add(suffix)
    expected = {f"{m}.{p}" for m, p in trained_layers(model_dir, family, models)}
    assert set(modules) == expected, f"trained modules without a key: {sorted(expected - set(modules))[:3]}"
    assert all(len(parts) == 2 + dora for parts in modules.values())


def adapters(model_dir, family, models, use_dora=False):
    """The pipeline's models with adapters as training puts them (random up matrices, so nothing is zero)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    config = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_dora": use_dora}
    torch.manual_seed(0)
    trained = {}
    for name in models:
        module = getattr(pipe, name)
        families.add_lora(module, config, families.UNET_LORA_TARGETS if name == "unet" else families.TEXT_ENCODER_LORA_TARGETS)
        for key, p in module.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(p)
        trained[name] = (module, module.state_dict())
    return trained


@pytest.mark.parametrize("family, models", [("sd", ["unet", "text_encoder"]), ("sd", ["unet"]),
                                            ("sdxl", ["unet", "text_encoder", "text_encoder_2"]), ("sdxl", ["unet"])],
                         ids=["sd-text-encoder", "sd-unet", "sdxl-text-encoders", "sdxl-unet"])
def test_both_files_name_every_trained_layer_as_their_readers_do(tiny_model, tiny_sdxl, tmp_path, family, models):
    model_dir = tiny_model if family == "sd" else tiny_sdxl
    export.save_lora(tmp_path, families.FAMILIES[family], torch.float32, adapters(model_dir, family, models))
    counts = assert_kohya_names(tmp_path / "pytorch_lora_weights_kohya.safetensors", model_dir, family, models)
    assert all(counts[m] > 0 for m in models), counts
    assert_diffusers_names(tmp_path / families.LORA_WEIGHTS, model_dir, family, models)


def test_dora_file_names_every_trained_layer_and_its_magnitude(tiny_sdxl, tmp_path):
    models = ["unet", "text_encoder", "text_encoder_2"]
    export.save_lora(tmp_path, families.SDXL, torch.float32, adapters(tiny_sdxl, "sdxl", models, use_dora=True))
    assert_diffusers_names(tmp_path / families.LORA_WEIGHTS, tiny_sdxl, "sdxl", models, dora=True)
    assert not (tmp_path / "pytorch_lora_weights_kohya.safetensors").exists()


def older_layout(folder):
    """The diffusers file as earlier versions wrote it under transformers 5: text encoders without text_model."""
    from safetensors import safe_open

    path = folder / families.LORA_WEIGHTS
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    assert any(".text_model." in k for k in state)
    save_file({k.replace(".text_model.", ".", 1): v for k, v in state.items()}, path, metadata=metadata)


@pytest.mark.parametrize("layout", ["current", "older"])
def test_resume_and_diffusers_read_both_layouts_into_the_same_adapters(tiny_sdxl, tmp_path, layout):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    models = ["unet", "text_encoder", "text_encoder_2"]
    written = adapters(tiny_sdxl, "sdxl", models)
    export.save_lora(tmp_path, families.SDXL, torch.float32, written)
    if layout == "older":
        older_layout(tmp_path)
    want = {name: get_peft_model_state_dict(module) for name, (module, _) in written.items()}

    fresh = adapters(tiny_sdxl, "sdxl", models)  # the resume hook's case: adapters in place, other values
    export.load_lora(tmp_path, families.SDXL, {name: module for name, (module, _) in fresh.items()})
    for name, (module, _) in fresh.items():
        got = get_peft_model_state_dict(module)
        assert got.keys() == want[name].keys() and all(torch.equal(got[k], want[name][k]) for k in got), name

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # infer.py's --lora: diffusers' load_lora_weights
    pipe.load_lora_weights(tmp_path, adapter_name="default")
    for name in models:
        got = get_peft_model_state_dict(getattr(pipe, name))
        assert got.keys() == want[name].keys() and all(torch.equal(got[k], want[name][k]) for k in got), name


def test_a_file_that_does_not_fit_the_models_is_one_line(tiny_model, tmp_path):
    """Plain LoRA adapters into a run's DoRA modules (their magnitudes missing): one line naming the folder, not a
    silent partial load."""
    export.save_lora(tmp_path, families.SD, torch.float32, adapters(tiny_model, "sd", ["unet"]))
    dora = adapters(tiny_model, "sd", ["unet"], use_dora=True)
    with pytest.raises(SystemExit, match=r"cannot load the adapters of .* into the unet: missing .*lora_magnitude"):
        export.load_lora(tmp_path, families.SD, {"unet": dora["unet"][0]})
