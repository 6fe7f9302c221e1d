"""Repository format 2: content-addressed, deduplicated, compressed and encrypted chunks
(docs/repository-format.md).

- ``keys``: the repository key and the passphrase-wrapped key file that holds it.
- ``objects``: how a chunk, index or manifest becomes the bytes a backend stores.
- ``index``: one disk of one point as the list of its chunks.
"""
