"""The model layer: load a model (:mod:`probes.model.load`: embedded GGUF, local directories and hub names, one
code path; adapters), the per-architecture table of module names (:mod:`probes.model.architecture`), hooks on the
HF modules (:mod:`probes.model.hooks`) and the TransformerLens backend (:mod:`probes.model.tl_backend`) behind one
interface, residual states (:mod:`probes.model.states`) and answer targets as token ids on every tokenizer family
(:mod:`probes.model.targets`).

May import: nothing of the package (the rooms above it build on it).
"""
