"""params.yaml schema: no defaults of its own, profiles, the generated reference, clear errors."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from vitkit.config import (
    DOCS_COMMAND,
    Params,
    deep_merge,
    flatten,
    load_params,
    params_reference,
    profile_overrides,
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
