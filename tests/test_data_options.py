"""The data options: aspect-ratio buckets, several subjects in one run (--concepts_list), and masks that weigh the
subject's pixels in the loss. Pure functions and the dataset first, then the script run for real on the tiny models of
both families: each batch one size, exact resume with buckets and with two subjects, cached latents equal to
uncached ones with buckets, each subject with its own class images and validation prompt."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import generate_priors
import imagedata
import objectives
import train_dreambooth as td
from test_data import WordTokenizer
from test_train import scalars, train_args, weights

# ----------------------------------------------------------------------------------------------------------------
# Buckets


def test_auto_buckets_are_about_the_resolutions_area_in_multiples_of_64():
    sdxl = imagedata.bucket_sizes("auto", 1024)
    assert {(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)} <= set(sdxl)
    for resolution in (512, 768, 1024):
        assert (resolution, resolution) in imagedata.bucket_sizes("auto", resolution)
        for h, w in imagedata.bucket_sizes("auto", resolution):
            assert h % 64 == w % 64 == 0 and max(h, w) <= 2 * min(h, w)
            assert 0.8 * resolution**2 <= h * w <= resolution**2, (resolution, h, w)
    assert imagedata.bucket_sizes("auto", 32) == [(32, 32)]  # below 64 px: the square alone
    assert imagedata.bucket_sizes("64,64; 48,80;80,48;", 64) == [(48, 80), (64, 64), (80, 48)]
    for bad in ("64x64", "64,60", "64", "a,b", "0,64"):
        with pytest.raises(SystemExit):
            td.parse_args(["--aspect_ratio_buckets", bad])


def test_each_photo_goes_to_the_bucket_of_the_nearest_aspect_ratio():
    sizes = [(48, 80), (64, 64), (80, 48)]
    assert imagedata.nearest_bucket(sizes, 120, 60) == (48, 80)  # wide: width 120, height 60
    assert imagedata.nearest_bucket(sizes, 60, 90) == (80, 48)
    assert imagedata.nearest_bucket(sizes, 70, 66) == (64, 64)


def test_a_photo_is_fitted_to_its_bucket_and_its_mask_follows_the_crop_and_flip():
    """A red disc on grey, its mask the disc: after any random crop and flip into a wide bucket, the mask is white
    exactly where the pixels are red, and the time ids carry the original size and the (mirrored) crop."""
    photo = Image.new("RGB", (150, 100), (128, 128, 128))
    ImageDraw.Draw(photo).ellipse([20, 20, 70, 70], fill=(255, 0, 0))
    mask = Image.new("L", (150, 100), 0)
    ImageDraw.Draw(mask).ellipse([20, 20, 70, 70], fill=255)
    crops = set()
    for seed in range(12):
        pixels, time_ids, m = imagedata.preprocess(photo, (48, 80), False, True, torch.Generator().manual_seed(seed), mask=mask)
        assert pixels.shape == (3, 48, 80) and m.shape == (1, 48, 80)
        red = (pixels[0] > 0.9) & (pixels[1] < -0.9)  # the disc; its mask, resized and cropped the same way:
        assert red[m[0] > 0.99].all() and not red[m[0] < 0.01].any() and red.any() and (m < 0.01).any()
        h0, w0, top, left, h, w = time_ids.tolist()  # resized to 80 x 53: a crop top in 0..5
        assert (h0, w0, h, w) == (100, 150, 48, 80) and left == 0 and 0 <= top <= 5
        crops.add((top, bool(red[:, :40].sum() < red[:, 40:].sum())))  # the disc on the right: flipped
    assert len(crops) > 3


def photo_set(folder, sizes, color=(200, 30, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (40 * i % 255, 120, 60))
        ImageDraw.Draw(image).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=color)
        image.save(folder / f"p{i}.png")
        paths.append(folder / f"p{i}.png")
    return paths


def test_bucket_batches_are_one_size_cover_the_epoch_and_replay_from_seed_and_epoch(tmp_path):
    photos = [(p, "sks dog", None) for p in photo_set(tmp_path / "i", [(96, 64), (64, 96), (80, 80), (120, 60), (90, 60)])]
    classes = photo_set(tmp_path / "c", [(64, 64)] * 7, color=(0, 0, 200))
    ds = imagedata.DreamBoothDataset([(photos, classes, "dog")], [WordTokenizer()], 64, False, True, seed=5,
                              buckets=[(48, 80), (64, 64), (80, 48)])
    sampler = imagedata.BucketBatchSampler(ds, 2, seed=5)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))  # every item once
        for b in batches:
            assert len({ds.size_of(i) for i in b}) == 1
            batch = imagedata.collate([ds[i] for i in b])  # photos and their class images: one shape
            h, w = ds.size_of(b[0])
            assert batch["images"].shape == (2 * len(b), 3, h, w)
            assert batch["time_ids"][:, 4:].tolist() == [[h, w]] * (2 * len(b))
            originals = [list(Image.open(photos[ds.locate(i)[1]][0]).size[::-1]) for i in b] + [[64, 64]] * len(b)
            assert batch["time_ids"][:, :2].tolist() == originals  # SDXL's time ids: each image's real size
        orders.append(batches)
    assert orders[0] == orders[2] and orders[0] != orders[1]


def test_two_subjects_get_equal_shares_with_their_own_class_images_and_prompts(tmp_path):
    a = [(p, "a photo of sks dog", None) for p in photo_set(tmp_path / "a", [(64, 64)] * 3)]
    b = [(p, "a photo of zwx cat", None) for p in photo_set(tmp_path / "b", [(64, 64)] * 30)]
    dogs, cats = photo_set(tmp_path / "dogs", [(64, 64)] * 4), photo_set(tmp_path / "cats", [(64, 64)] * 5)
    ds = imagedata.DreamBoothDataset([(a, dogs, "a photo of dog"), (b, cats, "a photo of cat")], [WordTokenizer()], 32, True,
                              False, seed=0)
    assert len(ds) == 60  # both subjects as long as the larger set: 30 each per epoch
    seen = {0: [], 1: []}
    for i in range(len(ds)):
        s, p, c = ds.locate(i)
        seen[s].append((p, c))
    assert len(seen[0]) == len(seen[1]) == 30
    assert {p for p, _ in seen[0]} == {0, 1, 2} and {c for _, c in seen[0]} == {0, 1, 2, 3}
    assert {p for p, _ in seen[1]} == set(range(30)) and {c for _, c in seen[1]} == set(range(5))
    (_, dog_prompt), (_, dog_class) = ds[0]
    (_, cat_prompt), (_, cat_class) = ds[1]
    assert torch.equal(dog_prompt[0], ds.tokenize("a photo of sks dog")[0]) and torch.equal(dog_class[0], ds.tokenize("a photo of dog")[0])
    assert torch.equal(cat_prompt[0], ds.tokenize("a photo of zwx cat")[0]) and torch.equal(cat_class[0], ds.tokenize("a photo of cat")[0])


def test_one_subject_keeps_the_old_pairing():
    """Item i is photo i and class image i (modulo their counts), as before --concepts_list."""
    ds = imagedata.DreamBoothDataset([([("x", "p", None)] * 3, ["c"] * 5, "q")], [WordTokenizer()], 32, True, False, seed=0)
    assert len(ds) == 5 and [ds.locate(i) for i in range(5)] == [(0, i % 3, i) for i in range(5)]


# ----------------------------------------------------------------------------------------------------------------
# Masked loss


def test_a_background_weight_of_zero_ignores_the_background_and_a_white_mask_is_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:2, :, 8:24, 8:24] = 1  # instance examples: the subject in the middle; class examples (rows 2-3): ones
    masks[2:] = 1
    weights = objectives.mask_weights(masks, (8, 8), 0.0)
    assert weights[0, 0, 3, 3] == 1 and weights[0, 0, 0, 0] == 0 and torch.equal(weights[2:], torch.ones(2, 1, 8, 8))
    loss = objectives.dreambooth_loss(pred, target, 2, 1.0, pixel_weights=weights)
    other = target.clone()
    other[:2, :, :2, :] += 5.0  # only background pixels of the instance examples
    assert all(torch.equal(x, y) for x, y in zip(loss, objectives.dreambooth_loss(pred, other, 2, 1.0, pixel_weights=weights)))
    inside = target.clone()
    inside[:2, :, 3:5, 3:5] += 5.0  # the subject's pixels count
    assert objectives.dreambooth_loss(pred, inside, 2, 1.0, pixel_weights=weights)[1] > loss[1]
    # the class loss is never masked; an all-white mask is the plain loss, bit for bit
    assert torch.equal(loss[2], objectives.dreambooth_loss(pred, target, 2, 1.0)[2])
    white = objectives.mask_weights(torch.ones(4, 1, 32, 32), (8, 8), 0.1)
    assert all(torch.equal(x, y) for x, y in zip(objectives.dreambooth_loss(pred, target, 2, 0.5, pixel_weights=white),
                                                 objectives.dreambooth_loss(pred, target, 2, 0.5)))
    # a background weight between: between the two
    half = objectives.dreambooth_loss(pred, other, 2, 1.0, pixel_weights=objectives.mask_weights(masks, (8, 8), 0.5))[1]
    assert loss[1] < half < objectives.dreambooth_loss(pred, other, 2, 1.0)[1]


def save_mask(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def test_masks_sit_beside_their_photos_and_are_not_photos(tmp_path):
    photo_set(tmp_path, [(64, 48), (64, 48)])
    save_mask(tmp_path / "p0.mask.png", np.full((24, 32), 255, np.uint8))  # half the size: fine
    assert imagedata.list_images(tmp_path, "instance image") == [tmp_path / "p0.png", tmp_path / "p1.png"]
    assert imagedata.find_mask(tmp_path / "p0.png") == tmp_path / "p0.mask.png" and imagedata.find_mask(tmp_path / "p1.png") is None
    assert imagedata.load_mask(tmp_path / "p0.mask.png", (64, 48)).size == (64, 48)


@pytest.mark.parametrize("array, mode, message", [
    (np.full((48, 48), 255, np.uint8), None, "is 48x48 and its photo 64x48: a mask has its photo's shape (at any size)"),
    (np.zeros((48, 64), np.uint8), None, "has no white pixels: white marks the subject"),
    (np.dstack([np.full((48, 64), 255, np.uint8), np.zeros((48, 64), np.uint8), np.zeros((48, 64), np.uint8)]), None,
     "has coloured pixels: a mask is black and white (white = the subject), grey at soft edges"),
    (np.dstack([np.full((48, 64, 3), 255, np.uint8), np.zeros((48, 64, 1), np.uint8)]), None,
     "has transparent pixels: a mask is black and white (white = the subject), grey at soft edges"),
    (np.full((48, 64), 40000, np.uint16), None, "is a I;16 image: a mask is black and white (white = the subject), "
                                                "8-bit grey or RGB"),
])
def test_a_mask_that_makes_no_sense_is_one_line_naming_it(tmp_path, array, mode, message):
    photo_set(tmp_path, [(64, 48)])
    mask = save_mask(tmp_path / "p0.mask.png", array, mode)
    with pytest.raises(SystemExit) as e:
        imagedata.find_mask(tmp_path / "p0.png")
    assert str(e.value) == f"error: mask {mask} {message}"


# ----------------------------------------------------------------------------------------------------------------
# --concepts_list input


@pytest.mark.parametrize("content, message", [
    ('{"instance_prompt": "x"}', "must be a non-empty list of subjects ({instance_prompt, instance_data_dir, "
                                 "class_prompt, class_data_dir}), not dict"),
    ("[]", "must be a non-empty list of subjects ({instance_prompt, instance_data_dir, class_prompt, class_data_dir}), "
           "not list (empty)"),
    ('[{"instance_prompt": "a photo of sks dog"}]', "subject 0 needs instance_data_dir"),
    ('[{"instance_prompt": "p", "instance_data_dir": "d", "class_promt": "q"}]', "subject 0 has unknown key(s) class_promt"),
    ('[{"instance_prompt": "p", "instance_data_dir": "d"}, 3]', "subject 1 is a int, not a mapping of instance_prompt, "
                                                                 "instance_data_dir, class_prompt, class_data_dir"),
    ("[{", "is not JSON: Expecting property name enclosed in double quotes: line 1 column 3 (char 2)"),
])
def test_a_concepts_list_that_makes_no_sense_is_one_line(tmp_path, content, message):
    path = tmp_path / "concepts.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        imagedata.read_concepts(str(path), False)
    assert str(e.value) == f"error: --concepts_list {path} {message}".replace(f"{path} subject", f"{path}: subject")


def test_prior_preservation_needs_each_subjects_class_and_a_folder_per_class(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text('[{"instance_prompt": "p", "instance_data_dir": "d", "class_prompt": "q"}]')
    with pytest.raises(SystemExit, match="subject 0 needs class_data_dir \\(prior preservation is on\\)"):
        imagedata.read_concepts(str(path), True)
    same = {"instance_prompt": "p", "instance_data_dir": "d", "class_data_dir": "priors/"}
    concepts = [{**same, "class_prompt": "a dog"}, {**same, "class_prompt": "a dog"}]
    assert len(imagedata.read_concepts(concepts, True)) == 2  # two subjects of one class share its folder
    with pytest.raises(SystemExit) as e:
        imagedata.read_concepts(concepts + [{**same, "class_data_dir": "priors", "class_prompt": "a cat"}], True)
    assert str(e.value) == ("error: --concepts_list: class folder priors is given two class prompts ('a dog' and "
                            "'a cat'): one folder per class")


# ----------------------------------------------------------------------------------------------------------------
# The script, for real


@pytest.fixture(scope="module")
def mixed_photos(tmp_path_factory):
    """Photos of three aspect ratios, two with masks (at twice the photo's size)."""
    folder = tmp_path_factory.mktemp("mixed")
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (120, 60)]):
        photo_set(folder / "tmp", [(w, h)])[0].rename(folder / f"p{i}.png")
        if i < 2:
            mask = Image.new("L", (2 * w, 2 * h), 0)
            ImageDraw.Draw(mask).ellipse([w // 2, h // 2, 3 * w // 2, 3 * h // 2], fill=255)
            mask.save(folder / f"p{i}.mask.png")
    shutil.rmtree(folder / "tmp")
    return folder


BUCKETS = ["--aspect_ratio_buckets", "64,64;48,80;80,48"]


def resumed_equals_uninterrupted(run, out, args, trained=("unet",), launch=False, env=None):
    """Train 4 steps with checkpoints every 2; then resume a copy from checkpoint-2: the same weights and losses."""
    run("train_dreambooth.py", *args(out, "--max_train_steps", 4, "--checkpointing_steps", 2), launch=launch, env=env)
    resumed = out.with_name(out.name + "-resumed")
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run("train_dreambooth.py", *args(resumed, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                     "--resume_from_checkpoint", "latest"), launch=launch, env=env)
    for component in trained:
        ref, new = weights(out, component), weights(resumed, component)
        assert all(torch.equal(ref[k], new[k]) for k in ref), component
    ref_logs, new_logs = scalars(out / "logs"), scalars(resumed / "logs")
    assert new_logs["loss"] == {s: v for s, v in ref_logs["loss"].items() if s > 2}


@pytest.mark.slow  # CI time: Z-Image's full fine-tune covers buckets, masks, priors and exact resume by default, and
# SDXL's time ids per bucket are checked on the dataset (test_bucket_batches_are_one_size_...)
def test_buckets_and_masks_with_prior_preservation_train_and_resume_exactly_sdxl(run, tiny_sdxl, mixed_photos, tmp_path):
    """SDXL: mixed-aspect photos in buckets, two with masks, class images fitted to each photo's bucket; the run says
    what it did, records it, and a resume from a checkpoint is bit-identical."""
    def args(out, *extra):
        return train_args(tiny_sdxl, mixed_photos, out, *BUCKETS, "--with_prior_preservation", "--class_dir",
                          tmp_path / "priors", "--class_prompt", "a photo of dog", "--num_class_images", 3,
                          "--random_flip", "--mask_background_weight", 0.2, *extra)

    out = tmp_path / "run"
    resumed_equals_uninterrupted(run, out, args)
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["buckets"] == {"48x80": 2, "64x64": 1, "80x48": 1}
    assert record["masks"] == [str(mixed_photos / "p0.mask.png"), str(mixed_photos / "p1.mask.png")]


@pytest.mark.slow  # CI time: two processes resume exactly in test_resume.py; bucket batches are one size and replay
# from (seed, epoch) on the dataset (test_bucket_batches_are_one_size_...)
def test_buckets_on_two_processes_take_whole_batches_and_resume_exactly(run, tiny_model, mixed_photos, tmp_path):
    """accelerate deals whole batches to the processes (a batch of one bucket each), and the resume is exact."""
    def args(out, *extra):
        return train_args(tiny_model, mixed_photos, out, *BUCKETS, "--train_batch_size", 1, "--random_flip", *extra)

    resumed_equals_uninterrupted(run, tmp_path / "run", args, launch=["--multi_gpu", "--num_processes", 2],
                                 env={"ACCELERATE_USE_CPU": "true"})


def test_the_banner_names_the_buckets_and_masks(run, tiny_sdxl, mixed_photos, tmp_path):
    proc = run("train_dreambooth.py", *train_args(tiny_sdxl, mixed_photos, tmp_path / "out", *BUCKETS,
                                                  "--max_train_steps", 1, "--report_to", "none"))
    assert ("4 instance images, 2 with masks (background weight 0.0), buckets 48x80: 2, 64x64: 1, 80x48: 1, "
            "0 class images") in proc.stdout


@pytest.mark.slow  # a minute of CI: cached = uncached is in the default run without buckets (SD, SDXL)
def test_cached_latents_equal_uncached_with_buckets(run, tiny_model, mixed_photos, tmp_path):
    """Batch 1 without class images: the VAE then encodes one image at a time either way, as the cache does (a batch
    of two rounds differently). With class images, each is cached at the buckets of its photos: that run trains too."""
    common = [*BUCKETS, "--train_batch_size", 1, "--center_crop", "--random_flip", "--max_train_steps", 4,
              "--report_to", "none"]
    run("train_dreambooth.py", *train_args(tiny_model, mixed_photos, tmp_path / "live", *common))
    run("train_dreambooth.py", *train_args(tiny_model, mixed_photos, tmp_path / "cached", *common, "--cache_latents"))
    live, cached = weights(tmp_path / "live", "unet"), weights(tmp_path / "cached", "unet")
    assert all(torch.equal(live[k], cached[k]) for k in live)
    run("train_dreambooth.py", *train_args(tiny_model, mixed_photos, tmp_path / "prior", *common, "--cache_latents",
                                           "--with_prior_preservation", "--class_dir", tmp_path / "priors",
                                           "--class_prompt", "a photo of dog", "--num_class_images", 3))
    assert (tmp_path / "prior" / "model_index.json").is_file()


@pytest.mark.slow  # CI time: Z-Image's full fine-tune trains two subjects with their own class images and resumes
# exactly by default; the subjects' shares and prompts are checked on the dataset (test_two_subjects_get_equal_...)
def test_two_subjects_own_class_images_validation_prompts_and_exact_resume(run, tiny_model, photos, tmp_path):
    cats = tmp_path / "cats"
    photo_set(cats, [(64, 64)] * 2, color=(30, 30, 220))
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_prompt": "a photo of sks dog", "instance_data_dir": str(photos), "class_prompt": "a photo of dog",
         "class_data_dir": str(tmp_path / "dogs"), "validation_prompt": "a sks dog on the beach"},
        {"instance_prompt": "a photo of zwx cat", "instance_data_dir": str(cats), "class_prompt": "a photo of cat",
         "class_data_dir": str(tmp_path / "cat-priors"), "validation_prompt": ["a zwx cat in a box"]}]))
    run("generate_priors.py", "--model", tiny_model, "--concepts_list", concepts, "--num_class_images", 2,
        "--num_inference_steps", 2, "--resolution", 64, launch=False)
    for folder, prompt in ((tmp_path / "dogs", "a photo of dog"), (tmp_path / "cat-priors", "a photo of cat")):
        assert len(imagedata.list_images(folder, "class image")) == 2 and generate_priors.read_prior_manifest(folder)["class_prompt"] == prompt

    def args(out, *extra):
        return ["--pretrained_model_name_or_path", tiny_model, "--concepts_list", concepts, "--output_dir", out,
                "--resolution", 64, "--train_batch_size", 2, "--learning_rate", 1e-4, "--lr_warmup_steps", 0, "--seed", 0,
                "--with_prior_preservation", "--num_class_images", 3, "--train_text_encoder", "--validation_steps", 4,
                "--num_validation_images", 1, "--validation_inference_steps", 1, *extra]

    out = tmp_path / "run"
    resumed_equals_uninterrupted(run, out, args, trained=("unet", "text_encoder"))
    # each folder was topped up to 3 with its own prompt; both subjects' prompts were sampled
    for folder, prompt in ((tmp_path / "dogs", "a photo of dog"), (tmp_path / "cat-priors", "a photo of cat")):
        assert len(imagedata.list_images(folder, "class image")) == 3 and generate_priors.read_prior_manifest(folder)["class_prompt"] == prompt
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["validation_prompt"] == ["a sks dog on the beach", "a zwx cat in a box"]
    assert record["num_instance_images"] == 6 and record["num_class_images_used"] == 6
    assert Image.open(out / "validation" / "step-000004.png").size == (64, 2 * 64)  # one row per prompt
    card = (out / "README.md").read_text()
    assert "**a photo of sks dog**, **a photo of zwx cat**" in card


def test_concepts_list_in_a_config_file(tiny_model, photos, tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"concepts_list": [
        {"instance_prompt": "a photo of sks dog", "instance_data_dir": str(photos)}]}))
    args = td.parse_args(["--config", str(config), "--model", tiny_model, "--output_dir", str(tmp_path / "o"),
                          "--resolution", "64"])
    td.check_args(args)
    assert [s["instance_prompt"] for s in args.subjects] == ["a photo of sks dog"]


def test_a_batch_with_a_masked_photo_carries_white_masks_for_the_rest(tmp_path):
    paths = photo_set(tmp_path / "i", [(64, 64), (64, 64)])
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)  # the left half
    mask.save(tmp_path / "i" / "p0.mask.png")
    photos = [(p, "sks dog", imagedata.find_mask(p)) for p in paths]
    classes = photo_set(tmp_path / "c", [(64, 64)] * 2)
    ds = imagedata.DreamBoothDataset([(photos, classes, "dog")], [WordTokenizer()], 32, True, False, seed=0)
    batch = imagedata.collate([ds[0], ds[1]])
    assert batch["masks"].shape == (4, 1, 32, 32)
    assert batch["masks"][0, 0, :, :15].min() == 1 and batch["masks"][0, 0, :, 17:].max() == 0  # the photo's mask
    assert torch.equal(batch["masks"][1:], torch.ones(3, 1, 32, 32))  # the photo without one, the class images
    assert "masks" not in imagedata.collate([ds[1]])  # no masked photo in the batch: the plain loss


def test_caption_dropout_empties_instance_prompts_only_and_keeps_the_images_draws(tmp_path):
    """--caption_dropout: each instance example's prompt is empty with that probability, drawn from (seed, epoch,
    item) alone (the same in a resumed run); class prompts never; the crops and flips stay those of a run without."""
    photos = [(p, "sks dog", None) for p in photo_set(tmp_path / "i", [(96, 64)] * 4)]
    classes = photo_set(tmp_path / "c", [(64, 64)] * 40, color=(0, 0, 200))

    def dataset(p):
        return imagedata.DreamBoothDataset([(photos, classes, "a dog")], [WordTokenizer()], 32, False, True, seed=5,
                                           caption_dropout=p)

    plain, dropped, again = dataset(0.0), dataset(0.5), dataset(0.5)
    empty, prompt, class_prompt = (WordTokenizer()(t).input_ids[0] for t in ("", "sks dog", "a dog"))
    kept = []
    for i in range(len(plain)):
        (image, text), (class_image, class_text) = dropped[i]
        assert torch.equal(image[0], plain[i][0][0][0]) and torch.equal(class_image[0], plain[i][1][0][0])
        assert torch.equal(class_text[0], class_prompt) and torch.equal(plain[i][0][1][0], prompt)
        assert torch.equal(text[0], prompt) or torch.equal(text[0], empty)
        assert torch.equal(text[0], again[i][0][1][0])  # a function of (seed, epoch, item)
        kept.append(torch.equal(text[0], prompt))
    assert 10 < sum(kept) < 30  # about half of 40
    dropped.set_epoch(1)
    assert [torch.equal(dropped[i][0][1][0], prompt) for i in range(len(plain))] != kept  # redrawn each epoch
