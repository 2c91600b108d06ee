"""Shared-memory analyses: the patched maps against plain HF forward hooks, no-op patches, batching over items,
resume, alignment statistics against direct numpy computations, the probe; on the real models, identity decoding
of explicit entities and the command end to end (slow)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bridgeprobe.probes.memory.analysis
import bridgeprobe.probes.memory.rows
from conftest import requires_gemma3, requires_smollm2, tiny_model
from bridgeprobe.probes.memory.alignment import LinearProbe, alignment_rows, jackknife_cka, cosine, linear_cka
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.variants import run_variants
from bridgeprobe.probes.memory.analysis import run_memory
from bridgeprobe.probes.memory.plans import (MemoryConfig, backpatch_cells, crosspatch_cells, decoding_cells, encode,
                                             identity_prompt, make_plans, span_end_position)
from bridgeprobe.probes.memory.rows import patch_states
from bridgeprobe.probes.model.states import read_states
from bridgeprobe.prompts.sampling import sample_items
from bridgeprobe.prompts.schema import PromptItem

TOL = 1e-4


class WordTokenizer:
    """One token per word (with the whitespace before it) or colon; ids given on first sight from 1, BOS = 0."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in re.findall(r"\s*[^\s:]+|\s*:", text)]
        if max(ids, default=0) >= 128:
            raise ValueError("the tiny models have 128 tokens")
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int]) -> str:
        words = {v: k for k, v in self.vocab.items()}
        return "".join(words.get(i, "<s>") for i in ids)


def _item(pid: str, r2: str, e1: str, bridge: str, answer: str, pair: str) -> PromptItem:
    question = {"capital": "The capital of", "language": "The language of"}[r2]
    return PromptItem(pid, f"{question} the country where {e1} is located is", bridge, answer, e1=e1,
                      r1="located_in_country", r2=r2, hop1=f"{e1} is located in", hop2=f"{question} {bridge} is",
                      pair=pair)


ITEMS = [
    _item("cap-fr", "capital", "the Tower", "France", "Paris", "cap-it"),
    _item("cap-it", "capital", "the Colosseum", "Italy", "Rome", "cap-jp"),
    _item("cap-jp", "capital", "the Fuji", "Japan", "Tokyo", "cap-fr"),
    _item("lang-fr", "language", "the Louvre", "France", "French", "lang-it"),
    _item("lang-it", "language", "the Pisa", "Italy", "Italian", "lang-jp"),
    _item("lang-jp", "language", "the Kyoto", "Japan", "Japanese", "lang-fr"),
]


def _hooked(kind: str) -> NativeHooks:
    return NativeHooks(tiny_model(kind), WordTokenizer())


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@torch.no_grad()
def _hf_patched_logits(model: torch.nn.Module, source: list[int], source_position: int, receiving: list[int],
                       position: int, source_layer: int, target_layer: int) -> torch.Tensor:
    """Plain HF forward hooks, independent of the package: the output of decoder block ``source_layer`` at
    ``source_position`` of the source prompt replaces that of block ``target_layer`` at ``position`` of the
    receiving prompt; returns the receiving prompt's last-position logits."""
    blocks = _blocks(model)
    captured = {}

    def first(output):
        return output[0] if isinstance(output, tuple) else output

    def capture(module, args, output):
        captured["h"] = first(output)[0, source_position].clone()

    def write(module, args, output):
        hidden = first(output).clone()
        hidden[0, position] = captured["h"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = blocks[source_layer].register_forward_hook(capture)
    model(torch.tensor([source]))
    handle.remove()
    handle = blocks[target_layer].register_forward_hook(write)
    try:
        return model(torch.tensor([receiving])).logits[0, -1]
    finally:
        handle.remove()


def _hf_scores(logits: torch.Tensor, token: int) -> tuple[float, int, float]:
    return float(logits[token]), int((logits > logits[token]).sum()), float(logits.log_softmax(-1)[token])


@pytest.mark.parametrize("kind", ["llama", "gemma3_text", "gpt2"])
def test_patched_map_equals_plain_hf_hooks(kind: str) -> None:
    hooked = _hooked(kind)
    tok = hooked.tokenizer
    a, c = encode(tok, ITEMS[0]), encode(tok, ITEMS[1])
    states, _ = read_states(hooked, [(a.two_hop, [a.e1_position, len(a.two_hop) - 1])])
    cells = crosspatch_cells(hooked.n_layers, 1)
    assert (1, 1) in cells and (2, 0) in cells and all(t <= hooked.n_layers - 2 for _, t in cells)
    tokens = [a.answer, c.answer, a.bridge]
    scores, base = patch_states(hooked, c.hop2, c.hop2_position, [states[0, 1], states[0, 0]], [cells, cells[::2]],
                                tokens)
    for score, source_position, own in ((scores[0], len(a.two_hop) - 1, cells), (scores[1], a.e1_position, cells[::2])):
        for k, (s, t) in enumerate(own):
            logits = _hf_patched_logits(hooked.model, list(a.two_hop), source_position, list(c.hop2),
                                        c.hop2_position, s, t)
            for token in tokens:
                logit, rank, logprob = _hf_scores(logits, token)
                assert score.logit(token)[k] == pytest.approx(logit, abs=TOL)
                assert score.rank(token)[k] == rank
                assert float(score.prob(token)[k].log()) == pytest.approx(logprob, abs=TOL)
    reference = hooked.model(torch.tensor([c.hop2])).logits[0, -1]
    assert float(base.logit(a.answer)) == pytest.approx(float(reference[a.answer]), abs=TOL)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_a_state_patched_into_itself_changes_nothing(kind: str) -> None:
    hooked = _hooked(kind)
    c = encode(hooked.tokenizer, ITEMS[1])
    states, _ = read_states(hooked, [(c.hop2, [c.hop2_position]), (c.two_hop, [len(c.two_hop) - 1])])
    same = [(l, l) for l in range(hooked.n_layers - 1)]
    (scores,), base = patch_states(hooked, c.hop2, c.hop2_position, [states[0, 0]], [same], [c.answer, c.bridge])
    torch.testing.assert_close(scores.values, base.values.expand_as(scores.values), atol=1e-5, rtol=0)
    # back-patching s == t (at the last token of the two-hop prompt, the last layer included)
    same = [(l, l) for l in range(hooked.n_layers)]
    (scores,), base = patch_states(hooked, c.two_hop, len(c.two_hop) - 1, [states[1, 0]], [same], [c.answer])
    torch.testing.assert_close(scores.values, base.values.expand_as(scores.values), atol=1e-5, rtol=0)


def test_backpatch_later_into_earlier_equals_plain_hf() -> None:
    hooked = _hooked("llama")
    a = encode(hooked.tokenizer, ITEMS[0])
    last = len(a.two_hop) - 1
    states, _ = read_states(hooked, [(a.two_hop, [last])])
    cells = backpatch_cells(hooked.n_layers, 1)
    assert cells == [(1, 0), (2, 0), (2, 1)]
    (scores,), _ = patch_states(hooked, a.two_hop, last, [states[0, 0]], [cells], [a.answer])
    for k, (s, t) in enumerate(cells):
        logits = _hf_patched_logits(hooked.model, list(a.two_hop), last, list(a.two_hop), last, s, t)
        assert scores.rank(a.answer)[k] == _hf_scores(logits, a.answer)[1]
        assert float(scores.logit(a.answer)[k]) == pytest.approx(float(logits[a.answer]), abs=TOL)


def _run(hooked: NativeHooks, out: Path, **config) -> pd.DataFrame:
    result = run_memory(hooked, ITEMS, out, MemoryConfig(**config), settings={"model": "tiny"})
    return result.frame


def test_job_rows_equal_plain_hf_and_cover_every_analysis(tmp_path: Path, monkeypatch) -> None:
    hooked = _hooked("llama")
    variants = []  # every patched run goes through the patching engine: one variant per patched cell

    def counting(hooked, ids, batch, measure, **kwargs):
        variants.extend(batch)
        return run_variants(hooked, ids, batch, measure, **kwargs)

    monkeypatch.setattr(bridgeprobe.probes.memory.rows, "run_variants", counting)
    frame = _run(hooked, tmp_path / "o", batch_items=2, backpatch_groups=("correct", "hop_failed"))
    assert set(frame["analysis"]) == {"crosspatch", "decoding", "lens", "backpatch", "alignment", "item"}
    patched = frame[frame.analysis.isin(["crosspatch", "backpatch", "decoding"]) & frame.source_layer.notna()]
    cell = ["analysis", "prompt_id", "condition", "source_id", "receiving_id", "source_position", "source_layer",
            "target_layer"]
    assert len(variants) == len(patched.drop_duplicates(cell)) > 0
    assert set(frame.columns) >= {"analysis", "prompt_id", "source_layer", "target_layer", "metric", "value"}
    tok = hooked.tokenizer
    a, c = encode(tok, ITEMS[0]), encode(tok, ITEMS[1])
    rows = frame[(frame.analysis == "crosspatch") & (frame.prompt_id == "cap-fr") & (frame.condition == "main")
                 & (frame.source_position == "last")]
    explicit = hooked.model(torch.tensor([a.hop2])).logits[0, -1]
    base = hooked.model(torch.tensor([c.hop2])).logits[0, -1]
    gap = float(explicit[a.answer] - explicit[c.answer]) - float(base[a.answer] - base[c.answer])
    for s, t in [(0, 0), (2, 1), (1, 0)]:
        logits = _hf_patched_logits(hooked.model, list(a.two_hop), len(a.two_hop) - 1, list(c.hop2),
                                    c.hop2_position, s, t)
        diff = float(logits[a.answer] - logits[c.answer])
        cell = rows[(rows.source_layer == s) & (rows.target_layer == t)].set_index("metric")["value"]
        assert cell["logit_diff"] == pytest.approx(diff, abs=TOL)
        assert cell["value"] == pytest.approx((diff - float(base[a.answer] - base[c.answer])) / gap, abs=TOL)
    # the controls: a random item of the same composition with another bridge; another relation with A's bridge
    random_rows = frame[(frame.analysis == "crosspatch") & (frame.condition == "random")]
    assert set(random_rows["source_id"]) <= {"cap-jp", "cap-it", "cap-fr", "lang-jp", "lang-it", "lang-fr"}
    for pid, source in random_rows.groupby("prompt_id")["source_id"].first().items():
        item, partner = next(i for i in ITEMS if i.id == pid), next(i for i in ITEMS if i.id == source)
        assert partner.bridge != item.bridge
    other = frame[(frame.analysis == "crosspatch") & frame.condition.isin(["other_relation", "other_relation_random"])]
    assert set(other["metric"]) >= {"transfer_value", "answer_value", "transfer_gap"}
    assert set(other["condition"]) == {"other_relation", "other_relation_random"}
    assert (other.dropna(subset=["source_layer"]).eval("source_layer == target_layer")).all()
    decoded = frame[(frame.analysis == "decoding") & (frame.metric == "rank")]
    assert set(decoded["condition"]) == {"latent", "explicit"}
    assert set(decoded["source_position"]) == {"last", "e1_last", "bridge"}


@pytest.fixture(scope="module")
def job_frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _run(_hooked("llama"), tmp_path_factory.mktemp("job"), batch_items=3,
                backpatch_groups=("correct", "hop_failed"))


def test_report_curves_are_means_of_the_rows(job_frame: pd.DataFrame, monkeypatch) -> None:
    import bridgeprobe.analyses.memory_band as band
    import bridgeprobe.analyses.memory_tables as tables
    for module in (tables, band):  # a random model: keep every item (both modules read MIN_GAP)
        monkeypatch.setattr(module, "MIN_GAP", -np.inf)
    frame = job_frame
    layers = tables.curves(frame)
    rows = frame[(frame.analysis == "crosspatch") & (frame.condition == "main") & (frame.source_position == "last")
                 & (frame.metric == "rank") & (frame.source_layer == 1) & (frame.target_layer == 1)]
    curve = layers[(layers.curve == "top1_main_last") & (layers.layer == 1)].iloc[0]
    assert curve["mean"] == pytest.approx((rows["value"] == 0).mean()) and curve["n"] == len(rows)
    value = frame[(frame.analysis == "crosspatch") & (frame.source_position == "last") & (frame.metric == "value")
                  & (frame.source_layer == 1) & (frame.target_layer == 1)].pivot(index="prompt_id", columns="condition",
                                                                                  values="value")
    specific = layers[(layers.curve == "specific_last") & (layers.layer == 1)].iloc[0]
    assert specific["mean"] == pytest.approx((value["main"] - value["random"]).mean())
    cells = tables.crosspatch_cells(frame).set_index(["condition", "source_position", "source_layer", "target_layer"])
    assert cells.loc[("main", "last", 1, 1), "specific"] == pytest.approx(specific["mean"])
    summary = band.summarize(frame, layers, tables.backpatch_table(frame), "tiny", 3, tables.crosspatch_cells(frame))
    assert summary["statement"].startswith("tiny (3 layers): at the last token") and summary["n_items"] == len(ITEMS)
    stats = tables.mean_intervals(np.array([[1.0, np.nan], [0.0, 2.0], [1.0, 4.0]]))
    assert stats["mean"].tolist() == pytest.approx([2 / 3, 3.0]) and stats["n"].tolist() == [3, 2]
    assert stats.loc[0, "ci_low"] <= stats.loc[0, "mean"] <= stats.loc[0, "ci_high"]
    assert np.isnan(stats.loc[1, "ci_low"])  # two items: no interval


@pytest.mark.slow  # plotting takes several seconds
def test_report_writes_every_output(job_frame: pd.DataFrame, tmp_path: Path) -> None:
    from bridgeprobe.analyses.memory_report import write_memory_outputs

    summary = write_memory_outputs(job_frame, tmp_path, {"model": "tiny", "n_layers": 3, "settings": {}})
    for name in ("memory_cells.csv", "memory_layers.csv", "memory_backpatch.csv", "memory_summary.json",
                 "memory_layers.png", "memory_crosspatch.png", "memory_backpatch.png", "memory.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "memory_summary.json").read_text())["statement"] == summary["statement"]


def test_batched_over_items_equals_one_at_a_time(tmp_path: Path) -> None:
    hooked = _hooked("gemma3_text")
    config = {"analyses": ("crosspatch", "decoding", "backpatch"), "backpatch_groups": ("hop_failed",)}
    one = _run(hooked, tmp_path / "one", batch_items=1, **config)
    many = _run(hooked, tmp_path / "many", batch_items=4, **config)
    assert set(one["analysis"]) == {"crosspatch", "decoding", "lens", "backpatch", "item"}
    keys = ["analysis", "prompt_id", "condition", "source_position", "source_layer", "target_layer", "metric"]
    pd.testing.assert_frame_equal(one.drop(columns="value"), many.drop(columns="value"))
    np.testing.assert_allclose(one["value"], many["value"], atol=1e-5, rtol=1e-5)
    assert not one.duplicated(keys).any()


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    hooked = _hooked("llama")
    clean = _run(hooked, tmp_path / "clean", batch_items=2)
    real = bridgeprobe.probes.memory.rows.decoding_rows
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bridgeprobe.probes.memory.analysis, "decoding_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(hooked, tmp_path / "cut", batch_items=2)
    monkeypatch.setattr(bridgeprobe.probes.memory.analysis, "decoding_rows", real)
    result = run_memory(hooked, ITEMS, tmp_path / "cut", MemoryConfig(batch_items=2), settings={"model": "tiny"})
    assert result.info["resumed_items"] == 2
    pd.testing.assert_frame_equal(clean, result.frame)
    assert not (tmp_path / "cut" / "memory.partial.csv").exists()


def test_resumed_run_times_the_whole_analysis(tmp_path: Path, monkeypatch) -> None:
    """The first session commits one chunk whose decoding takes >= PAUSE s, then dies; the resumed session's
    run.json timings (``run_memory_section``) must include that chunk's seconds, and no ledger may remain."""
    from bridgeprobe.probes.cli.memory import run_memory_section
    from bridgeprobe.probes.runs.pipeline import Timer

    pause, hooked, out = 0.5, _hooked("llama"), tmp_path / "cut"
    real = bridgeprobe.probes.memory.rows.decoding_rows
    calls = []

    def slow_then_dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(bridgeprobe.probes.memory.analysis, "decoding_rows", slow_then_dying)
    with pytest.raises(KeyboardInterrupt):
        _run(hooked, out, batch_items=2)
    ledger = json.loads((out / ".memory.timings.json").read_text())
    assert ledger["sessions"] == 1 and ledger["elapsed_s"] >= pause and ledger["analyses"]["decoding_s"] >= pause
    monkeypatch.setattr(bridgeprobe.probes.memory.analysis, "decoding_rows", real)
    timer, started = Timer(), time.perf_counter()
    done = run_memory_section(hooked, ITEMS, out, MemoryConfig(batch_items=2), {"model": "tiny"}, timer)
    this_session = time.perf_counter() - started
    assert done.info["resumed_items"] == 2 and done.info["sessions"] == 2
    assert done.info["earlier_sessions_s"] == pytest.approx(ledger["elapsed_s"])
    assert timer.timings["memory_s"] == pytest.approx(ledger["elapsed_s"] + this_session, abs=0.05)
    assert timer.timings["memory_decoding_s"] >= pause  # the resumed session itself never sleeps
    assert not (out / ".memory.timings.json").exists()
    # a fresh run ignores a ledger left without rows (e.g. its partial file was deleted by hand)
    (out / ".memory.timings.json").write_text(json.dumps({**ledger, "sessions": 7}))
    fresh = run_memory(hooked, ITEMS, tmp_path / "cut", MemoryConfig(batch_items=2, analyses=("alignment",)),
                       settings={"model": "tiny"})
    assert fresh.info["sessions"] == 1 and fresh.info["earlier_sessions_s"] == 0


def test_cosine_and_cka_equal_direct_numpy() -> None:
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    z[:, :8] += 2 * x[:, :8]
    assert cosine(x, z) == pytest.approx([a @ b / np.sqrt(a @ a * (b @ b)) for a, b in zip(x, z)])
    xc, zc = x - x.mean(0), z - z.mean(0)  # the feature-space formula (Kornblith et al. 2019, eq. 5)
    direct = np.linalg.norm(zc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(zc.T @ zc))
    assert linear_cka(x, z) == pytest.approx(direct, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(3 * x @ q + 1, z) == pytest.approx(direct, rel=1e-8)  # invariant to rotation, scale, shift
    assert linear_cka(x, x) == pytest.approx(1.0)
    # the jackknife standard error agrees with the spread of CKA over independent samples of the same distribution
    def sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.random.default_rng(seed)
        a, b = g.normal(size=(40, 16)), g.normal(size=(40, 16))
        b[:, :8] += 2 * a[:, :8]
        return a, b

    spread = np.std([linear_cka(*sample(seed)) for seed in range(200)])
    cka, low, high = jackknife_cka(x, z, np.random.default_rng(1))
    assert cka == pytest.approx(direct, rel=1e-10)
    assert low < direct < high and 0.6 < (high - low) / (2 * 1.96) / spread < 1.6


def test_jackknife_cka_equals_recentring_each_held_out_gram() -> None:
    """The block-sum jackknife equals the direct one: every held-out Gram matrix recentred and its CKA computed."""
    def direct(x: np.ndarray, z: np.ndarray, rng: np.random.Generator, groups: int) -> tuple[float, float]:
        labels = rng.permutation(len(x)) % min(groups, len(x))
        values = []
        for g in np.unique(labels):
            keep = labels != g
            values.append(linear_cka(x[keep], z[keep]))  # centres the held-out items' Gram matrices itself
        values = np.array(values)
        se = np.sqrt((len(values) - 1) / len(values) * ((values - values.mean()) ** 2).sum())
        return linear_cka(x, z), linear_cka(x, z) - 1.96 * se, linear_cka(x, z) + 1.96 * se

    rng = np.random.default_rng(3)
    for n, d, groups in ((40, 16, 20), (97, 8, 20), (25, 30, 7), (6, 4, 20)):
        x = rng.normal(size=(n, d)) + 50.0  # a large shared offset, as in the residual stream
        z = rng.normal(size=(n, d)) - 20.0
        z[:, : d // 2] += x[:, : d // 2]
        fast = jackknife_cka(x, z, np.random.default_rng(n), groups)
        assert fast == pytest.approx(direct(x, z, np.random.default_rng(n), groups), rel=1e-9, abs=1e-12)


def test_alignment_rows_equal_states_read_with_plain_hf() -> None:
    hooked = _hooked("llama")
    tok = hooked.tokenizer
    encoded = {i.id: encode(tok, i) for i in ITEMS}
    plans = make_plans(encoded, [i.id for i in ITEMS], 0)
    frame = pd.DataFrame(alignment_rows(hooked, plans, encoded))
    layer = 1
    captured = {}
    handle = _blocks(hooked.model)[layer].register_forward_hook(lambda m, a, o: captured.update(h=o[0] if isinstance(o, tuple) else o))

    def state(ids, position):
        with torch.no_grad():
            hooked.model(torch.tensor([ids]))
        return captured["h"][0, position].numpy()

    try:
        latent = np.stack([state(e.two_hop, len(e.two_hop) - 1) for e in encoded.values()])
        explicit = np.stack([state(e.hop2, e.hop2_position) for e in encoded.values()])
        partner = np.stack([state(encoded[e.item.pair].hop2, encoded[e.item.pair].hop2_position)
                            for e in encoded.values()])
    finally:
        handle.remove()
    rows = frame[(frame.source_layer == layer) & (frame.source_position == "last")].set_index(["metric", "prompt_id"])["value"]
    ids = list(encoded)
    np.testing.assert_allclose(rows.loc["cosine_matched"].loc[ids], cosine(latent, explicit), atol=1e-5)
    np.testing.assert_allclose(rows.loc["cosine_mismatched"].loc[ids], cosine(latent, partner), atol=1e-5)
    centered = cosine(latent - latent.mean(0), partner - explicit.mean(0))
    np.testing.assert_allclose(rows.loc["cosine_centered_mismatched"].loc[ids], centered, atol=1e-4)
    assert rows.loc[("cka_matched", "")] == pytest.approx(linear_cka(latent, explicit), abs=1e-5)
    dataset = frame[frame.source_layer.isna()].set_index("metric")["value"]
    assert dataset["chance_uniform"] == pytest.approx(1 / 3) and dataset["n_classes"] == 3
    assert set(frame["metric"]) >= {"probe_latent", "probe_explicit_heldout", "probe_latent_templates"}


def test_alignment_rows_are_the_same_with_any_number_of_fitting_threads() -> None:
    """The probes fitted on a pool of threads give the rows of fits run one after another on one thread, and
    the caller's thread count is restored."""
    hooked = _hooked("llama")
    encoded = {i.id: encode(hooked.tokenizer, i) for i in ITEMS}
    plans = make_plans(encoded, [i.id for i in ITEMS], 0)
    threads = torch.get_num_threads()
    pooled = pd.DataFrame(alignment_rows(hooked, plans, encoded, workers=3))
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)
    try:
        serial = pd.DataFrame(alignment_rows(hooked, plans, encoded, workers=1))
    finally:
        torch.set_num_threads(threads)
    assert pooled["metric"].str.startswith("probe_").sum() > 0
    pd.testing.assert_frame_equal(pooled, serial)


def test_alignment_reuses_the_reference_forwards_states(monkeypatch) -> None:
    """The states the items' reference forwards read are those the alignment would read itself (same prompt,
    same position); given them, it runs only the templates and writes the same rows."""
    import bridgeprobe.probes.memory.alignment as alignment
    from bridgeprobe.probes.memory.rows import reference_runs, reference_states

    hooked = _hooked("llama")
    encoded = {i.id: encode(hooked.tokenizer, i) for i in ITEMS}
    plans = make_plans(encoded, [i.id for i in ITEMS], 0)
    known = {}
    for plan, sources in zip(plans, reference_runs(hooked, plans)):
        known.update(reference_states(plan, sources))
    assert len(known) == 3 * len(ITEMS)  # last token, e1's last token, the bridge in hop2
    fresh = alignment.read_at(hooked, [(ids, [position]) for ids, position in known])[:, 0]
    torch.testing.assert_close(torch.stack(list(known.values())), fresh, atol=1e-5, rtol=1e-5)

    plain = pd.DataFrame(alignment_rows(hooked, plans, encoded, workers=1))
    forwards = []
    monkeypatch.setattr(alignment, "read_states", lambda h, prompts: forwards.append(len(prompts)) or read_states(h, prompts))
    reused = pd.DataFrame(alignment_rows(hooked, plans, encoded, workers=1, known=known))
    assert sum(forwards) == len(alignment.TEMPLATES) * len({e.bridge for e in encoded.values()})  # templates only
    pd.testing.assert_frame_equal(reused.drop(columns="value"), plain.drop(columns="value"))
    np.testing.assert_allclose(reused["value"], plain["value"], atol=1e-5, rtol=1e-5)


def test_token_ranks_with_a_token_per_state_equal_one_state_at_a_time(monkeypatch) -> None:
    from bridgeprobe.probes.readouts import lens

    hooked = _hooked("llama")
    states = torch.randn(5, hooked.n_layers, hooked.d_model) * 3
    tokens = torch.tensor([1, 7, 7, 30, 2])
    one_at_a_time = torch.stack([lens.token_ranks(hooked, s, int(t)) for s, t in zip(states, tokens)])
    together = lens.token_ranks(hooked, states, tokens[:, None].expand(states.shape[:-1]))
    assert one_at_a_time.unique().numel() > 3  # the ranks vary: a wrong token per row would show
    assert torch.equal(together, one_at_a_time)
    monkeypatch.setattr(lens, "RANK_BUDGET", 4 * 128)  # 4 of the 15 vectors per unembedding: calls split states
    assert torch.equal(lens.token_ranks(hooked, states, tokens[:, None].expand(states.shape[:-1])), one_at_a_time)


def test_probe_reads_separable_classes_and_not_shuffled_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(5, 20, generator=gen)
    y = torch.arange(5).repeat(8)
    x = centers[y] + torch.randn(40, 20, generator=gen)
    test_y = torch.arange(5).repeat(4)
    test_x = centers[test_y] + torch.randn(20, 20, generator=gen)
    probe = LinearProbe(x, y, 5)
    assert (probe.predict(test_x) == test_y).double().mean() == 1.0
    shuffled = LinearProbe(x, y[torch.randperm(40, generator=gen)], 5)
    assert (shuffled.predict(test_x) == test_y).double().mean() < 0.6


def test_probe_started_from_another_reaches_the_same_optimum() -> None:
    """A probe fitted from a related probe's function (the alignment starts a layer's probes from its
    templates-only probe) ends where the probe fitted from zero ends: same predictions, logits within the
    optimizer's tolerance; started from its own data's solution, it stays there."""
    gen = torch.Generator().manual_seed(1)
    centers = 2 * torch.randn(6, 30, generator=gen)
    y1, y2 = torch.arange(6).repeat(5), torch.arange(6).repeat(9)
    x1 = centers[y1] + torch.randn(30, 30, generator=gen)
    x2 = 1.5 * centers[y2] + torch.randn(54, 30, generator=gen) + 0.3  # more data, shifted and rescaled
    test = centers[torch.arange(6).repeat(20)] + 1.5 * torch.randn(120, 30, generator=gen)
    first = LinearProbe(x1, y1, 6)
    from_zero, started = LinearProbe(x2, y2, 6), LinearProbe(x2, y2, 6, start=first)
    assert torch.equal(started.predict(test), from_zero.predict(test))
    assert (started.logits(test) - from_zero.logits(test)).abs().max() < 1e-2
    again = LinearProbe(x1, y1, 6, start=first)
    assert (again.logits(test) - first.logits(test)).abs().max() < 1e-3


def test_cells_items_and_prompts() -> None:
    assert crosspatch_cells(6, 2) == sorted({(s, t) for s in (0, 2, 4, 5) for t in (0, 2, 4)} | {(l, l) for l in range(5)})
    assert decoding_cells(4, 1) == [(0, 0), (0, 1), (1, 1), (2, 1), (2, 2), (3, 1)]
    with pytest.raises(ValueError, match="decode layer"):
        decoding_cells(4, 3)
    chosen = sample_items(ITEMS, 4)  # round-robin over the two compositions, in file order
    compositions = [i.composition for i in chosen]
    assert compositions.count("located_in_country>capital") == 2 and chosen == sorted(chosen, key=ITEMS.index)
    prompt, demos = identity_prompt([*ITEMS, PromptItem("x", "About Mount Everest and gold is", "b", "c")])
    assert "Mount Everest" not in demos and prompt.endswith("\nx:") and prompt.count(":") == len(demos) + 1
    tok = WordTokenizer()
    assert span_end_position(tok, "The capital of France is", "France") == 4  # BOS, The, capital, of, France
    assert span_end_position(tok, "The capital of France is", "Fran") is None  # ends inside a token
    assert span_end_position(tok, "The capital of France is", "Spain") is None
    encoded = {i.id: encode(tok, i) for i in ITEMS}
    plans = make_plans(encoded, list(encoded), seed=0)
    for plan in plans:
        assert plan.c.item.id == plan.a.item.pair and plan.r.item.bridge not in {plan.a.item.bridge, plan.c.item.bridge}
        assert plan.d.item.r2 != plan.a.item.r2 and plan.e.item.bridge == plan.a.item.bridge
        assert plan.e.item.r2 == plan.d.item.r2
    assert [p.r.item.id for p in plans] == [p.r.item.id for p in make_plans(encoded, list(encoded), seed=0)]


# --------------------------------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.parametrize("model_name", [pytest.param("smollm2-135m", marks=requires_smollm2),
                                        pytest.param("gemma3-270m", marks=requires_gemma3)])
def test_identity_decoding_of_explicit_entities_works_above_chance(model_name: str) -> None:
    """The explicit bridge's own state (hop2 prompt, the bridge's last token), written into the identity prompt's
    placeholder at its own early layer, is decoded as the bridge far more often than as the partner's bridge (an
    entity of the same type: the chance level), as the decoding analysis does it."""
    from bridgeprobe.analyses.stats import sign_test
    from bridgeprobe.probes.model.load import load_model
    from bridgeprobe.prompts.loaders import load_prompts

    model, tokenizer = load_model(model_name)
    hooked = NativeHooks(model, tokenizer)
    items = load_prompts("curated")
    encoded = {i.id: encode(tokenizer, i) for i in items}
    chosen = [e for e in (encoded[i.id] for i in sample_items(items, 24))
              if e.hop2_position is not None and encoded[e.item.pair].bridge != e.bridge][:16]
    prompt, _ = identity_prompt(items)
    prompt_ids = tokenizer(prompt)["input_ids"]
    placeholder = span_end_position(tokenizer, prompt, "\nx")
    assert placeholder == len(prompt_ids) - 2
    states, _ = read_states(hooked, [(e.hop2, [e.hop2_position]) for e in chosen])
    cells = [(l, l) for l in range(4)]
    tokens = [e.bridge for e in chosen] + [encoded[e.item.pair].bridge for e in chosen]
    scores, base = patch_states(hooked, prompt_ids, placeholder, list(states[:, 0]), [cells] * len(chosen), tokens)
    own = torch.stack([s.rank(e.bridge) for s, e in zip(scores, chosen)])  # [items, layers]
    partner = torch.stack([s.rank(encoded[e.item.pair].bridge) for s, e in zip(scores, chosen)])
    top10, chance10 = (own < 10).double().mean(0), (partner < 10).double().mean(0)
    # at every layer the own bridge outranks the partner's for more items than chance allows (one-sided sign test)
    p_values = [sign_test((partner[:, layer] - own[:, layer]).numpy(), alternative="greater")[0] for layer in range(4)]
    assert len(chosen) == 16 and max(p_values) < 0.01 and (top10 - chance10 >= 0.4).all(), (p_values, top10, chance10)
    # unpatched, the identity prompt says "x" again: no bridge in first place
    assert all(base.rank(e.bridge) > 0 for e in chosen)


@pytest.mark.slow
@requires_smollm2
def test_memory_command_end_to_end(tmp_path: Path) -> None:
    from bridgeprobe.probes.cli import main

    out = tmp_path / "m"
    args = ["memory", "--model", "smollm2-135m", "--prompts", "curated", "--items", "4", "--map-items", "2",
            "--stride", "10", "--out", str(out)]
    assert main(args) == 0
    frame = pd.read_csv(out / "memory.csv", dtype={"prompt_id": str})
    assert set(frame["analysis"]) >= {"crosspatch", "decoding", "lens", "alignment", "item"}
    assert frame.loc[frame.analysis == "item", "prompt_id"].nunique() == 4
    assert frame.loc[frame.analysis == "crosspatch", "prompt_id"].nunique() <= 2
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "memory" and run["timings"]["memory_s"] > 0 and run["memory"]["map_items"] == 2
    summary = json.loads((out / "memory_summary.json").read_text())
    assert summary["statement"].startswith("smollm2-135m (30 layers): ")
    (out / "memory_summary.json").unlink()
    assert main(["memory-report", str(out)]) == 0 and (out / "memory_summary.json").is_file()
    # the checked-in controls keep memory.csv compressed: the report reads it and checks its rows the same way
    import gzip
    import shutil

    with (out / "memory.csv").open("rb") as src, gzip.open(out / "memory.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "memory.csv").unlink()
    assert main(["memory-report", str(out)]) == 0
    assert json.loads((out / "memory_summary.json").read_text())["statement"] == summary["statement"]
    with gzip.open(out / "memory.csv.gz", "rt") as fh:
        lines = fh.readlines()
    with gzip.open(out / "memory.csv.gz", "wt") as fh:  # cut short: refused like a plain file
        fh.writelines(lines[:-5])
    assert main(["memory-report", str(out)]) == 2


def test_probe_is_trained_without_the_hop2_prompts_of_its_test_relations(monkeypatch) -> None:
    """probe_latent: no training row is the explicit hop2 state of a relation its test items use; the partner
    rows say when the probe names the partner's bridge instead."""
    import bridgeprobe.probes.memory.alignment as alignment
    trained: list[torch.Tensor] = []

    class Recording(alignment.LinearProbe):
        def __init__(self, x, y, n_classes, **kwargs):
            trained.append(x.clone())
            super().__init__(x, y, n_classes, **kwargs)

    monkeypatch.setattr(alignment, "LinearProbe", Recording)
    hooked = _hooked("llama")
    encoded = {i.id: encode(hooked.tokenizer, i) for i in ITEMS}
    # one worker: the probes are fitted in layer order, as the recording below reads them
    frame = pd.DataFrame(alignment_rows(hooked, make_plans(encoded, [i.id for i in ITEMS], 0), encoded, workers=1))
    explicit = alignment.read_at(hooked, [(e.hop2, [e.hop2_position]) for e in encoded.values()])[:, 0]
    n_templates = len(alignment.TEMPLATES) * 3
    per_layer = 1 + 2  # the templates-only probe, one probe per relation set (capital, language)
    assert len(trained) == per_layer * hooked.n_layers
    for k, x in enumerate(trained):
        layer = k // per_layer
        rows_of = {r2: [i for i, item in enumerate(ITEMS) if item.r2 == r2] for r2 in ("capital", "language")}
        present = {r2: [any(torch.allclose(row, explicit[i, layer], atol=1e-4) for row in x[n_templates:])
                        for i in rows] for r2, rows in rows_of.items()}
        if k % per_layer == 0:
            assert len(x) == n_templates
        else:  # trained on the other relation's three hop2 prompts and none of its own
            assert len(x) == n_templates + 3
            assert sorted((all(v), any(v)) for v in present.values()) == [(False, False), (True, True)]
    probe = frame[frame.metric.isin(["probe_latent", "probe_latent_partner"])].pivot_table(
        index=["prompt_id", "source_position", "source_layer"], columns="metric", values="value")
    assert probe["probe_latent_partner"].isin([0.0, 1.0]).all()
    assert (probe["probe_latent"] + probe["probe_latent_partner"] <= 1).all()


def _memory_frame(n_items: int, band: tuple[int, int] | None, seed: int = 0, layers: int = 6,
                  noise: float = 0.1) -> pd.DataFrame:
    """memory.csv rows of the four band tests: paired bridge/control values per item, position and layer, with a
    bridge-minus-control effect of about 0.5 at the ``band`` layers of the last token and none elsewhere."""
    rng = np.random.default_rng(seed)
    rows = []

    def row(analysis, pid, condition, position, s, t, metric, value):
        rows.append({"analysis": analysis, "prompt_id": pid, "condition": condition, "source_id": "",
                     "receiving_id": "", "source_position": position, "source_layer": s, "target_layer": t,
                     "metric": metric, "value": value})

    for i in range(n_items):
        pid = f"i{i:03d}"
        row("crosspatch", pid, "main", "", None, None, "explicit_logit_diff", 3.0)
        row("crosspatch", pid, "main", "", None, None, "baseline_logit_diff", 0.0)
        for position in ("last", "e1_last"):
            for layer in range(layers):
                on = band is not None and position == "last" and band[0] <= layer <= band[1]
                base = rng.normal(0.3, noise)
                row("crosspatch", pid, "main", position, layer, layer, "value", base + (0.5 if on else 0) + rng.normal(0, noise))
                row("crosspatch", pid, "random", position, layer, layer, "value", base + rng.normal(0, noise))
                for condition, lift in (("other_relation", 0.5 if on else 0), ("other_relation_random", 0.0)):
                    row("crosspatch", pid, condition, position, layer, layer, "transfer_value", lift + rng.normal(0, noise))
                    row("crosspatch", pid, condition, position, layer, layer, "answer_value", rng.normal(0, noise))
                hit = rng.random() < (0.7 if on else 0.02)
                miss = rng.random() < 0.02
                row("decoding", pid, "latent", position, layer, 1, "rank", 0 if hit else 100)
                row("decoding", pid, "latent", position, layer, 1, "partner_rank", 0 if miss else 100)
                named = rng.random() < (0.7 if on else 0.02)
                row("alignment", pid, "", position, layer, None, "probe_latent", float(named))
                row("alignment", pid, "", position, layer, None, "probe_latent_partner",
                    float(not named and rng.random() < 0.02))
    return pd.DataFrame(rows)


def test_band_test_finds_a_planted_band_and_nothing_else() -> None:
    import bridgeprobe.analyses.memory_band as band
    frame = _memory_frame(60, (2, 4))
    differences = band.paired_differences(frame)
    assert set(differences.columns.get_level_values("test")) == set(band.TESTS)
    tests = band.band_test(frame, n_resamples=1999, differences=differences)
    last, e1 = band.decide(tests, "last"), band.decide(tests, "e1_last")
    assert last["status"] == "band" and last["band"] == [2, 4]
    assert e1["status"] == "none" and e1["band"] is None  # enough items: every layer is ruled out
    assert last["n"] == {t: 60 for t in band.TESTS}
    # the paired difference of the cross-patch test is main - random per item
    main = frame[(frame.condition == "main") & (frame.metric == "value") & (frame.source_position == "last")
                 & (frame.source_layer == 3)].set_index("prompt_id")["value"]
    rand = frame[(frame.condition == "random") & (frame.metric == "value") & (frame.source_position == "last")
                 & (frame.source_layer == 3)].set_index("prompt_id")["value"]
    np.testing.assert_allclose(differences[("crosspatch", "last", 3)].loc[main.index], main - rand)


def test_band_test_near_the_threshold_with_unequal_items_per_test() -> None:
    """Differences planted at 2x the minimum effect (0.2, sd 0.3) at layers 2-4 of the last token, none elsewhere,
    with the tests' item counts as unequal as in a real run (cross-patch 120, other relation 60, decoding 120,
    probe 400): the band is found, e1 is ruled out; an eighth of the items leaves the null layers undecided rather
    than "no band" (less data never gives the stronger conclusion)."""
    import bridgeprobe.analyses.memory_band as band
    rng = np.random.default_rng(3)
    items = {"crosspatch": 120, "other_relation": 60, "decoding": 120, "probe": 400}
    columns, data = [], []
    for test, n in items.items():
        for position in ("last", "e1_last"):
            shared = rng.normal(size=400)
            for layer in range(6):
                effect = 0.2 if position == "last" and 2 <= layer <= 4 else 0.0
                values = effect + 0.3 * (0.6 * shared + 0.8 * rng.normal(size=400))
                values[n:] = np.nan
                columns.append((test, position, layer))
                data.append(values)
    differences = pd.DataFrame(np.column_stack(data), columns=pd.MultiIndex.from_tuples(
        columns, names=["test", "position", "layer"]))
    tests = band.band_test(pd.DataFrame(), n_resamples=1999, differences=differences)
    assert band.decide(tests, "last")["band"] == [2, 4]
    assert band.decide(tests, "e1_last")["status"] == "none"
    fewer = differences.copy()
    for test, n in items.items():
        fewer.loc[n // 8:, test] = np.nan
    assert band.decide(band.band_test(pd.DataFrame(), n_resamples=1999, differences=fewer),
                       "e1_last")["status"] == "undecided"


def test_band_test_says_when_items_are_too_few_and_old_files_lack_the_probe_control() -> None:
    """Five items without any effect can rule nothing out (undecided, with the items that would decide it), and
    five items whose every test shows a large, consistent effect are already a band: an exact sign-flip test of
    5 items reaches p = 1/32, below the family-wise 5% (the rule's error rates: tests/test_calibration.py)."""
    import bridgeprobe.analyses.memory_band as band
    few = band.decide(band.band_test(_memory_frame(5, None, noise=0.3), n_resamples=999), "last")
    assert few["status"] == "undecided" and few["n"]["probe"] == 5
    assert few["to_decide"]["items"] > 5 and few["to_decide"]["test"] in band.TESTS
    strong = band.decide(band.band_test(_memory_frame(5, (2, 4), noise=0.1), n_resamples=999), "last")
    assert strong["status"] == "band" and 2 <= strong["band"][0] <= strong["band"][1] <= 4
    old = _memory_frame(60, (2, 4))
    old = old[old.metric != "probe_latent_partner"]
    decision = band.decide(band.band_test(old, n_resamples=999), "last")
    assert decision["status"] == "undecided" and decision["n"]["probe"] == 0


def test_memory_summary_states_the_decision_and_the_sensitivity_table() -> None:
    import bridgeprobe.analyses.memory_band as band
    import bridgeprobe.analyses.memory_tables as tables
    frame = _memory_frame(60, (2, 4))
    summary = band.summarize(frame, tables.curves(frame), tables.backpatch_table(frame), "toy", 7)
    assert "at the last token, band 2-4 (all four tests hold" in summary["statement"]
    assert "at e1's last token, no band" in summary["statement"]
    assert summary["band"] == [2, 4] and summary["test"]["n_tests"] == 4 * 6 * 2
    settings = [row["setting"] for row in summary["sensitivity"]]
    assert settings == ["as set", "alpha halved", "alpha doubled", "min effect halved", "min effect doubled",
                        "min gap halved", "min gap doubled"]
    assert summary["sensitivity"][0]["last"] == "band 2-4"
    small = band.summarize(_memory_frame(4, (2, 4)), pd.DataFrame(columns=list(tables.CURVE_COLUMNS)),
                           pd.DataFrame(), "toy", 7)
    assert "not enough items to decide (n = cross-patch 4, other relation 4, decoding 4, probe 4" in small["statement"]
    assert small["band"] is None
