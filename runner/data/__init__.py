"""Prompts in and results out: `spec` (the job's `dataset` section), `dataset` + `formats` (streaming
records and rejects per format), `outputs` (generation records and the throughput CSV, whose columns are
declared there once), `reports` (batches.csv and report.png).

May import: `runner.spec`, `runner.units`. Nothing else of the project.
"""
