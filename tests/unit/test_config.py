"""params.yaml schema: no defaults of its own, profiles, the generated reference, clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from vitkit import config
from vitkit.config import (
    DOCS_COMMAND,
    Params,
    deep_merge,
    flatten,
    load_params,
    params_reference,
    profile_overrides,
    read_yaml,
    validate_params,
)
from vitkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "params.md"


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_and_every_profile_validate():
    assert isinstance(load_params(ROOT / "params.yaml"), Params)
    profiles = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
    assert {"smoke", "gpu"} <= set(profiles)
    for name in profiles:
        merged = deep_merge(default_raw(), profile_overrides(name))
        validate_params(merged, f"{name}.yaml")


def _fields(model: type, prefix: str = ""):
    """(dotted key, FieldInfo) of every field of ``model``, nested sections (and mapped ones) included."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, field
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _fields(inner, f"{key}.")


def test_schema_has_no_defaults_and_documents_every_key():
    """params.yaml is the only source of values: every key is required and described."""
    fields = dict(_fields(Params))
    assert "data.detection.coco.annotations" in fields  # the walk reaches mapped sections too
    with_default = [key for key, field in fields.items() if not field.is_required()]
    assert not with_default, (
        f"schema fields with a default (params.yaml must be the only one): {with_default}"
    )
    undocumented = [key for key, field in fields.items() if not (field.description or "").strip()]
    assert not undocumented, f"schema fields without a description: {undocumented}"


def test_every_missing_key_is_one_required_key_message():
    raw = default_raw()
    del raw["engine"]["amp"]
    del raw["ssl"]["augmentation"]["blur_p"]
    with pytest.raises(ConfigError) as info:
        validate_params(raw, "params.yaml")
    message = str(info.value)
    assert message.startswith("params.yaml: 2 invalid param(s)")
    assert "engine.amp: required key is missing" in message
    assert "ssl.augmentation.blur_p: required key is missing" in message
    assert "docs/params.md" in message


def test_params_reference_is_up_to_date():
    assert DOCS.is_file(), f"docs/params.md is missing: run `{DOCS_COMMAND}`"
    assert DOCS.read_text() == params_reference(ROOT / "params.yaml"), (
        f"docs/params.md is out of date with vitkit/config.py or params.yaml: run `{DOCS_COMMAND}`"
    )


def test_params_reference_has_a_row_for_every_leaf_key():
    reference = params_reference(ROOT / "params.yaml")
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    assert sorted(keys) == sorted(flatten(default_raw()))
    assert "| `ssl.augmentation.crop_scale` | `[0.4, 1.0]` | [a, b], each float in (0, 1] |" in reference
    assert "| `detr_training.lr_backbone` | `0.00002` | float >= 0 |" in reference
    assert "| `data.classification.path` | `null` | null or path |" in reference
    coco = next(row for row in rows if row.startswith("| `data.detection.coco` |"))
    assert "annotations" in coco and "images" in coco


def test_cli_docs_prints_or_writes_the_reference(tmp_path):
    out = tmp_path / "params.md"
    result = subprocess.run(
        [sys.executable, "-m", "vitkit.config", "docs", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == params_reference(ROOT / "params.yaml")
    printed = subprocess.run(
        [sys.executable, "-m", "vitkit.config", "docs"], capture_output=True, text=True, cwd=ROOT
    )
    assert printed.returncode == 0 and printed.stdout == out.read_text()


def test_deep_merge_keeps_sibling_keys():
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}})
    assert merged == {"a": {"b": 5, "c": 2}, "d": 3}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("teacher", "lrr"), 0.1, "teacher.lrr: unknown key"),
        (("teacher", "epochs"), "ten", "teacher.epochs: Input should be a valid integer"),
        (("teacher", "lr"), -1.0, "teacher.lr: Input should be greater than 0"),
        (
            ("teacher", "label_fraction"),
            1.5,
            "teacher.label_fraction: Input should be less than or equal to 1",
        ),
        (("engine", "device"), "tpu", "engine.device: Input should be 'auto', 'cpu', 'cuda' or 'mps'"),
        (("data", "classes"), ["circle"], "data.classes: List should have at least 2 items"),
        (("data", "classes"), ["circle", ""], "data.classes.1: String should have at least 1 character"),
        (
            ("data", "classes"),
            ["circle", "star", "circle"],
            "data.classes: Value error, duplicate name(s) 'circle'",
        ),
        (("data", "detection", "shapes", "min_objects"), 9, "min_objects (9) must be <= max_objects"),
        (("data", "classification", "source"), "imagefolder", "needs 'path'"),
        (("ssl", "temperature"), -0.1, "ssl.temperature: Input should be greater than 0"),
        (("ssl", "method"), "moco", "ssl.method: Input should be 'mocov2' or 'simclr'"),
        (("ssl", "augmentation", "crop_scale"), [0.9, 0.3], "crop_scale must be [min, max]"),
        (("teacher", "init"), "teacher", "teacher.init: Input should be 'ssl' or 'scratch'"),
        (("deit", "tau"), 0, "deit.tau: Input should be greater than 0"),
        (("deit", "alpha"), 1.5, "deit.alpha: Input should be less than or equal to 1"),
        (("deit", "mixup"), -0.1, "deit.mixup: Input should be greater than or equal to 0"),
        (("deit", "preset"), "vit_huge", "deit.preset: Input should be 'cpu_tiny', 'deit_tiny'"),
        (("deit", "repeated_aug"), 0, "deit.repeated_aug: Input should be greater than 0"),
        # sanity bounds: what no machine or model comes near, refused before anything allocates
        (("seed",), 2**32, "seed: Input should be less than or equal to 4294967295"),
        (("seed",), -1, "seed: Input should be greater than or equal to 0"),
        (("engine", "nproc"), 100_000, "engine.nproc: Input should be less than or equal to 1024"),
        (("engine", "threads"), 100_000, "engine.threads: Input should be less than or equal to 1024"),
        (("engine", "num_workers"), 100_000, "engine.num_workers: Input should be less than or equal"),
        (("data", "workers"), 100_000, "data.workers: Input should be less than or equal to 1024"),
        (("detr", "num_queries"), 1e9, "detr.num_queries: Input should be less than or equal to 2048"),
        (("detr", "num_queries"), "1e9", "detr.num_queries: Input should be a valid integer"),
        (("deformable", "num_queries"), 10**6, "deformable.num_queries: Input should be less than or equal"),
        (("detr", "hidden_dim"), 2**20, "detr.hidden_dim: Input should be less than or equal to 4096"),
        (("detr", "dec_layers"), 1000, "detr.dec_layers: Input should be less than or equal to 64"),
        (("deit", "embed_dim"), 10**6, "deit.embed_dim: Input should be less than or equal to 4096"),
        (("ssl", "proj_dim"), 10**6, "ssl.proj_dim: Input should be less than or equal to 16384"),
        (("teacher", "batch_size"), 10**9, "teacher.batch_size: Input should be less than or equal to 65536"),
        (
            ("data", "classification", "shapes", "train_per_class"),
            10**9,
            "train_per_class: Input should be less than or equal to 1000000",
        ),
    ],
)
def test_bad_value_names_file_key_and_what_is_allowed(path, value, expected):
    raw = default_raw()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        validate_params(raw, "params.yaml")
    message = str(info.value)
    assert message.startswith("params.yaml: 1 invalid param(s)")
    assert expected in message


def test_missing_required_section_is_reported():
    raw = default_raw()
    del raw["teacher"]
    with pytest.raises(ConfigError, match="teacher: required key is missing"):
        validate_params(raw)


def test_cli_check_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "params.yaml"
    raw = default_raw()
    raw["teacher"]["epochs"] = 0
    bad.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "vitkit.config", "check", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert "teacher.epochs: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_profile_prints_dvc_set_param_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "vitkit.config", "profile", "smoke"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    assert "-S teacher.epochs=2" in result.stdout
    with pytest.raises(ConfigError, match="unknown profile"):
        profile_overrides("nonexistent")


def test_moco_queue_must_hold_a_batch():
    raw = default_raw()
    raw["ssl"].update(method="mocov2", queue_size=100, batch_size=128)
    with pytest.raises(
        ConfigError, match=r"ssl: Value error, queue_size \(100\) must be >= batch_size \(128\)"
    ):
        validate_params(raw, "params.yaml")
    raw["ssl"]["method"] = "simclr"  # SimCLR has no queue: the key is ignored
    validate_params(raw, "params.yaml")


def test_seeds_of_every_ddp_rank_stay_in_numpys_range():
    """Rank r seeds numpy with seed + r, and numpy takes seeds below 2**32."""
    raw = default_raw()
    raw["seed"], raw["engine"]["nproc"] = 2**32 - 1, 1
    validate_params(raw)
    raw["engine"]["nproc"] = 4
    with pytest.raises(ConfigError) as info:
        validate_params(raw)
    assert "seed (4294967295) + engine.nproc (4) - 1 must be <= 4294967295" in str(info.value)


def test_mocos_queue_is_bounded_by_its_memory():
    raw = default_raw()
    raw["ssl"].update(method="mocov2", queue_size=2**20, proj_dim=1024)
    with pytest.raises(ConfigError, match=r"queue_size \* proj_dim \(1048576 \* 1024\) must be <= 268435456"):
        validate_params(raw)


def _params_text(**replace: str) -> str:
    text = (ROOT / "params.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # a second section would silently replace the first
        ({"mlflow:\n": "teacher: {epochs: 1}\nmlflow:\n"}, "duplicate key 'teacher' on line"),
        ({"  epochs: 12\n": "  epochs: 12\n  epochs: 13\n"}, "duplicate key 'epochs' on line"),
        ({"train_scales: [128]": "train_scales: [128]\n  crop: false"}, "duplicate key 'crop' on line"),
        ({"{images: 10000}": "{images: 10000, images: 5}"}, "duplicate key 'images' on line"),
    ],
)
def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path, edit, expected):
    text = _params_text(**edit)
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: {expected}")
    first, second = (int(n) for n in re.findall(r"line (\d+)", message))
    key = expected.split("'")[1]
    lines = text.splitlines()
    assert f"{key}:" in lines[second - 1] and f"{key}:" in lines[first - 1]


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")
    assert read_yaml(merged) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}


def test_a_profile_with_a_duplicate_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROFILES_DIR", tmp_path)
    (tmp_path / "twice.yaml").write_text("teacher:\n  epochs: 1\nteacher:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        profile_overrides("twice")
    assert "twice.yaml: duplicate key 'teacher' on line 3 (first on line 1)" in str(info.value)


def test_a_params_file_that_is_not_utf8_a_folder_or_a_pipe_is_one_error_line(tmp_path):
    """Checked from the command line: a named pipe must be refused unopened, never waited on."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 0\nmlflow: {experiment: caf\u00e9}\n".encode("latin-1"))
    os.mkfifo(tmp_path / "pipe.yaml")
    cases = {
        latin1: f"{latin1}: not UTF-8 text (byte 0xe9 on line 2); save the params file as UTF-8",
        tmp_path: f"{tmp_path}: is a folder, not a params file",
        tmp_path / "pipe.yaml": f"{tmp_path}/pipe.yaml: is a named pipe (FIFO), not a params file",
    }
    for path, expected in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "vitkit.config", "check", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {expected}")
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
