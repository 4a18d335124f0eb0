"""Who a request is: the identity every login produces (htpasswd, LDAP, mTLS, a token), and how
access rules name identities. Pure: no I/O.

Rules name a user (`alice`), a certificate subject, a group (`group:ops`), anyone authenticated
(`*`) or `anonymous`. A token's identity also carries the repositories the token grants, so a token
for one repository is no use for another even where the rules would allow it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecache.config import AccessRule

ANONYMOUS = "anonymous"
GROUP_PREFIX = "group:"


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool
    groups: frozenset[str] = frozenset()
    # Set for a token's bearer: the repository names (as the client asked for them) it may pull.
    token_scope: frozenset[str] | None = None


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, False)


def applies(rule: AccessRule, identity: Identity) -> bool:
    """Does `rule` speak of `identity`? By name, by one of its groups, or `*` for anyone logged in."""
    if rule.identity == identity.name:
        return True
    if rule.identity.startswith(GROUP_PREFIX):
        return identity.authenticated and rule.identity[len(GROUP_PREFIX) :] in identity.groups
    return rule.identity == "*" and identity.authenticated
