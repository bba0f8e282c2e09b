from __future__ import annotations

import numpy as np
import pytest
import torch

from mergemix.model.modeling import build_demo_model
from mergemix.recipe import DemoBaseSpec
from mergemix.report.interference import dominance_warnings, interference_gamma, task_vector_cosines

VOCAB = 64


def _tiny(seed: int = 0) -> torch.nn.Module:
    spec = DemoBaseSpec(hidden=32, layers=1, heads=2, ffn=64, vocab=300)  # vocab sizes a tokenizer: unused
    return build_demo_model(spec, VOCAB, 32, 0, seed=seed)


def _domains(k: int, n: int = 4, seq_len: int = 16) -> list[torch.Tensor]:
    """K domains that differ: each draws tokens from its own slice of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    width = VOCAB // k
    return [torch.randint(i * width, (i + 1) * width, (n, seq_len), generator=g) for i in range(k)]


def test_cosines_identical_opposite_orthogonal() -> None:
    base = {"w": torch.zeros(2, 3), "b": torch.ones(4), "steps": torch.tensor(7)}
    t1 = {"w": torch.tensor([[1.0, 2, 0], [0, 0, 0]]), "b": torch.ones(4), "steps": torch.tensor(9)}
    same = {"w": 2 * t1["w"], "b": torch.ones(4)}
    opposite = {"w": -t1["w"], "b": torch.ones(4)}
    orthogonal = {"w": torch.tensor([[0.0, 0, 0], [5, 0, 0]])}  # "b" missing: zero task vector there
    cos = task_vector_cosines(base, [t1, same, opposite, orthogonal])
    assert cos.shape == (4, 4)
    np.testing.assert_allclose(cos, cos.T)
    np.testing.assert_array_equal(np.diag(cos), 1.0)
    assert cos[0, 1] == pytest.approx(1.0)
    assert cos[0, 2] == pytest.approx(-1.0)
    assert cos[0, 3] == pytest.approx(0.0)


def test_cosines_reject_a_mismatched_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        task_vector_cosines({"w": torch.zeros(2)}, [{"w": torch.zeros(3)}])


def _flat_grad(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


@torch.no_grad()
def _shift(model: torch.nn.Module, v: torch.Tensor, scale: float) -> None:
    offset = 0
    for p in model.parameters():
        p.add_(v[offset:offset + p.numel()].view_as(p), alpha=scale)
        offset += p.numel()


def test_hessian_vector_products_match_finite_differences() -> None:
    model = _tiny().double().eval()
    batches = _domains(2)
    result = interference_gamma(model, batches, batch_size=4, max_batches=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [_flat_grad(model, x) for x in batches]
    np.testing.assert_allclose(result.grad_norms, [float(g.norm()) for g in grads], rtol=1e-10)
    for k, x in enumerate(batches):
        for j, v in enumerate(grads):
            eps = 1e-4 / float(v.norm())
            _shift(model, v, eps)
            plus = _flat_grad(model, x)
            _shift(model, v, -2 * eps)
            minus = _flat_grad(model, x)
            model.load_state_dict(before)
            hv = (plus - minus) / (2 * eps)
            # rel 1e-4, not tighter: Llama's RMSNorm computes in float32 even in a float64 model
            assert result.response[k, j] == pytest.approx(float(hv.norm() / v.norm()), rel=1e-4)


def test_gamma_shape_diagonal_and_model_left_as_it_was() -> None:
    model = _tiny().train()
    model.model.layers[0].mlp.eval()  # mixed modes must come back as they were
    model.model.norm.weight.requires_grad_(False)
    marked = model.model.layers[0].mlp.up_proj.weight
    marked.grad = torch.full_like(marked, 3.0)  # a .grad from before must survive untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    result = interference_gamma(model, _domains(3, n=6), batch_size=4, max_batches=2)

    assert result.gamma.shape == result.response.shape == (3, 3)
    assert result.grad_norms.shape == (3,)
    np.testing.assert_allclose(np.diag(result.gamma), 1.0)
    assert np.all(np.isfinite(result.gamma)) and np.all(result.gamma > 0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.equal(marked.grad, torch.full_like(marked, 3.0))
    assert all(p.grad is None for p in model.parameters() if p is not marked)
    assert model.config._attn_implementation == "sdpa"


def test_gamma_rejects_float_batches() -> None:
    with pytest.raises(ValueError, match="LongTensor"):
        interference_gamma(_tiny(), [torch.zeros(2, 8)])


def test_dominance_warnings() -> None:
    names = ["code", "math", "prose"]
    dominant = np.array([[1.0, 0.4, 0.2], [0.9, 1.0, 0.5], [0.1, 0.3, 1.0]])
    assert dominance_warnings(dominant, names) == []
    bad = dominant.copy()
    bad[0, 1] = 1.43
    (warning,) = dominance_warnings(bad, names)
    assert "code's curvature reacts more to math's gradient" in warning and "1.43" in warning
    cosines = np.array([[1.0, 0.1, -0.5], [0.1, 1.0, -0.1], [-0.5, -0.1, 1.0]])
    (warning,) = dominance_warnings(dominant, names, cosines)
    assert "code and prose" in warning and "-0.50" in warning
    with pytest.raises(ValueError):
        dominance_warnings(dominant, names[:2])
