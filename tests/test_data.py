"""Datasets, builders, sources and the host pipeline (CPU, tiny data made in tmp_path)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pand_jax.data import DATASETS, builders, classnames, get_dataset, load_split
from pand_jax.data.pipeline import Loader, resize_image
from pand_jax.data.prepare import prepare
from pand_jax.data.sources import ConcatSource, prepared_dir

# ------------------------------------------------------------------ registry


def test_registry_counts_and_names():
    expected = {
        "cub": 200,
        "aircraft": 100,
        "pets": 37,
        "dogs": 120,
        "cars": 196,
        "flowers": 102,
        "food": 101,
        "digits": 10,
    }
    assert {k: d.num_classes for k, d in DATASETS.items()} == expected
    for d in DATASETS.values():
        assert len(set(d.class_names)) == d.num_classes and "{}" in d.prompt_template
    assert DATASETS["cub"].class_names[0] == "Black footed Albatross"
    assert DATASETS["aircraft"].class_names[0] == "Boeing 707-320"
    assert DATASETS["aircraft"].class_names[41] == "Boeing 717"  # no doubled maker
    assert DATASETS["pets"].class_names[2] == "American Pit Bull Terrier"
    assert DATASETS["dogs"].class_names[1] == "Japanese spaniel"
    assert DATASETS["aircraft"].val_split == "val" and DATASETS["cub"].val_split is None
    assert DATASETS["cars"].class_names[-1] == "smart fortwo Convertible 2012"
    assert DATASETS["flowers"].class_names[:2] == ("pink primrose", "hard-leaved pocket orchid")
    assert DATASETS["food"].class_names[-1] == "waffles" and DATASETS["flowers"].val_split == "val"
    assert DATASETS["food"].prompt_template == "a photo of {}, a type of food."


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ValueError, match="cub, aircraft, pets, dogs, cars, flowers, food, digits, or folder:PATH"
    ):
        get_dataset("imagenet")


# ------------------------------------------------------------------ digits


def test_digits_split():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    ex = train[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    labels = np.array([test[i]["label"] for i in range(len(test))])
    assert np.bincount(labels).min() >= 43  # stratified: every digit 43-46 times
    with pytest.raises(ValueError, match="splits: train, test"):
        load_split("digits", "validation")


def test_unprepared_dataset_names_prepare_command(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=f"python -m pand_jax.data.prepare --dataset cub --data-dir {tmp_path}",
    ):
        load_split("cub", "train", data_dir=str(tmp_path))


# ------------------------------------------------------------------ raw archive trees


def _jpeg(path, shape=(24, 32, 3), seed=0, mode="RGB", fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)


def _cub_tree(root):
    root = f"{root}/CUB_200_2011"
    os.makedirs(root)
    rows = [(1, 0, 1), (2, 0, 0), (3, 5, 1), (4, 199, 0), (5, 199, 1)]  # id, label, is_train
    with open(f"{root}/classes.txt", "w") as f:
        f.writelines(f"{i + 1} {i + 1:03d}.{n}\n" for i, n in enumerate(classnames.CUB))
    images, labels, split = [], [], []
    for image_id, label, is_train in rows:
        rel = f"{label + 1:03d}.{classnames.CUB[label]}/img_{image_id}.jpg"
        _jpeg(f"{root}/images/{rel}", seed=image_id, mode="CMYK" if image_id == 3 else "RGB")
        images.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {label + 1}\n")
        split.append(f"{image_id} {is_train}\n")
    for name, lines in (
        ("images", images),
        ("image_class_labels", labels),
        ("train_test_split", split),
    ):
        with open(f"{root}/{name}.txt", "w") as f:
            f.writelines(lines)
    return {
        split: {f"img_{i}.jpg": label for i, label, t in rows if t == (split == "train")}
        for split in ("train", "test")
    }


def _aircraft_tree(root):
    root = f"{root}/fgvc-aircraft-2013b/data"
    os.makedirs(f"{root}/images")
    variants = list(classnames.AIRCRAFT)
    with open(f"{root}/variants.txt", "w") as f:
        f.write("\n".join(variants) + "\n")
    layout = {
        "train": [0, 72, 99],
        "val": [72],
        "test": [37, 99],
    }  # 72 = "F-16A/B": slash in a name
    n, out = 0, {}
    for split, labels in layout.items():
        out[split] = {}
        with open(f"{root}/images_variant_{split}.txt", "w") as f:
            for label in labels:
                n += 1
                _jpeg(f"{root}/images/{n:07d}.jpg", seed=n, mode="L" if n == 1 else "RGB")
                f.write(f"{n:07d} {variants[label]}\n")
                out[split][f"{n:07d}.jpg"] = label
    return out


def _pets_tree(root):
    layout = {"train": [0, 36, 5], "test": [10, 20]}
    n, out = 0, {}
    for split, listing in (("train", "trainval"), ("test", "test")):
        lines = ["#Image CLASS-ID SPECIES BREED ID\n"]
        out[split] = {}
        for label in layout[split]:
            n += 1
            name = f"{classnames.PETS[label]}_{n}"
            out[split][f"{name}.jpg"] = label
            # Oxford-IIIT Pet has PNGs and RGBA files named .jpg; they must come out RGB.
            _jpeg(
                f"{root}/images/{name}.jpg",
                seed=n,
                mode="RGBA" if n == 2 else "RGB",
                fmt="PNG" if n == 2 else "JPEG",
            )
            lines.append(f"{name} {label + 1} 1 1\n")
        os.makedirs(f"{root}/annotations", exist_ok=True)
        with open(f"{root}/annotations/{listing}.txt", "w") as f:
            f.writelines(lines)
    return out


def _dogs_tree(root):
    from scipy.io import savemat

    layout = {"train": [0, 119, 60], "test": [1, 119]}
    for d in classnames.DOGS:
        os.makedirs(f"{root}/Images/{d}")
    n, out = 0, {}
    for split, labels in layout.items():
        files, out[split] = [], {}
        for label in labels:
            n += 1
            rel = f"{classnames.DOGS[label]}/{classnames.DOGS[label].split('-')[0]}_{n}.jpg"
            _jpeg(f"{root}/Images/{rel}", seed=n)
            files.append(rel)
            out[split][os.path.basename(rel)] = label
        savemat(f"{root}/{split}_list.mat", {"file_list": np.array(files, dtype=object)[:, None]})
    return out


def _cars_tree(root):
    from scipy.io import savemat

    layout = {
        "train": {"00001.jpg": 0, "00002.jpg": 195, "00003.jpg": 117},
        "test": {"00001.jpg": 195, "00002.jpg": 3},
    }
    os.makedirs(f"{root}/devkit")
    savemat(
        f"{root}/devkit/cars_meta.mat",
        {"class_names": np.array(classnames.CARS, dtype=object)[None]},
    )
    fields = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    for n, (split, files) in enumerate(layout.items()):
        annos = np.zeros((1, len(files)), dtype=fields)
        for j, (fname, label) in enumerate(files.items()):
            # CMYK in the test split: Stanford Cars has a few.
            _jpeg(
                f"{root}/cars_{split}/{fname}",
                seed=10 * n + j,
                mode="CMYK" if split == "test" and j == 0 else "RGB",
            )
            annos[0, j] = (1, 2, 20, 15, label + 1, fname)
        path = (
            f"{root}/devkit/cars_train_annos.mat"
            if split == "train"
            else f"{root}/cars_test_annos_withlabels.mat"
        )
        savemat(path, {"annotations": annos})
    return layout


def _flowers_tree(root):
    from scipy.io import savemat

    # Labels of image 1..110 (1-based, every class present); only the listed images exist.
    labels = np.concatenate([np.arange(1, 103), [7, 7, 50, 102, 1, 1, 1, 1]])
    setid = {"trnid": [104, 3], "valid": [105], "tstid": [106, 102, 1]}
    os.makedirs(root)
    savemat(f"{root}/imagelabels.mat", {"labels": labels[None]})
    savemat(f"{root}/setid.mat", {k: np.array(v)[None] for k, v in setid.items()})
    out = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        out[split] = {}
        for i in setid[key]:
            _jpeg(f"{root}/jpg/image_{i:05d}.jpg", seed=i)
            out[split][f"image_{i:05d}.jpg"] = int(labels[i - 1]) - 1
    return out


def _food_tree(root):
    root = f"{root}/food-101"
    layout = {
        "train": [("apple_pie", "101"), ("waffles", "7"), ("sushi", "55")],
        "test": [("waffles", "3"), ("apple_pie", "1")],
    }
    os.makedirs(f"{root}/meta")
    with open(f"{root}/meta/classes.txt", "w") as f:
        f.write("\n".join(classnames.FOOD) + "\n")
    out = {}
    for split, rows in layout.items():
        with open(f"{root}/meta/{split}.txt", "w") as f:
            f.writelines(f"{c}/{i}\n" for c, i in rows)
        for c, i in rows:
            _jpeg(f"{root}/images/{c}/{i}.jpg", seed=int(i))
        out[split] = {f"{c}/{i}.jpg": classnames.FOOD.index(c) for c, i in rows}
    return out


TREES = {
    "cub": _cub_tree,
    "aircraft": _aircraft_tree,
    "pets": _pets_tree,
    "dogs": _dogs_tree,
    "cars": _cars_tree,
    "flowers": _flowers_tree,
    "food": _food_tree,
}


@pytest.mark.parametrize("key", list(TREES))
def test_builder_reads_raw_layout(tmp_path, key):
    layout = TREES[key](str(tmp_path / "raw"))  # {split: {file_name: label}}
    data_dir = str(tmp_path / "data")
    prepare(key, data_dir, str(tmp_path / "raw"))
    stored = tfds.builder_from_directory(prepared_dir(key, data_dir)).as_data_source()
    for split, labels in layout.items():
        src = load_split(key, split, data_dir=data_dir)
        assert len(src) == len(labels)
        got = [src[i] for i in range(len(src))]
        names = [stored[split][i]["file_name"].decode() for i in range(len(src))]
        assert sorted(names) == sorted(labels)
        assert [ex["label"] for ex in got] == [labels[n] for n in names]  # each example's own label
        assert [ex["index"] for ex in got] == list(range(len(src)))
        assert all(
            ex["image"].ndim == 3 and ex["image"].shape[-1] == 3 and ex["image"].dtype == np.uint8
            for ex in got
        )
    with pytest.raises(ValueError, match="splits: "):
        load_split(key, "nope", data_dir=data_dir)
    if key == "aircraft":
        tv = load_split(key, "trainval", data_dir=data_dir)
        assert len(tv) == len(layout["train"]) + len(layout["val"])
        assert tv[len(tv) - 1]["index"] == len(tv) - 1


def test_corrupt_image_is_reported_and_nothing_is_published(tmp_path):
    _aircraft_tree(str(tmp_path / "raw"))
    bad = tmp_path / "raw/fgvc-aircraft-2013b/data/images/0000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data_dir = str(tmp_path / "data")
    with pytest.raises(builders.CorruptImagesError, match="0000002.jpg"):
        prepare("aircraft", data_dir, str(tmp_path / "raw"))
    assert prepared_dir("aircraft", data_dir) is None
    with pytest.raises(FileNotFoundError, match="--dataset aircraft"):
        load_split("aircraft", "train", data_dir=data_dir)


def test_class_list_mismatch_is_an_error(tmp_path):
    _aircraft_tree(str(tmp_path / "raw"))
    variants = tmp_path / "raw/fgvc-aircraft-2013b/data/variants.txt"
    variants.write_text(variants.read_text().replace("A380", "A390"))
    with pytest.raises(ValueError, match="A390"):
        prepare("aircraft", str(tmp_path / "data"), str(tmp_path / "raw"))


def _rename_car(raw):
    from scipy.io import savemat

    names = list(classnames.CARS)
    names[5] = "Acura Integra Type Z 2001"
    savemat(f"{raw}/devkit/cars_meta.mat", {"class_names": np.array(names, dtype=object)[None]})


def _drop_flower_label(raw):
    from scipy.io import loadmat, savemat

    labels = loadmat(f"{raw}/imagelabels.mat")["labels"]
    labels[labels == 50] = 51  # label 50 no longer occurs: not the 102-class archive
    savemat(f"{raw}/imagelabels.mat", {"labels": labels})


def _rename_food(raw):
    path = f"{raw}/food-101/meta/classes.txt"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("tiramisu", "tiramisu_cake"))


@pytest.mark.parametrize(
    "key, edit, message",
    [
        ("cars", _rename_car, "Type Z"),
        ("flowers", _drop_flower_label, "imagelabels.mat labels"),
        ("food", _rename_food, "tiramisu_cake"),
    ],
)
def test_new_builders_check_their_class_lists(tmp_path, key, edit, message):
    raw = str(tmp_path / "raw")
    TREES[key](raw)
    edit(raw)
    with pytest.raises(ValueError, match=message):
        prepare(key, str(tmp_path / "data"), raw)


def test_official_split_names_are_mapped(tmp_path):
    """TFDS's food101 calls the official test list `validation`; its copy must serve `test`."""
    import types

    layout = _food_tree(str(tmp_path / "raw"))

    def body(ns):
        ns["name"] = "food101"
        ns["split_files"] = lambda self, root: {
            {"test": "validation"}.get(k, k): v
            for k, v in builders.PandFood.split_files(self, root).items()
        }

    official = types.new_class("Food101", (builders.PandFood,), {"skip_registration": True}, body)
    official(data_dir=str(tmp_path / "data"), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw"))
    )
    test = load_split("food", "test", data_dir=str(tmp_path / "data"))
    assert sorted(test[i]["label"] for i in range(len(test))) == sorted(layout["test"].values())


def test_missing_manual_dir_explains_layout(tmp_path):
    with pytest.raises(ValueError, match="variants.txt"):
        prepare("aircraft", str(tmp_path / "data"))


# ------------------------------------------------------------------ TFDS official builders (mocked)


@pytest.mark.parametrize("name", ["caltech_birds2011", "oxford_iiit_pet", "stanford_dogs"])
def test_mock_tfds_source_through_pipeline(name):
    with tfds.testing.mock_data(num_examples=10):
        src = ConcatSource([tfds.data_source(name, split="train")], f"{name}-train")
        assert len(src) == 10
        loader = Loader(
            src,
            global_batch_size=4,
            image_size=32,
            train=True,
            process_index=0,
            process_count=1,
            threads=2,
        )
        batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 2
    b = batches[0]
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32 and b["mask"].all()


# ------------------------------------------------------------------ pipeline


def _digits_loader(**kw):
    args = dict(
        global_batch_size=64,
        image_size=32,
        train=True,
        seed=3,
        process_index=0,
        process_count=1,
        threads=2,
    )
    args.update(kw)
    return Loader(load_split("digits", args.pop("split", "train")), **args)


def test_train_batches_shapes_and_determinism():
    loader = _digits_loader()
    a, b = list(loader.epoch(0)), list(loader.epoch(0))
    assert len(a) == loader.steps_per_epoch == 1347 // 64
    assert a[0]["image"].shape == (64, 32, 32, 3) and a[0]["label"].shape == (64,)
    assert all(
        np.array_equal(x["index"], y["index"]) and np.array_equal(x["image"], y["image"])
        for x, y in zip(a, b)
    )
    c = next(loader.epoch(1))
    assert not np.array_equal(a[0]["index"], c["index"])
    src = loader.source
    assert all(a[0]["label"][j] == src[a[0]["index"][j]]["label"] for j in range(64))


def test_partner_images_are_the_images_of_the_partners_the_hook_names():
    """ "mixup"'s second images: the loader reads the images of whatever indices its `partners`
    hook gives for (indices, epoch), in any shape, and zeros where it gives -1."""
    n = 450

    def partners(index, epoch):  # [b, 2]: the next example of the epoch's shift, and none
        return np.stack([(index + epoch + 1) % n, np.where(index % 2, -1, index)], 1)

    loader = _digits_loader(split="test", train=False, partners=partners)
    batch = next(loader.epoch(3, start_step=7))  # the padded last batch
    src = loader.source
    want = partners(batch["index"], 3)
    assert batch["partner"].shape == (64, 2, 32, 32, 3)
    for row, index in zip(batch["partner"].reshape(-1, 32, 32, 3), want.ravel()):
        if index < 0:
            assert not row.any()
        else:
            assert np.array_equal(row, resize_image(src[int(index)]["image"], 32, "stretch"))


def test_process_slices_are_disjoint_and_cover_each_global_batch():
    full = _digits_loader(global_batch_size=64)
    p0 = _digits_loader(global_batch_size=64, process_index=0, process_count=2)
    p1 = _digits_loader(global_batch_size=64, process_index=1, process_count=2)
    assert p0.local_batch_size == 32
    for g, x, y in zip(full.epoch(2), p0.epoch(2), p1.epoch(2)):
        assert not set(x["index"]) & set(y["index"])
        assert np.array_equal(np.concatenate([x["index"], y["index"]]), g["index"])


def test_eval_pads_last_batch_with_mask():
    loader = _digits_loader(split="test", train=False, global_batch_size=64)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 8  # 450 = 7 * 64 + 2
    last = batches[-1]
    assert last["image"].shape == (64, 32, 32, 3) and last["mask"].sum() == 2
    assert (last["image"][~last["mask"]] == 0).all() and (last["index"][~last["mask"]] == -1).all()
    seen = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert np.array_equal(seen, np.arange(450))


def test_resume_from_step_and_from_iterator_state():
    loader = _digits_loader()
    full = list(loader.epoch(4))
    resumed = next(loader.epoch(4, start_step=5))
    assert np.array_equal(resumed["index"], full[5]["index"])
    it = loader.epoch(4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    fresh = loader.epoch(4)
    fresh.set_state(state)
    nxt = next(fresh)
    assert np.array_equal(nxt["index"], full[3]["index"]) and np.array_equal(
        nxt["image"], full[3]["image"]
    )


def test_cache_gives_identical_batches_and_is_reused(tmp_path):
    plain = _digits_loader(image_size=24)
    cached = _digits_loader(image_size=24, cache_dir=str(tmp_path))
    (path,) = [p for p in tmp_path.iterdir() if p.name.endswith(".images.npy")]
    mtime = path.stat().st_mtime_ns
    for x, y in zip(plain.epoch(1), cached.epoch(1)):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    _digits_loader(image_size=24, cache_dir=str(tmp_path))
    assert path.stat().st_mtime_ns == mtime and not [
        p for p in tmp_path.iterdir() if "tmp" in p.name
    ]


def test_loader_bad_arguments():
    with pytest.raises(ValueError, match="resize mode 'crop'"):
        _digits_loader(resize="crop")
    with pytest.raises(ValueError, match="start_step 99"):
        _digits_loader().epoch(0, start_step=99)


# ------------------------------------------------------------------ host resize vs torchvision


def test_host_resize_matches_torchvision():
    from torchvision import transforms as T

    img = np.random.default_rng(0).integers(0, 255, (181, 243, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    stretch = np.asarray(T.Resize((64, 64))(pil))
    assert np.array_equal(resize_image(img, 64, "stretch"), stretch)
    clip_eval = T.Compose(
        [T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)]
    )
    for arr in (img, img.transpose(1, 0, 2)):
        assert np.array_equal(
            resize_image(arr, 64, "shorter_center_crop"),
            np.asarray(clip_eval(Image.fromarray(arr))),
        )


def test_damaged_cache_chunk_is_decoded_again_and_repaired_in_place(tmp_path, capsys):
    """Bytes of one 64-row chunk damaged on disk: the first read of that chunk finds it by its
    CRC-32, says so in one line, decodes only those rows again and writes them back; the
    batches are those of an undisturbed run and the next Loader finds nothing to repair."""
    from pand_jax.data import pipeline

    plain = list(_digits_loader(image_size=24).epoch(1))
    _digits_loader(image_size=24, cache_dir=str(tmp_path))
    (path,) = tmp_path.glob("*.images.npy")
    whole = path.read_bytes()
    row = 24 * 24 * 3
    offset = len(whole) - 1347 * row + 3 * pipeline.CHUNK * row + 5 * row  # inside chunk 3
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(255 - b for b in whole[offset : offset + 100]))
    capsys.readouterr()
    decoded = []
    loader = _digits_loader(image_size=24, cache_dir=str(tmp_path))
    real_decode = loader._decode
    loader._decode = lambda i: decoded.append(i) or real_decode(i)
    for x, y in zip(plain, loader.epoch(1), strict=True):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert capsys.readouterr().out.splitlines() == [
        f"warning: examples 192-255 of the image cache {path} do not match their checksum "
        "(damaged on disk); decoding them again"
    ]
    assert sorted(decoded) == list(range(192, 256))
    assert path.read_bytes() == whole
    list(_digits_loader(image_size=24, cache_dir=str(tmp_path)).epoch(0))
    assert capsys.readouterr().out == ""
