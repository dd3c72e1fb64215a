"""The HTTP API: accepts jobs and answers at once, shows jobs and models."""
