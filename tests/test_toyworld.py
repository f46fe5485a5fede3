"""The toy world: rendering is deterministic, and the evaluator reads every attribute back from rendered
ground truth (it must, before it can judge generated images)."""

from dataclasses import replace

import numpy as np

from toyworld.world import PALETTE, SHAPES, SUBJECT, expected, read_attributes, reading, render, sample_attributes


def test_rendering_is_a_function_of_the_seed():
    assert np.array_equal(np.asarray(render(sample_attributes(7))), np.asarray(render(sample_attributes(7))))
    assert sample_attributes(7) != sample_attributes(8)


def test_the_evaluator_reads_rendered_ground_truth():
    attributes = [sample_attributes(seed) for seed in range(600)]
    assert {a.shape for a in attributes} == set(SHAPES) and {a.colour for a in attributes} == set(PALETTE)
    wrong = [(a, reading(render(a))) for a in attributes if reading(render(a)) != expected(a)]
    assert not wrong, wrong[:3]


def test_the_subject_is_told_apart_from_plain_circles():
    subjects = [sample_attributes(seed, subject=True) for seed in range(100)]
    for a in subjects:
        seen = read_attributes(render(a))
        assert (seen["shape"], seen["background"], seen["pattern"]) == ("circle", a.background, True)
    assert subjects[0].caption() == f"a photo of sks circle on a {subjects[0].background} background"
    plain = [sample_attributes(seed, shape="circle") for seed in range(100)]
    assert not any(read_attributes(render(a))["pattern"] for a in plain)
    # the pattern is the subject's own: halves swapped, or split left/right, is another object
    swapped = [replace(a, colour=SUBJECT[1], pattern=SUBJECT[::-1]) for a in subjects]
    assert not any(read_attributes(render(a))["pattern"] for a in swapped)
    sideways = [render(a).rotate(90) for a in subjects]
    assert not any(read_attributes(image)["pattern"] for image in sideways)


def test_an_empty_image_has_no_object():
    from PIL import Image

    assert read_attributes(Image.new("RGB", (32, 32), PALETTE["blue"])) == {
        "shape": None, "colour": None, "background": "blue", "pattern": False, "similarity": 0.0}


def test_similarity_to_the_subject_on_rendered_images():
    """The continuous score, fixed on rendered images before any model's were read: the subject about 1, a one-colour
    red or yellow circle about 1/2, the halves swapped 0, split sideways about 1/2 (100 of each, the subject's own
    places and sizes; the values QUALITY.md gives)."""
    subjects = [sample_attributes(seed, subject=True) for seed in range(100)]

    def scores(images):
        values = np.array([read_attributes(image)["similarity"] for image in images])
        return values.mean(), values.min(), values.max()
    mean, low, _ = scores(render(a) for a in subjects)
    assert mean > 0.95 and low > 0.9
    for colour in SUBJECT:  # one-colour circles at the same places
        mean, low, high = scores(render(replace(a, colour=colour, pattern=())) for a in subjects)
        assert 0.4 < low and high < 0.6
    assert scores(render(replace(a, colour=SUBJECT[1], pattern=SUBJECT[::-1])) for a in subjects)[2] < 0.05
    mean, low, high = scores(render(a).rotate(90) for a in subjects)
    assert 0.4 < low and high < 0.6


def test_the_second_subject_and_the_photos_for_the_data_options(tmp_path):
    """zwx (the halves swapped) is read by the same rule with its colours, and the subject is not it; wide photos
    are 48x32; busy photos carry clutter outside their mask, which covers the subject and nothing else."""
    from PIL import Image

    from toyworld.world import SUBJECT_B, write_subject_photos

    write_subject_photos(tmp_path / "b", subject=SUBJECT_B, token="zwx", captions=True)
    write_subject_photos(tmp_path / "a")
    for i in range(4):
        b, a = Image.open(tmp_path / "b" / f"zwx-{i}.png"), Image.open(tmp_path / "a" / f"sks-{i}.png")
        assert read_attributes(b, subject=SUBJECT_B)["pattern"] and read_attributes(b, subject=SUBJECT_B)["similarity"] > 0.9
        assert not read_attributes(b)["pattern"] and not read_attributes(a, subject=SUBJECT_B)["pattern"]
        assert (tmp_path / "b" / f"zwx-{i}.txt").read_text().startswith("a photo of zwx circle on a ")
    write_subject_photos(tmp_path / "wide", width=48)
    assert {Image.open(p).size for p in (tmp_path / "wide").glob("*.png")} == {(48, 32)}
    write_subject_photos(tmp_path / "busy", busy=True, masks=True)
    for i in range(4):
        photo = np.asarray(Image.open(tmp_path / "busy" / f"sks-{i}.png"), dtype=float)
        mask = np.asarray(Image.open(tmp_path / "busy" / f"sks-{i}.mask.png")) > 127
        background = PALETTE[read_attributes(Image.open(tmp_path / "busy" / f"sks-{i}.png"))["background"]]
        other = np.linalg.norm(photo - background, axis=-1) > 80  # pixels of some object
        subject = np.any([np.all(photo == PALETTE[c], axis=-1) for c in SUBJECT], axis=0)
        assert (other & ~mask).sum() >= 2 * 64  # the two clutter squares, outside the mask
        assert subject[mask].mean() > 0.95 and not subject[~mask].any()


def test_objects_are_counted_on_rendered_images(tmp_path):
    """count_objects, fixed on rendered images before any model's were read: one for the subject or a plain object,
    none on an empty background, three on a busy photo (the subject and two clutter squares)."""
    from PIL import Image

    from toyworld.world import count_objects, write_subject_photos

    assert {count_objects(render(sample_attributes(seed))) for seed in range(200)} == {1}
    assert {count_objects(render(sample_attributes(seed, subject=True))) for seed in range(100)} == {1}
    assert count_objects(Image.new("RGB", (32, 32), PALETTE["purple"])) == 0
    write_subject_photos(tmp_path, n=8, busy=True)
    assert {count_objects(Image.open(p)) for p in tmp_path.glob("*.png")} == {3}


def test_every_evaluation_row_is_a_valid_training_command():
    """Each ablation row of toyworld/evaluate.py (and --train_flags on top) parses as train_dreambooth.py flags: a
    renamed or misspelt flag fails here, not an hour into a table."""
    import train_dreambooth
    from toyworld.evaluate import DATA_ROWS, ROWS

    parser = train_dreambooth.build_parser()
    common = ["--model", "m", "--instance_dir", "d", "--instance_prompt", "a photo of sks circle", "--output_dir", "o"]
    for name, flags in {**ROWS, **{k: f for k, (_, f) in DATA_ROWS.items()}}.items():
        args = parser.parse_args(common + list(flags))
        assert ("--lora_rank" in flags) == (args.lora_rank > 0), name
    # --train_flags come after a row's own: the later flag wins
    assert parser.parse_args(common + ["--lora_rank", "4", "--lora_rank", "32"]).lora_rank == 32


def test_class_images_without_a_background_keeps_the_others_unchanged(tmp_path):
    """evaluate.py --class_images_without: a copy of the class images without those read on the given backgrounds."""
    from toyworld.evaluate import class_images_without

    priors, backgrounds = tmp_path / "priors", ["purple", "white", "purple", "blue", "green", "purple"]
    priors.mkdir()
    for i, background in enumerate(backgrounds):
        render(sample_attributes(i, shape="circle", colour="red", background=background)).save(priors / f"{i:06d}.png")
    kept = tmp_path / "without"
    kept.mkdir()
    (kept / "stale.png").write_bytes(b"from an earlier run")
    assert class_images_without(priors, ["purple"], kept) == 3
    assert sorted(p.name for p in kept.iterdir()) == ["000001.png", "000003.png", "000004.png"]
    assert all((kept / p).read_bytes() == (priors / p).read_bytes() for p in ["000001.png", "000003.png", "000004.png"])


def test_photos_on_other_backgrounds_and_the_score_of_their_new_ones(tmp_path):
    """write_subject_photos(backgrounds=...): the same subject at the same places and sizes, only the background
    changed; shift=K: the same photos under other names; evaluate.score then counts the photos' backgrounds as seen
    and the others alone as new."""
    from PIL import Image

    from toyworld.evaluate import BACKGROUNDS, score
    from toyworld.world import write_subject_photos

    write_subject_photos(tmp_path / "usual")
    write_subject_photos(tmp_path / "blue", backgrounds=("white", "green", "white", "blue"))
    for i, expected in enumerate(("white", "green", "white", "blue")):
        usual = np.asarray(Image.open(tmp_path / "usual" / f"sks-{i}.png"))
        moved = np.asarray(Image.open(tmp_path / "blue" / f"sks-{i}.png"))
        assert read_attributes(Image.fromarray(moved))["background"] == expected
        subject = np.any([np.all(usual == PALETTE[c], axis=-1) for c in SUBJECT], axis=0)
        assert subject.sum() > 100 and (usual[subject] == moved[subject]).all()
        assert (usual != moved).any() == (i == 3)
    write_subject_photos(tmp_path / "shifted", shift=1)  # the same photos under the next one's name
    assert all((tmp_path / "shifted" / f"sks-{(i + 1) % 4}.png").read_bytes() == (tmp_path / "usual" / f"sks-{i}.png")
               .read_bytes() for i in range(4))
    # the subject drawn on blue only: on the usual photos' terms half the new images show it, with blue seen none
    drawn = {b: [{**read_attributes(render(sample_attributes(0, subject=True, background=b))), "objects": 1}] * 2
             if b == "blue" else [{**read_attributes(render(sample_attributes(0, background=b))), "objects": 1}] * 2
             for b in BACKGROUNDS}
    assert score(drawn, drawn["white"])["subject_fidelity_new"] == 0.5
    blue_seen = score(drawn, drawn["white"], seen=("white", "green", "blue"))
    assert blue_seen["subject_fidelity_new"] == 0.0 and blue_seen["subject_fidelity_seen"] == 1 / 3
