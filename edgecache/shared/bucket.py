"""The bucket, through obstore (Rust object_store: signing, multipart, ranged reads; chosen over
aiobotocore on figures measured against radosgw, bench/RESULTS.md). Every call has the tier's own
deadlines, and every failure becomes a `TierError` with a kind from a closed set (metrics, health), a
message without credentials, keys or exception text from the library.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import ObjectStore, S3Store

from edgecache.config import SharedConfig
from edgecache.errors import ConfigError
from edgecache.oci import Digest
from edgecache.sizes import parse_size
from edgecache.upstream.pace import BodyPace, Deadlines

T = TypeVar("T")
# An S3 answer's status as the client library words it ("... status code: 404 Not Found"), never
# a number that only happens to be in the error's text (the endpoint's port, a bucket name).
_STATUS = re.compile(r"\b(?P<code>404 Not Found|403 Forbidden)\b")
PART_SIZE = 8 * 1024 * 1024
PART_CONCURRENCY = 4
READ_CHUNK = 1024 * 1024


class TierError(Exception):
    """A bucket request that failed; `kind` is one of metrics.SHARED_ERRORS (timeout, unavailable,
    denied, corrupt, other); `deadline` when it missed one (the tier goes down at once)."""

    def __init__(self, kind: str, message: str, *, deadline: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.deadline = deadline


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = ""

    def __repr__(self) -> str:  # never the secret, whatever prints it
        return "Credentials(<hidden>)"


def load_credentials(config: SharedConfig, env: Mapping[str, str] | None = None) -> Credentials | None:
    """From `credentials_file` (AWS shared-credentials format, profile `default`), else from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; None: anonymous requests."""
    env = os.environ if env is None else env
    if config.credentials_file:
        parser = configparser.ConfigParser()
        try:
            with open(os.path.expanduser(config.credentials_file), encoding="utf-8") as fh:
                parser.read_file(fh)
        except (OSError, configparser.Error):
            raise ConfigError(f"shared.credentials_file: {config.credentials_file} cannot be read") from None
        section = parser["default"] if parser.has_section("default") else None
        key = section.get("aws_access_key_id", "") if section is not None else ""
        secret = section.get("aws_secret_access_key", "") if section is not None else ""
        if not key or not secret:
            raise ConfigError(
                f"shared.credentials_file: {config.credentials_file} needs [default] with "
                "aws_access_key_id and aws_secret_access_key"
            )
        return Credentials(key, secret)
    key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if key and secret:
        return Credentials(key, secret)
    return None


def blob_key(prefix: str, digest: Digest) -> str:
    return f"{prefix}blobs/{digest.algorithm}/{digest.hex}"


def manifest_key(prefix: str, digest: Digest) -> str:
    return f"{prefix}manifests/{digest.algorithm}/{digest.hex}"


class Bucket:
    """One bucket on one endpoint. Objects are immutable and named by digest: nothing here needs
    conditional requests or versions."""

    def __init__(
        self, config: SharedConfig, credentials: Credentials | None, store: ObjectStore | None = None
    ) -> None:
        """`store`: another obstore store in place of the S3 one (the pure tests' MemoryStore)."""
        self.prefix = (
            config.prefix if not config.prefix or config.prefix.endswith("/") else config.prefix + "/"
        )
        self.name = config.bucket
        self.deadlines = Deadlines(
            connect=config.connect_timeout,
            headers=config.header_timeout,
            stall=config.stall_timeout,
            min_rate=parse_size(config.min_rate, "shared.min_rate"),
            rate_window=config.rate_window,
        )
        self.multipart_threshold = parse_size(config.multipart_threshold, "shared.multipart_threshold")
        client: dict[str, object] = {
            "allow_http": config.endpoint.startswith("http://"),
            "connect_timeout": timedelta(seconds=config.connect_timeout),
            # A backstop only: each phase has its own deadline below, and a large upload may take long.
            "timeout": timedelta(hours=1),
            "user_agent": "edgecache",
        }
        if config.ca_bundle:
            client["root_certificate"] = Path(os.path.expanduser(config.ca_bundle)).read_bytes()
        auth: dict[str, object] = (
            {"access_key_id": credentials.access_key_id, "secret_access_key": credentials.secret_access_key}
            if credentials is not None
            else {"skip_signature": True}
        )
        # No retries inside the library: a failing bucket is skipped for the upstream at once, and
        # the tier's health decides when to ask it again.
        self._store: ObjectStore = store or S3Store(
            config.bucket,
            endpoint=config.endpoint.rstrip("/"),
            region=config.region,
            virtual_hosted_style_request=False,
            client_options=client,  # type: ignore[arg-type]
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
            **auth,  # type: ignore[arg-type]
        )

    async def check(self) -> None:
        """At start-up: the bucket exists and takes our credentials (a listing under the prefix);
        raises ConfigError, one line, when it does not. An endpoint that does not answer is an
        outage, not a mistake in the config: TierError (the tier starts down; a probe brings it up)."""
        where = f"shared.bucket {self.name!r}"
        try:
            await asyncio.wait_for(
                obstore.list_with_delimiter_async(self._store, self.prefix or None),
                self.deadlines.connect + self.deadlines.headers,
            )
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such bucket on the endpoint") from None
        except (PermissionDeniedError, UnauthenticatedError):
            raise ConfigError(f"{where}: the endpoint refused our credentials") from None
        except TimeoutError:
            raise TierError(
                "timeout", f"{where}: the endpoint did not answer in time", deadline=True
            ) from None
        except Exception as exc:
            refusal = start_up_refusal(str(exc))
            if refusal is not None:
                raise ConfigError(f"{where}: {refusal}") from None
            raise TierError(
                "unavailable",
                f"{where}: the endpoint cannot be reached ({type(exc).__name__})",
                deadline=True,
            ) from None

    async def exists(self, key: str) -> bool:
        try:
            await self._deadline(obstore.head_async(self._store, key), self.deadlines.headers)
        except FileNotFoundError:
            return False
        return True

    async def get_small(self, key: str, limit: int) -> tuple[str | None, bytes] | None:
        """A small object whole (a manifest) with its Content-Type, or None when the bucket does not
        hold it."""
        try:
            result = await self._deadline(
                obstore.get_async(self._store, key), self.deadlines.connect + self.deadlines.headers
            )
            if int(result.meta["size"]) > limit:
                raise TierError("corrupt", "object larger than any manifest")
            body = bytes(await self._deadline(result.bytes_async(), self.deadlines.stall))
        except FileNotFoundError:
            return None
        content_type = result.attributes.get("Content-Type")
        return (content_type if isinstance(content_type, str) else None), body

    async def open(self, key: str, offset: int = 0) -> tuple[int, AsyncIterator[bytes]] | None:
        """(size of the whole object, its bytes from `offset` in chunks of about a MiB), or None when
        it is not there. Each chunk must come within the stall deadline, and the body faster than
        the minimum rate; a ranged read (`offset`) resumes one that broke off."""
        options: dict[str, object] = {"range": {"offset": offset}} if offset else {}
        try:
            result = await self._deadline(
                obstore.get_async(self._store, key, options=options),  # type: ignore[arg-type]
                self.deadlines.connect + self.deadlines.headers,
            )
        except FileNotFoundError:
            return None
        size = int(result.meta["size"])
        stream = result.stream(min_chunk_size=READ_CHUNK)
        pace = BodyPace(self.deadlines)

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                try:
                    chunk = await self._deadline(anext(stream), self.deadlines.stall)
                except StopAsyncIteration:
                    return
                data = bytes(chunk)
                try:
                    pace.note(len(data))
                except Exception:
                    raise TierError("timeout", "shared tier read trickled", deadline=True) from None
                yield data

        return size, chunks()

    async def put_file(self, key: str, path: Path, size: int) -> None:
        """Upload a stored file; multipart (8 MiB parts, 4 at once) above the threshold."""
        multipart = size > self.multipart_threshold
        await self._deadline(
            obstore.put_async(
                self._store,
                key,
                path,
                use_multipart=multipart,
                chunk_size=PART_SIZE,
                max_concurrency=PART_CONCURRENCY,
            ),
            # At least the minimum rate (a stalled upload fails, its slot is freed).
            self.deadlines.headers + size / max(self.deadlines.min_rate, 64 * 1024),
        )

    async def put_bytes(self, key: str, body: bytes, content_type: str | None = None) -> None:
        attributes = {"Content-Type": content_type} if content_type else None
        await self._deadline(
            obstore.put_async(self._store, key, body, attributes=attributes),
            self.deadlines.headers * 2,
        )

    async def delete(self, key: str) -> None:
        await self._deadline(obstore.delete_async(self._store, key), self.deadlines.headers)

    @staticmethod
    async def _deadline(awaitable: Awaitable[T], seconds: float) -> T:
        """Await with a deadline, mapping the library's failures to TierError kinds (FileNotFoundError
        passes: a missing object is an answer, not a failure)."""
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except (FileNotFoundError, StopAsyncIteration, TierError):
            raise
        except TimeoutError:
            raise TierError("timeout", "shared tier missed a deadline", deadline=True) from None
        except (PermissionDeniedError, UnauthenticatedError):
            raise TierError("denied", "shared tier refused our credentials") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind = "unavailable" if _looks_unreachable(exc) else "other"
            raise TierError(kind, f"shared tier request failed ({type(exc).__name__})") from None


def _looks_unreachable(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        word in text
        for word in ("connect", "connection", "refused", "reset", "timed out", "503", "500", "502")
    )


def start_up_refusal(text: str) -> str | None:
    """What an S3 error's text says about our configuration, when it is a refusal rather than an
    outage: the bucket missing, or our credentials refused. None for anything else."""
    status = _STATUS.search(text)
    code = status["code"][:3] if status else ""
    if "NoSuchBucket" in text or code == "404":
        return "no such bucket on the endpoint"
    if "AccessDenied" in text or "SignatureDoesNotMatch" in text or code == "403":
        return "the endpoint refused our credentials"
    return None
