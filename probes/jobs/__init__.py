"""Jobs: the identity experiments end to end, one module per command that ends in a report (``reproduce`` and
``identity-grid``, ``finetune``, ``finetune-lens``, ``reversal-sft``). A job runs the experiment's parts
(:mod:`probes.identity`, with the model, readout and run rooms below it), writes its tables, then its report
(:mod:`analyses`), then marks the run finished (:func:`probes.runs.rundir.write_finished`), so that a run is finished
only when every file exists. The CLI parses flags and calls these.

May import: every room of ``probes`` below it, ``prompts`` and ``analyses``; imported only by ``probes.cli``.
"""
