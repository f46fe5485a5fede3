"""Data listing and preprocessing: order, EXIF, captions, crops, the instance/class batch layout, prior indices."""

import pytest
import torch
from PIL import Image

import generate_priors
import imagedata
from imagedata import DreamBoothDataset, collate, preprocess


def save(path, size=(16, 12), color=(255, 0, 0), **kw):
    Image.new("RGB", size, color).save(path, **kw)
    return path


def test_images_are_listed_sorted_and_non_images_skipped_with_a_note(tmp_path, capsys):
    for name in ["b.png", "a.jpg", "c.webp"]:
        save(tmp_path / name, format="PNG" if name.endswith("png") else None)
    (tmp_path / "a.txt").write_text("a caption")  # sidecar: silent
    (tmp_path / "notes.pdf").write_text("not an image")
    (tmp_path / ".DS_Store").write_text("")
    assert [p.name for p in imagedata.list_images(tmp_path, "instance image")] == ["a.jpg", "b.png", "c.webp"]
    err = capsys.readouterr().err
    assert "notes.pdf" in err and "a.txt" not in err and "DS_Store" not in err


@pytest.mark.parametrize("content", [b"not a png at all", None], ids=["garbage", "truncated"])
def test_a_corrupt_image_is_named(tmp_path, content):
    save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    if content is None:  # a real PNG cut in half
        save(bad, size=(64, 64), color=(1, 2, 3))
        content = bad.read_bytes()[: len(bad.read_bytes()) // 2]
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        imagedata.list_images(tmp_path, "instance image")
    assert str(e.value).startswith("error: cannot read image") and str(bad) in str(e.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match="instance image folder not found: .*nope"):
        imagedata.list_images(tmp_path / "nope", "instance image")


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert raw.size == (40, 20)
    assert imagedata.load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "alpha.png")
    assert imagedata.load_image(tmp_path / "gray.png").mode == "RGB"
    assert imagedata.load_image(tmp_path / "alpha.png").mode == "RGB"


def test_sidecar_caption_replaces_the_prompt(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo of sks dog on grass \n")
    save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("   ")  # empty: the default stands
    assert imagedata.read_caption(tmp_path / "a.png", "default") == "a photo of sks dog on grass"
    assert imagedata.read_caption(tmp_path / "b.png", "default") == "default"
    assert imagedata.read_caption(tmp_path / "c.png", "default") == "default"


def test_center_crop_takes_the_middle_and_scales_to_minus_one_one():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    out, time_ids, _ = preprocess(img, (10, 10), center_crop=True, random_flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    assert torch.equal(out, torch.ones(3, 10, 10))
    assert time_ids.tolist() == [10, 30, 0, 10, 10, 10]  # original (h, w), crop (top, left), target (h, w)


def test_random_crop_and_flip_follow_the_generator():
    img = Image.linear_gradient("L").rotate(90).convert("RGB").resize((48, 32))  # varies left to right
    a, a_ids, _ = preprocess(img, (16, 16), False, True, torch.Generator().manual_seed(1))
    b, b_ids, _ = preprocess(img, (16, 16), False, True, torch.Generator().manual_seed(1))
    outs = {preprocess(img, (16, 16), False, True, torch.Generator().manual_seed(s))[0].sum().item() for s in range(8)}
    assert torch.equal(a, b) and torch.equal(a_ids, b_ids) and len(outs) > 1


class WordTokenizer:
    model_max_length = 6

    def __call__(self, text, **kw):
        ids = [len(w) for w in text.split()][: self.model_max_length]
        ids += [0] * (self.model_max_length - len(ids))
        return type("Out", (), {"input_ids": torch.tensor([ids])})


def test_batch_holds_instances_first_then_class_images(tmp_path):
    inst = [(save(tmp_path / f"i{k}.png", color=(k, 0, 0)), f"sks {'x' * (k + 1)}", None) for k in range(2)]
    cls = [save(tmp_path / f"c{k}.png", color=(0, 0, 200 + k)) for k in range(3)]
    ds = DreamBoothDataset([(inst, cls, "dog")], [WordTokenizer()], 8, True, False, seed=0)
    assert len(ds) == 3  # the larger of the two sets
    batch = collate([ds[0], ds[1]])
    assert batch["images"].shape == (4, 3, 8, 8) and batch["time_ids"].shape == (4, 6)
    # rows 0-1: instances 0, 1; rows 2-3: class images 0, 1 (blue); token ids of the one tokenizer
    (texts,) = batch["texts"]  # token ids of the one tokenizer
    assert texts.shape == (4, 6)
    assert texts[:, 1].tolist() == [1, 2, 0, 0] and texts[:, 0].tolist() == [3, 3, 3, 3]
    assert (batch["images"][2:, 2] > 0).all() and (batch["images"][:2, 2] == -1).all()


def test_image_seeds_depend_only_on_seed_and_index():
    seeds = [imagedata.image_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100 and seeds[7] == imagedata.image_seed(0, 7) != imagedata.image_seed(1, 7)


def test_missing_prior_indices_counts_user_images_and_fills_gaps(tmp_path):
    assert generate_priors.missing_prior_indices(tmp_path / "new", 3) == [0, 1, 2]
    save(tmp_path / generate_priors.prior_image_name(1))
    save(tmp_path / "my_own_dog.jpg")
    (tmp_path / ".000000.png.tmp").write_bytes(b"half an image")  # a killed run's leftover does not count
    assert generate_priors.missing_prior_indices(tmp_path, 4) == [0, 2]
    assert generate_priors.missing_prior_indices(tmp_path, 2) == []
