"""`--dataset folder:PATH`: layout, labels, image modes, bad input, the prepared copy, and one
run of both stages through train.py (tiny trees and images made in tmp_path)."""

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import NSD_ARGS, PSC_ARGS, run_train
from PIL import Image

from pand_jax import anchors as anchors_lib
from pand_jax.data import folder, get_dataset, load_split
from pand_jax.data.datasets import run_name
from pand_jax.data.images import read_rgb
from pand_jax.data.pipeline import Loader
from pand_jax.data.prepare import prepare
from pand_jax.data.sources import ConcatSource, check_folder

CLASSES = ("blue-jay", "Zebra_finch", "cardinal")  # sorted: Zebra_finch, blue-jay, cardinal


def _color(label: int, k: int) -> tuple[int, int, int]:
    return (40 * label + 10, 30 * k + 5, 200)


def make_tree(root: pathlib.Path, counts=None, classes=CLASSES, size=(12, 16)) -> pathlib.Path:
    """PNG images (lossless) of one colour per (class, image), so each decoded image tells
    which file it came from."""
    counts = counts or {"train": 4, "test": 2}
    for split, n in counts.items():
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for k in range(n):
                label = sorted(classes).index(c)
                img = Image.new("RGB", size[::-1], _color(label, k))
                img.save(root / split / c / f"img{k}.png")
    return root


def key(root) -> str:
    return f"folder:{root}"


# ------------------------------------------------------------------ layout and labels


def test_labels_names_and_every_example(tmp_path):
    root = make_tree(tmp_path / "birds", {"train": 3, "val": 1, "test": 2})
    (root / "classes.json").write_text(json.dumps({"cardinal": "Northern Cardinal"}))
    info = get_dataset(key(root))
    assert info.class_names == ("Zebra finch", "blue jay", "Northern Cardinal")
    assert (
        info.num_classes == 3
        and info.val_split == "val"
        and info.prompt_template == "a photo of a {}."
    )
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        src = load_split(info.key, split, data_dir=str(tmp_path / "none"))
        assert len(src) == 3 * n
        for i in range(len(src)):
            ex = src[i]
            label, k = i // n, i % n  # sorted folders, sorted files
            assert ex["label"] == label and ex["index"] == i
            assert ex["image"].shape == (12, 16, 3) and ex["image"].dtype == np.uint8
            assert (ex["image"] == _color(label, k)).all()


def test_sub_folders_other_files_and_letter_case(tmp_path):
    root = make_tree(tmp_path / "birds", {"train": 1, "test": 1})
    cardinal = root / "train" / "cardinal"
    os.makedirs(cardinal / "2024")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(cardinal / "2024" / "A.JPEG", format="JPEG")
    (cardinal / "notes.txt").write_text("not an image")
    (cardinal / ".hidden.png").write_bytes(b"")
    src = load_split(key(root), "train", data_dir=str(tmp_path / "none"))
    assert [(os.path.relpath(p, root), label) for p, label in src.files] == [
        ("train/Zebra_finch/img0.png", 0),
        ("train/blue-jay/img0.png", 1),
        ("train/cardinal/img0.png", 2),
        ("train/cardinal/2024/A.JPEG", 2),
    ]


def test_relative_and_absolute_paths_name_the_same_dataset(tmp_path, monkeypatch):
    make_tree(tmp_path / "birds")
    monkeypatch.chdir(tmp_path)
    assert get_dataset("folder:birds").key == get_dataset(key(tmp_path / "birds")).key
    assert folder.run_name("folder:./my birds/") == "folder-my_birds"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: __import__("shutil").rmtree(r / "test"), r"birds/test is missing"),
        (
            lambda r: __import__("shutil").rmtree(r / "test" / "cardinal"),
            r"class folders of .*birds/train and .*birds/test differ: "
            r"only in train: \['cardinal'\]",
        ),
        (
            lambda r: [p.unlink() for p in (r / "test" / "blue-jay").iterdir()],
            r"class folder .*birds/test/blue-jay has no images",
        ),
        (
            lambda r: (r / "classes.json").write_text('{"robin": "Robin"}'),
            r"classes.json names folders that are not classes: \['robin'\]",
        ),
        (
            lambda r: (r / "classes.json").write_text('{"cardinal": "blue jay"}'),
            r"class names \['blue jay'\] .* more than one class folder",
        ),
    ],
)
def test_layout_errors_name_the_folder(tmp_path, breakage, message):
    root = make_tree(tmp_path / "birds")
    breakage(root)
    with pytest.raises(folder.FolderError, match=message):
        get_dataset(key(root))


def test_a_folder_without_train_takes_its_classes_from_test(tmp_path):
    """A label-free run trains on --unlabeled-data only; anything else is refused before work."""
    root = make_tree(tmp_path / "birds")
    __import__("shutil").rmtree(root / "train")
    info = get_dataset(key(root))
    assert info.class_names == ("Zebra finch", "blue jay", "cardinal")
    assert set(info.tree.files) == {"test"}
    with pytest.raises(
        folder.FolderError,
        match=r"birds/train is missing; expected .*birds/train/"
        r"<class>/<images> \(or, for a method that reads "
        r"no labels, .*--unlabeled-data folder:DIR\)",
    ):
        check_folder(info, None, skip_bad_images=False, train_split="train", batch_size=4)
    assert (
        check_folder(
            info, None, skip_bad_images=False, train_split="train", batch_size=4, unlabeled=4
        )
        == []
    )
    with pytest.raises(
        folder.FolderError,
        match=r"birds/train with the unlabelled images has 3 "
        r"readable images, fewer than one training batch",
    ):
        check_folder(
            info, None, skip_bad_images=False, train_split="train", batch_size=4, unlabeled=3
        )


def test_no_images_at_all(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / "empty" / split)
    Image.new("RGB", (4, 4)).save(tmp_path / "empty" / "train" / "loose.png")  # no class folder
    with pytest.raises(
        folder.FolderError, match=r"no images in .*empty/train: expected one sub-folder"
    ):
        get_dataset(key(tmp_path / "empty"))
    with pytest.raises(folder.FolderError, match=r"/nope is not a folder"):
        get_dataset(key(tmp_path / "nope"))


def test_fewer_images_than_one_batch(tmp_path):
    info = get_dataset(key(make_tree(tmp_path / "birds")))  # 12 training images
    # all 12 read, none left out
    assert check_folder(info, None, skip_bad_images=False, train_split="train", batch_size=12) == []
    with pytest.raises(
        folder.FolderError,
        match=r"birds/train has 12 readable images, fewer than "
        r"one training batch of 16; lower --batch-size",
    ):
        check_folder(info, None, skip_bad_images=False, train_split="train", batch_size=16)


# ------------------------------------------------------------------ reading: modes, EXIF


def _modes(rng):
    """(mode, array or image, file extension, expected RGB from NumPy)."""
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    wide = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    unit = rng.random((6, 5)).astype(np.float32)
    pal_idx = rng.integers(0, 4, (6, 5), dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]], np.uint8)
    pal = Image.fromarray(pal_idx, "P")
    pal.putpalette(palette.ravel().tolist())

    def rep(g):
        return np.repeat(g[..., None], 3, axis=-1)

    nk = 255 - cmyk[..., 3:].astype(np.float64)
    return [
        ("L", Image.fromarray(grey), ".png", rep(grey)),
        ("LA", Image.fromarray(np.stack([grey, grey[::-1]], -1), "LA"), ".png", rep(grey)),
        ("P", pal, ".png", palette[pal_idx]),
        ("RGBA", Image.fromarray(rgba), ".png", rgba[..., :3]),  # alpha dropped, like torchvision
        ("CMYK", Image.fromarray(cmyk, "CMYK"), ".tif", (255 - cmyk[..., :3]) * nk / 255),
        ("I;16", Image.fromarray(wide), ".png", rep(np.round(wide / 257.0))),
        ("I", Image.fromarray(wide.astype(np.int32), "I"), ".tif", rep(np.round(wide / 257.0))),
        ("F", Image.fromarray(unit, "F"), ".tif", rep(np.round(unit * 255.0))),
        ("F", Image.fromarray(unit * 300, "F"), ".tif", rep(np.clip(np.round(unit * 300), 0, 255))),
        ("1", Image.fromarray(grey > 127), ".png", rep((grey > 127) * 255)),
    ]


def test_every_mode_reads_as_rgb(tmp_path):
    for n, (mode, img, ext, expected) in enumerate(_modes(np.random.default_rng(0))):
        path = tmp_path / f"{n}{ext}"
        img.save(path)
        with Image.open(path) as f:
            assert f.mode == mode  # the file really has the mode under test
        got = np.asarray(read_rgb(str(path)))
        assert got.dtype == np.uint8 and got.shape == (6, 5, 3), mode
        # CMYK: PIL rounds its integer formula differently from the float one.
        np.testing.assert_allclose(got, expected, atol=1 if mode == "CMYK" else 0, err_msg=mode)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # top-left marker
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rot.png", exif=exif.tobytes())
    got = np.asarray(read_rgb(str(tmp_path / "rot.png")))
    np.testing.assert_array_equal(got, np.rot90(arr, k=-1))  # clockwise: marker at top-right
    assert tuple(got[0, -1]) == (255, 0, 0)


def test_builders_store_rotated_jpegs_upright(tmp_path):
    import io

    from pand_jax.data.builders import rgb_jpeg_bytes

    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    img.save(tmp_path / "plain.jpg", quality=95)
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    assert rgb_jpeg_bytes(str(tmp_path / "plain.jpg")) == (tmp_path / "plain.jpg").read_bytes()
    stored = np.asarray(Image.open(io.BytesIO(rgb_jpeg_bytes(str(tmp_path / "rot.jpg")))))
    assert stored.shape == (32, 16, 3)  # upright: counter-clockwise, the white half at the bottom
    assert stored[20:, :].mean() > 240 and stored[:12, :].mean() < 15


# ------------------------------------------------------------------ bad images


def _break(root: pathlib.Path) -> list[pathlib.Path]:
    good = (root / "train" / "cardinal" / "img0.png").read_bytes()
    truncated = root / "train" / "cardinal" / "img1.png"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = root / "test" / "blue-jay" / "img0.png"
    garbage.write_bytes(b"not an image at all")
    return [truncated, garbage]


def test_every_bad_image_is_named_and_skip_leaves_them_out(tmp_path):
    root = make_tree(tmp_path / "birds")
    bad = _break(root)
    info = get_dataset(key(root))
    with pytest.raises(folder.BadImagesError) as e:
        check_folder(info, None, skip_bad_images=False, train_split="train", batch_size=4)
    msg = str(e.value)
    assert msg.startswith("2 image file(s) under") and "--skip-bad-images" in msg
    assert all(str(p) in msg for p in bad)
    with pytest.raises(folder.BadImagesError):
        load_split(info.key, "train", data_dir=str(tmp_path / "none"))
    skipped = check_folder(info, None, skip_bad_images=True, train_split="train", batch_size=4)
    assert [p for p, _ in skipped] == [str(p) for p in bad]
    train = load_split(info.key, "train", data_dir=str(tmp_path / "none"), skip_bad_images=True)
    assert len(train) == 11 and str(bad[0]) not in [p for p, _ in train.files]
    folder.write_skipped(tmp_path, skipped, str(root))
    lines = (tmp_path / folder.BAD_IMAGES_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in bad]


def test_the_class_record_is_whole_or_the_previous_one(tmp_path, monkeypatch):
    """A run stopped while it writes the workdir's class record leaves the previous record."""
    tree = folder.scan(str(make_tree(tmp_path / "birds")))
    folder.write_record(tree, tmp_path)
    record = (tmp_path / folder.CLASSES_FILE).read_text()

    def dump_half_then_stop(obj, f, **kwargs):
        text = json.dumps(obj, **kwargs)
        f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        folder.write_record(tree, tmp_path)
    assert (tmp_path / folder.CLASSES_FILE).read_text() == record
    assert [r["folder"] for r in json.loads(record)["classes"]] == list(tree.folders)


# ------------------------------------------------------------------ caches and the prepared copy


def test_host_cache_is_keyed_by_the_file_list(tmp_path):
    root = make_tree(tmp_path / "birds")
    src = load_split(key(root), "train", data_dir=str(tmp_path / "none"))
    loader = Loader(
        src,
        global_batch_size=4,
        image_size=8,
        train=False,
        process_index=0,
        process_count=1,
        threads=2,
        cache_dir=str(tmp_path / "cache"),
    )
    batch = next(loader.epoch(0))
    assert batch["label"].tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(batch["image"][:, 0, 0], [_color(0, k) for k in range(4)])
    # images, labels and the key they were written for
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith(src.name)]) == 3
    Image.new("RGB", (16, 12), (1, 2, 3)).save(root / "train" / "cardinal" / "new.png")
    src2 = load_split(key(root), "train", data_dir=str(tmp_path / "none"))
    assert len(src2) == 13 and src2.name != src.name
    assert src.name.startswith("folder-birds-train-") and "/" not in src2.name


def test_prepared_copy_is_read_in_the_folder_order(tmp_path):
    root = make_tree(tmp_path / "birds", {"train": 2, "val": 1, "test": 1})
    data_dir = str(tmp_path / "data")
    direct = {s: load_split(key(root), s, data_dir=data_dir) for s in ("train", "val", "test")}
    prepare(key(root), data_dir)
    for split, src in direct.items():
        prepared = load_split(key(root), split, data_dir=data_dir)
        assert isinstance(prepared, ConcatSource) and len(prepared) == len(src)
        for i in range(len(src)):
            a, b = src[i], prepared[i]
            assert a["label"] == b["label"]
            # JPEG re-encoding of a flat colour: within a few levels.
            assert np.abs(a["image"].astype(int) - b["image"]).max() <= 3
    # A changed folder no longer matches the prepared copy: it is read directly again.
    (root / "test" / "cardinal" / "img0.png").unlink()
    Image.new("RGB", (16, 12)).save(root / "test" / "cardinal" / "other.png")
    assert not isinstance(load_split(key(root), "test", data_dir=data_dir), ConcatSource)


def test_prepare_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from pand_jax.data.prepare import main

    assert main(["--dataset", f"folder:{tmp_path}/nope", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/nope is not a folder") and err.count("\n") == 1


# ------------------------------------------------------------------ anchors, CLI, both stages


def test_anchors_of_another_folder_are_refused(tmp_path):
    a = get_dataset(key(make_tree(tmp_path / "a")))
    b = get_dataset(key(make_tree(tmp_path / "b", classes=("cardinal", "robin", "Zebra_finch"))))
    anchors = np.eye(3, 4, dtype=np.float32)
    anchors_lib.save(tmp_path / "anchors.npz", anchors, a)
    np.testing.assert_array_equal(anchors_lib.load(tmp_path / "anchors.npz", a)[0], anchors)
    with pytest.raises(
        anchors_lib.AnchorsError, match="class 1 is 'blue jay' in the anchors but 'cardinal'"
    ):
        anchors_lib.load(tmp_path / "anchors.npz", b)


def test_default_workdir_is_file_system_safe(tmp_path):
    from pand_jax.cli import train as cli

    # resolve checks the folder; PAND's K = 3 neighbours need 4 classes
    make_tree(tmp_path / "My Birds:2", classes=CLASSES + ("dove",))
    args = cli.parser().parse_args(
        ["--stage", "nsd", "--dataset", f"folder:{tmp_path}/My Birds:2/"]
    )
    cfg, workdir, _ = cli.resolve(args)
    runs = pathlib.Path("runs") / run_name(f"folder:{tmp_path}/My Birds:2")
    assert runs.name.startswith("folder-My_Birds_2-")
    assert workdir == runs / "nsd" / "pand-resnet18"
    assert cfg["anchors"] == str(runs / "psc" / "anchors.npz")


def test_folders_with_one_base_name_get_their_own_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {run_name(f"folder:{where}/birds") for where in ("a", "b")}
    assert len(names) == 2 and all(n.startswith("folder-birds-") for n in names)
    assert run_name("folder:a/birds/") == run_name(f"folder:{tmp_path}/a/birds")


def test_too_few_classes_for_k_names_the_flag_that_fits(tmp_path):
    from pand_jax.cli import train as cli
    from pand_jax.config import ConfigError

    root = make_tree(tmp_path / "birds")  # 3 classes: K = 3 other classes cannot exist
    args = cli.parser().parse_args(["--stage", "nsd", "--dataset", key(root)])
    with pytest.raises(
        ConfigError,
        match=r"loss\.pand\.nsd_k = 3: .* pass --set "
        r"loss\.pand\.nsd_k=2, or --lambda-nsd 0",
    ):
        cli.resolve(args)
    args = cli.parser().parse_args(
        ["--stage", "nsd", "--dataset", key(root), "--set", "loss.pand.nsd_k=2"]
    )
    assert cli.resolve(args)[0]["loss"]["pand"]["nsd_k"] == 2


def _stage_args(base, root):
    args = list(base)
    args[args.index("digits")] = key(root)
    return args


def test_bad_images_stop_train_py_before_anything_runs(tmp_path):
    root = make_tree(tmp_path / "birds")
    bad = _break(root)
    out = run_train(_stage_args(PSC_ARGS, root) + ["--workdir", tmp_path / "run"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert all(str(p) in out.stderr for p in bad)
    assert not (tmp_path / "run" / "features_train.npz").exists()


def test_psc_then_nsd_on_a_folder(teacher, tmp_path):
    # Four classes: the NSD loss takes k = 3 neighbours among the other classes.
    root = make_tree(
        tmp_path / "birds",
        {"train": 5, "val": 2, "test": 2},
        size=(20, 24),
        classes=CLASSES + ("robin",),
    )
    bad = _break(root)
    template = "a photo of a {}, a type of bird."
    psc, nsd = tmp_path / "psc", tmp_path / "nsd"
    out = run_train(
        _stage_args(PSC_ARGS, root)
        + [
            "--teacher",
            teacher,
            "--workdir",
            psc,
            "--skip-bad-images",
            "--set",
            f"prompt_template={template}",
        ]
    )
    assert (
        f"skipped {len(bad)} unreadable image(s) under {root} (--skip-bad-images); "
        f"listed in {psc / folder.BAD_IMAGES_FILE}"
    ) in out.stdout
    with np.load(psc / "anchors.npz") as f:
        assert [str(n) for n in f["class_names"]] == [
            "Zebra finch",
            "blue jay",
            "cardinal",
            "robin",
        ]
        meta = json.loads(str(f["meta"]))
    assert meta["prompt_template"] == template and meta["select_split"] == "val"
    assert meta["dataset"] == key(root)
    record = json.loads((psc / folder.CLASSES_FILE).read_text())
    assert [c["folder"] for c in record["classes"]] == [
        "Zebra_finch",
        "blue-jay",
        "cardinal",
        "robin",
    ]
    assert [
        line.split("\t")[0] for line in (psc / folder.BAD_IMAGES_FILE).read_text().splitlines()
    ] == [str(p) for p in bad]
    run_train(
        _stage_args(NSD_ARGS, root)
        + [
            "--teacher",
            teacher,
            "--workdir",
            nsd,
            "--anchors",
            psc / "anchors.npz",
            "--skip-bad-images",
            "--teacher-cache",
            "1",
        ],
        devices=2,
    )
    summary = json.loads((nsd / "summary.json").read_text())
    assert summary["dataset"] == key(root) and summary["learned_anchors"] is True
    student = json.loads((nsd / "student" / "config.json").read_text())
    assert student["class_names"] == ["Zebra finch", "blue jay", "cardinal", "robin"]
    assert student["config"]["num_classes"] == 4
    assert (nsd / folder.BAD_IMAGES_FILE).read_text() == (psc / folder.BAD_IMAGES_FILE).read_text()
