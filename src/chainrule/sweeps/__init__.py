"""Sweeps: Hydra multiruns read back as one table, scaling-law fits and plots.

    python train.py -m sweep=transformer_scaling_cpu     # the presets in chainrule/conf/sweep/
    chainrule-report multirun/transformer_scaling_cpu/<time>   # or python -m chainrule.sweeps

job.py       what identifies a job of a multirun; its failure record (failed.json)
results.py   a sweep directory read back: jobs, overrides, metrics, curves
powerlaw.py  L = a * N^-alpha (+ e) fitted in log space, with standard errors
plots.py     the figures (matplotlib, Agg canvas)
report.py    the Markdown/CSV report and the chainrule-report command
"""
