"""Aggregation, statistics, plots and reports: the report writers read the tables a run wrote and write pages,
summaries and figures from them, so every report can be rebuilt without the model.

May import: ``probes.io`` (the tables), ``probes.model`` (model provenance), ``prompts``; never the experiment code
(``probes.readouts`` and above): jobs and the CLI compose experiments with their reports.
"""
