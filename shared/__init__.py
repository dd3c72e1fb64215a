"""What the API, the workers and the command line share. Top-level modules are the
platform (settings, database, broker, logs, metrics, keys); the packages are the domain:
``jobs``, ``batching``, ``models``, ``scoring``, ``monitoring``, and ``devstack`` for
running it all on one machine. README, Development, has the whole tree."""
