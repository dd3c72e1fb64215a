"""Population scoring: every entity of a segment of a model's feature table, read from
and written back to Postgres.

- ``plan``: the segment checked, the run planned into chunks, the run finalized.
- ``chunk``: one chunk read with a COPY, predicted, written back exactly once.
- ``partitions``: each run's own partition of ``predictions``, dropped whole.
- ``pgcopy``: PostgreSQL's binary COPY format, both ways, as numpy arrays.
"""
