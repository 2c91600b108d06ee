"""The shared-memory analyses: where the bridge that hop 1 computes inside a two-hop prompt lives relative to where
hop 2 reads an explicit bridge (cross-patching, decoding, back-patching: :mod:`probes.memory.analysis`) and how well
the two kinds of state align (:mod:`probes.memory.alignment`).

May import: ``probes.io``, ``probes.model``, ``prompts``, ``probes.readouts``, ``probes.runs``.
"""
