"""Running a readout over a prompt set: the lens and patching runs with model options and run records
(:mod:`probes.runs.pipeline`), run directories that lock, fingerprint, resume and mark a run finished
(:mod:`probes.runs.rundir`), one run split over several processes (:mod:`probes.runs.distributed`), checks of the
inputs against the loaded tokenizer (:mod:`probes.runs.checks`) and the fidelity of fast variants against the
reference (:mod:`probes.runs.fidelity`).

May import: ``probes.io``, ``probes.model``, ``prompts``, ``probes.readouts``.
"""
