"""Small JSON documents from outside services that are not registries: an OIDC issuer's discovery
document and key set. Kept here because this package is the only aiohttp client code; the access
layer gets the fetch as a plain callable (access.oidc.Fetch) from the wiring.

One short-lived request per fetch, a whole-request deadline, a size cap, no redirects to elsewhere
and no credentials sent: these documents are public.
"""

from __future__ import annotations

import ssl

import aiohttp

from edgecache.upstream.client import read_capped

MAX_DOCUMENT = 1024 * 1024


class DocumentFetcher:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}

    async def __call__(self, url: str, *, deadline: float, ca_file: str) -> bytes:
        """GET `url`: the body of a 200 answer, at most MAX_DOCUMENT bytes; raises otherwise."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = ssl.create_default_context(cafile=ca_file or None)
        timeout = aiohttp.ClientTimeout(total=deadline)
        async with self._session.get(
            url, timeout=timeout, ssl=context, allow_redirects=False, headers={"Accept": "application/json"}
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await read_capped(resp, MAX_DOCUMENT)
            if body is None:
                raise ValueError("document too large")
            return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
