"""edgecache: a pull-through caching proxy for OCI container registries.

The package is layered; a module imports only from its own layer or lower ones (checked in CI by
import-linter: `[tool.importlinter]` in pyproject.toml), and the two `|` groups never import each other:

    6 operators            cli (and __main__), ops/ (warm starts an instance: it sits above app)
    5 wiring               app (the composition root), sdnotify
    4 fronts               http/  front, routes, send (framework-free); aiohttp and granian adapters
    3 use case             trust  (the signature gate) above pull (reaches the upstream only through
                           its Upstream Protocol)
    2 parts                shared/ (the object-storage tier) above fill/ above
                           store/ | upstream/ | access/
    1 policy & config      config, metrics, trace, usage
    0 vocabulary           oci, sizes, errors, outcomes

aiohttp's server and granian are imported only by the adapters in http/, by app, and by ops/warm
(which serves an instance on loopback for its own requests). Requests to upstreams are made only in
upstream/ (aiohttp's client, and http.client for blob bodies read on threads); ops/ is a client of
edgecache itself, shared/ of an S3 bucket (obstore).
"""

__version__ = "0.5.2"
