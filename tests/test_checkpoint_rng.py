"""RNG state: seeding, capture/restore of every generator, and surviving a checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hardneg.train.checkpoint import load_checkpoint, save_checkpoint, validate_payload
from hardneg.train.rng import capture_rng_state, restore_rng_state, seed_everything


def _draw(generators: dict[str, torch.Generator]) -> dict[str, object]:
    """Consume randomness from every source, including the cached-Gaussian paths."""
    out: dict[str, object] = {
        "random": [random.random(), random.gauss(0.0, 1.0), random.randint(0, 10**9)],
        "numpy": np.concatenate([np.random.rand(3), np.random.randn(3)]).tolist(),
        "torch": torch.randn(5).tolist() + torch.randint(0, 1000, (3,)).tolist(),
    }
    for name, generator in generators.items():
        out[name] = torch.rand(4, generator=generator, device=generator.device).tolist()
    if torch.cuda.is_available():
        out["cuda"] = torch.randn(4, device="cuda").tolist()
    return out


def _generators() -> dict[str, torch.Generator]:
    gens = {"augment": torch.Generator().manual_seed(7), "loss": torch.Generator().manual_seed(8)}
    if torch.cuda.is_available():
        gens["augment_cuda"] = torch.Generator(device="cuda").manual_seed(9)
    return gens


def test_seed_everything_is_reproducible():
    seed_everything(123)
    a = _draw({})
    seed_everything(123)
    b = _draw({})
    seed_everything(124)
    c = _draw({})
    assert a == b
    assert a["random"] != c["random"] and a["numpy"] != c["numpy"] and a["torch"] != c["torch"]


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "1"])
def test_seed_everything_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


def test_capture_restore_replays_identical_draws():
    seed_everything(0)
    gens = _generators()
    _draw(gens)  # leaves a cached Gaussian in Python's random and in numpy's legacy generator
    state = capture_rng_state(gens)
    assert state["python"]["gauss_next"] is not None
    assert state["numpy"]["has_gauss"] == 1
    first = _draw(gens)
    restore_rng_state(state, gens)
    second = _draw(gens)
    assert first == second


def test_state_is_weights_only_safe_and_survives_a_checkpoint(tmp_path):
    seed_everything(1)
    gens = _generators()
    _draw(gens)
    state = capture_rng_state(gens)
    validate_payload({"rng": state})
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"rng": state, "epoch": 1})
    expected = _draw(gens)

    # a "new process": everything reseeded differently, fresh generator objects
    seed_everything(999)
    fresh = {name: torch.Generator(device=g.device).manual_seed(0) for name, g in gens.items()}
    _draw(fresh)
    restore_rng_state(load_checkpoint(path)["rng"], fresh)
    assert _draw(fresh) == expected


def test_state_contents_are_plain_types():
    state = capture_rng_state({"g": torch.Generator().manual_seed(0)})
    assert set(state) == {"format", "python", "numpy", "torch", "cuda", "generators"}
    assert isinstance(state["python"]["state"], torch.Tensor)
    assert state["python"]["state"].numel() == 625
    assert isinstance(state["numpy"]["keys"], torch.Tensor)
    assert state["numpy"]["keys"].numel() == 624
    assert state["torch"].dtype == torch.uint8
    assert isinstance(state["generators"]["g"], torch.Tensor)
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert state["cuda"] is None


def test_restoring_an_uncaptured_generator_is_an_error():
    state = capture_rng_state({"augment": torch.Generator()})
    with pytest.raises(ValueError, match="no generator named 'loss'"):
        restore_rng_state(state, {"loss": torch.Generator()})
    restore_rng_state(state)  # captured generators that are not passed are ignored


def test_restore_rejects_foreign_state():
    with pytest.raises(ValueError, match="no 'numpy' entry"):
        restore_rng_state({"python": {}, "torch": torch.get_rng_state()})
    with pytest.raises(ValueError, match="must be a dict"):
        restore_rng_state([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torch.Generator"):
        capture_rng_state({"g": 3})  # type: ignore[dict-item]
