"""Models: everything about the estimators inferq serves.

- ``registry``: versions and their artifact bytes in Postgres, stages, the per-process cache.
- ``formats``: artifact formats (skops, joblib, pickle) and what a file may be trusted with.
- ``schema``: input schemas: declared, normalised, validated per row and field;
  ``schema_infer`` derives one from a fitted estimator; ``encoding`` builds each batch's
  model input from validated rows.
- ``runtime``: the ``Runtime`` interface and its scikit-learn and ONNX implementations.
- ``intake``: registering a user's own artifact, with every check before anything is stored.
- ``mlflow_source``: reading models out of an MLflow registry (``mlflow_client``: the
  server calls and their errors); ``follow``: keeping a production version in step with
  an MLflow alias.
- ``features``: feature tables (a model's own table of entities), checked and read
  through the Redis feature cache.
- ``catalog`` and ``training``: the built-in demo models and how inferq trains them.
"""
