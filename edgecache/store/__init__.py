"""The cache on disk: the content-addressed store (`blobs`), what identifies a stored file
(`identity`), its SQLite index (`index`), the LRU accounting, reservations and eviction that keep it
within its size and quarantine what changed (`keeper`), manifests and tag entries (`manifests`),
which repositories are known to hold which digests (`membership`) and what a rebuilt index can
recover of that (`recovery`), and the background scrubber (`scrub`).

Imports the vocabulary, config and metrics only: the store never talks to an upstream or a client.
"""
