"""The error tree: every failure a client can see, each leaf knowing its OCI code and HTTP status.

    EdgecacheError
    ├── ClientError                 the request itself is wrong, or not allowed (4xx)
    │   ├── NameInvalid             NAME_INVALID        400
    │   ├── TagInvalid              TAG_INVALID         400
    │   ├── DigestInvalid           DIGEST_INVALID      400
    │   ├── RangeInvalid            RANGE_INVALID       416 (with Content-Range: bytes */N)
    │   ├── ParameterInvalid        PAGINATION_NUMBER_INVALID 400
    │   ├── BadRequest              UNSUPPORTED         400 (malformed HTTP)
    │   │   └── HeadersTooLarge     UNSUPPORTED         431
    │   ├── Unsupported             UNSUPPORTED         405 (push, delete, catalog)
    │   ├── RouteUnknown            UNSUPPORTED         404
    │   ├── NotAcceptable           MANIFEST_UNKNOWN    404 (cached manifest type not in Accept)
    │   ├── ReferenceUnknown        MANIFEST_UNKNOWN    404 (a reference outside the tag grammar)
    │   ├── UpstreamUnknown         NAME_UNKNOWN        404 (a `ns=` that is not configured)
    │   ├── Unauthorized            UNAUTHORIZED        401 (with WWW-Authenticate)
    │   ├── AccessDenied            DENIED              403 (an access rule refused it)
    │   │   └── SignatureRefused    DENIED              403 (the signature policy refused the manifest)
    │   ├── TooManyAttempts         TOOMANYREQUESTS     429 (failed logins from one client)
    │   └── RequestTimeout          UNSUPPORTED         408 (request headers too slow)
    ├── TooManyConnections          TOOMANYREQUESTS     503 (the connection cap)
    ├── DirectoryUnavailable        UNAVAILABLE         503 (the LDAP directory is down or too slow)
    ├── NotFound                    upstream said 404
    │   ├── ManifestUnknown         MANIFEST_UNKNOWN    404
    │   ├── BlobUnknown             BLOB_UNKNOWN        404
    │   └── NameUnknown             NAME_UNKNOWN        404
    ├── UpstreamDenied              DENIED              403 (401/403 from upstream)
    ├── UpstreamRateLimited         TOOMANYREQUESTS     429
    └── UpstreamError               the upstream failed: never reported as "not found"
        ├── UpstreamUnavailable     UNAVAILABLE         502 (5xx, refused, reset, bad answer)
        │   ├── SignatureUnavailable                    503 (a required signature cannot be fetched)
        │   ├── UpstreamDown                            503 (marked down after repeated failures)
        │   └── UpstreamInterrupted                     a body cut short mid-way (resumable)
        │       └── UpstreamStalled                     a body silent or trickling past its deadline
        ├── UpstreamTimeout         UNAVAILABLE         504
        ├── UpstreamDigestMismatch  UNAVAILABLE         502 (bytes did not hash to the digest)
        ├── ManifestInvalid         MANIFEST_INVALID    502 (not JSON, or contradicts its mediaType)
        └── ManifestTooLarge        SIZE_INVALID        502

`message` is fixed per class; `detail` is a short, safe string (never paths, exception text or secrets).
The signature policy's refusals carry their detail (the rule's name) as the message too: dockerd and
containerd show a client only `message`, and an operator's user needs to see which rule refused.
An error is complete when built (nothing is set on it afterwards). Rendering happens in one place, the
front's error rendering (`http.front.error_reply`).
"""

from __future__ import annotations

from edgecache.outcomes import CacheResult


class EdgecacheError(Exception):
    code = "UNKNOWN"
    status = 500
    message = "internal error"
    detail_is_message = False  # the detail is shown as the message too (the signature policy's)

    def __init__(self, detail: str = "", *, retry_after: float | None = None, negative: bool = False) -> None:
        super().__init__(detail or self.message)
        self.detail = detail
        self.negative = negative  # answered from a brief negative entry, without asking upstream
        self.retry_after = retry_after  # seconds, sent as Retry-After when set

    @property
    def cache_result(self) -> CacheResult:
        """For X-Cache and the metrics: a refusal of ours, a remembered failure, or upstream's word."""
        if self.negative:
            return CacheResult.NEGATIVE
        return CacheResult.PASS if isinstance(self, ClientError) else CacheResult.MISS

    def body(self) -> dict[str, list[dict[str, str]]]:
        message = self.detail if self.detail_is_message and self.detail else self.message
        return {"errors": [{"code": self.code, "message": message, "detail": self.detail}]}


class ClientError(EdgecacheError):
    status = 400


class NameInvalid(ClientError):
    code = "NAME_INVALID"
    message = "invalid repository name"


class TagInvalid(ClientError):
    code = "TAG_INVALID"
    message = "invalid tag"


class DigestInvalid(ClientError):
    code = "DIGEST_INVALID"
    message = "provided digest did not match uploaded content or is malformed"


class RangeInvalid(ClientError):
    code = "RANGE_INVALID"
    message = "invalid content range"
    status = 416

    def __init__(self, detail: str = "", *, size: int | None = None) -> None:
        super().__init__(detail)
        self.size = size


class ParameterInvalid(ClientError):
    code = "PAGINATION_NUMBER_INVALID"
    message = "invalid number of results requested"


class ScopeInvalid(ClientError):
    """A /token request the token service refuses to sign (too many scopes: the token would not fit
    in the header it is sent back in)."""

    code = "UNSUPPORTED"
    message = "invalid token scope"


class BadRequest(ClientError):
    """The HTTP request itself is malformed (refused by the HTTP layer, before any route)."""

    code = "UNSUPPORTED"
    message = "malformed HTTP request"


class HeadersTooLarge(BadRequest):
    message = "request header fields too large"
    status = 431


class Unsupported(ClientError):
    code = "UNSUPPORTED"
    message = "the operation is unsupported"
    status = 405


class RouteUnknown(ClientError):
    code = "UNSUPPORTED"
    message = "unknown API route"
    status = 404


class NotAcceptable(ClientError):
    code = "MANIFEST_UNKNOWN"
    message = "manifest unknown"
    status = 404


class ReferenceUnknown(ClientError):
    """A manifest reference that is neither a tag nor a digest (`.INVALID_MANIFEST_NAME`): no manifest
    can exist under it, so it is unknown (the spec's 404 for a missing manifest), and upstream is not
    asked. A malformed digest stays DIGEST_INVALID."""

    code = "MANIFEST_UNKNOWN"
    message = "manifest unknown"
    status = 404


class UpstreamUnknown(ClientError):
    code = "NAME_UNKNOWN"
    message = "registry not served by this mirror"
    status = 404


class Unauthorized(ClientError):
    """No identity, or wrong credentials: the client should (re)authenticate."""

    code = "UNAUTHORIZED"
    message = "authentication required"
    status = 401
    BASIC_CHALLENGE = 'Basic realm="edgecache", charset="UTF-8"'

    def __init__(self, detail: str = "", *, challenge: str | None = None) -> None:
        super().__init__(detail)
        # The token service replaces the Basic challenge with a Bearer one naming its realm and scope.
        self.challenge = challenge or self.BASIC_CHALLENGE


class AccessDenied(ClientError):
    """Authenticated (or anonymous by policy), but this identity may not pull this repository."""

    code = "DENIED"
    message = "requested access to the resource is denied"
    status = 403


class SignatureRefused(AccessDenied):
    """A [[trust.rules]] entry refused the manifest: rejected outright, unsigned, or not signed by a
    trusted key for this digest and repository. `detail` names the rule."""

    message = "the manifest is refused by the signature policy"
    detail_is_message = True


class TooManyAttempts(ClientError):
    """Too many failed logins from one client: refused without checking, for a while."""

    code = "TOOMANYREQUESTS"
    message = "too many failed authentication attempts"
    status = 429


class RequestTimeout(ClientError):
    code = "UNSUPPORTED"
    message = "request headers did not arrive in time"
    status = 408


class TooManyConnections(EdgecacheError):
    code = "TOOMANYREQUESTS"
    message = "too many connections to this mirror; retry shortly"
    status = 503


class DirectoryUnavailable(EdgecacheError):
    """The LDAP directory did not answer in time, or refused the service account: a login that is not
    remembered can be neither accepted nor refused, so nobody is let in and the client may retry."""

    code = "UNAVAILABLE"
    message = "the login directory is unavailable; retry shortly"
    status = 503


class NotFound(EdgecacheError):
    status = 404


class ManifestUnknown(NotFound):
    code = "MANIFEST_UNKNOWN"
    message = "manifest unknown"


class BlobUnknown(NotFound):
    code = "BLOB_UNKNOWN"
    message = "blob unknown to registry"


class NameUnknown(NotFound):
    code = "NAME_UNKNOWN"
    message = "repository name not known to registry"


class UpstreamDenied(EdgecacheError):
    code = "DENIED"
    message = "requested access to the resource is denied upstream"
    status = 403


class UpstreamRateLimited(EdgecacheError):
    code = "TOOMANYREQUESTS"
    message = "too many requests to the upstream registry"
    status = 429


class UpstreamError(EdgecacheError):
    code = "UNAVAILABLE"
    message = "upstream registry failed"
    status = 502


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamDown(UpstreamUnavailable):
    """Failing repeatedly, or missed a deadline: not contacted until a probe finds it back."""

    message = "upstream registry is down"
    status = 503


class SignatureUnavailable(UpstreamUnavailable):
    """A rule requires a signature and it cannot be fetched (upstream down or failing): the manifest
    is not served unverified (fail closed), and the client may retry."""

    message = "the signature the trust policy requires cannot be fetched from upstream"
    status = 503
    detail_is_message = True


class UpstreamInterrupted(UpstreamUnavailable):
    """The body stopped mid-way (connection dropped, stalled, cut short): a fill may resume it."""


class UpstreamStalled(UpstreamInterrupted):
    """The body went silent for the stall deadline, or trickled below the minimum rate: resumable,
    but each costs a deadline, so a fill resumes it fewer times than a dropped connection."""


class UpstreamTimeout(UpstreamError):
    message = "upstream registry timed out"
    status = 504


class UpstreamDigestMismatch(UpstreamError):
    message = "upstream content did not match its digest"


class ManifestInvalid(UpstreamError):
    """Upstream's manifest is not JSON, or its Content-Type contradicts its own mediaType."""

    code = "MANIFEST_INVALID"
    message = "upstream sent an invalid manifest"


class ManifestTooLarge(UpstreamError):
    code = "SIZE_INVALID"
    message = "manifest exceeds the size limit"


class ConfigError(Exception):
    """A configuration problem, always naming the key; shown to the operator without a traceback."""
