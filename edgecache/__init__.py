"""edgecache: a pull-through caching proxy for OCI container registries.

The package is layered; a module imports only from its own layer or lower ones (checked in CI by
import-linter, see `[tool.importlinter]` in pyproject.toml):

    5 wiring & operators   app, cli, sdnotify, ops/
    4 fronts               http/        (the only aiohttp server and granian code)
    3 use case             pull
    2 parts                fill/ → store/, upstream/   (upstream/ holds the only aiohttp client code)
    1 policy & config      access/, config, metrics, trace, usage
    0 vocabulary           errors, oci, sizes
"""

__version__ = "0.2.0"
