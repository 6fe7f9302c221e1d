"""The runtime edge: Celery app and tasks, CLI, and (later) listener, scheduler and API."""
