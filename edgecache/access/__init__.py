"""Who may pull what: client logins (htpasswd, mutual TLS) and per-repository rules.

Later: LDAP, the token service, OIDC and the signature policy live here too. Imports only the
vocabulary (errors, oci) and config; never the store, the upstream client or an HTTP server.
"""
