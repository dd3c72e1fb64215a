"""The API's routers: jobs, models, operations."""
