"""Sampling: greedy, temperature, top-k, top-p and seeded generators, checked by the numbers."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.sampling import SamplingParams, filter_logits, sample

LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0], np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def frequencies(params: SamplingParams, draws: int = 20_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.bincount([sample(LOGITS, params, rng) for _ in range(draws)], minlength=6)
    return counts / draws


def test_greedy_is_argmax_and_draws_nothing() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample(LOGITS, SamplingParams(max_new_tokens=1, temperature=0), rng) == 3
    assert rng.bit_generator.state == state  # greedy must not consume randomness


def test_greedy_tie_takes_lowest_id() -> None:
    logits = np.array([0.0, 5.0, 5.0], np.float32)
    assert sample(logits, SamplingParams(1, temperature=0), np.random.default_rng()) == 1


def test_temperature_one_matches_softmax() -> None:
    observed = frequencies(SamplingParams(1, temperature=1.0))
    np.testing.assert_allclose(observed, softmax(LOGITS.astype(np.float64)), atol=0.015)


def test_temperature_sharpens_and_flattens() -> None:
    cold = frequencies(SamplingParams(1, temperature=0.25))
    hot = frequencies(SamplingParams(1, temperature=4.0))
    np.testing.assert_allclose(cold, softmax(LOGITS / 0.25), atol=0.015)
    np.testing.assert_allclose(hot, softmax(LOGITS / 4.0), atol=0.015)
    assert cold[3] > 0.95 > hot[3]


def test_top_k_keeps_only_the_k_largest() -> None:
    ids, probs = filter_logits(LOGITS, SamplingParams(1, top_k=2))
    assert ids.tolist() == [3, 0]
    np.testing.assert_allclose(probs, softmax(np.array([3.0, 2.0])), rtol=1e-9)
    observed = frequencies(SamplingParams(1, top_k=2))
    assert observed[[1, 2, 4, 5]].sum() == 0


def test_top_k_ties_are_broken_by_lowest_id() -> None:
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    ids, _ = filter_logits(logits, SamplingParams(1, top_k=2))
    assert ids.tolist() == [1, 2]


def test_top_k_zero_and_above_vocab_mean_no_limit() -> None:
    for k in (0, 6, 100):
        ids, _ = filter_logits(LOGITS, SamplingParams(1, top_k=k))
        assert sorted(ids.tolist()) == list(range(6))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    p = softmax(LOGITS.astype(np.float64))  # sorted: id3 .63, id0 .23, id1 .086, ...
    order = np.argsort(-p)
    mass = p[order[0]] + p[order[1]]
    ids, probs = filter_logits(LOGITS, SamplingParams(1, top_p=float(mass) - 1e-3))
    assert ids.tolist() == [3, 0]  # two tokens are needed to reach just under their mass
    np.testing.assert_allclose(probs, p[[3, 0]] / mass, rtol=1e-9)
    ids, _ = filter_logits(LOGITS, SamplingParams(1, top_p=float(mass) + 1e-3))
    assert ids.tolist() == [3, 0, 1]


def test_tiny_top_p_is_greedy() -> None:
    observed = frequencies(SamplingParams(1, top_p=1e-6), draws=500)
    assert observed[3] == 1.0


def test_top_k_then_top_p_compose() -> None:
    # top_k=3 renormalises over {3, 0, 1}; top_p=0.7 then needs id 3 and id 0.
    ids, probs = filter_logits(LOGITS, SamplingParams(1, top_k=3, top_p=0.7))
    assert ids.tolist() == [3, 0]
    assert probs.sum() == pytest.approx(1.0)


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    def draw(seed: int) -> list[int]:
        params = SamplingParams(1, temperature=1.0, seed=seed)
        rng = params.generator()
        return [sample(LOGITS, params, rng) for _ in range(64)]

    assert draw(1234) == draw(1234)
    assert draw(1234) != draw(4321)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},  # 0 is allowed: prefill only (prompt scoring)
        {"max_new_tokens": 1, "logprobs": -1},
        {"max_new_tokens": 1, "prompt_logprobs": -1},
        {"max_new_tokens": 1, "temperature": -0.1},
        {"max_new_tokens": 1, "temperature": float("nan")},
        {"max_new_tokens": 1, "top_k": -1},
        {"max_new_tokens": 1, "top_p": 0.0},
        {"max_new_tokens": 1, "top_p": 1.5},
        {"max_new_tokens": 1, "stop": ("",)},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
