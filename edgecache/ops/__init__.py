"""The commands operators run beside or against a cache: `warm` (pull images in ahead of time),
`stats` (hit-rate picture of a running instance), and `maintenance` (du, prune, verify, pin on a
cache directory). Later: export/import bundles. May import anything below the wiring layer.
"""
