"""The Celery edge: the app and its one task (``celery_app``), running one job row
(``runner``) and the sweep that requeues and resends jobs (``outbox``)."""
