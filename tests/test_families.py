"""The family seam: what differs between model families is declared in families.py's rows, and nothing outside
families.py branches on a family's name or writes a family's denoiser name. A new family is then its row."""

import ast

import pytest

from conftest import ROOT
import families
import loading

SCRIPTS = ["train_dreambooth.py", "generate_priors.py", "infer.py", "export.py", "imagedata.py", "objectives.py",
           "runs.py", "cli.py", "singlefile.py", "loading.py", "model_calls.py"]
# diffusers' own table of UNet keys (DIFFUSERS_TO_LDM_MAPPING["unet"]) in the UNet families' single-file layout
ALLOWED = {("singlefile.py", "ldm_unet_key")}


def literals(path):
    """(string constant, enclosing function) of a file, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []

    def visit(node, function):
        if isinstance(node, ast.FunctionDef):
            function = node.name
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.value, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_family_names_outside_the_rows(script):
    names = set(families.FAMILIES) | set(families.DENOISERS)
    found = [(value, function) for value, function in literals(ROOT / script)
             if value in names and (script, function) not in ALLOWED]
    assert not found, f"{script} names a family or a denoiser outside families.py: {found}"
    source = (ROOT / script).read_text()
    assert not [row for row in ("families.SD.", "families.SD)", "families.SDXL") if row in source]


def test_every_row_is_complete_and_names_real_classes():
    import diffusers
    import transformers

    for family in families.FAMILIES.values():
        assert family.pipeline_class().__name__ == family.pipeline
        assert hasattr(diffusers, family.denoiser_class)
        assert all(hasattr(transformers, cls) for _, cls in family.text_encoders)
        assert len(family.tokenizers) == len(family.text_encoders)
        # pivotal tuning's file has a key per text encoder, where the pipeline loads textual inversion
        has_loader = hasattr(family.pipeline_class(), "load_textual_inversion")
        assert len(family.embedding_keys) == len(family.text_encoders) * has_loader or family.name == "sd3"
        # a kohya-format copy names every model that trains, or there is none (the diffusers file is the UIs' one)
        assert {name for name, _ in family.kohya_prefixes} in (set(), {family.denoiser, *family.trained_text_encoders})
        assert set(family.trained_text_encoders) <= set(family.text_encoder_names)
        assert family.sequence_tokenizer in ("", *family.tokenizers) and family.objective in ("ddpm", "flow")
        assert family.components[0] == family.denoiser and callable(family.encode_prompt) and callable(family.denoise)


def test_every_family_flag_exists_and_the_samplers_match_the_objective():
    import train_dreambooth

    dests = {a.dest for a in train_dreambooth.build_parser()._actions}
    assert set(families.FAMILY_FLAGS) <= dests
    for family in families.FAMILIES.values():
        for config in ({"guidance_embeds": True}, {}):
            defaults = family.training_defaults(config)
            assert (defaults["validation_scheduler"] in loading.FLOW_SCHEDULERS) == (family.objective == "flow")


def test_each_model_is_recognised_by_exactly_one_row(tiny_model, tiny_sdxl, tiny_flux, tiny_sd3):
    """The family, native resolution and denoiser config come from the model's own files (model_index.json names the
    pipeline and the denoiser class; SD and SDXL share the class and differ in the UNet's config)."""
    for model, family in ((tiny_model, families.SD), (tiny_sdxl, families.SDXL), (tiny_flux, families.FLUX),
                          (tiny_sd3, families.SD3)):
        read = families.read_model(model)
        assert read.family is family
        index = __import__("json").loads((ROOT / model / "model_index.json").read_text())
        assert index["_class_name"] == family.pipeline and index[family.denoiser][1] == family.denoiser_class
    assert families.read_model(tiny_flux).config["guidance_embeds"] is True
    assert [families.read_model(m).resolution for m in (tiny_model, tiny_flux, tiny_sd3)] == [16, 64, 64]
