"""The band test of the shared-memory report (:mod:`analyses.memory_report`): each item's bridge-minus-control
differences, the decision per test, layer and position, the sensitivity table, and the statement with its evidence
(``memory_summary.json``, whose ``criteria`` quote the rest of this docstring).

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

from typing import Any

import numpy as np
import pandas as pd

from bridgeprobe.analyses.memory_tables import (MIN_GAP, TOP_K, best_targets, crosspatch_eligible, curve_rows,
                                                item_table, layer_matrix, select, transfer_eligible)
from bridgeprobe.analyses.page import p_value, too_small
from bridgeprobe.analyses.stats import N_RESAMPLES, equivalence_decisions

TESTS = ("crosspatch", "other_relation", "decoding", "probe")
# the smallest bridge-minus-control difference each test must show to hold, in the test's own unit (docstring)
MIN_EFFECTS = {"crosspatch": 0.1, "other_relation": 0.1, "decoding": 0.1, "probe": 0.1}
EFFECT_UNITS = {"crosspatch": "of the explicit bridge's effect", "other_relation": "of the explicit transfer",
                "decoding": "rate difference", "probe": "rate difference"}
ALPHA = 0.05  # family-wise error of the lower bounds, and separately of the upper bounds, over every column
SEED = 0


# --------------------------------------------------------------------------------------------------- summary


def answer_rise_layer(frame: pd.DataFrame) -> float | None:
    """Median over items of the first layer from which the answer stays in the logit-lens top 10 at the two-hop
    prompt's last token (items where it ends there), as ``answer_rise_layer`` in the lens report."""
    ranks = layer_matrix(select(frame, analysis="lens", condition="latent", source_position="last",
                                metric="answer_rank"))
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


def paired_differences(frame: pd.DataFrame, min_gap: float | None = None) -> pd.DataFrame:
    """Items x (test, position, layer): each item's bridge-minus-control difference for each test of the band
    (module docstring; NaN where the item has no value). A ``memory.csv`` without the probe's partner rows (before
    the matched probe control existed) has no ``probe`` columns."""
    eligible = crosspatch_eligible(frame, min_gap)
    transfer_ok, _ = transfer_eligible(frame, min_gap)
    cross = select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    diagonal = cross[cross["source_layer"] == cross["target_layer"]]
    decoded = select(frame, analysis="decoding")
    fixed = _fixed_decode_layer(decoded) if not decoded.empty else None
    align = select(frame, analysis="alignment")
    columns: dict[tuple[str, str], pd.DataFrame] = {}
    for position in POSITIONS:
        main, rand = (layer_matrix(select(diagonal, condition=c, source_position=position, metric="value")
                              .pipe(lambda f: f[f["prompt_id"].isin(eligible)])) for c in ("main", "random"))
        if not main.empty and not rand.empty:
            columns[("crosspatch", position)] = main - rand
        own, other = (layer_matrix(select(diagonal, condition=c, source_position=position, metric="transfer_value")
                              .pipe(lambda f: f[f["prompt_id"].isin(transfer_ok)]))
                      for c in ("other_relation", "other_relation_random"))
        if not own.empty and not other.empty:
            columns[("other_relation", position)] = own - other
        if fixed is not None:
            rows = decoded[(decoded["target_layer"] == fixed) & (decoded["condition"] == "latent")
                           & (decoded["source_position"] == position)]
            bridge, partner = (layer_matrix(select(rows, metric=m)) for m in ("rank", "partner_rank"))
            if not bridge.empty and not partner.empty:
                columns[("decoding", position)] = ((bridge < TOP_K).astype(float).where(bridge.notna())
                                                   - (partner < TOP_K).astype(float).where(partner.notna()))
        own, named_partner = (layer_matrix(select(align, source_position=position, metric=m))
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
        rows = curve_rows(table, analysis, names[key])
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

    chance = select(frame, analysis="alignment", metric="chance_majority")["value"]
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
        "n_items": int(len(items)), "n_map_items": int(select(frame, analysis="crosspatch", condition="main")
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
