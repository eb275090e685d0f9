"""The job: what a job is and where it runs, before anything starts.

`spec` (the validated `JobSpec`, and the rules between its sections), `sections` (each section's
keys, types and defaults), `config` (YAML, `--set`, `${VAR}`), `errors` (`UserError`, shown as one
line), `metric_names`, `continuation` (whether a stored run can go on under a spec), `cluster`
(how this process reaches Ray).

May import: nothing else in rayganx.
"""
