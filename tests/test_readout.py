"""The logit-lens readout applies the model's own output scaling (Cohere's ``logit_scale``, Granite's
``logits_scaling``, Gemma's soft cap): on tiny random models the last lens layer equals the model's own logits,
and lens rows' last-layer log-probabilities equal the log-softmax of HF's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig

from conftest import CharTokenizer, tiny_model
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import lens_batch, lens_queries
from bridgeprobe.prompts.schema import PromptItem

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
SCALED = {
    # non-default values far from 1, so a readout that skips them is far off
    "cohere": lambda: CohereConfig(**SIZES, logit_scale=0.25),
    "granite": lambda: GraniteConfig(**SIZES, logits_scaling=8.0),
    "gemma3_text": None,  # conftest's tiny Gemma 3, soft cap 30
}


def _model(kind: str) -> torch.nn.Module:
    if SCALED[kind] is None:
        return tiny_model(kind)
    torch.manual_seed(0)
    config = SCALED[kind]()
    config.architectures = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", sorted(SCALED))
def test_last_lens_layer_is_the_models_own_logits(kind: str) -> None:
    model = _model(kind)
    hooked = NativeHooks(model, CharTokenizer())
    ids = torch.tensor([[0, 5, 9, 17, 33, 2, 71]])
    with torch.no_grad():
        own = model(input_ids=ids).logits.float()
        result = hooked.run(ids, read=[("resid_post", hooked.n_layers - 1)])
        lens = hooked.readout(result.acts[("resid_post", hooked.n_layers - 1)]).float()
        unscaled = hooked.modules.unembed(hooked.modules.final_norm(result.acts[("resid_post", hooked.n_layers - 1)]))
    torch.testing.assert_close(lens.log_softmax(-1), own.log_softmax(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lens, own, rtol=0, atol=1e-4)
    if SCALED[kind] is not None:  # the scaling matters (a tiny random Gemma's logits stay far below its cap)
        assert (unscaled.float().log_softmax(-1) - own.log_softmax(-1)).abs().max() > 1e-2

    queries = lens_queries([PromptItem("a", "hello there", "xy", "z"), PromptItem("b", "hi", "q", "rs")])
    rows = [r for r in lens_batch(hooked, queries) if r["layer"] == hooked.n_layers - 1]
    tokenizer = hooked.tokenizer
    for q, row in zip(queries, rows):
        assert (q.prompt_id, q.target) == (row["prompt_id"], row["target"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokenizer(q.prompt)["input_ids"]])).logits[0, -1].float()
        assert row["logprob"] == pytest.approx(float(logits.log_softmax(-1)[row["token_id"]]), abs=1e-5)
