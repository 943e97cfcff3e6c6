"""Detection task wiring: params -> library configs, backbone init sources, loss terms, model files,
the comparison."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from stages.common import StageContext
from stages.train_detr import trunk_init
from vitkit.config import validate_params
from vitkit.engine.checkpoint import load_weights, save_weights
from vitkit.engine.distributed import DistInfo
from vitkit.errors import ConfigError
from vitkit.evaluation.detection import compare_runs, plot_comparison
from vitkit.models.deformable import DeformableDETRConfig, TopKPostProcess
from vitkit.models.detr import DETRConfig, PostProcess
from vitkit.models.resnet import backbone_state_dict, build_resnet
from vitkit.tasks.detection import DETECTORS, DetectionTask, detector_config, load_detector

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "hidden_dim": 32,
    "nheads": 2,
    "enc_layers": 1,
    "dec_layers": 1,
    "dim_feedforward": 32,
    "num_queries": 4,
}


def params(**overrides):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    return validate_params(raw)


def context(tmp_path: Path, **overrides) -> StageContext:
    return StageContext(
        "train_detr@detr", params(**overrides), tmp_path, torch.device("cpu"), DistInfo(), None
    )


def model_config(arch: str, p, num_classes: int):
    return detector_config(arch, getattr(p, arch), p.backbone, p.detr_training, num_classes)


def build_model(cfg, trunk):
    return DETECTORS["detr" if isinstance(cfg, DETRConfig) else "deformable"].build(cfg, trunk)


def test_params_become_the_library_configs_of_each_arch():
    p = params(detr=TINY, deformable={**TINY, "return_layers": ["layer3", "layer4"], "num_feature_levels": 3})
    detr = model_config("detr", p, num_classes=7)
    assert isinstance(detr, DETRConfig)
    assert (detr.num_classes, detr.hidden_dim, detr.return_layer) == (7, 32, p.detr.return_layer)
    assert detr.train_backbone is not p.detr_training.freeze_backbone
    deformable = model_config("deformable", p, num_classes=7)
    assert isinstance(deformable, DeformableDETRConfig)
    assert deformable.return_layers == ("layer3", "layer4")
    assert (deformable.num_feature_levels, deformable.arch) == (3, p.backbone.arch)


@pytest.mark.parametrize(
    ("section", "values", "needle"),
    [
        ("deformable", {"hidden_dim": 48}, "deformable.hidden_dim: Input should be a multiple of 32"),
        ("deformable", {"two_stage": True, "with_box_refine": False}, "two_stage needs with_box_refine"),
        (
            "deformable",
            {"return_layers": ["layer2", "layer3"], "num_feature_levels": 1},
            "num_feature_levels",
        ),
        ("detr", {"hidden_dim": 100, "nheads": 8}, "multiple of nheads"),
        ("detr", {"return_layer": "layer5"}, "detr.return_layer: Input should be"),
        ("detr_training", {"init": "imagenet"}, "detr_training.init: Input should be 'ssl', 'teacher'"),
        ("detr_training", {"eval_every": 0}, "detr_training.eval_every: Input should be greater than 0"),
    ],
)
def test_bad_detection_params_name_the_key(section, values, needle):
    with pytest.raises(ConfigError) as info:
        params(**{section: values})
    assert needle in str(info.value)


def _save_trunk(path: Path, arch: str = "resnet18", stem: str = "imagenet", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    state = backbone_state_dict(build_resnet(arch, stem=stem))
    save_weights(path, state, {"arch": arch, "stem": stem, "method": "simclr"})
    return state


def test_ssl_init_loads_the_pretrain_ssl_backbone_into_the_detr_trunk(tmp_path):
    state = _save_trunk(tmp_path / "artifacts/ssl/model.pt")
    ctx = context(tmp_path, detr_training={"init": "ssl"}, detr=TINY)
    init = trunk_init(ctx)
    model = build_model(model_config("detr", ctx.params, 7), init)
    body = model.backbone[0].body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])  # frozen BN keeps the statistics


def test_teacher_init_drops_the_classifier_and_scratch_needs_no_file(tmp_path):
    torch.manual_seed(0)
    teacher = build_resnet("resnet18", num_classes=6)
    save_weights(
        tmp_path / "artifacts/teacher/model.pt",
        teacher.state_dict(),
        {"arch": "resnet18", "stem": "imagenet"},
    )
    init = trunk_init(context(tmp_path, detr_training={"init": "teacher"}))
    assert "fc.weight" not in init and torch.equal(init["conv1.weight"], teacher.conv1.weight)
    assert trunk_init(context(tmp_path, detr_training={"init": "scratch"})) is None


def test_missing_or_mismatched_init_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="run the pretrain_ssl stage first"):
        trunk_init(context(tmp_path, detr_training={"init": "ssl"}))
    _save_trunk(tmp_path / "artifacts/ssl/model.pt", stem="small")
    with pytest.raises(ConfigError, match=r"set backbone\.arch and backbone\.stem"):
        trunk_init(context(tmp_path, detr_training={"init": "ssl"}))


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_model_file_meta_rebuilds_the_same_model(tmp_path, arch):
    p = params(detr=TINY, deformable={**TINY, "enc_n_points": 2, "dec_n_points": 2})
    cfg = model_config(arch, p, num_classes=7)
    torch.manual_seed(0)
    model = build_model(cfg, None).eval()
    meta = {"model": arch, "config": dataclasses.asdict(cfg), "top_k": 5, "score_threshold": 0.1}
    save_weights(tmp_path / "model.pt", model.state_dict(), meta)

    state, loaded_meta = load_weights(tmp_path / "model.pt")  # weights_only: meta survives as plain types
    rebuilt, post = load_detector(state, loaded_meta)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images)["pred_boxes"], rebuilt.eval()(images)["pred_boxes"])
    assert type(post) is (PostProcess if arch == "detr" else TopKPostProcess)
    assert (post.top_k, post.score_threshold) == (5, 0.1)


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_the_step_returns_the_objective_and_each_loss_term(arch):
    """What DETR's engine logs: the weighted sum and every unweighted term of the last decoder layer."""
    p = params(detr=TINY, deformable={**TINY, "enc_n_points": 2, "dec_n_points": 2})
    categories = [{"id": i, "name": f"c{i}"} for i in range(3)]
    torch.manual_seed(0)
    task = DetectionTask(
        arch, p.detr_training, getattr(p, arch), p.backbone, categories, None, 2, torch.device("cpu")
    )
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]])},
    ]
    terms = task.step(task.model, (images, targets))
    assert set(terms) == {"loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
    assert terms["loss"].requires_grad and not terms["loss_ce"].requires_grad
    weights = task.criterion.weight_dict
    last_layer = sum(weights[k] * terms[k] for k in ("loss_ce", "loss_bbox", "loss_giou"))
    assert torch.allclose(terms["loss"].detach(), last_layer)  # one decoder layer: no auxiliary terms


def _history(aps: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"epoch": list(range(1, len(aps) + 1)), "val_AP": aps})


def test_comparison_table_puts_final_metrics_and_shared_epochs_side_by_side(tmp_path):
    histories = {
        "detr": _history([0.0, math.nan, 0.1, math.nan]),  # evaluated every other epoch + last
        "deformable": _history([0.1, 0.2, 0.3, 0.4]),
    }
    histories["detr"].loc[3, "val_AP"] = 0.15
    final = {"AP": 0.2, "AP50": 0.5, "AP75": 0.1, "APs": 0.05, "APm": 0.3, "APl": -1.0, "AR100": 0.4}
    finals = {"detr": final, "deformable": {**final, "AP": 0.4, "APs": 0.2}}
    table = compare_runs(histories, finals).set_index("arch")
    assert table.loc["deformable", "AP"] == 0.4 and table.loc["detr", "APs"] == 0.05
    assert table.loc["detr", "epochs"] == table.loc["deformable", "epochs"] == 4
    shared = [c for c in table.columns if c.startswith("val_AP@")]
    assert shared == ["val_AP@1", "val_AP@3", "val_AP@4"]  # only epochs both were evaluated at
    assert table.loc["detr", "val_AP@4"] == 0.15 and table.loc["deformable", "val_AP@3"] == 0.3

    figure = tmp_path / "comparison.png"
    plot_comparison(histories, table.reset_index(), figure, "race")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
