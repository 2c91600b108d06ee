"""Identity experiments' statistics and data: reversal splits never leak a tested reversal into training, the
item-by-item comparison equals direct computations (McNemar as a binomial test on the discordant items, exact
intervals), and the grid table flags the paper's claim only where every criterion holds."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bridgeprobe.analyses.identity_report import grid_table, item_comparison
from bridgeprobe.analyses.stats import proportion_interval
from bridgeprobe.prompts.reversal import ReversalConfig, check_reversal, generate_reversal
from bridgeprobe.prompts.synthetic_text import people


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("identity_of", ["answers", "everyone"])
def test_reversal_splits_never_train_a_tested_reversal(seed: int, fraction: float, identity_of: str) -> None:
    config = ReversalConfig(n_pairs=40, n_relations=3, reverse_train_fraction=fraction, identity_of=identity_of,
                            seed=seed)
    data = generate_reversal(config, people(80, seed=seed))
    assert len(data.examples["reverse_train"]) == round(fraction * 40)
    assert len(data.examples["reverse_test"]) == 40 - round(fraction * 40)
    for identity in (False, True):
        trained = set(data.training(identity, identity_repeat=2))
        tested = {(f.prompt, f.target) for f in data.examples["reverse_test"]}
        assert not trained & tested
        # nothing in training states a tested pair's relation from b's side
        tested_b = {data.pairs[f.pair][2] for f in data.examples["reverse_test"]}
        assert not any(prompt.startswith(f"{b}'s") for prompt, _ in trained for b in tested_b)
    a_side = {a for a, _, _ in data.pairs}
    b_side = {b for _, _, b in data.pairs}
    assert not a_side & b_side and len(a_side) == len(b_side) == 40
    named = [f.target for f in data.examples["identity"]]
    # the answers of the reversed questions, and with "everyone" their subjects too, each once
    assert sorted(named) == sorted(a_side if identity_of == "answers" else a_side | b_side)
    assert all(f.prompt == f"The name of {f.target} is" for f in data.examples["identity"])
    assert generate_reversal(config, people(80, seed=seed)).examples == data.examples  # deterministic
    data.examples["reverse_train"].append(data.examples["reverse_test"][0])
    with pytest.raises(ValueError, match="reversed in training"):
        check_reversal(data)
    data.examples["reverse_train"].pop()
    b_fact = replace(data.examples["identity"][0], prompt=f"The name of {data.pairs[0][2]} is",
                     target=data.pairs[0][2], pair=0)
    data.examples["identity"].append(b_fact)
    if identity_of == "answers":  # a b's identity sentence is refused unless asked for
        with pytest.raises(ValueError, match="does not name a person of its pair"):
            check_reversal(data)
    else:
        check_reversal(data)


def test_reversal_config_errors() -> None:
    with pytest.raises(ValueError, match="n_relations"):
        ReversalConfig(n_relations=9)
    with pytest.raises(ValueError, match="reverse_train_fraction"):
        ReversalConfig(reverse_train_fraction=1.0)
    with pytest.raises(ValueError, match="identity_of"):
        ReversalConfig(identity_of="subjects")
    with pytest.raises(ValueError, match="distinct names"):
        generate_reversal(ReversalConfig(n_pairs=10), people(5))


def _items(rng: np.random.Generator, n: int, rates: dict[str, float], seeds: int = 3,
           seed_sd: float = 0.0) -> pd.DataFrame:
    """items.csv rows: per seed and item, 0/1 entity hits at each state's rate; ``seed_sd`` moves the identity
    condition's rate by a per-seed amount (adapters of different seeds differ)."""
    rows = []
    for seed in range(seeds):
        shift = rng.normal(0, seed_sd) if seed_sd else 0.0
        for item in range(n):
            for state, rate in rates.items():
                rate = min(max(rate + (shift if state == "identity" else 0.0), 0.0), 1.0)
                rows.append({"seed": seed, "state": state, "split": "reverse_test", "item": item,
                             "entity": int(rng.random() < rate)})
    return pd.DataFrame(rows)


def test_item_comparison_equals_direct_computations() -> None:
    items = _items(np.random.default_rng(0), 60, {"base": 0.05, "no_identity": 0.2, "identity": 0.45})
    row = item_comparison(items).iloc[0]
    wide = items.pivot_table(index=["seed", "item"], columns="state", values="entity")
    assert row["items"] == 180 and row["seeds"] == 3
    for state in ("base", "no_identity", "identity"):
        direct = proportion_interval(int(wide[state].sum()), 180)
        assert row[f"{state} acc"] == pytest.approx(wide[state].mean())
        assert (row[f"{state} ci_low"], row[f"{state} ci_high"]) == pytest.approx((direct.low, direct.high))
        ci = sps.binomtest(int(wide[state].sum()), 180).proportion_ci(method="exact")
        assert row[f"{state} ci_low"] == pytest.approx(ci.low)
    # the primary difference: the seed is the unit (t interval over the per-seed differences, exact sign-flip)
    per_seed = (wide["identity"] - wide["no_identity"]).groupby(level="seed").mean()
    low, high = sps.t.interval(0.95, 2, loc=per_seed.mean(), scale=sps.sem(per_seed))
    assert row["delta"] == pytest.approx(per_seed.mean())
    assert (row["delta ci_low"], row["delta ci_high"]) == pytest.approx((low, high))
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    exact = np.mean(np.abs((signs * per_seed.to_numpy()).mean(1)) >= abs(per_seed.mean()) - 1e-12)
    assert row["seeds sign-flip p"] == pytest.approx(exact)
    # the secondary, pooled columns: McNemar as a binomial test on the discordant items
    better = int(((wide["identity"] == 1) & (wide["no_identity"] == 0)).sum())
    worse = int(((wide["identity"] == 0) & (wide["no_identity"] == 1)).sum())
    assert (row["identity better"], row["no_identity better"]) == (better, worse)
    assert row["pooled mcnemar p"] == pytest.approx(sps.binomtest(better, better + worse, 0.5).pvalue)
    assert row["pooled delta"] == pytest.approx((better - worse) / 180)


def test_seed_level_interval_covers_when_seeds_differ_and_the_pooled_one_does_not() -> None:
    """Coverage by simulation over 200 experiments of 5 seeds x 100 items whose adapters differ by seed (the
    identity rate moves by sd 0.12 per seed): the t interval over seeds holds the true mean difference (0.15) in
    about 95% of them; the item-level interval, which pools the 500 items as if independent, far less often (its
    expected coverage here is about 66%: its width ignores the seed-to-seed sd of 0.12/sqrt(5) = 0.054)."""
    rng = np.random.default_rng(1)
    seed_level = pooled = 0
    for _ in range(200):
        row = item_comparison(_items(rng, 100, {"no_identity": 0.3, "identity": 0.45}, seeds=5, seed_sd=0.12)).iloc[0]
        seed_level += row["delta ci_low"] <= 0.15 <= row["delta ci_high"]
        pooled += row["pooled delta ci_low"] <= 0.15 <= row["pooled delta ci_high"]
    assert 0.9 <= seed_level / 200 <= 0.99
    assert pooled / 200 < 0.8


def _grid_rows(ood_without: list[float], ood_with: list[float], id_acc: float = 0.95) -> pd.DataFrame:
    rows = []
    for seed, (a, b) in enumerate(zip(ood_without, ood_with)):
        for condition, ood in (("no_identity", a), ("identity", b)):
            rows.append({"model": "gpt2", "tied": True, "residual": True, "d_model": 64, "steps": 100, "lr": 1e-3,
                         "subjects": 100, "bridges": 20, "ood": "bridge", "identity_form": "relation",
                         "two_hop_training": True, "identity_coverage": 1.0, "init_scale": 1.0, "weight_decay": 1.0,
                         "identity_repeat": 10,
                         "condition": condition, "seed": seed, "ood_two_hop_acc": ood, "id_two_hop_acc": id_acc,
                         "one_hop_acc": 1.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("without,with_,id_acc,met", [
    ([0.05, 0.06, 0.04, 0.05, 0.05], [0.6, 0.7, 0.55, 0.8, 0.65], 0.95, True),
    ([0.05, 0.06, 0.04, 0.05], [0.6, 0.7, 0.55, 0.8], 0.95, False),  # four seeds
    ([0.05, 0.06, 0.04, 0.05, 0.05], [0.6, 0.7, 0.55, 0.8, 0.03], 0.95, False),  # one seed lower
    ([0.05, 0.06, 0.04, 0.05, 0.05], [0.6, 0.7, 0.55, 0.8, 0.65], 0.85, False),  # not fitted in distribution
    ([0.3, 0.3, 0.3, 0.3, 0.3], [0.6, 0.7, 0.55, 0.8, 0.65], 0.95, False),  # no failure without identity
    ([0.05, 0.06, 0.04, 0.05, 0.05], [0.4, 0.45, 0.4, 0.45, 0.4], 0.95, False),  # too weak with identity
])
def test_grid_claim_needs_every_criterion(without, with_, id_acc, met) -> None:
    table = grid_table(_grid_rows(without, with_, id_acc), chance=0.05)
    assert len(table) == 1 and bool(table.iloc[0]["claim met"]) is met
    row = table.iloc[0]
    delta = np.array(with_) - np.array(without)
    assert row["ood_two_hop_acc delta mean"] == pytest.approx(delta.mean())
    assert row["ood_two_hop_acc sign test p"] == pytest.approx(
        sps.binomtest(int((delta > 0).sum()), int((delta != 0).sum()), 0.5).pvalue)
    if len(delta) == 5 and (delta > 0).all():
        assert row["ood_two_hop_acc signflip p"] == pytest.approx(1 / 32)  # exact: one of 2^5 sign patterns


def test_grid_markdown_prints_tiny_p_values_without_scientific_notation() -> None:
    """12 seeds all higher: the sign test's p is 2 / 2^12 = 0.00049, printed "< 0.001" (not "0.00049" or "4.9e-04")."""
    from bridgeprobe.analyses.identity_report import grid_markdown

    table = grid_table(_grid_rows([0.05] * 12, [0.5 + i / 100 for i in range(12)]), chance=0.05)
    assert table.iloc[0]["ood_two_hop_acc sign test p"] == pytest.approx(2 / 2**12)
    text = grid_markdown(table)
    assert "< 0.001" in text and not re.search(r"\d[eE][-+]?\d", text)
