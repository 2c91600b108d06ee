"""Prompt sets as data: the schema (:mod:`prompts.schema`), the bundled sets and their loaders
(:mod:`prompts.loaders`), sampling (:mod:`prompts.sampling`), matched controls (:mod:`prompts.controls`), synthetic
two-hop knowledge (:mod:`prompts.synthetic`), the reversal data (:mod:`prompts.reversal`, :mod:`prompts.couples`)
and the builder of the curated set (:mod:`prompts.build_curated`).

May import: ``probes.io``, ``probes.model`` (token targets and the embedded tokenizers).
"""
