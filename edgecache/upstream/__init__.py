"""Talking to upstream registries: the aiohttp client (`client`), the token dance and where
credentials may go (`tokens`, pure), and when to stop asking a failing upstream (`health`, pure).

The only aiohttp *client* code of the package lives here, and library errors are mapped to the
domain error tree at this boundary. Imports the vocabulary, config, metrics and trace; never the
store, fills, the use case or a front.
"""
