"""Benchmarks of virtwarden against the bare operations it is built from.

``python -m bench.run`` (or ``make bench``) creates one OS-less guest, fills its disk with
random data, drives a real ``virtwarden worker`` through the CLI and compares each job
with the plain tool doing the same work on the same bytes (cp, boto3, qemu-img).
docs/benchmarks.md explains the figures.
"""
