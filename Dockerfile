# The virtwarden image: one image for every process (worker, listener, scheduler, api).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev libvirt-clients pkg-config gcc qemu-utils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir '.[postgres]'
ENTRYPOINT ["virtwarden"]
CMD ["--help"]
