"""The fronts: everything between a socket and the pull use case.

`front` is framework-free (a ClientRequest in, a Reply out: routing, access control, validation);
`routes` parses paths; `send` is the one send path that turns a Reply into bytes on the wire for
both adapters, `aiohttp_front` (plain and mutual-TLS HTTP/1.1, kernel sendfile) and `granian_front`
(TLS with HTTP/2, ASGI), each supplying only write / sendfile / abort. `aiohttp_server` holds the
aiohttp internals we subclass; `connguard`, `tls`, `accesslog`, `chunks` serve the adapters.
`status` gathers the status page's figures (and samples the counters for its windows); `status_page`
renders them as HTML.
Only this package (and the wiring in `app`) imports aiohttp's server or granian.
"""
