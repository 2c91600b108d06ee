"""Readouts and interventions on a hooked model: the logit lens (:mod:`probes.readouts.lens`) and its variants
(:mod:`probes.readouts.variants`), per-head outputs (:mod:`probes.readouts.heads`), the exact activation-patching
engine (:mod:`probes.readouts.patching`) and attribution patching (:mod:`probes.readouts.attribution`).

May import: ``probes.io``, ``probes.model``, ``prompts``.
"""
