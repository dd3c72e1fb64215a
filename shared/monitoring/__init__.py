"""Watching the models: what each version saw when it was made, and how live traffic
compares with it.

- ``profile``: a version's reference profile (quantile bins, category shares, scores).
- ``drift``: the statistics (PSI, Kolmogorov-Smirnov, chi-squared) of a window against it.
- ``reports``: windows read from prediction logs and score runs; reports stored, read and
  published as metrics.
- ``shadow``: a staging version scoring a sample of production traffic, compared with it.
"""
