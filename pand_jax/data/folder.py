"""Your own images: `--dataset folder:PATH` reads the torchvision ImageFolder layout.

    PATH/train/<class>/*.jpg   any of IMAGE_EXTENSIONS, in any letter case, sub-folders too
    PATH/test/<class>/...
    PATH/val/<class>/...       optional: Stage-PSC then picks its best epoch on it, not on test
    PATH/classes.json          optional: {"<class folder>": "display name", ...}

PATH/train/ may be missing when the student trains without labels (`--unlabeled-data
folder:DIR`, any layout: `unlabeled_images`); the classes then come from PATH/test/.

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
    return os.path.abspath(os.path.expanduser(key[len(PREFIX) :]))


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
        return {
            path: (st.st_size, st.st_mtime_ns)
            for split in self.files.values()
            for path, _ in split
            for st in [os.stat(path)]
        }

    def fingerprint_of(self, files) -> str:
        """The fingerprint of some of the tree's (path, label) files."""
        return _fingerprint(self.root, ((p, label, *self._stats[p]) for p, label in files))


def _fingerprint(root: str, rows) -> str:
    """A short digest of (path, label, size, mtime_ns) rows, paths relative to `root`."""
    h = hashlib.sha256()
    for path, label, size, mtime in rows:
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def scan(root: str) -> Tree:
    """The tree's classes and files; a layout problem is one FolderError naming the folder."""
    if not os.path.isdir(root):
        raise FolderError(
            f"{root} is not a folder; --dataset folder:PATH expects "
            f"PATH/train/<class>/<images> and PATH/test/<class>/<images>"
        )
    # train/ may be missing (a label-free run; `sources.check_folder` says what else is needed).
    splits = [s for s in SPLITS if s == "test" or os.path.isdir(os.path.join(root, s))]
    classes = {}
    for split in splits:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FolderError(f"{path} is missing; expected {path}/<class>/<images>")
        classes[split] = sorted(
            e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")
        )
        if not classes[split]:
            raise FolderError(
                f"no images in {path}: expected one sub-folder of images per class, "
                f"{path}/<class>/*.jpg"
            )
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            only_first = sorted(set(classes[first]) - set(classes[split]))
            only_other = sorted(set(classes[split]) - set(classes[first]))
            raise FolderError(
                f"the class folders of {root}/{first} and {root}/{split} differ: "
                f"only in {first}: {only_first}, only in {split}: {only_other}"
            )
    folders = tuple(classes[first])
    files = {
        split: tuple(
            (p, label)
            for label, c in enumerate(folders)
            for p in _class_images(os.path.join(root, split, c))
        )
        for split in splits
    }
    return Tree(root, folders, _class_names(root, folders), files)


def _images_under(path: str) -> list[str]:
    # Sub-folders count, in torchvision's order (sorted walk, sorted names).
    return [
        os.path.join(d, f)
        for d, _, names in sorted(os.walk(path, followlinks=True))
        for f in sorted(names)
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _class_images(path: str) -> list[str]:
    found = _images_under(path)
    if not found:
        raise FolderError(
            f"class folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add some or remove the folder from every split"
        )
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
        if not isinstance(given, dict) or not all(
            isinstance(v, str) and v.strip() for v in given.values()
        ):
            raise FolderError(
                f'{path} must map class folders to names: {{"{folders[0]}": "a name", ...}}'
            )
        unknown = sorted(set(given) - set(folders))
        if unknown:
            raise FolderError(
                f"{path} names folders that are not classes: {unknown}; "
                f"the class folders are {list(folders)}"
            )
    names = tuple(given.get(f, display_name(f)) for f in folders)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FolderError(
            f"class names {dup} of {root} are used by more than one class folder; "
            f"rename the folders or give distinct names in {path}"
        )
    return names


_BAD: dict[tuple[str, str], list] = {}  # (root, fingerprint) -> bad files; one check per process


def _bad_files(root: str, fingerprint: str, paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) of every file of `paths` that does not decode, in file order."""
    key = (root, fingerprint)
    if key not in _BAD:
        with (
            concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool,
            progress_bar(total=len(paths), unit="image", desc=f"checking {root}") as bar,
        ):
            results = []
            for err in pool.map(_read_error, paths):  # PIL decodes without the GIL
                results.append(err)
                bar.update(1)
        _BAD[key] = [(p, err) for p, err in zip(paths, results) if err]
    return _BAD[key]


def bad_images(tree: Tree) -> list[tuple[str, str]]:
    """(path, reason) of every file of the tree that does not decode, in file order."""
    return _bad_files(
        tree.root, tree.fingerprint, [p for split in tree.files.values() for p, _ in split]
    )


def _read_error(path: str) -> str | None:
    try:
        images.read_rgb(path)
    except images.READ_ERRORS as e:
        return str(e) or type(e).__name__
    return None


def check_images(tree: Tree, skip: bool) -> list[tuple[str, str]]:
    """The bad files to leave out ([] when all decode); raises listing them all unless `skip`."""
    return _refuse_bad(tree.root, bad_images(tree), skip)


def _refuse_bad(root: str, bad: list[tuple[str, str]], skip: bool) -> list[tuple[str, str]]:
    if bad and not skip:
        raise BadImagesError(
            f"{len(bad)} image file(s) under {root} cannot be read; nothing was run. Replace "
            "or remove them, or pass --skip-bad-images to train without them:\n  "
            + "\n  ".join(f"{p} ({err})" for p, err in bad)
        )
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


@dataclasses.dataclass(frozen=True)
class Unlabeled:
    """`--unlabeled-data folder:DIR`: every image under DIR, in any layout (sorted walk)."""

    root: str
    paths: tuple[str, ...]

    @functools.cached_property
    def fingerprint(self) -> str:
        return _fingerprint(
            self.root,
            ((p, -1, st.st_size, st.st_mtime_ns) for p in self.paths for st in [os.stat(p)]),
        )


def unlabeled_images(key: str) -> Unlabeled:
    """The images of `folder:DIR`; one FolderError when DIR is not a folder or holds none."""
    if not is_folder(key):
        raise FolderError(
            f"--unlabeled-data {key!r}: expected folder:DIR, a folder of images in any layout"
        )
    root = root_of(key)
    if not os.path.isdir(root):
        raise FolderError(f"--unlabeled-data: {root} is not a folder")
    paths = tuple(_images_under(root))
    if not paths:
        raise FolderError(
            f"--unlabeled-data: no images under {root} "
            f"({', '.join(IMAGE_EXTENSIONS)}, sub-folders too)"
        )
    return Unlabeled(root, paths)


def check_unlabeled(unlabeled: Unlabeled, skip: bool) -> list[tuple[str, str]]:
    """As `check_images`, for the unlabelled images."""
    bad = _bad_files(unlabeled.root, unlabeled.fingerprint, list(unlabeled.paths))
    return _refuse_bad(unlabeled.root, bad, skip)


class UnlabeledSource:
    """Random-access source of the unlabelled images: {image, label: -1, index}."""

    def __init__(self, unlabeled: Unlabeled, skip: bool = False):
        bad = {p for p, _ in check_unlabeled(unlabeled, skip)}
        self.files = [p for p in unlabeled.paths if p not in bad]
        self.name = f"{run_name(PREFIX + unlabeled.root)}-unlabeled-{unlabeled.fingerprint}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"image": np.asarray(images.read_rgb(self.files[i])), "label": -1, "index": int(i)}


def write_record(tree: Tree, workdir) -> None:
    """The label of each class folder, in the run's workdir."""
    record = [
        {"label": i, "folder": f, "name": n}
        for i, (f, n) in enumerate(zip(tree.folders, tree.class_names))
    ]
    with files.atomic_path(os.path.join(workdir, CLASSES_FILE)) as tmp, open(tmp, "w") as f:
        json.dump({"root": tree.root, "classes": record}, f, indent=1)


def write_skipped(workdir, skipped: list[tuple[str, str]], where: str) -> None:
    """The images left out (--skip-bad-images) of the folder(s) `where`, in the run's workdir;
    said once per run."""
    bad_path = os.path.join(workdir, BAD_IMAGES_FILE)
    if skipped:
        with open(bad_path, "w") as f:
            f.writelines(f"{p}\t{err}\n" for p, err in skipped)
        # --skip-bad-images trains on fewer images than the folder holds: say so, once per run.
        print(
            f"skipped {len(skipped)} unreadable image(s) under {where} (--skip-bad-images); "
            f"listed in {bad_path}",
            flush=True,
        )
    elif os.path.exists(bad_path):
        os.remove(bad_path)
