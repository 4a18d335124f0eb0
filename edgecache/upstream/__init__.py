"""Talking to upstream registries: the client (`client`, with blob bodies read on threads in
`blocking`), deadlines by phase and the trickle check (`pace`, pure), the token dance and where
credentials may go (`tokens`, pure), and when to stop asking a failing upstream and when to probe
it again (`health`, pure).

The only aiohttp *client* code of the package lives here, and library errors are mapped to the
domain error tree at this boundary. Imports the vocabulary, config, metrics and trace; never the
store, fills, the use case or a front.
"""
