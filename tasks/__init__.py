"""Jobs as plain functions over small typed objects; no Celery, no libvirt here."""
