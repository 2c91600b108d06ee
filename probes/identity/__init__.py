"""The identity experiments' parts (Lin, Chen, Xu 2025; Ma et al. 2026): their data on disk and presets
(:mod:`probes.identity.data`), from-scratch training (:mod:`probes.identity.scratch`) and the analysis of trained
models (:mod:`probes.identity.scratch_analysis`), LoRA fine-tuning (:mod:`probes.identity.finetune`) and
full-parameter chat fine-tuning (:mod:`probes.identity.chat_sft`). The commands that run them end to end and write
their reports are :mod:`probes.jobs`.

May import: ``probes.io``, ``probes.model``, ``prompts``, ``probes.readouts``, ``probes.runs``, ``probes.memory``.
"""
