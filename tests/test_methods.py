"""The method registry (`pand_jax.methods`): one entry per Stage-NSD method, each paper value
defined once (configs/), and a dataset resolved once per run."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib

import pytest
from conftest import NSD_ARGS, REPO
from helpers import cli_error
from PIL import Image

from pand_jax import config, methods
from pand_jax.methods.base import ANCHOR_KINDS, INTERMEDIATE, TEACHER_SIGNALS

PACKAGE = REPO / "pand_jax"


def _sources(exclude=()):
    for path in sorted(PACKAGE.rglob("*.py")):
        if not any(path.is_relative_to(PACKAGE / e) for e in exclude):
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_every_entry_is_complete_and_reads_its_own_config_sections():
    loss = config.default_config("nsd")["loss"]
    modules = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base"}
    # every module of the package is a method's, and each one's entries are in the registry
    assert {m.objective.__module__.rsplit(".", 1)[-1] for m in methods.REGISTRY.values()} == modules
    for name, m in methods.REGISTRY.items():
        assert m.name == name and m.label
        assert m.teacher in (None, *TEACHER_SIGNALS, INTERMEDIATE)
        assert m.anchors in (None, *ANCHOR_KINDS)
        assert set(m.sections) <= set(loss), (name, m.sections)
        # its settings come from its sections (and the shared scale) only
        trimmed = {k: v for k, v in loss.items() if k in m.sections or not isinstance(v, dict)}
        assert m.settings(trimmed, 10, True, "digits") == m.settings(loss, 10, True, "digits")
    with pytest.raises(ValueError, match=r"unknown method 'pandas'; expected one of \['none'"):
        methods.get("pandas")


def test_each_loss_section_has_its_schema_beside_its_method():
    """configs/nsd.json's `loss` sections are exactly the methods' own (each named after the
    method whose module holds its schema), and the config schema is assembled from them: a
    section no method owns is an unknown key."""
    loss = config.default_config("nsd")["loss"]
    sections = methods.loss_sections()
    assert set(sections) == set(loss) - {"scale"}
    for name, schema in sections.items():
        method = methods.get(name)
        assert name in method.sections and schema.__module__ == method.objective.__module__
        schema.model_validate(loss[name])
    from pand_jax.cli.train import schema_facts

    cfg = config.default_config("nsd")
    cfg["dataset"] = "digits"
    facts = schema_facts()
    assert config.validate(cfg, facts, "nsd")["loss"].keys() == loss.keys()
    without = dataclasses.replace(
        facts, loss_sections={k: v for k, v in sections.items() if k != "kd"}
    )
    with pytest.raises(config.ConfigError, match="unknown config key 'loss.kd'"):
        config.validate(cfg, without, "nsd")


def test_bound_words_are_made_from_the_bounds():
    """An error names what a key allows in words made from its bound, the one place the bound
    is written."""
    cfg = config.default_config("nsd")
    cfg["dataset"] = "digits"
    from pand_jax.cli.train import schema_facts

    cases = {
        "loss.kd.temperature=0": "config loss.kd.temperature = 0: expected a number > 0",
        "optimizer.momentum=1.0": "config optimizer.momentum = 1.0: expected a number in [0, 1)",
        "loss.vl2lite.cls_offset=2.0": "expected a number in [0, 1]",
        "loss.pand.nsd_group_size=1": "expected an integer >= 2, or null for the whole batch",
        "teacher_cache=-1": "expected an integer >= 0 (views; 0: online teacher)",
        "loss.promptkd.weight=0": "expected a number > 0, or null for weight_by_dataset's",
        "loss.pand.nsd_form='x'": "expected one of ['paper', 'batch']",
        "no_psc=3": "expected true or false",
        "epochs=0": "config epochs = 0: expected an integer >= 1",
    }
    for item, message in cases.items():
        with pytest.raises(config.ConfigError) as e:
            config.validate(config.apply_sets(cfg, [item]), schema_facts(), "nsd")
        assert message in str(e.value), (item, str(e.value))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--method", "dkd", "--set", "loss.dkd.warmup=2"],
            "config loss.dkd.warmup = 2: expected <= epochs (1): the DKD term would not reach "
            "its full weight",
        ),
        (
            ["--method", "rkd", "--set", "loss.kd.standardize=true"],
            "config loss.kd.standardize = True: expected false with --method rkd, which reads "
            "no loss.kd (logit standardisation is a switch of kd, dkd)",
        ),
        (
            ["--method", "kd", "--set", "loss.kd.standardize=true"]
            + ["--teacher-cache", "2", "--soft-labels", "ms:3"],
            "config soft_labels = 'ms': expected embedding with loss.kd.standardize = true: "
            "standardisation z-scores the teacher's logits, and sparse soft labels keep only "
            "their softmax",
        ),
        (
            ["--method", "dkd", "--teacher-cache", "2", "--soft-labels", "ms:3"],
            "config soft_labels = 'ms': expected embedding with --method dkd, which reads the "
            "teacher's logits in full (sparse labels serve ",
        ),
        (
            ["--method", "dist", "--unlabeled-data", "folder:UNLABELED"],
            "config unlabeled_data = 'folder:UNLABELED': expected null with --method dist, "
            "which trains on labels",
        ),
        (
            ["--method", "kd", "--set", "augment=mixup"],
            "config augment = 'mixup': expected another recipe with --method kd, which trains "
            "on labels: a mixed view shows two examples under one label (mixup serves the "
            f"methods that read none: {', '.join(methods.names(lambda m: not m.reads_labels))})",
        ),
        (
            ["--method", "fm"],
            "config augment = 'rrc': expected 'mixup' with --method fm: function matching "
            "trains on mixed views (--set augment=mixup)",
        ),
    ],
)
def test_logit_methods_refuse_what_they_cannot_read(extra, message, teacher, tmp_path, capsys):
    """DKD, DIST, logit standardisation and function matching: each input they cannot use is
    one line, and nothing is written."""
    from pand_jax.cli.train import main

    unlabeled = tmp_path / "unlabeled" / "a"
    unlabeled.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(unlabeled / "u.png")
    extra = [a.replace("UNLABELED", str(unlabeled.parent)) for a in extra]
    argv = NSD_ARGS + ["--teacher", teacher, "--workdir", tmp_path / "run"] + extra
    assert main([str(a) for a in argv]) == 2
    err = cli_error(capsys)
    assert message.replace("UNLABELED", str(unlabeled.parent)) in err, err
    assert not (tmp_path / "run").exists()


def test_auto_text_reduction_resolves_in_one_place():
    loss = config.default_config("nsd")["loss"]
    assert loss["vl2lite"]["txt_reduction"] == "auto"
    for name in ("vl2lite", "pand"):
        s = methods.get(name).settings
        assert s(loss, 5, True, "digits")["reduction"] == "batch_mean"
        assert s(loss, 5, False, "digits")["reduction"] == "half_batch_mean"


def test_promptkd_weight_is_the_released_per_dataset_value_unless_set():
    loss = config.default_config("nsd")["loss"]
    s = methods.get("promptkd").settings
    assert [s(loss, 5, True, d)["weight"] for d in ("aircraft", "flowers", "cub", "folder:x")] == [
        200.0,
        200.0,
        1000.0,
        1000.0,
    ]
    loss["promptkd"]["weight"] = 3.0
    assert s(loss, 5, True, "aircraft")["weight"] == 3.0


def _written_names(tree) -> list[tuple[int, str]]:
    """(line, text) of every string in `tree` that names a registered method: the name itself,
    or a dotted config key with the name as one of its parts ("loss.pand.lambda_nsd")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            dotted = "." in text and " " not in text and set(text.split(".")) & set(methods.NAMES)
            if text in methods.NAMES or dotted:
                found.append((node.lineno, text))
    return found


def test_no_method_is_named_outside_the_registry():
    """A method's name belongs in pand_jax/methods: elsewhere the fields of its entry say what
    it needs, and help texts, tables and error hints derive from the registry. So a new method
    touches no file outside its module and the registry."""
    found = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path, tree in _sources(exclude=("methods",))
        for line, text in _written_names(tree)
    ]
    assert not found, "\n".join(found)


def test_the_guard_finds_a_method_name_in_any_string():
    tree = ast.parse(
        'if cfg["method"] == "pand": pass\n'
        'KEY = "loss.kd.temperature"\n'
        'f(x, reduction="vl2lite")\n'
        'print(f"loss.rkd.{k}")\n'
        'ok = "pandas kd-tree"\n'
    )
    assert sorted(line for line, _ in _written_names(tree)) == [1, 2, 3, 4]


def _paper_values() -> dict[float, str]:
    """Every number of the methods' and optimisers' sections of configs/, by value."""
    values = {}
    for stage in ("psc", "nsd"):
        for key, v in config.flatten(config.default_config(stage)):
            if (
                key.startswith(("loss.", "optimizer."))
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and v not in (0, 1)
            ):
                values[_key(v)] = f"{stage}.{key}"
    return values


def _key(v) -> float:
    """A number to 12 significant digits: 1 / 0.07 written out in JSON is the same value."""
    return float(f"{float(v):.12g}")


def _config_names() -> set[str]:
    """The leaf names of configs/psc.json and nsd.json, and the names the loss functions give
    some of them (k for nsd_k, ...)."""
    names = {
        key.rsplit(".", 1)[-1]
        for stage in ("psc", "nsd")
        for key, _ in config.flatten(config.default_config(stage))
    }
    return names | {"k", "group_size", "form", "reduction", "distance_weight", "angle_weight"}


def _defaults(tree):
    """(line, parameter name, default) of every keyword default that is not None."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, d in pairs:
                if not (isinstance(d, ast.Constant) and d.value is None):
                    yield d.lineno, arg.arg, d


def _fractions(tree):
    """(line, value) of every non-integral number in a keyword default or a module constant."""
    nodes = [d for _, _, d in _defaults(tree)]
    nodes += [
        n.value
        for n in tree.body
        if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None
    ]
    # A sensitivity study's points (`Sweep(values=...)`, PAND's lambda_NSD) are its design, as
    # the paper's reported numbers are, not a setting of a run.
    study = {
        id(n)
        for node in nodes
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Sweep"
        for n in ast.walk(call)
    }
    for node in nodes:
        for n in ast.walk(node):
            if id(n) in study:
                continue
            value = None
            if isinstance(n, ast.Constant) and type(n.value) is float:
                value = n.value
            elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):  # 1.0 / 0.07
                try:
                    value = eval(compile(ast.Expression(n), "", "eval"), {})
                except Exception:
                    pass
            if value is not None and value != int(value):
                yield n.lineno, _key(value)


# Model architectures and converters hold layer sizes and eps values; augmentation its recipe;
# experiments the paper's reported numbers and its sweep: none of them is a method setting.
NOT_SETTINGS = ("models", "convert", "data", "experiments")


def _violations(path_trees):
    paper, names = _paper_values(), _config_names()
    for path, tree in path_trees:
        for line, name, _ in _defaults(tree):
            if name in names:
                yield f"{path}:{line}: default for {name!r}"
        for line, value in _fractions(tree):
            if value in paper:
                yield f"{path}:{line}: {value:g} ({paper[value]})"


def test_each_paper_value_is_defined_in_configs_only():
    """A loss or optimiser setting of configs/ (k=3, T=4, 25/50, tau=2, lambda=0.5, 1/0.07, lr,
    ...) is never also a keyword default or a module constant of the package, where it could
    silently disagree with the config."""
    assert {_key(v) for v in (0.5, 1 / 0.07, 1e-4)} <= set(_paper_values())
    trees = [(p.relative_to(REPO), t) for p, t in _sources(exclude=NOT_SETTINGS)]
    found = list(_violations(trees))
    assert not found, "\n".join(found)


def test_the_scan_finds_a_default_defined_twice():
    tree = ast.parse(
        "def kd(s, t, temperature=4.0, k=3):\n    pass\nSCALE = 1.0 / 0.07\n"
        "def f(x, n=2, group_size=None):\n    pass\n"
    )
    assert list(_violations([("x.py", tree)])) == [
        "x.py:1: default for 'temperature'",
        "x.py:1: default for 'k'",
        "x.py:3: 14.2857 (nsd.loss.scale)",
    ]


def test_old_workdir_configs_read_as_the_new_sections():
    old = json.loads(json.dumps(config.default_config("nsd")))
    new_loss = old.pop("loss")
    old["align_dim"] = None
    old["loss"] = {
        "scale": new_loss["scale"],
        "tau": 2.0,
        "cls_offset": 0.0,
        "txt_reduction": "auto",
        "nsd_form": "batch",
        "lambda_nsd": 1.0,
        "nsd_k": 3,
        "nsd_group_size": 32,
        "kd_temperature": 4.0,
        "rkd_distance_weight": 25.0,
        "rkd_angle_weight": 50.0,
    }
    migrated = config.migrate(old)
    assert "align_dim" not in migrated
    assert migrated["loss"]["pand"] == {
        "lambda_nsd": 1.0,
        "nsd_form": "batch",
        "nsd_k": 3,
        "nsd_group_size": 32,
    }
    assert migrated["loss"]["kd"] == {"temperature": 4.0}
    # every section of that time (the ones configs/renamed.json moves keys into, and the shared
    # scale); later ones come from `with_defaults` on resume
    renamed = json.loads((config.CONFIG_DIR / "renamed.json").read_text())["keys"]
    then = {new.split(".")[1] for new in renamed.values()} | {"scale"}
    assert set(migrated["loss"]) == then


def _tree(root: pathlib.Path, per_class: int) -> int:
    n = 0
    for split in ("train", "test"):
        for c, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (16, 16), tuple(x + k for x in colour)).save(
                    root / split / c / f"{k}.png"
                )
                n += 1
    return n


def test_a_folder_is_scanned_and_fingerprinted_once_per_run(tmp_path, monkeypatch):
    """One NSD run on an image folder walks the folder once and stats each file once (the
    validation, the checks, both splits' sources and the evaluation read that one scan)."""
    from pand_jax.cli.train import main
    from pand_jax.data import folder

    n_files = _tree(tmp_path / "shapes", 4)
    scans, stats = [], []
    real_scan, real_stat = folder.scan, os.stat
    monkeypatch.setattr(folder, "scan", lambda root: scans.append(root) or real_scan(root))

    def counting_stat(path, *a, **kw):
        if str(path).endswith(".png"):
            stats.append(path)
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(folder.os, "stat", counting_stat)
    args = [a for a in NSD_ARGS]
    args[args.index("digits")] = f"folder:{tmp_path / 'shapes'}"
    args[args.index("--batch-size") + 1] = "4"
    args[args.index("eval_batch_size=64")] = "eval_batch_size=4"
    assert main(args + ["--method", "none", "--workdir", str(tmp_path / "run")]) == 0
    assert len(scans) == 1
    assert len(stats) == n_files
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher_mode"] is None and summary["teacher_forwards"] == 0
    # one step, whose time is compilation: no step is timed, the wall time has it all
    assert summary["train_seconds"] == 0.0 and summary["wall_seconds"] > 0
