"""LoRA aggregation: exact FedAvg of factors at equal ranks, exact/optimal re-factorisation otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from splitft.shared.errors import ConfigError
from splitft.shared.model.aggregation import (
    Contribution,
    aggregate,
    convert_state,
    module_key,
    state_ranks,
    to_rank,
)

K0 = "base_model.model.transformer.h.0.attn.c_attn"
K1 = "base_model.model.transformer.h.1.attn.c_attn"
OUT, IN = 12, 10


def pair(key: str, rank: int, seed: int, out: int = OUT, in_: int = IN) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{key}.lora_A.weight": torch.randn(rank, in_, generator=gen),
        f"{key}.lora_B.weight": torch.randn(out, rank, generator=gen),
    }


def factors(state: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]


def product(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    a, b = factors(state, key)
    return b.double() @ a.double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


# --------------------------------------------------------------------------- names


def test_module_key_and_state_ranks() -> None:
    assert module_key(f"{K0}.lora_A.weight") == K0
    assert module_key(f"{K0}.lora_B.weight") == K0
    with pytest.raises(ConfigError, match="not a LoRA weight"):
        module_key(f"{K0}.weight")
    assert state_ranks({**pair(K0, 3, 1), **pair(K1, 5, 2)}) == {K0: 3, K1: 5}


def test_state_ranks_refuses_lone_and_inconsistent_factors() -> None:
    lone = {f"{K0}.lora_A.weight": torch.zeros(2, IN)}
    with pytest.raises(ConfigError, match=K0):
        state_ranks(lone)
    bad = {f"{K0}.lora_A.weight": torch.zeros(2, IN), f"{K0}.lora_B.weight": torch.zeros(OUT, 3)}
    with pytest.raises(ConfigError, match=K0):
        state_ranks(bad)


# --------------------------------------------------------------------------- equal ranks: FedAvg of the factors


def test_equal_ranks_average_the_factors_exactly() -> None:
    s1, s2 = pair(K0, 4, 1), pair(K0, 4, 2)
    out = aggregate([Contribution(1.0, s1), Contribution(3.0, s2)], {K0: 4})
    for name in s1:
        expected = (1.0 * s1[name].double() + 3.0 * s2[name].double()) / 4.0
        torch.testing.assert_close(out[name], expected.float(), rtol=1e-7, atol=0)
        assert out[name].dtype == torch.float32
    # The average of the products is NOT what equal ranks give: the cross terms are there.
    assert rel(product(out, K0), 0.25 * product(s1, K0) + 0.75 * product(s2, K0)) > 1e-2


def test_equal_ranks_exact_on_representable_values() -> None:
    s1 = {f"{K0}.lora_A.weight": torch.full((2, IN), 2.0), f"{K0}.lora_B.weight": torch.full((OUT, 2), -4.0)}
    s2 = {f"{K0}.lora_A.weight": torch.full((2, IN), 6.0), f"{K0}.lora_B.weight": torch.full((OUT, 2), 8.0)}
    out = aggregate([Contribution(300, s1), Contribution(100, s2)], {K0: 2})
    assert torch.equal(out[f"{K0}.lora_A.weight"], torch.full((2, IN), 3.0))
    assert torch.equal(out[f"{K0}.lora_B.weight"], torch.full((OUT, 2), -1.0))


def test_single_holder_is_returned_bit_exact() -> None:
    s = pair(K0, 4, 5)
    out = aggregate([Contribution(123.0, s)], {K0: 4})
    for name in s:
        assert torch.equal(out[name], s[name])


def test_module_held_by_a_subset_is_averaged_over_that_subset_only() -> None:
    s1 = {**pair(K0, 4, 1), **pair(K1, 4, 11)}
    s2 = pair(K0, 4, 2)  # does not hold K1
    s3 = pair(K1, 4, 13)  # does not hold K0
    out = aggregate([Contribution(1.0, s1), Contribution(2.0, s2), Contribution(5.0, s3)], {K0: 4, K1: 4})
    for name in s2:
        torch.testing.assert_close(out[name], ((s1[name].double() + 2 * s2[name].double()) / 3).float())
    for name in s3:
        torch.testing.assert_close(out[name], ((s1[name].double() + 5 * s3[name].double()) / 6).float())


def test_modules_nobody_holds_are_absent() -> None:
    out = aggregate([Contribution(1.0, pair(K0, 4, 1))], {K0: 4, K1: 8})
    assert set(out) == {f"{K0}.lora_A.weight", f"{K0}.lora_B.weight"}


# --------------------------------------------------------------------------- unequal ranks: average of the products


def test_unequal_ranks_keep_the_average_product_when_the_rank_suffices() -> None:
    s1, s2 = pair(K0, 2, 1), pair(K0, 2, 2)  # rank 2 into rank 4: products averaged; the average has rank <= 4
    out = aggregate([Contribution(2.0, s1), Contribution(1.0, s2)], {K0: 4})
    a, b = factors(out, K0)
    assert a.shape == (4, IN) and b.shape == (OUT, 4)
    expected = (2 * product(s1, K0) + product(s2, K0)) / 3
    assert rel(product(out, K0), expected) < 1e-5


def test_mixed_ranks_into_the_smaller_rank_is_the_best_approximation() -> None:
    s1, s2 = pair(K0, 8, 1), pair(K0, 4, 2)
    out = aggregate([Contribution(1.0, s1), Contribution(1.0, s2)], {K0: 4})
    a, b = factors(out, K0)
    assert a.shape == (4, IN) and b.shape == (OUT, 4)
    m = (product(s1, K0) + product(s2, K0)) / 2
    sv = torch.linalg.svdvals(m)
    discarded = float(sv[4:].norm())
    assert discarded > 0.1 * float(sv.norm())  # truncation really loses something here
    err = float((product(out, K0) - m).norm())
    assert err == pytest.approx(discarded, rel=1e-5)
    # Balanced split: B = U sqrt(S), A = sqrt(S) V^T, so the column norms of B equal the row norms of A.
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_refactorisation_from_stacked_factors_matches_an_svd_of_the_whole_update() -> None:
    # The truncated SVD is taken from the stacked factors (rank 8 + 4 here, far below min(out, in) = 40), not
    # from the (96, 40) update: the kept product is the full SVD's truncation, to float rounding.
    s1, s2 = pair(K0, 8, 1, out=96, in_=40), pair(K0, 4, 2, out=96, in_=40)
    out = aggregate([Contribution(3.0, s1), Contribution(1.0, s2)], {K0: 5})
    m = (3 * product(s1, K0) + product(s2, K0)) / 4
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert rel(product(out, K0), best) < 1e-6
    # A stacked rank above the update's (the same holder twice: rank 16 stacked, 8 real) keeps only the
    # real directions; the others are fresh trainable rows with zero columns of B.
    twice = aggregate([Contribution(1.0, s1), Contribution(1.0, s1)], {K0: 12}, seed=2)
    a, b = factors(twice, K0)
    assert rel(product(twice, K0), product(s1, K0)) < 1e-6
    assert torch.count_nonzero(b[:, 8:]) == 0 and (a[8:].abs().sum(dim=1) > 0).all()


def test_aggregate_into_a_larger_rank_pads_trainable_directions() -> None:
    s1, s2 = pair(K0, 1, 1), pair(K0, 2, 2)  # the average has rank 3 <= min(OUT, IN)
    out = aggregate([Contribution(1.0, s1), Contribution(4.0, s2)], {K0: 6}, seed=3)
    a, b = factors(out, K0)
    assert rel(product(out, K0), (product(s1, K0) + 4 * product(s2, K0)) / 5) < 1e-5
    assert torch.count_nonzero(b[:, 3:]) == 0
    assert (a[3:].abs().sum(dim=1) > 0).all()
    assert a[3:].abs().max() <= 1 / math.sqrt(IN)  # Kaiming-uniform bound
    again = aggregate([Contribution(1.0, s1), Contribution(4.0, s2)], {K0: 6}, seed=3)
    assert torch.equal(again[f"{K0}.lora_A.weight"], a)  # deterministic
    other = aggregate([Contribution(1.0, s1), Contribution(4.0, s2)], {K0: 6}, seed=4)
    assert not torch.equal(other[f"{K0}.lora_A.weight"][3:], a[3:])


# --------------------------------------------------------------------------- to_rank


def test_to_rank_identity_when_ranks_agree() -> None:
    a, b = factors(pair(K0, 4, 1), K0)
    a2, b2 = to_rank(a, b, 4, key=K0)
    assert torch.equal(a2, a) and torch.equal(b2, b)


def test_to_rank_pads_beyond_min_dimension() -> None:
    a, b = factors(pair(K0, 3, 1, out=5, in_=4), K0)  # b @ a has rank min(5, 4, 3) = 3
    a2, b2 = to_rank(a, b, 7, key=K0, seed=1)
    assert a2.shape == (7, 4) and b2.shape == (5, 7) and a2.dtype == torch.float32
    assert rel(b2.double() @ a2.double(), b.double() @ a.double()) < 1e-5
    assert torch.count_nonzero(b2[:, 3:]) == 0
    assert (a2[3:].abs().sum(dim=1) > 0).all()


def test_to_rank_of_a_zero_update_is_a_fresh_init() -> None:
    # B = 0 (the state right after init_lora): nothing to keep, every direction is freshly drawn.
    a, b = torch.randn(2, IN), torch.zeros(OUT, 2)
    a2, b2 = to_rank(a, b, 4, key=K0)
    assert torch.count_nonzero(b2) == 0
    assert (a2.abs().sum(dim=1) > 0).all()


# --------------------------------------------------------------------------- convert_state


def test_convert_state_keeps_converts_and_drops() -> None:
    state = {**pair(K0, 4, 1), **pair(K1, 8, 2)}
    out = convert_state(state, {K0: 4, K1: 2})
    assert set(out) == set(state)
    for name in pair(K0, 4, 1):
        assert torch.equal(out[name], state[name])
        assert out[name].data_ptr() != state[name].data_ptr()  # a copy, not an alias
    a, b = factors(out, K1)
    assert a.shape == (2, IN) and b.shape == (OUT, 2)
    sv = torch.linalg.svdvals(product(state, K1))
    assert float((product(out, K1) - product(state, K1)).norm()) == pytest.approx(float(sv[2:].norm()), rel=1e-5)

    only = convert_state(state, {K1: 8})
    assert set(only) == {f"{K1}.lora_A.weight", f"{K1}.lora_B.weight"}
    with pytest.raises(ConfigError, match="lacks"):
        convert_state(pair(K0, 4, 1), {K0: 4, K1: 4})


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_bad_weights_are_refused(weight: float) -> None:
    with pytest.raises(ConfigError, match="weight"):
        aggregate([Contribution(1.0, pair(K0, 4, 1)), Contribution(weight, pair(K0, 4, 2))], {K0: 4})


def test_no_contributions_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        aggregate([], {K0: 4})


def test_shape_mismatch_between_holders_is_refused() -> None:
    with pytest.raises(ConfigError, match=K0):
        aggregate([Contribution(1.0, pair(K0, 4, 1)), Contribution(1.0, pair(K0, 4, 2, in_=IN + 1))], {K0: 4})
    with pytest.raises(ConfigError, match=K0):
        aggregate([Contribution(1.0, pair(K0, 2, 1)), Contribution(1.0, pair(K0, 4, 2, out=OUT + 1))], {K0: 4})


def test_lone_factor_is_refused() -> None:
    lone = {f"{K0}.lora_B.weight": torch.zeros(OUT, 4)}
    with pytest.raises(ConfigError, match=K0):
        aggregate([Contribution(1.0, pair(K0, 4, 1)), Contribution(1.0, lone)], {K0: 4})


def test_held_module_without_target_rank_is_refused() -> None:
    with pytest.raises(ConfigError, match=K1):
        aggregate([Contribution(1.0, {**pair(K0, 4, 1), **pair(K1, 4, 2)})], {K0: 4})


@pytest.mark.parametrize("rank", [0, -2, 2.0])
def test_bad_target_rank_is_refused(rank: object) -> None:
    with pytest.raises(ConfigError, match="rank"):
        aggregate([Contribution(1.0, pair(K0, 4, 1))], {K0: rank})  # type: ignore[dict-item]
