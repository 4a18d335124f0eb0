"""Who may pull what: the identity a request carries and the rules that decide on it.

`identity` (who, with groups, and a token's scope), `policy` (login modes in order: htpasswd, LDAP,
mutual TLS; bearer tokens; per-repository rules; the login cache and failure limits), `ldap` (the
directory, in threads of its own), `tokens` (the token service's keys and JWTs), `oidc` (an outside
issuer's tokens; its keys are fetched through a callable the wiring passes in) and `trust` (the
signature policy). Imports only the vocabulary (errors, oci) and config; never the store, the
upstream client or an HTTP server or client.
"""
