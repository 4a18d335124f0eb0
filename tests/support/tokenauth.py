"""A fake Docker-Hub-style token issuer, so the bearer-token flow is tested against a real registry.

Docker Hub's token service (auth.docker.io) cannot run here (no internet), so this module fakes it:
`TokenServer` speaks Docker's token protocol (`GET /token?service=...&scope=...`, optional HTTP
Basic credentials) and issues ES256 JWTs whose `x5c` header carries a self-signed certificate.
`registry_auth_config` points a real `docker-registry` (CNCF distribution) at it with that
certificate as its `rootcertbundle`, so every token the proxy presents is actually verified by
the origin — signature, issuer, audience, expiry and granted access — not by our own code.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import secrets
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.images import Pusher

DEFAULT_SERVICE = "edgecache-test-registry"
DEFAULT_ISSUER = "edgecache-test-token-issuer"
# Actions a token may grant on a repository; anything else a client asks for is silently dropped,
# as Docker Hub does.
KNOWN_ACTIONS = ("pull", "push", "delete", "*")

# --------------------------------------------------------------------------------------------
# Key material and JWT encoding
# --------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWS compact serialisation requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SigningKey:
    """An EC P-256 key and the self-signed certificate the registry trusts as its root bundle."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = DEFAULT_ISSUER) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Back-dated so clock skew between us and the registry cannot make it "not yet valid".
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def x5c(self) -> list[str]:
        """The JWS `x5c` chain: *standard* (padded) base64 of the DER cert, per RFC 7515 4.1.6."""
        return [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]

    @property
    def libtrust_kid(self) -> str:
        """The key's libtrust key ID (what distribution matches a JWT `kid` header against).

        Unused by default (we send `x5c`), kept for tests that want to exercise the `kid` path:
        base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo), in 4-char groups.
        """
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = hashes.Hash(hashes.SHA256())
        digest.update(spki)
        b32 = base64.b32encode(digest.finalize()[:30]).decode()
        return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))

    def sign_jwt(self, claims: dict[str, object], *, use_kid: bool = False) -> str:
        """ES256 JWS compact token; the signature is raw r||s (JWS), not OpenSSL's DER."""
        header: dict[str, object] = {"typ": "JWT", "alg": "ES256"}
        if use_kid:
            header["kid"] = self.libtrust_kid
        else:
            header["x5c"] = self.x5c
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def decode_jwt(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """(header, claims) of a JWT, *unverified* — for assertions in tests (the registry verifies)."""
    header, claims, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


# --------------------------------------------------------------------------------------------
# Scopes and challenges
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """One `type:name:actions` scope, e.g. `repository:library/alpine:pull,push`."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        # The name may itself contain ':' (registry host with a port), so split from both ends.
        type_, rest = text.split(":", 1)
        name, actions = rest.rsplit(":", 1)
        return cls(type_, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes from repeated `scope=` params; each value may also hold several, space-separated."""
    return [Scope.parse(part) for value in values for part in value.split() if part.count(":") >= 2]


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """`Bearer realm="..",service="..",scope=".."` → {"realm": .., "service": .., "scope": ..}."""
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "bearer":
        raise ValueError(f"not a Bearer challenge: {header!r}")
    return dict(_CHALLENGE_PARAM.findall(params))


def request_token(
    realm: str,
    service: str,
    scopes: Iterable[str] = (),
    username: str | None = None,
    password: str | None = None,
) -> str:
    """Fetch a token the way docker does (GET with Basic credentials); raises HTTPError on 401."""
    query = urllib.parse.urlencode([("service", service), *(("scope", s) for s in scopes)])
    req = urllib.request.Request(f"{realm}?{query}")
    if username is not None:
        creds = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {creds}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    return str(body.get("token") or body["access_token"])


# --------------------------------------------------------------------------------------------
# The token server
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRequest:
    """One request the token server received, so tests can count fetches and check credentials."""

    method: str
    path: str
    query: dict[str, list[str]]
    scopes: list[str]
    service: str | None
    authorization_present: bool
    user: str | None  # username from Basic credentials (even if the password was wrong)
    authenticated: bool  # credentials were present *and* correct
    status: int
    granted: list[dict[str, object]] = field(default_factory=list)


class TokenServer:
    """Docker's token protocol on a free 127.0.0.1 port, served from a daemon thread.

    Policy (like Docker Hub): anonymous callers get `pull` on public repos only — every repo not in
    `private_repos`, or, if `public_repos` is given, only those (Docker Hub also answers 401, not
    404, for repos that do not exist). Authenticated users get every requested action
    (pull/push/delete/*) on any repo, or only `pull` if `pull_only_users` names them. Wrong
    credentials are a 401 from the token server itself. Ungrantable scopes are *not* an error: the
    token just lacks that access, so it is the registry that answers 401 — exactly how Docker Hub
    behaves for private or missing repos.
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        private_repos: Iterable[str] = (),
        public_repos: Iterable[str] | None = None,
        pull_only_users: Iterable[str] = (),
        expires_in: int = 300,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        workdir: Path | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.private_repos: set[str] = set(private_repos)
        self.public_repos: set[str] | None = None if public_repos is None else set(public_repos)
        self.pull_only_users: set[str] = set(pull_only_users)
        self.expires_in = expires_in
        # Added to every token's exp (seconds); negative values mint already-expired tokens.
        self.exp_offset = 0
        self.service = service
        self.issuer = issuer
        self.use_kid = False  # True: sign with a libtrust `kid` header instead of `x5c`
        # (status, body) sent instead of a token: a broken token service, the fault itself
        self.raw_answer: tuple[int, bytes] | None = None
        self.key = SigningKey.generate(issuer)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgecache-tokenauth-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rootcertbundle = self.workdir / "token-root.pem"
        self.rootcertbundle.write_bytes(self.key.cert_pem)
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TokenServer:
        # Bind port 0 directly: no window for another process to take a pre-picked port.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="edgecache-token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "TokenServer not started"
        return int(self._httpd.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # -- test helpers --------------------------------------------------------------------------

    def token_requests(self, *, scope_contains: str = "") -> list[TokenRequest]:
        """Requests to /token so far (optionally only those asking for a matching scope)."""
        with self._lock:
            reqs = [r for r in self.requests if r.path == "/token"]
        return [r for r in reqs if not scope_contains or any(scope_contains in s for s in r.scopes)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def issue(self, user: str | None, scopes: Iterable[str]) -> tuple[str, list[dict[str, object]]]:
        """Mint a token for `user` (None = anonymous) as /token would; returns (jwt, access)."""
        access = self.grant(user, parse_scopes(scopes))
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer,
            "sub": user or "",
            # A plain string: distribution 2.8 decodes `aud` as a string, a list is rejected.
            "aud": self.service,
            "exp": now + self.expires_in + self.exp_offset,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        return self.key.sign_jwt(claims, use_kid=self.use_kid), access

    def is_public(self, repo: str) -> bool:
        if repo in self.private_repos:
            return False
        return self.public_repos is None or repo in self.public_repos

    def grant(self, user: str | None, scopes: list[Scope]) -> list[dict[str, object]]:
        access: list[dict[str, object]] = []
        for scope in scopes:
            if scope.type != "repository":
                continue
            wanted = [a for a in scope.actions if a in KNOWN_ACTIONS]
            if user is None:
                allowed = [a for a in wanted if a == "pull"] if self.is_public(scope.name) else []
            elif user in self.pull_only_users:
                allowed = [a for a in wanted if a == "pull"]
            else:
                allowed = wanted
            if allowed:
                access.append({"type": scope.type, "name": scope.name, "actions": allowed})
        return access

    # -- request handling ----------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, object]]:
        body: dict[str, object]
        url = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        auth = handler.headers.get("Authorization")
        user, authenticated = self._check_basic(auth)
        record = TokenRequest(
            method=handler.command,
            path=url.path,
            query=query,
            scopes=[s for v in query.get("scope", []) for s in v.split()],
            service=query["service"][0] if query.get("service") else None,
            authorization_present=auth is not None,
            user=user,
            authenticated=authenticated,
            status=0,
        )
        if url.path != "/token" or handler.command != "GET":
            status, body = 404, {"details": "not found"}
        elif auth is not None and not authenticated:
            status, body = 401, {"details": "incorrect username or password"}
        else:
            token, access = self.issue(user if authenticated else None, record.scopes)
            record.granted = access
            status = 200
            body = {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            }
        record.status = status
        with self._lock:
            self.requests.append(record)
        return status, body

    def _check_basic(self, auth: str | None) -> tuple[str | None, bool]:
        if auth is None:
            return None, False
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            username, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return None, False
        ok = username in self.users and secrets.compare_digest(self.users[username], password)
        return username, ok


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real auth service

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, body = server._handle(self)
            data = json.dumps(body).encode()
            if server.raw_answer is not None:
                status, data = server.raw_answer
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="edgecache test token issuer"')
            self.end_headers()
            with contextlib.suppress(OSError):  # a client that refuses a huge answer hangs up
                self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass  # requests are recorded in server.requests instead of spamming stderr

    return Handler


def registry_auth_config(token_server: TokenServer) -> str:
    """The `auth:` section for `start_registry(..., extra_config=...)` trusting `token_server`."""
    return f"""auth:
  token:
    realm: {token_server.realm}
    service: {token_server.service}
    issuer: {token_server.issuer}
    rootcertbundle: {token_server.rootcertbundle}
"""


# --------------------------------------------------------------------------------------------
# Seeding a token-protected registry
# --------------------------------------------------------------------------------------------

_REPO_IN_PATH = re.compile(r"/v2/(.+?)/(?:blobs|manifests|tags)/")


class TokenPusher(Pusher):
    """A `Pusher` that does the 401 → token (pull,push, as `username`) → retry dance.

    Tokens are cached per repository, so seeding an image costs one token fetch per repo (plus
    one 401), and re-fetched whenever the registry answers 401 again (e.g. after expiry).
    """

    def __init__(self, base_url: str, username: str, password: str) -> None:
        super().__init__(base_url)
        self.username = username
        self.password = password
        self._tokens: dict[str, str] = {}

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str]]:
        match = _REPO_IN_PATH.search(urllib.parse.urlsplit(url).path)
        repo = match[1] if match else ""
        headers = dict(headers or {})
        if repo in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[repo]}"
        try:
            return super()._request(method, url, data, headers)
        except urllib.error.HTTPError as err:
            if err.code != 401 or "Bearer" not in err.headers.get("WWW-Authenticate", ""):
                raise
            challenge = parse_bearer_challenge(err.headers["WWW-Authenticate"])
            err.close()
        scopes = [f"repository:{repo}:pull,push"] if repo else []
        token = request_token(challenge["realm"], challenge["service"], scopes, self.username, self.password)
        self._tokens[repo] = token
        headers["Authorization"] = f"Bearer {token}"
        return super()._request(method, url, data, headers)
