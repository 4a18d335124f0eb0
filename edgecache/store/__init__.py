"""The cache on disk: the content-addressed store (`blobs`), its SQLite index (`index`), the LRU
accounting and eviction that keep it within its size (`keeper`), manifests and tag entries
(`manifests`), and which repositories are known to hold which digests (`membership`).

Imports the vocabulary, config and metrics only: the store never talks to an upstream or a client.
"""
