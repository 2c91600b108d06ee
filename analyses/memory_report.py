"""Aggregate ``memory.csv`` (:mod:`probes.memory.analysis`) into tables, per-layer curves with 95% confidence intervals,
heatmaps, and the statement of where the shared latent memory sits.

Intervals (:mod:`analyses.stats`): 95% Student t intervals over prompts for means, exact (Clopper-Pearson)
intervals for rates, n beside each and none below 3 prompts; CKA's comes from the analysis itself (grouped
jackknife, :mod:`probes.memory.alignment`).

The band of the shared memory is the layers where four tests agree, each on the latent bridge state at layer
``l`` of the two-hop prompt, at its last token (the band) and at e1's last token. Each test is a paired
difference per item between the bridge and its matched control, which is symmetric about 0 when the state does
not carry the bridge (:func:`paired_differences`):

- cross-patching: on the diagonal (source = target layer), the bridge-specific effect ``main - random`` (A's
  state minus a random other item's state written into the partner's hop2 prompt), over the items where writing
  A's bridge out moves the partner's prompt by at least :data:`MIN_GAP` logit;
- other relation: A's state written into the hop2 prompt of another relation (item D), its movement toward the
  bridge's value under that relation (``transfer``: toward French in "The main language spoken in Italy is" for
  A's bridge France, normalized by E's hop2 prompt over D's) minus the same for the random item's state, over the
  items whose explicit transfer is at least :data:`MIN_GAP` logit: the state serves as the bridge for a relation
  it was not computed for. (Until this test was checked against the positive control it was ``transfer -
  answer``, toward the bridge's value minus toward A's answer; an explicit bridge state moves both alike, -0.04 at
  layer 7 of the control where the bridge is written out, so that contrast could not find a bridge that is
  there. ``answer_value`` stays in the curves as a description.);
- decoding: bridge decoded in the top 10 (identity prompt, fixed early target layer) minus the partner's bridge
  decoded in the top 10;
- probe: the probe (trained on explicit states of prompts sharing no relation template with the item) names the
  item's bridge minus it names the partner's bridge.

Each test's difference is in its own unit, and so is its minimum effect: cross-patching
and the other relation are fractions of what the explicit reference does (1 = as much as writing the bridge out;
0.1 = a tenth of it); decoding and the probe are rate differences (0.1 = 10 points, about a tenth of what the
explicit bridge reaches: decoded in the top 10 for 83-90% of prompts against 3-5% chance, the probe reads
96-99% of held-out explicit states).

Every test x layer x position is decided by :func:`analyses.stats.equivalence_decisions` with family-wise
one-sided bounds (:data:`ALPHA` for the lower bounds and, separately, for the upper bounds; each column
calibrated on its own sign-flip distribution and the columns combined by the min-p rule, so columns with few
items widen only their own bounds). A test *holds* at a layer when its lower bound is above 0 and its mean
difference at least its minimum effect; it *rules the layer out* when its upper bound is below its minimum effect
(the estimate and its precision both count: a precise estimate just above the minimum is not ruled out). The band
is the longest run of consecutive layers where all four hold. With no such layer, the statement says "no band"
only when every layer is ruled out, and otherwise "not enough items to decide", with the items that would decide
the undecided layers if the estimates stayed as they are. Items whose explicit reference moves the receiving
prompt by less than :data:`MIN_GAP` logit are left out of the normalized tests (cross-patch: A's hop2 over the
partner's; other relation: E's hop2 over D's), since a normalization by a tiny gap lets one item dominate. The
rule's error rates on planted effects are measured in :mod:`analyses.calibration` (docs/statistics.md). The
sensitivity table repeats the decision with :data:`ALPHA`, the minimum effects and :data:`MIN_GAP` halved and
doubled.

The band is compared with the median layer where the answer rises (first layer from which the answer stays in
the logit-lens top 10 at the last token). The summary also lists the source layers whose state is
bridge-specific when written into some other target layer (the best target of the grid: a maximum, so read it as
"readable somewhere", not as an effect size; not part of the test).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.findings import memory_finding  # noqa: E402
from bridgeprobe.analyses.page import Figure, Section, key_values, p_value, render, too_small  # noqa: E402
from bridgeprobe.analyses.provenance import provenance  # noqa: E402
from bridgeprobe.analyses.plots import legend_below, save_figure  # noqa: E402
from bridgeprobe.analyses.stats import N_RESAMPLES, column_intervals, equivalence_decisions  # noqa: E402
from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv, atomic_write_json  # noqa: E402

MIN_GAP = 1.0  # logits: items whose explicit reference moves the receiving prompt less are left out
TESTS = ("crosspatch", "other_relation", "decoding", "probe")
# the smallest bridge-minus-control difference each test must show to hold, in the test's own unit (docstring)
MIN_EFFECTS = {"crosspatch": 0.1, "other_relation": 0.1, "decoding": 0.1, "probe": 0.1}
EFFECT_UNITS = {"crosspatch": "of the explicit bridge's effect", "other_relation": "of the explicit transfer",
                "decoding": "rate difference", "probe": "rate difference"}
ALPHA = 0.05  # family-wise error of the lower bounds, and separately of the upper bounds, over every column
SEED = 0
TOP_K = 10
CURVE_COLUMNS = ("analysis", "curve", "layer", "mean", "ci_low", "ci_high", "n")


# --------------------------------------------------------------------------------------------------- statistics


def mean_intervals(matrix: np.ndarray) -> pd.DataFrame:
    """Mean over rows (items; NaN = missing) of each column with its 95% interval (exact for 0/1 columns, t
    otherwise; none below 3 items) and n."""
    return column_intervals(np.asarray(matrix, dtype=float), "auto").drop(columns="reason")


def _curve(matrix: pd.DataFrame, analysis: str, curve: str) -> pd.DataFrame:
    """Per-layer means with intervals of a prompt x layer matrix."""
    stats = mean_intervals(matrix.to_numpy())
    return stats.assign(analysis=analysis, curve=curve, layer=matrix.columns.astype(int))[list(CURVE_COLUMNS)]


def _matrix(rows: pd.DataFrame, value: str = "value", index: str = "prompt_id", columns: str = "source_layer") -> pd.DataFrame:
    return rows.pivot_table(index=index, columns=columns, values=value, aggfunc="first")


def _select(frame: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in equal.items():
        mask &= (frame[column] == value).to_numpy()
    return frame[mask]


# --------------------------------------------------------------------------------------------------- tables


def item_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per analysed item: outcome group and correctness flags."""
    items = _select(frame, analysis="item")
    flags = items[items["metric"] != "skipped"]
    table = flags.pivot_table(index="prompt_id", columns="metric", values="value", aggfunc="first")
    table["group"] = flags.groupby("prompt_id")["condition"].first()
    return table


def crosspatch_eligible(frame: pd.DataFrame, min_gap: float | None = None) -> pd.Index:
    """Items whose explicit bridge moves the partner's hop2 prompt by at least ``min_gap`` (default
    :data:`MIN_GAP`) logits."""
    min_gap = MIN_GAP if min_gap is None else min_gap
    rows = _select(frame, analysis="crosspatch", condition="main")
    values = rows.pivot_table(index="prompt_id", columns="metric", values="value", aggfunc="first")
    if values.empty or "explicit_logit_diff" not in values:
        return pd.Index([])
    gap = values["explicit_logit_diff"] - values["baseline_logit_diff"]
    return gap.index[gap >= min_gap]


def crosspatch_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, source position, source layer, target layer): the mean normalized effect over eligible
    items, the rate at which ``Y_A`` becomes the top token, and, for ``main``, the paired bridge-specific effect
    ``main - random``."""
    rows = _select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    rows = rows[rows["condition"].isin(["main", "random"])]
    if rows.empty:
        return pd.DataFrame()
    eligible = crosspatch_eligible(frame)
    keys = ["condition", "source_position", "source_layer", "target_layer"]
    value = rows[(rows["metric"] == "value") & rows["prompt_id"].isin(eligible)]
    top1 = rows[rows["metric"] == "rank"].assign(value=lambda f: (f["value"] == 0).astype(float))
    table = value.groupby(keys)["value"].agg(value="mean", n_value="count").join(
        top1.groupby(keys)["value"].agg(top1_rate="mean", n="count"), how="outer")
    paired = value.pivot_table(index=["prompt_id", "source_position", "source_layer", "target_layer"],
                               columns="condition", values="value", aggfunc="first")
    if {"main", "random"} <= set(paired.columns):
        diff = (paired["main"] - paired["random"]).unstack(["source_position", "source_layer", "target_layer"])
        stats = mean_intervals(diff.to_numpy())
        stats.index = diff.columns
        specific = stats[["mean", "ci_low", "ci_high"]].add_prefix("specific_").rename(
            columns={"specific_mean": "specific"})
        table = table.join(pd.concat({"main": specific}, names=["condition"]), how="left")
    return table.reset_index()


def best_targets(cells: pd.DataFrame, position: str = "last") -> pd.DataFrame:
    """Per source layer of the grid: the target layer where A's state has the largest bridge-specific effect,
    with its CI (a maximum over targets: read it as "readable somewhere", not as an unbiased size)."""
    if "specific" not in cells:
        return pd.DataFrame()
    main = cells[(cells["condition"] == "main") & (cells["source_position"] == position)].dropna(subset=["specific"])
    if main.empty:
        return pd.DataFrame()
    grid = main.groupby("source_layer")["target_layer"].transform("nunique") > 1
    best = main[grid].loc[lambda f: f.groupby("source_layer")["specific"].idxmax()]
    return best[["source_layer", "target_layer", "specific", "specific_ci_low", "specific_ci_high"]].reset_index(drop=True)


def curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Every per-layer curve with its 95% CI (long table, :data:`CURVE_COLUMNS`)."""
    parts = []
    eligible = crosspatch_eligible(frame)
    transfer_ok, _ = transfer_eligible(frame)
    cross = _select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    diagonal = cross[cross["source_layer"] == cross["target_layer"]]
    for position in ("last", "e1_last"):
        values = {c: _matrix(_select(diagonal, condition=c, source_position=position, metric="value")
                             .pipe(lambda f: f[f["prompt_id"].isin(eligible)])) for c in ("main", "random")}
        for condition, matrix in values.items():
            if not matrix.empty:
                parts.append(_curve(matrix, "crosspatch", f"{condition}_{position}"))
        if not values["main"].empty and not values["random"].empty:
            parts.append(_curve(values["main"] - values["random"], "crosspatch", f"specific_{position}"))
        for condition in ("main", "random"):
            ranks = _matrix(_select(diagonal, condition=condition, source_position=position, metric="rank"))
            if not ranks.empty:
                parts.append(_curve((ranks == 0).astype(float).where(ranks.notna()), "crosspatch",
                                    f"top1_{condition}_{position}"))
        transfer = {}
        for condition, name in (("other_relation", ""), ("other_relation_random", "random_")):
            other = {m: _matrix(_select(diagonal, condition=condition, source_position=position, metric=m)
                                .pipe(lambda f: f[f["prompt_id"].isin(transfer_ok)]))
                     for m in ("transfer_value", "answer_value")}
            if other["transfer_value"].empty:
                continue
            transfer[condition] = other["transfer_value"]
            parts += [_curve(other["transfer_value"], "crosspatch", f"{name}transfer_{position}"),
                      _curve(other["answer_value"], "crosspatch", f"{name}answer_{position}")]
        if len(transfer) == 2:
            parts.append(_curve(transfer["other_relation"] - transfer["other_relation_random"], "crosspatch",
                                f"specific_transfer_{position}"))
    decoded = _select(frame, analysis="decoding")
    if not decoded.empty:
        fixed_layer = int(decoded.loc[decoded["source_layer"] != decoded["target_layer"], "target_layer"].mode().iloc[0]) \
            if (decoded["source_layer"] != decoded["target_layer"]).any() else None
        for mode in ("same", "fixed"):
            sub = (decoded[decoded["source_layer"] == decoded["target_layer"]] if mode == "same"
                   else decoded[decoded["target_layer"] == fixed_layer])
            for (condition, position), rows in sub.groupby(["condition", "source_position"]):
                for metric, name in (("rank", "bridge"), ("partner_rank", "partner")):
                    ranks = _matrix(_select(rows, metric=metric))
                    if ranks.empty:
                        continue
                    for k in (1, TOP_K):
                        parts.append(_curve((ranks < k).astype(float).where(ranks.notna()), "decoding",
                                            f"{condition}_{position}_{mode}_{name}_top{k}"))
    lens = _select(frame, analysis="lens")
    for (condition, position, metric), rows in lens.groupby(["condition", "source_position", "metric"]):
        ranks = _matrix(rows)
        for k in (1, TOP_K):
            parts.append(_curve((ranks < k).astype(float), "lens",
                                f"{condition}_{position}_{metric.removesuffix('_rank')}_top{k}"))
    align = _select(frame, analysis="alignment")
    set_level = align["prompt_id"].fillna("") == ""  # rows about the whole set (CKA, counts) have no prompt id
    per_item = align[~set_level]
    suffix = {"last": "", "e1_last": "_e1_last"}  # the explicit held-out probe has no position: ""
    for (position, metric), rows in per_item.groupby([per_item["source_position"].fillna(""), "metric"]):
        parts.append(_curve(_matrix(rows), "alignment", metric + suffix.get(position, "")))
    for position, end in suffix.items():
        for kind in ("cosine", "cosine_centered"):
            matched, mismatched = (_matrix(_select(per_item, source_position=position, metric=f"{kind}_{m}"))
                                   for m in ("matched", "mismatched"))
            if not matched.empty and not mismatched.empty:
                parts.append(_curve(matched - mismatched, "alignment", f"{kind}_gap{end}"))
        dataset = align[set_level & align["source_layer"].notna() & (align["source_position"] == position)]
        for kind in ("matched", "mismatched"):
            rows = dataset[dataset["metric"].str.startswith(f"cka_{kind}")]
            if rows.empty:
                continue
            table = rows.pivot_table(index="source_layer", columns="metric", values="value")
            parts.append(pd.DataFrame({"analysis": "alignment", "curve": f"cka_{kind}{end}",
                                       "layer": table.index.astype(int), "mean": table[f"cka_{kind}"],
                                       "ci_low": table.get(f"cka_{kind}_ci_low"),
                                       "ci_high": table.get(f"cka_{kind}_ci_high"), "n": np.nan}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(CURVE_COLUMNS))


def backpatch_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (group, source layer, target layer): the rate at which the answer's first token is the top token after
    the patch (for failures: fixed; for the correct prompts, 1 - rate: broken), with its CI."""
    rows = _select(frame, analysis="backpatch", metric="rank").dropna(subset=["source_layer"])
    parts = []
    for group, sub in rows.groupby("condition"):
        top = (sub.assign(cell=list(zip(sub["source_layer"].astype(int), sub["target_layer"].astype(int))))
               .pivot_table(index="prompt_id", columns="cell", values="value", aggfunc="first"))
        stats = mean_intervals((top == 0).astype(float).where(top.notna()).to_numpy())
        stats["group"] = group
        stats["source_layer"] = [c[0] for c in top.columns]
        stats["target_layer"] = [c[1] for c in top.columns]
        parts.append(stats)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True).rename(columns={"mean": "top1_rate"})
    return table[["group", "source_layer", "target_layer", "top1_rate", "ci_low", "ci_high", "n"]]


# --------------------------------------------------------------------------------------------------- summary


def _get(table: pd.DataFrame, analysis: str, curve: str) -> pd.DataFrame:
    return table[(table["analysis"] == analysis) & (table["curve"] == curve)].set_index("layer")


def answer_rise_layer(frame: pd.DataFrame) -> float | None:
    """Median over items of the first layer from which the answer stays in the logit-lens top 10 at the two-hop
    prompt's last token (items where it ends there), as ``answer_rise_layer`` in the lens report."""
    ranks = _matrix(_select(frame, analysis="lens", condition="latent", source_position="last", metric="answer_rank"))
    if ranks.empty:
        return None
    inside = (ranks < TOP_K).to_numpy()
    rises = []
    for row in inside:
        if row[-1]:
            outside = np.flatnonzero(~row)
            rises.append(ranks.columns[outside[-1] + 1] if len(outside) else ranks.columns[0])
    return float(np.median(rises)) if rises else None


POSITIONS = {"last": "the last token", "e1_last": "e1's last token"}


def _curve_names(position: str) -> dict[str, str]:
    """The curves that judge the latent state at ``position`` (``last`` or ``e1_last``)."""
    end = "" if position == "last" else f"_{position}"
    return {"specific": f"specific_{position}", "main": f"main_{position}", "random": f"random_{position}",
            "top1_main": f"top1_main_{position}", "top1_random": f"top1_random_{position}",
            "specific_transfer": f"specific_transfer_{position}",
            "decoded": f"latent_{position}_fixed_bridge_top{TOP_K}", "chance": f"latent_{position}_fixed_partner_top{TOP_K}",
            "lens": f"latent_{position}_bridge_top{TOP_K}", "probe": f"probe_latent{end}",
            "cosine_gap": f"cosine_centered_gap{end}", "cka_matched": f"cka_matched{end}",
            "cka_mismatched": f"cka_mismatched{end}"}


def _fixed_decode_layer(decoded: pd.DataFrame) -> int | None:
    """The decoding's fixed target layer: the target layer of the rows whose source layer differs from it."""
    other = decoded["source_layer"] != decoded["target_layer"]
    return int(decoded.loc[other, "target_layer"].mode().iloc[0]) if other.any() else None


def transfer_eligible(frame: pd.DataFrame, min_gap: float | None = None) -> tuple[pd.Index, int]:
    """Items of the other-relation control whose explicit transfer (E's hop2 prompt over D's) is at least
    ``min_gap`` (default :data:`MIN_GAP`) logits, and how many items were left out for a smaller gap. A
    ``memory.csv`` without the ``transfer_gap`` rows keeps every item."""
    min_gap = MIN_GAP if min_gap is None else min_gap
    rows = _select(frame, analysis="crosspatch", condition="other_relation", metric="transfer_gap")
    if rows.empty:
        ids = _select(frame, analysis="crosspatch", condition="other_relation")["prompt_id"].unique()
        return pd.Index(ids), 0
    gap = rows.groupby("prompt_id")["value"].first()
    return gap.index[gap >= min_gap], int((gap < min_gap).sum())


def paired_differences(frame: pd.DataFrame, min_gap: float | None = None) -> pd.DataFrame:
    """Items x (test, position, layer): each item's bridge-minus-control difference for each test of the band
    (module docstring; NaN where the item has no value). A ``memory.csv`` without the probe's partner rows (before
    the matched probe control existed) has no ``probe`` columns."""
    eligible = crosspatch_eligible(frame, min_gap)
    transfer_ok, _ = transfer_eligible(frame, min_gap)
    cross = _select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    diagonal = cross[cross["source_layer"] == cross["target_layer"]]
    decoded = _select(frame, analysis="decoding")
    fixed = _fixed_decode_layer(decoded) if not decoded.empty else None
    align = _select(frame, analysis="alignment")
    columns: dict[tuple[str, str], pd.DataFrame] = {}
    for position in POSITIONS:
        main, rand = (_matrix(_select(diagonal, condition=c, source_position=position, metric="value")
                              .pipe(lambda f: f[f["prompt_id"].isin(eligible)])) for c in ("main", "random"))
        if not main.empty and not rand.empty:
            columns[("crosspatch", position)] = main - rand
        own, other = (_matrix(_select(diagonal, condition=c, source_position=position, metric="transfer_value")
                              .pipe(lambda f: f[f["prompt_id"].isin(transfer_ok)]))
                      for c in ("other_relation", "other_relation_random"))
        if not own.empty and not other.empty:
            columns[("other_relation", position)] = own - other
        if fixed is not None:
            rows = decoded[(decoded["target_layer"] == fixed) & (decoded["condition"] == "latent")
                           & (decoded["source_position"] == position)]
            bridge, partner = (_matrix(_select(rows, metric=m)) for m in ("rank", "partner_rank"))
            if not bridge.empty and not partner.empty:
                columns[("decoding", position)] = ((bridge < TOP_K).astype(float).where(bridge.notna())
                                                   - (partner < TOP_K).astype(float).where(partner.notna()))
        own, named_partner = (_matrix(_select(align, source_position=position, metric=m))
                              for m in ("probe_latent", "probe_latent_partner"))
        if not own.empty and not named_partner.empty:
            columns[("probe", position)] = own - named_partner
    parts = [m.set_axis(pd.MultiIndex.from_tuples([(test, position, int(l)) for l in m.columns],
                                                  names=["test", "position", "layer"]), axis=1)
             for (test, position), m in columns.items() if not m.empty]
    return pd.concat(parts, axis=1) if parts else pd.DataFrame()


def band_test(frame: pd.DataFrame, alpha: float = ALPHA, min_effects: dict[str, float] | None = None,
              min_gap: float | None = None, n_resamples: int = N_RESAMPLES, seed: int = SEED,
              differences: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (test, position, layer): the mean paired difference, n, standard error, family-wise ``lower`` and
    ``upper`` bounds, adjusted p, the test's minimum effect, whether it ``holds``, whether it ``rules_out`` the
    layer, and the items that would decide it (:func:`analyses.stats.equivalence_decisions` over every column at
    once; module docstring)."""
    differences = paired_differences(frame, min_gap) if differences is None else differences
    columns = ["test", "position", "layer", "mean", "n", "se", "lower", "upper", "p_adjusted", "min_effect",
               "holds", "rules_out", "n_to_decide"]
    if differences.empty:
        return pd.DataFrame(columns=columns)
    effects = MIN_EFFECTS | (min_effects or {})
    required = [effects[test] for test in differences.columns.get_level_values("test")]
    table = equivalence_decisions(differences, required, alpha, n_resamples=n_resamples, seed=seed)
    return table.reset_index()[columns]


def decide(tests: pd.DataFrame, position: str) -> dict[str, Any]:
    """The decision at one position: ``status`` ``band`` / ``none`` / ``undecided``, the band, per-layer status,
    the layers where each test holds, the most items each test had and, when undecided, what would decide it
    (``to_decide``: the undecided layers and, for the one that needs the most, the test and its items)."""
    sub = tests[tests["position"] == position]
    present = [set(sub.loc[sub["test"] == t, "layer"].astype(int)) for t in TESTS]
    layers = sorted(set.intersection(*present)) if all(present) else sorted(set.union(*present))
    wide = {k: sub.pivot(index="layer", columns="test", values=k).reindex(index=layers, columns=list(TESTS))
            for k in ("holds", "rules_out", "n_to_decide", "mean", "min_effect")}
    holds, rules = (wide[k].fillna(False).astype(bool) for k in ("holds", "rules_out"))
    status = pd.Series(np.where(holds.all(axis=1), "in", np.where(rules.any(axis=1), "out", "undecided")),
                       index=layers, dtype=object)
    runs = _runs([int(l) for l in status.index[status == "in"]])
    band = max(runs, key=lambda r: (r[1] - r[0], -r[0])) if runs else None
    decision = "band" if band else ("none" if layers and (status == "out").all() else "undecided")
    n = {t: int(sub.loc[sub["test"] == t, "n"].max()) if (sub["test"] == t).any() else 0 for t in TESTS}
    to_decide = None
    if decision == "undecided" and (status == "undecided").any():
        needs = []  # per undecided layer: the cheapest way to decide it, (items, test)
        for layer in status.index[status == "undecided"]:
            need = wide["n_to_decide"].loc[layer]
            below = wide["mean"].loc[layer] < wide["min_effect"].loc[layer]
            options = [(float(need[t]), t) for t in TESTS if below[t] and np.isfinite(need[t])]  # rule it out
            if not below.any() and need.notna().any():  # every test reaches its minimum: all must hold
                options.append((float(need.max()), str(need.idxmax())))
            needs.append((min(options) if options else (np.inf, ""), int(layer)))
        (items, test), layer = max(needs)
        to_decide = {"layers": _ranges([l for _, l in needs]), "layer": layer, "test": test or None,
                     "items": int(items) if np.isfinite(items) else None}
    return {"status": decision, "band": list(band) if band else None, "layers": status.to_dict(),
            "holds": {t: _ranges([int(l) for l in holds.index[holds[t]]]) for t in TESTS}, "n": n,
            "to_decide": to_decide}


def _short(decision: dict[str, Any]) -> str:
    if decision["status"] == "band":
        return "band {}-{}".format(*decision["band"])
    if decision["status"] == "none":
        return "no band"
    return "not enough items to decide (n = " + ", ".join(f"{TEST_NAMES[t]} {decision['n'][t]}" for t in TESTS) + ")"


TEST_NAMES = {"crosspatch": "cross-patch", "other_relation": "other relation", "decoding": "decoding",
              "probe": "probe"}


def sensitivity(frame: pd.DataFrame, n_resamples: int = N_RESAMPLES) -> list[dict[str, Any]]:
    """The decision at both positions with the test as set and with each threshold halved and doubled (the
    minimum effects all together)."""
    settings = [("as set", {}), ("alpha halved", {"alpha": ALPHA / 2}), ("alpha doubled", {"alpha": ALPHA * 2}),
                ("min effect halved", {"effect_scale": 0.5}), ("min effect doubled", {"effect_scale": 2.0}),
                ("min gap halved", {"min_gap": MIN_GAP / 2}), ("min gap doubled", {"min_gap": MIN_GAP * 2})]
    differences = {g: paired_differences(frame, g) for g in (MIN_GAP, MIN_GAP / 2, MIN_GAP * 2)}
    rows = []
    for name, change in settings:
        values = {"alpha": ALPHA, "effect_scale": 1.0, "min_gap": MIN_GAP} | change
        effects = {t: e * values["effect_scale"] for t, e in MIN_EFFECTS.items()}
        tests = band_test(frame, values["alpha"], effects, n_resamples=n_resamples,
                          differences=differences[values["min_gap"]])
        rows.append({"setting": name, "alpha": values["alpha"], "min_effect_scale": values["effect_scale"],
                     "min_gap": values["min_gap"],
                     **{position: _short(decide(tests, position)) for position in POSITIONS}})
    return rows


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _ranges(layers: list[int]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in _runs(layers)) or "none"


def _fmt(row: pd.Series | None, pct: bool = False) -> str:
    if row is None or pd.isna(row.get("mean")):
        return "n/a"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.2f}")
    if too_small(row.get("ci_low"), row.get("ci_high"), row.get("n"), f):
        return f"n too small (n = {int(row['n'])})"
    ci = "" if pd.isna(row.get("ci_low")) else f" [{f(row['ci_low'])}, {f(row['ci_high'])}]"
    if not ci and not pd.isna(row.get("n", np.nan)) and row["n"] < 3:
        ci = f" (n = {int(row['n'])}: no interval below 3)"
    return f"{f(row['mean'])}{ci}"


def _position_summary(frame: pd.DataFrame, table: pd.DataFrame, cells: pd.DataFrame | None, tests: pd.DataFrame,
                      differences: pd.DataFrame, position: str) -> dict[str, Any]:
    """The decision at one position with the evidence at the band's peak (or at the best cross-patch layer)."""
    names = _curve_names(position)
    decision = decide(tests, position)
    band = decision["band"]
    sub = tests[(tests["position"] == position) & (tests["test"] == "crosspatch")].set_index("layer")
    peak = None
    if band is not None and len(sub):
        peak = int(sub.loc[band[0] : band[1], "mean"].idxmax())
    elif band is not None:
        peak = band[0]
    elif len(sub) and sub["mean"].notna().any():
        peak = int(sub["mean"].astype(float).idxmax())

    def at(analysis: str, key: str, pct: bool = False) -> str:
        rows = _get(table, analysis, names[key])
        return _fmt(rows.loc[peak] if peak is not None and peak in rows.index else None, pct)

    def paired(test: str) -> str:
        row = tests[(tests["test"] == test) & (tests["position"] == position) & (tests["layer"] == peak)]
        if row.empty:
            return "n/a (not measured)"
        row = row.iloc[0]
        if row["n"] < 3:
            return f"{row['mean']:+.2f} (n = {int(row['n'])}: too few to test)" if row["n"] else "n/a (n = 0)"
        if too_small(row["lower"], row["upper"], row["n"]):
            return f"n too small (n = {int(row['n'])}: every item gave the same difference)"
        verdict = "holds" if row["holds"] else "ruled out" if row["rules_out"] else "undecided"
        return (f"{row['mean']:+.2f}, family-wise bounds [{row['lower']:.2f}, {row['upper']:.2f}] (n = {int(row['n'])}, "
                f"adjusted {p_value(row['p_adjusted'])}; minimum {row['min_effect']:g}: {verdict})")

    chance = _select(frame, analysis="alignment", metric="chance_majority")["value"]
    evidence_at = None if peak is None else {
        "layer": peak,
        **{f"{test}_difference": paired(test) for test in TESTS},
        "crosspatch_main_value": at("crosspatch", "main"), "crosspatch_random_value": at("crosspatch", "random"),
        "answer_top1_main": at("crosspatch", "top1_main", True), "answer_top1_random": at("crosspatch", "top1_random", True),
        "decoded_top10": at("decoding", "decoded", True), "decoded_top10_chance": at("decoding", "chance", True),
        "lens_top10": at("lens", "lens", True), "probe_latent_accuracy": at("alignment", "probe", True),
        "probe_chance_majority": f"{100 * float(chance.iloc[0]):.0f}%" if len(chance) else "n/a",
        "cosine_centered_gap": at("alignment", "cosine_gap"), "cka_matched": at("alignment", "cka_matched"),
        "cka_mismatched": at("alignment", "cka_mismatched"),
    }
    per_kind = dict(decision["holds"])
    best = best_targets(cells, position) if cells is not None and not cells.empty else pd.DataFrame()
    readable = (best[(best["specific_ci_low"] > 0) & (best["specific"] >= MIN_EFFECTS["crosspatch"])] if len(best)
                else best)
    per_kind["crosspatch_some_target"] = ", ".join(f"{int(r.source_layer)}->{int(r.target_layer)}"
                                                   for r in readable.itertuples()) or "none"
    return {"status": decision["status"], "band": band, "peak_layer": peak, "layers_by_evidence": per_kind,
            "n": decision["n"], "to_decide": decision["to_decide"], "evidence_at_peak": evidence_at}




def _sentence(position: str, part: dict[str, Any], n_tests: int) -> str:
    where, ev, kinds = POSITIONS[position], part["evidence_at_peak"], part["layers_by_evidence"]
    holds = "; ".join(f"{TEST_NAMES[t]}: {kinds[t]}" for t in TESTS)
    if part["status"] == "band":
        a, b = part["band"]
        return (f"at {where}, band {a}-{b} (all four tests hold, family-wise error {ALPHA:.0%} over {n_tests} "
                f"tests; at layer {ev['layer']}, bridge minus control: cross-patch {ev['crosspatch_difference']}, "
                f"other relation {ev['other_relation_difference']}, decoding {ev['decoding_difference']}, probe "
                f"{ev['probe_difference']})")
    at = "" if ev is None else (
        f"; at layer {ev['layer']}, the largest same-layer cross-patch difference, bridge minus control: cross-patch "
        f"{ev['crosspatch_difference']}, other relation {ev['other_relation_difference']}, decoding "
        f"{ev['decoding_difference']}, probe {ev['probe_difference']}")
    if part["status"] == "none":
        return (f"at {where}, no band: at every layer some test's upper bound lies below its minimum effect "
                f"(layers where each test holds: {holds}{at})")
    counts = ", ".join(f"{TEST_NAMES[t]} {part['n'][t]}" for t in TESTS)
    need = part.get("to_decide") or {}
    more = ""
    if need.get("items"):
        more = (f"; with the estimates as they are, layer {need['layer']} (the hardest of the undecided layers "
                f"{need['layers']}) needs about {need['items']} items for the {TEST_NAMES[need['test']]} test")
    return (f"at {where}, not enough items to decide (n = {counts}{more}; layers where each test holds: {holds}{at})")


def summarize(frame: pd.DataFrame, table: pd.DataFrame, backpatch: pd.DataFrame, model: str, n_layers: int,
              cells: pd.DataFrame | None = None) -> dict[str, Any]:
    """The band statement with its evidence (JSON-ready): per source position of the latent state; ``band`` is
    the last token's."""
    differences = paired_differences(frame)
    tests = band_test(frame, differences=differences)
    positions = {pos: _position_summary(frame, table, cells, tests, differences, pos) for pos in POSITIONS}
    rise = answer_rise_layer(frame)
    items = item_table(frame)
    fixes = {}
    if not backpatch.empty:
        failed = backpatch[backpatch["group"] == "hops_ok_composition_failed"]
        correct = backpatch[backpatch["group"] == "correct"].set_index(["source_layer", "target_layer"])
        if not failed.empty:
            # the cell that fixes the most failures net of the correct prompts it breaks (a patch that only adds
            # noise fixes some near misses too: the correct prompts are the control)
            broken = 1 - correct["top1_rate"].reindex(list(zip(failed["source_layer"], failed["target_layer"])))
            best = failed.loc[(failed["top1_rate"] - broken.fillna(0).to_numpy()).idxmax()]
            cell = (best["source_layer"], best["target_layer"])
            fixes = {"n_failures": int(best["n"]), "best_cell": [int(c) for c in cell],
                     "fixed": _fmt(best.rename({"top1_rate": "mean"}), pct=True),
                     "broken_correct_at_best_cell": (_fmt(1 - correct.loc[cell][["top1_rate", "ci_high", "ci_low"]]
                                                         .set_axis(["mean", "ci_low", "ci_high"]), pct=True)
                                                     if cell in correct.index else "n/a"),
                     "n_correct": int(correct["n"].max()) if len(correct) else 0}
    band = positions["last"]["band"]
    relation = ""
    if band and rise is not None:
        relation = (f", {'before' if band[1] < rise else 'after' if band[0] > rise else 'around'} the layer where the "
                    "answer rises")
    rises = ("The answer never rises into the logit-lens top 10" if rise is None
             else f"The answer rises at layer {rise:g} (median)")
    statement = (f"{model} ({n_layers} layers): " + "; ".join(_sentence(p, positions[p], len(tests))
                                                            for p in POSITIONS)
                 + f". {rises}{relation}.")
    groups = items["group"].value_counts().to_dict() if "group" in items else {}
    return {
        "model": model, "n_layers": n_layers, "statement": statement, "band": band,
        "peak_layer": positions["last"]["peak_layer"], "answer_rise_layer": rise,
        "layers_by_evidence": positions["last"]["layers_by_evidence"],
        "evidence_at_peak": positions["last"]["evidence_at_peak"], "positions": positions, "backpatch": fixes,
        "n_items": int(len(items)), "n_map_items": int(_select(frame, analysis="crosspatch", condition="main")
                                                       ["prompt_id"].nunique()),
        "n_crosspatch_eligible": int(len(crosspatch_eligible(frame))), "groups": {k: int(v) for k, v in groups.items()},
        "criteria": __doc__.split("The band of the shared memory is")[1].strip(),
        "test": {"method": "family-wise one-sided bounds: studentized sign-flip resampling per column, min-p "
                           "combination (analyses.stats.equivalence_decisions)",
                 "alpha": ALPHA, "min_effects": MIN_EFFECTS, "min_effect_units": EFFECT_UNITS, "min_gap": MIN_GAP,
                 "n_resamples": N_RESAMPLES, "n_tests": int(len(tests)),
                 "n_other_relation_small_gap": transfer_eligible(frame)[1],
                 "tests_measured": sorted(tests["test"].unique().tolist()) if len(tests) else []},
        "sensitivity": sensitivity(frame),
    }


# --------------------------------------------------------------------------------------------------- plots


def _heat(ax: plt.Axes, cells: pd.DataFrame, column: str, title: str, limit: float, cmap: str) -> Any:
    """A source x target heatmap on the layer grid of the cells (the layers that have more than one partner layer;
    the full diagonal is drawn as curves in ``memory_layers.png``), each grid cell one block."""
    sources = sorted(l for l, n in cells.groupby("source_layer")["target_layer"].nunique().items() if n > 1)
    targets = sorted(l for l, n in cells.groupby("target_layer")["source_layer"].nunique().items() if n > 1)
    sources, targets = sources or sorted(cells["source_layer"].unique()), targets or sorted(cells["target_layer"].unique())
    grid = cells.pivot_table(index="target_layer", columns="source_layer", values=column, aggfunc="first")
    grid = grid.reindex(index=targets, columns=sources)
    image = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), origin="lower", cmap=cmap,
                      vmin=-limit if cmap == "RdBu_r" else 0, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(sources)), [str(int(l)) for l in sources], fontsize=7)
    ax.set_yticks(range(len(targets)), [str(int(l)) for l in targets], fontsize=7)
    ax.set(xlabel="source layer (two-hop prompt)", ylabel="target layer (hop2 prompt)", title=title)
    return image


def crosspatch_heatmaps(cells: pd.DataFrame, path: Path, title: str) -> Path:
    """Source x target maps: A's state (main), a random item's state, and their difference, at the last token and
    at e1's last token."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for row, position in enumerate(("last", "e1_last")):
        main = cells[(cells["condition"] == "main") & (cells["source_position"] == position)]
        rand = cells[(cells["condition"] == "random") & (cells["source_position"] == position)]
        for ax, sub, column, name, cmap, limit in (
            (axes[row, 0], main, "value", "A's state", "RdBu_r", 1.0),
            (axes[row, 1], rand, "value", "random item's state", "RdBu_r", 1.0),
            (axes[row, 2], main, "specific", "bridge-specific: A - random", "RdBu_r", 0.5),
        ):
            if sub.empty or column not in sub:
                ax.axis("off")
                continue
            image = _heat(ax, sub, column, f"{name}, source at {position}", limit, cmap)
            fig.colorbar(image, ax=ax, label="normalized effect (1 = bridge written out)")
    fig.suptitle(title)
    return save_figure(fig, path)


def _band(ax: plt.Axes, summary: dict[str, Any]) -> None:
    if summary.get("band"):
        ax.axvspan(summary["band"][0] - 0.5, summary["band"][1] + 0.5, color="gold", alpha=0.2)
    if summary.get("answer_rise_layer") is not None:
        ax.axvline(summary["answer_rise_layer"], color="tab:red", ls=":", lw=1)


# Colours: blue = the latent state at the last token, purple = at e1's last token, green = the explicit bridge,
# grey = the control (random item's state, partner's bridge, chance), orange = the logit lens, black = a difference.
LAYER_PANELS = [
    ("Cross-patching (source = target layer)", "normalized effect", [
        ("crosspatch", "main_last", "A's state (last token)", "tab:blue", "-"),
        ("crosspatch", "random_last", "random item's state (control)", "tab:gray", "-"),
        ("crosspatch", "specific_last", "bridge-specific (A - random)", "black", "-"),
        ("crosspatch", "specific_e1_last", "bridge-specific, e1's last token", "tab:purple", "--"),
        ("crosspatch", "specific_transfer_last", "other relation: toward the bridge's value there, A - random",
         "tab:brown", ":"),
    ]),
    ("Decoding at the last token (bridge in top 10)", "fraction of prompts", [
        ("decoding", f"latent_last_fixed_bridge_top{TOP_K}", "decoded (fixed target layer)", "tab:blue", "-"),
        ("decoding", f"latent_last_same_bridge_top{TOP_K}", "decoded (same layer)", "tab:blue", "--"),
        ("decoding", f"latent_last_fixed_partner_top{TOP_K}", "chance: partner's bridge decoded", "tab:gray", "-"),
        ("lens", f"latent_last_bridge_top{TOP_K}", "logit lens on the same state", "tab:orange", "-"),
    ]),
    ("Decoding at e1 and of the explicit bridge", "fraction of prompts", [
        ("decoding", f"latent_e1_last_fixed_bridge_top{TOP_K}", "decoded, latent at e1's last token", "tab:purple", "-"),
        ("decoding", f"latent_e1_last_fixed_partner_top{TOP_K}", "chance at e1's last token", "tab:gray", ":"),
        ("decoding", f"explicit_bridge_fixed_bridge_top{TOP_K}", "decoded, explicit bridge", "tab:green", "-"),
        ("lens", f"explicit_bridge_bridge_top{TOP_K}", "logit lens, explicit bridge", "tab:orange", ":"),
    ]),
    ("Alignment of latent and explicit states", "similarity", [
        ("alignment", "cosine_centered_matched", "centered cosine, same item", "tab:blue", "-"),
        ("alignment", "cosine_centered_mismatched", "centered cosine, partner (control)", "tab:gray", "-"),
        ("alignment", "cka_matched", "linear CKA, matched", "tab:blue", "--"),
        ("alignment", "cka_mismatched", "linear CKA, partners (control)", "tab:gray", "--"),
        ("alignment", "cosine_centered_gap_e1_last", "centered cosine gap (same - partner) at e1", "tab:purple", ":"),
    ]),
    ("Linear probe for the bridge", "accuracy", [
        ("alignment", "probe_latent", "trained on explicit, tested on latent", "tab:blue", "-"),
        ("alignment", "probe_latent_templates", "trained on templates, tested on latent", "tab:blue", ":"),
        ("alignment", "probe_latent_e1_last", "trained on explicit, tested on latent at e1", "tab:purple", "-"),
        ("alignment", "probe_explicit_heldout", "trained on templates, tested on hop2 (held out)", "tab:green", "-"),
    ]),
]


def layer_curves(table: pd.DataFrame, summary: dict[str, Any], path: Path, title: str) -> Path:
    """Per-layer curves with 95% CIs (at most five per panel, legends under the panels): cross-patching on the
    diagonal, decoding beside the logit lens, alignment (cosine, CKA) and the probe; the last panel explains the
    shading, the band and the answer's rise."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(3, 2, figsize=(14, 14))
    for ax, (name, ylabel, lines) in zip(axes.flat, LAYER_PANELS):
        for analysis, curve, label, color, style in lines:
            rows = _get(table, analysis, curve)
            if rows.empty:
                continue
            ax.plot(rows.index, rows["mean"], style, color=color, label=label, lw=1.8)
            if rows["ci_low"].notna().any():
                ax.fill_between(rows.index, rows["ci_low"], rows["ci_high"], color=color, alpha=0.15)
        if name.startswith("Linear probe") and summary.get("probe_chance") is not None:
            ax.axhline(summary["probe_chance"], color="tab:gray", ls="--", lw=1, label="chance (majority bridge)")
        _band(ax, summary)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="layer", ylabel=ylabel, title=name)
        legend_below(ax, ncol=1)
    key = axes.flat[-1]
    key.axis("off")
    key.legend(handles=[Patch(color="tab:blue", alpha=0.15, label="shaded: 95% CI of the curve of the same colour"),
                        Patch(color="gold", alpha=0.2, label="the band (all four tests hold)"),
                        Line2D([], [], color="tab:red", ls=":", label="layer where the answer rises (median)")],
               loc="center", fontsize=10, frameon=False, title="Key", title_fontsize=10)
    fig.suptitle(title)
    return save_figure(fig, path)


def backpatch_heatmaps(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Fraction of failures fixed and of correct prompts broken, per (source, target) layer."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, group, column, name in ((axes[0], "hops_ok_composition_failed", "top1_rate", "failures fixed"),
                                    (axes[1], "correct", "broken", "correct prompts broken")):
        sub = table[table["group"] == group].assign(broken=lambda f: 1 - f["top1_rate"])
        if sub.empty:
            ax.axis("off")
            continue
        image = _heat(ax, sub, column, f"{name} (n={int(sub['n'].max())})", 1.0, "viridis")
        ax.set(xlabel="source layer (later)", ylabel="target layer (earlier)")
        fig.colorbar(image, ax=ax, label="fraction of prompts")
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------- outputs


def write_memory_outputs(frame: pd.DataFrame, out_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """Write ``memory_cells.csv``, ``memory_layers.csv``, ``memory_backpatch.csv``, ``memory_summary.json``, the
    PNGs and ``memory.html``; return the summary (with ``figures``: the PNG paths)."""
    model, n_layers = run["model"], int(run["n_layers"])
    cells = crosspatch_cells(frame)
    table = curves(frame)
    backpatch = backpatch_table(frame)
    summary = summarize(frame, table, backpatch, model, n_layers, cells)
    chance = _select(frame, analysis="alignment", metric="chance_majority")["value"]
    summary["probe_chance"] = float(chance.iloc[0]) if len(chance) else None
    summary["settings"] = run.get("memory", {}) | {k: run["settings"].get(k) for k in ("items", "stride", "map_items")
                                                    if k in run.get("settings", {})}
    summary["timings"] = {k: v for k, v in run.get("timings", {}).items() if k.startswith("memory")}
    atomic_write_csv(out_dir / "memory_cells.csv", cells)
    atomic_write_csv(out_dir / "memory_layers.csv", table)
    atomic_write_csv(out_dir / "memory_backpatch.csv", backpatch)
    figures = [layer_curves(table, summary, out_dir / "memory_layers.png", f"Shared latent memory, {model}")]
    if not cells.empty:
        figures.append(crosspatch_heatmaps(cells, out_dir / "memory_crosspatch.png",
                                           f"Cross-prompt patching into the partner's hop2 prompt, {model}"))
    if not backpatch.empty:
        figures.append(backpatch_heatmaps(backpatch, out_dir / "memory_backpatch.png",
                                          f"Back-patching later into earlier layers, {model}"))
    summary["figures"] = [f.name for f in figures]
    summary["provenance"] = provenance(run)
    summary = {"finding": memory_finding(summary), **summary}
    atomic_write_json(out_dir / "memory_summary.json", summary)
    section = memory_section(summary, figures)
    atomic_write(out_dir / "memory.html", render(f"{section.title}, {model}", [section],
                                                 provenance=summary["provenance"], finding=summary["finding"]))
    return summary


EVIDENCE_NAMES = {
    "layer": "layer", "crosspatch_difference": "cross-patch, bridge minus control (A - random item's state)",
    "other_relation_difference": "other relation, bridge minus control (toward the bridge's value there, A - random)",
    "decoding_difference": "decoding, bridge minus control (bridge - partner's bridge in the top 10)",
    "probe_difference": "probe, bridge minus control (names the bridge - names the partner's bridge)",
    "other_relation": "other relation", "probe": "probe",
    "crosspatch_specific_effect": "cross-patch, bridge-specific effect (A - random)",
    "crosspatch_main_value": "cross-patch effect of A's state", "crosspatch_random_value": "cross-patch effect of a "
    "random item's state (control)", "answer_top1_main": "A's answer becomes top 1, A's state",
    "answer_top1_random": "A's answer becomes top 1, random state (control)",
    "other_relation_specific_transfer": "other relation: toward the bridge's value there (A - random)",
    "decoded_top10": "decoded in the top 10", "decoded_top10_chance": "decoded in the top 10, partner's bridge "
    "(chance)", "lens_top10": "logit lens top 10", "probe_latent_accuracy": "probe accuracy on the latent state",
    "probe_chance_majority": "probe chance (majority bridge)", "cosine_centered_gap": "centered cosine gap (same "
    "item - partner)", "cka_matched": "linear CKA, matched", "cka_mismatched": "linear CKA, partners (control)",
    "crosspatch": "cross-patching", "decoding": "decoding", "alignment": "probe",
    "crosspatch_some_target": "A's state written into another layer of the partner's prompt, bridge-specific "
                              "(source layer -> target layer; the best target per source, a maximum: readable "
                              "somewhere, not an effect size)",
}
CAPTIONS = {
    "memory_layers.png": "Per-layer curves, each a mean over prompts with its 95% interval (shaded, same "
                         "colour); the gold span marks the band where all four tests hold, the red "
                         "dotted line the layer where the answer rises. Blue: the latent state at the last token; "
                         "purple: at e1's last token; green: the explicit bridge; grey: controls and chance.",
    "memory_crosspatch.png": "Source layer (two-hop prompt) × target layer (partner's hop2 prompt): the effect of "
                             "A's state, of a random item's state (the control), and their difference; top row at "
                             "the last token, bottom row at e1's last token. 1 = as if A's bridge were written out.",
    "memory_backpatch.png": "Back-patching a later layer's state into an earlier layer of the same prompt: the "
                            "fraction of composition failures fixed (left) and of correct prompts broken (right).",
}


def _sensitivity_html(rows: list[dict[str, Any]]) -> str:
    """The sensitivity table: the decision under each threshold halved and doubled."""
    if not rows:
        return ""
    frame = pd.DataFrame(rows).rename(columns={"min_effect_scale": "minimum effects (x as set)",
                                               "min_gap": "minimum gap (logit)",
                                               **{p: f"at {w}" for p, w in POSITIONS.items()}})
    return ("<h3>Sensitivity</h3><p>The decision with each threshold of the band test halved and doubled (the "
            "others as set).</p>" + frame.to_html(index=False, border=0, classes="data"))


TERMS = ("<p><b>Terms.</b> An item A is a two-hop prompt such as \"The capital of the country where the Eiffel "
         "Tower is located is\", whose bridge (France) is never written in it. <b>e1</b> is the first entity of the "
         "two-hop prompt, its subject (the Eiffel Tower): the bridge can be computed from e1's last token on. "
         "<b>A's state</b> is the hidden state (residual stream) of A's two-hop prompt at one layer, at its last token "
         "or at e1's last token: where the bridge is kept, if it is. A's <b>partner</b> is an item with another "
         "bridge; its hop-2 prompt names that bridge (\"The capital of Italy is\"). <b>Cross-patching</b> writes A's "
         "state into the partner's hop-2 prompt at its bridge: if the state carries France, the prompt moves toward "
         "Paris. The <b>control</b> of each test is the same measurement with a random other item's state or the "
         "partner's bridge.</p>")


def criteria_html() -> str:
    """The band test in plain words, with the thresholds as set (the module docstring is the developers' version)."""
    effects = sorted(set(MIN_EFFECTS.values()))
    minimum = (f"{effects[0]:g} for each test" if len(effects) == 1 else
               ", ".join(f"{TEST_NAMES[t]} {e:g}" for t, e in MIN_EFFECTS.items()))
    return (
        "<p>The band of the shared memory is the longest run of consecutive layers where four tests all hold. Each "
        "test compares, item by item, the bridge with its matched control (a difference centred on 0 when the state "
        "does not carry the bridge), on A's state at a layer, at the last token and at e1's last token:</p><ul>"
        "<li><b>cross-patch</b>: A's state written into the partner's hop-2 prompt at the same layer, against a "
        "random other item's state written there; in fractions of what writing A's bridge out in words does (1 = as "
        f"much). Only items where the written-out bridge moves the partner's prompt by at least {MIN_GAP:g} logit "
        "count (a smaller gap would let one item dominate).</li>"
        "<li><b>other relation</b>: A's state written into the hop-2 prompt of another relation, at that prompt's "
        "own bridge (\"The main language spoken in Italy is\", A's bridge being France): how far it moves that "
        "prompt toward the value of A's bridge there (French), against the random item's state; in fractions of "
        "what writing A's bridge out there does, over the "
        f"items where that is at least {MIN_GAP:g} logit. The state then serves as the bridge for a relation it was "
        "not computed for.</li>"
        "<li><b>decoding</b>: the bridge decoded in the top 10 from A's state (through an identity prompt, read at a "
        "fixed early layer) minus the partner's bridge decoded there; a rate difference (0.1 = 10 points).</li>"
        "<li><b>probe</b>: a linear probe trained on written-out bridges (of prompts that share no template with the "
        "item) names the item's bridge, minus it names the partner's bridge; a rate difference.</li></ul>"
        f"<p>A test <b>holds</b> at a layer when its lower bound is above 0 and its mean difference is at least its "
        f"minimum effect ({minimum}: a tenth of what the written-out bridge does, or 10 points); it <b>rules the "
        f"layer out</b> when its upper bound is below the minimum effect. The bounds are one-sided and family-wise "
        f"over every test, layer and position ({ALPHA:.0%} error for the lower bounds and, separately, for the upper "
        f"bounds), from {N_RESAMPLES:,} random sign flips of the items' differences. With no layer where all four "
        "hold, the statement says \"no band\" only when every layer is ruled out, and otherwise \"not enough items "
        "to decide\", with the number of items that would decide if the estimates stayed as they are. The rule's "
        "error rates on planted effects are in docs/statistics.md; the sensitivity table repeats the decision with "
        "each threshold halved and doubled.</p>"
        "<p>The band is compared with the median layer where the answer rises (the first layer from which it stays "
        "in the logit-lens top 10 at the last token). The row \"A's state written into another layer\" lists the "
        "source layers whose state is bridge-specific when written into some other layer of the partner's prompt "
        "(the best target layer per source: a maximum, so read it as \"readable somewhere\", not as an effect size; "
        "not part of the test).</p>")


def memory_section(summary: dict[str, Any], figures: list[Path]) -> Section:
    """The report section: the statement as its findings (e1 defined where it first appears), the terms, the
    evidence per position, the criteria in plain words."""
    fixes = summary.get("backpatch") or {}
    settings = summary.get("settings", {})
    tables = ""
    for position, part in summary["positions"].items():
        evidence = {EVIDENCE_NAMES.get(k, k): v for k, v in (part.get("evidence_at_peak") or {}).items()}
        kinds = {EVIDENCE_NAMES.get(k, k): v for k, v in part["layers_by_evidence"].items()}
        tables += (f"<h3>Latent state at {POSITIONS[position]}</h3><p>Layers where each kind of evidence holds:</p>"
                   + key_values(kinds)
                   + (f"<p>Evidence at layer {evidence['layer']}:</p>" + key_values(evidence) if evidence else ""))
    decode_layer = settings.get("decode_layer")
    body = (
        TERMS
        + f"<p>{summary['n_items']} items ({summary['n_map_items']} with the cross-patch maps and the decoding; "
        f"{summary['n_crosspatch_eligible']} of those where writing the bridge out moves the partner's prompt by "
        f"at least {MIN_GAP:g} logit). Identity prompt for the decoding: <code>"
        f"{html.escape(repr(settings.get('identity_prompt', '')))}</code>"
        + (f", read at the fixed layer {decode_layer}. " if decode_layer is not None else ". ")
        + (f"Back-patching fixes {fixes['fixed']} of the {fixes['n_failures']} two-hop failures whose hops are both "
           f"right at the best cell (source, target) = {tuple(fixes['best_cell'])} (net of breakage; a maximum over cells, so biased upward), and breaks "
           f"{fixes['broken_correct_at_best_cell']} of the {fixes['n_correct']} correct prompts there. "
           if fixes else "")
        + "Means with 95% t intervals over prompts, rates with exact intervals (none below 3 prompts; an interval "
        "of no width from fewer than 10 items is shown as \"n too small\"); CKA with grouped-jackknife intervals. "
        "Files: memory.csv (every row), memory_cells.csv, memory_layers.csv, memory_backpatch.csv, "
        "memory_summary.json. <code>bridgeprobe memory</code> runs the analysis on every item (<code>--map-items"
        "</code>, <code>--stride</code> set its cost).</p>" + tables
        + _sensitivity_html(summary.get("sensitivity") or [])
        + "<h3>Criteria</h3>" + criteria_html()
    )
    findings = summary["statement"].replace(
        "e1's last token", "e1's last token (e1: the first entity of the two-hop prompt, its subject)", 1)
    return Section("Shared latent memory", findings, body,
                   [Figure(f, CAPTIONS.get(Path(f).name, "")) for f in figures])
