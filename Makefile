# Every entry point prepares this machine first: scripts/testhost.sh installs what is missing,
# starts libvirtd (two hosts), Redis and the S3 endpoint, and writes their addresses to
# .testhost/env. It is idempotent and takes a second or two when all is already running.
#   make test PYTEST_ARGS="-k backup -x"      (add -n 0 to run in one process)

SHELL := /bin/bash
PYTEST_ARGS ?=
# testhost.sh creates .venv only where python3 refuses `pip install` (PEP 668). Decide at
# run time, after it ran, so the first run on a fresh machine already uses the venv.
PY = "$$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)"
WITH_ENV = set -a && . .testhost/env && set +a &&

.PHONY: testhost lint test demo bench compose-env

testhost:
	bash scripts/testhost.sh

# ruff and mypy, as configured in pyproject.toml (installs them first where they are missing).
lint:
	bash scripts/lint.sh

# Three pytest workers on the 2-core machines: with two, half of the CPU stands idle
# (tests wait out leases, agent timeouts and migrations): the suite took 325 s with two
# (PYTEST_WORKERS=2) and 263 s with three, from a fresh clone. Tests that use the second host run on one
# worker (xdist_group "host2"). The 25 slowest tests are listed at the end: where the time goes.
PYTEST_WORKERS ?= 3
test: testhost
	$(WITH_ENV) $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

demo: testhost
	$(WITH_ENV) $(PY) -m virtwarden.cli.demo

bench: testhost
	$(WITH_ENV) $(PY) -m bench.run

# compose.yaml takes MinIO's and PostgreSQL's passwords from .env: generated here once
# (never overwritten), readable by root only.
compose-env:
	@if [ -e .env ]; then echo ".env exists: kept"; else \
	  umask 077 && printf 'MINIO_ROOT_PASSWORD=%s\nPOSTGRES_PASSWORD=%s\n' \
	    "$$(openssl rand -hex 24)" "$$(openssl rand -hex 24)" > .env && echo "wrote .env (mode 600)"; fi
