"""Micro-batching, the online path's heart: jobs committed by the API wait on pending lists,
and a draining worker takes them a batch at a time.

- ``pending``: the protocol (pending lists, doorbell, in-flight lists, the drain, help).
- ``inference``: one batch's model calls, one per model version, and its prediction logs.

The API's half is ``api.submitter`` (group commit, then push and ring); the worker's half
is ``workers.tasks.predict`` (pop, claim, predict, settle, mirror, pop again).
"""
