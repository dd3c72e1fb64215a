"""Jobs: what a job is and how its status changes.

- ``fields``: the one definition of a job (states, types, priorities, fields), its public
  view, the hot copy and the done message.
- ``store``: the state machine in Postgres (claim, settle, fail, cancel) and the hot
  copies in Redis (``mirror``).
- ``callbacks``: the callback URL rules and the delivery of an ended job's view.
"""
