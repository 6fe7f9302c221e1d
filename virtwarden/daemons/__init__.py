"""The long-running processes beside the workers: the scheduler (backup windows and
other cron slots) and the listener (libvirt events, with ``reconcile`` for what
happened while it was not connected)."""
