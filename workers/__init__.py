"""The worker and beat processes: Celery tasks that do the CPU-bound work."""
