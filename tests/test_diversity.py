"""rlrefine.metrics.diversity: the Vendi score against hand-computed values."""
import math

import pytest
import torch

from rlrefine.metrics.diversity import vendi_score


def test_identical_captions_count_once_and_orthogonal_ones_count_each():
    assert vendi_score(torch.ones(7, 4)) == pytest.approx(1.0)
    assert vendi_score(torch.eye(5) * 3.0) == pytest.approx(5.0)


def test_two_captions_at_cosine_one_half():
    # K = [[1, .5], [.5, 1]] -> eigenvalues of K/2 are 0.75 and 0.25.
    e = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 1.7548
    assert vendi_score(e) == pytest.approx(expected, rel=1e-9)


def test_matches_the_eigenvalue_definition_on_random_embeddings():
    e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.nn.functional.normalize(e, dim=-1)
    lam = torch.linalg.eigvalsh(x @ x.T / 30).clamp_min(0)
    lam = lam[lam > 1e-12]
    assert vendi_score(e) == pytest.approx(float(torch.exp(-(lam * lam.log()).sum())), rel=1e-9)


def test_empty_input_names_the_problem():
    with pytest.raises(ValueError, match="non-empty"):
        vendi_score(torch.zeros(0, 3))
