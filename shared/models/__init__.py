"""Models: everything about the estimators inferq serves.

- ``registry``: versions and their artifact bytes in Postgres, stages, the per-process cache.
- ``formats``: artifact formats (skops, joblib, pickle) and what a file may be trusted with.
- ``schema``: input schemas: inferred, declared, validated, built into each batch's input.
- ``runtime``: the ``Runtime`` interface and its scikit-learn and ONNX implementations.
- ``intake``: registering a user's own artifact, with every check before anything is stored.
- ``mlflow_source``: reading models out of an MLflow registry; ``follow``: keeping a
  production version in step with an MLflow alias.
- ``catalog`` and ``training``: the built-in demo models and how inferq trains them.
"""
