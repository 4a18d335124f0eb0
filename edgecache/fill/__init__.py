"""Single-flight fills: one fetch per object however many clients ask (`flights` for blobs that
stream through a spool, or through a bounded memory `window` when they cannot be stored;
`coalesce` for small answers such as manifests and tag look-ups).

A fill reads from a `BlobSource` (a Protocol: the upstream client, or an in-memory source in
tests) and writes into the store. Imports the vocabulary, metrics and `store`; never `upstream`
itself, the use case or a front.
"""
