"""Prompt sets for the shared-memory analysis's positive and negative controls: the same items, the same
partners and controls, with the first entity of each two-hop prompt replaced so that the state at e1's last
token *is*, or certainly *is not*, an explicit state of the item's bridge.

- ``present``: e1 becomes the bridge itself ("The capital of the country where France is located is"): the
  latent state at e1's last token is the bridge written out, so every test of the band (cross-patching,
  the other-relation control, decoding, the probe) should find it there.
- ``absent``: e1 becomes another item's bridge of the same type, never the item's own or its partner's
  ("The capital of the country where Japan is located is"): the state at e1 carries an entity, but not the
  bridge, so every test should find nothing beyond its control.

Run both through ``bridgeprobe memory`` exactly as a real set; reports/memory-controls/ holds the result.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from bridgeprobe.prompts.schema import PromptItem

KINDS = ("present", "absent")


def control_items(items: Sequence[PromptItem], kind: str, seed: int = 0) -> list[PromptItem]:
    """The ``kind`` control set of ``items``: every item with an ``e1`` that occurs once in its two-hop prompt,
    with e1 replaced as described in the module docstring (``absent``: a bridge drawn, with ``seed``, from the
    items of the same first relation, differing from the item's and its partner's bridge). Items without such an
    e1, and pairs pointing outside the result, are dropped or unpaired."""
    if kind not in KINDS:
        raise ValueError(f"control kind must be one of {', '.join(KINDS)}, got {kind!r}")
    by_id = {item.id: item for item in items}
    bridges: dict[str | None, list[str]] = defaultdict(list)
    for item in items:
        if item.bridge not in bridges[item.r1]:
            bridges[item.r1].append(item.bridge)
    kept = []
    for item in items:
        if not item.e1 or item.two_hop.count(item.e1) != 1:
            continue
        if kind == "present":
            entity = item.bridge
        else:
            partner = by_id.get(item.pair) if item.pair else None
            avoid = {item.bridge.lower(), partner.bridge.lower() if partner else ""}
            pool = [b for b in bridges[item.r1] if b.lower() not in avoid and b.lower() not in item.two_hop.lower()]
            if not pool:
                continue
            entity = random.Random(f"{seed}/{item.id}").choice(sorted(pool))
        kept.append(PromptItem(**{**item.to_dict(), "two_hop": item.two_hop.replace(item.e1, entity), "e1": entity}))
    ids = {item.id for item in kept}
    return [item if item.pair is None or item.pair in ids else PromptItem(**{**item.to_dict(), "pair": None})
            for item in kept]
