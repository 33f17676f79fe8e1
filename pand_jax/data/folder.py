"""Your own images: `--dataset folder:PATH` reads the torchvision ImageFolder layout.

    PATH/train/<class>/*.jpg   any of IMAGE_EXTENSIONS, in any letter case, sub-folders too
    PATH/test/<class>/...
    PATH/val/<class>/...       optional: Stage-PSC then picks its best epoch on it, not on test
    PATH/classes.json          optional: {"<class folder>": "display name", ...}

Labels are the class folders in sorted order. The display names (folder names with
underscores and hyphens as spaces, unless classes.json names them) are what the text anchors
are built from. Every image is decoded once before training (`check_images`), so a bad file
is reported with all the others before anything runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import re

import numpy as np

from pand_jax import files
from pand_jax.data import images
from pand_jax.progress import progress_bar

PREFIX = "folder:"
# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")  # val is optional
DEFAULT_TEMPLATE = "a photo of a {}."
CLASSES_FILE = "classes.json"  # in the tree (display names) and in the workdir (the record)
BAD_IMAGES_FILE = "bad_images.txt"


class FolderError(ValueError):
    """The folder does not have the expected layout; the message names the folder."""


class BadImagesError(FolderError):
    """Some image files cannot be read; the message lists every one of them."""


def is_folder(key: str) -> bool:
    return key.startswith(PREFIX)


def root_of(key: str) -> str:
    return os.path.abspath(os.path.expanduser(key[len(PREFIX):]))


def run_name(key: str) -> str:
    """A file-system-safe name for `runs/<name>/...`: the folder's base name."""
    return "folder-" + re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(root_of(key)))


def display_name(folder: str) -> str:
    return re.sub(r"[_-]+", " ", folder).strip()


@dataclasses.dataclass(frozen=True)
class Tree:
    root: str
    folders: tuple[str, ...]  # class folders, label order
    class_names: tuple[str, ...]
    files: dict[str, tuple[tuple[str, int], ...]]  # split -> ((path, label), ...)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed, renamed, moved to another class or edited."""
        return self.fingerprint_of([p for split in self.files.values() for p in split])

    @functools.cached_property
    def _stats(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every file, read once per scan."""
        return {path: (st.st_size, st.st_mtime_ns) for split in self.files.values()
                for path, _ in split for st in [os.stat(path)]}

    def fingerprint_of(self, files) -> str:
        """The fingerprint of some of the tree's (path, label) files."""
        h = hashlib.sha256()
        for path, label in files:
            size, mtime = self._stats[path]
            h.update(f"{os.path.relpath(path, self.root)}\0{label}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()[:16]


def scan(root: str) -> Tree:
    """The tree's classes and files; a layout problem is one FolderError naming the folder."""
    if not os.path.isdir(root):
        raise FolderError(f"{root} is not a folder; --dataset folder:PATH expects "
                          f"PATH/train/<class>/<images> and PATH/test/<class>/<images>")
    splits = [s for s in SPLITS if s != "val" or os.path.isdir(os.path.join(root, s))]
    classes = {}
    for split in splits:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FolderError(f"{path} is missing; expected {path}/<class>/<images>")
        classes[split] = sorted(e.name for e in os.scandir(path)
                                if e.is_dir() and not e.name.startswith("."))
        if not classes[split]:
            raise FolderError(f"no images in {path}: expected one sub-folder of images per class, "
                              f"{path}/<class>/*.jpg")
    for split in splits[1:]:
        if classes[split] != classes["train"]:
            only_train = sorted(set(classes["train"]) - set(classes[split]))
            only_other = sorted(set(classes[split]) - set(classes["train"]))
            raise FolderError(f"the class folders of {root}/train and {root}/{split} differ: "
                              f"only in train: {only_train}, only in {split}: {only_other}")
    folders = tuple(classes["train"])
    files = {split: tuple((p, label) for label, c in enumerate(folders)
                          for p in _class_images(os.path.join(root, split, c)))
             for split in splits}
    return Tree(root, folders, _class_names(root, folders), files)


def _class_images(path: str) -> list[str]:
    # Sub-folders of a class folder count, in torchvision's order (sorted walk, sorted names).
    found = [os.path.join(d, f) for d, _, names in sorted(os.walk(path, followlinks=True))
             for f in sorted(names)
             if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise FolderError(f"class folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                          "add some or remove the folder from every split")
    return found


def _class_names(root: str, folders: tuple[str, ...]) -> tuple[str, ...]:
    path = os.path.join(root, CLASSES_FILE)
    given = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                given = json.load(f)
        except (OSError, ValueError) as e:
            raise FolderError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(given, dict) or not all(isinstance(v, str) and v.strip()
                                                  for v in given.values()):
            raise FolderError(f'{path} must map class folders to names: '
                              f'{{"{folders[0]}": "a name", ...}}')
        unknown = sorted(set(given) - set(folders))
        if unknown:
            raise FolderError(f"{path} names folders that are not classes: {unknown}; "
                              f"the class folders are {list(folders)}")
    names = tuple(given.get(f, display_name(f)) for f in folders)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FolderError(f"class names {dup} of {root} are used by more than one class folder; "
                          f"rename the folders or give distinct names in {path}")
    return names


_BAD: dict[tuple[str, str], list] = {}  # (root, fingerprint) -> bad files; one check per process


def bad_images(tree: Tree) -> list[tuple[str, str]]:
    """(path, reason) of every file of the tree that does not decode, in file order."""
    key = (tree.root, tree.fingerprint)
    if key not in _BAD:
        paths = [p for split in tree.files.values() for p, _ in split]
        with (concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool,
              progress_bar(total=len(paths), unit="image", desc=f"checking {tree.root}") as bar):
            results = []
            for err in pool.map(_read_error, paths):  # PIL decodes without the GIL
                results.append(err)
                bar.update(1)
        _BAD[key] = [(p, err) for p, err in zip(paths, results) if err]
    return _BAD[key]


def _read_error(path: str) -> str | None:
    try:
        images.read_rgb(path)
    except images.READ_ERRORS as e:
        return str(e) or type(e).__name__
    return None


def check_images(tree: Tree, skip: bool) -> list[tuple[str, str]]:
    """The bad files to leave out ([] when all decode); raises listing them all unless `skip`."""
    bad = bad_images(tree)
    if bad and not skip:
        raise BadImagesError(
            f"{len(bad)} image file(s) under {tree.root} cannot be read; nothing was run. Replace "
            "or remove them, or pass --skip-bad-images to train without them:\n  "
            + "\n  ".join(f"{p} ({err})" for p, err in bad))
    return bad


class FolderSource:
    """Random-access source of one split: {image: uint8 HWC RGB, label, index}."""

    def __init__(self, tree: Tree, split: str, skip: bool = False):
        if split not in tree.files:
            raise ValueError(f"{tree.root} has no split {split!r}; splits: {', '.join(tree.files)}")
        bad = {p for p, _ in check_images(tree, skip)}
        self.files = [(p, label) for p, label in tree.files[split] if p not in bad]
        # The name keys the pipeline's uint8 cache, so it changes with the file list.
        self.name = f"{run_name(PREFIX + tree.root)}-{split}-{tree.fingerprint_of(self.files)}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path, label = self.files[i]
        return {"image": np.asarray(images.read_rgb(path)), "label": label, "index": int(i)}


def write_record(tree: Tree, workdir, skipped: list[tuple[str, str]]) -> None:
    """The label of each class folder, and the images left out, in the run's workdir."""
    record = [{"label": i, "folder": f, "name": n}
              for i, (f, n) in enumerate(zip(tree.folders, tree.class_names))]
    with files.atomic_path(os.path.join(workdir, CLASSES_FILE)) as tmp, open(tmp, "w") as f:
        json.dump({"root": tree.root, "classes": record}, f, indent=1)
    bad_path = os.path.join(workdir, BAD_IMAGES_FILE)
    if skipped:
        with open(bad_path, "w") as f:
            f.writelines(f"{p}\t{err}\n" for p, err in skipped)
        # --skip-bad-images trains on fewer images than the folder holds: say so, once per run.
        print(f"skipped {len(skipped)} unreadable image(s) under {tree.root} "
              f"(--skip-bad-images); listed in {bad_path}", flush=True)
    elif os.path.exists(bad_path):
        os.remove(bad_path)
