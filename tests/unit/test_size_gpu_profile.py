"""benchmarks/size_gpu_profile.py: FLOP counts that match the arithmetic, schedules read from the
params, and the whole sizing on the smoke profile."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vitkit.models.vit import Block

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "size_gpu_profile.py"
spec = importlib.util.spec_from_file_location("size_gpu_profile", SCRIPT)
size = importlib.util.module_from_spec(spec)
sys.modules["size_gpu_profile"] = size  # its dataclasses look their module up there
spec.loader.exec_module(size)


def test_a_linear_layer_counts_two_m_n_k():
    m, k, n = 7, 24, 40
    layer, x = nn.Linear(k, n), torch.randn(m, k)
    assert size.count_flops(lambda: layer(x)) == 2 * m * n * k


def test_a_vit_block_counts_its_matmuls_and_attention_by_hand():
    """One pre-norm block, forward: qkv (3d^2) and projection (d^2) and the MLP (2 x d x 4d) per
    token, two multiply-adds each; attention's QK^T and AV, 2 x T^2 x d each per image."""
    batch, tokens, dim, heads = 2, 10, 48, 3
    block = Block(dim, heads, mlp_ratio=4.0, drop_path=0.0).eval()
    x = torch.randn(batch, tokens, dim)
    linear = 2 * batch * tokens * (3 * dim * dim + dim * dim + 2 * dim * 4 * dim)
    attention = 2 * (2 * batch * tokens * tokens * dim)
    with torch.no_grad():
        assert size.count_flops(lambda: block(x)) == linear + attention


def test_the_schedule_comes_from_the_params():
    params = size.gpu_check.load_profile("gpu")
    teacher = size.schedule("train_teacher", params)
    n_train = params.data.classification.shapes.train_per_class * len(size.shape_classes(params))
    assert teacher.images_per_epoch == n_train // params.teacher.batch_size * params.teacher.batch_size
    assert teacher.images == params.teacher.epochs * teacher.images_per_epoch
    ssl = size.schedule("pretrain_ssl", params)
    n_val = params.data.classification.shapes.val_per_class * len(size.shape_classes(params))
    assert ssl.val_images == (n_train + n_val) * (1 + params.ssl.epochs)  # every epoch, and once before
    detr = size.schedule("train_detr@deformable", params)
    evals = params.detr_training.epochs // params.detr_training.eval_every
    assert detr.val_images == params.data.detection.shapes.val_images * evals
    assert size.validation_epochs(7, 3) == 3  # epochs 3, 6 and the last


def test_the_smoke_profile_is_sized_with_each_stage_s_numbers(capsys):
    stages = ["train_teacher", "distill_deit@none", "distill_deit@hard", "train_detr@deformable"]
    rows = size.main(["--profile", "smoke", "--quick", "--stages", *stages])
    assert [r.stage for r in rows] == stages
    for r in rows:
        assert r.gflop_per_image > 0 and r.images > 0 and r.images_per_s_core > 0 and r.val_gflop > 0, r
        low, high = r.mfu
        assert r.expected_min(low) == pytest.approx(
            max(r.compute_min(low), r.data_min) + r.validation_min(low)
        )
        assert r.compute_min(low) == pytest.approx(r.compute_min(high) * high / low)
    by_stage = {r.stage: r for r in rows}
    # the hard student adds the teacher's forward to the plain student's step
    assert by_stage["distill_deit@hard"].gflop_per_image > by_stage["distill_deit@none"].gflop_per_image
    deformable = by_stage["train_detr@deformable"]
    assert 0 < deformable.uncounted_gflop_per_image < deformable.gflop_per_image
    table = capsys.readouterr().out.split("profile smoke")[1]
    assert [line.split()[0] for line in table.splitlines()[4 : 4 + len(stages)]] == stages


def test_standard_errors_of_the_test_split():
    assert size.proportion_se(0.5, 6000) == pytest.approx(math.sqrt(0.25 / 6000))
    assert size.paired_difference_se(0.1, 6000) == pytest.approx(math.sqrt(0.1 / 6000))
