"""The reductions every probe leans on: they must see NaN and ±Inf wherever they are, in every dtype."""

import math

import pytest
import torch

from sarkd_diag.probes.base import abs_max, sample, sampled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_abs_max_matches_the_inf_norm_and_propagates_nan(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).to(dtype) * 100 for n in (1, 7, 5000)]
    tensors[1][3] = -1e4  # the absolute max is a negative value
    expected = torch.stack([torch.linalg.vector_norm(t.float(), math.inf) for t in tensors])
    assert torch.equal(abs_max(tensors).float(), expected)
    tensors[0][0], tensors[1][5], tensors[2][4999] = math.nan, -math.inf, math.inf
    assert [str(v) for v in abs_max(tensors).tolist()] == ["nan", "inf", "inf"]


def test_abs_max_of_mixed_dtypes_is_one_tensor():
    values = abs_max([torch.tensor([-3.0]), torch.tensor([2.0], dtype=torch.bfloat16)])
    assert values.tolist() == [3.0, 2.0]
    assert abs_max([]).numel() == 0  # nothing trainable: nothing to read


def test_sampled_is_the_samples_side_by_side():
    a, b = torch.arange(10_000.0), torch.arange(5.0)
    assert torch.equal(sampled([a, b]), torch.cat([sample(a), b]))
    assert sample(a).numel() <= 2 * 4096


def test_a_reading_is_not_overwritten_by_the_next_one_of_the_same_shape():
    first = abs_max([torch.tensor([1.0]), torch.tensor([-2.0])])
    second = abs_max([torch.tensor([5.0]), torch.tensor([-6.0])])
    assert first.tolist() == [1.0, 2.0] and second.tolist() == [5.0, 6.0]
