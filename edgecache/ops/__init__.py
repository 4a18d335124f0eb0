"""The commands operators run beside or against a cache: `warm` (pull images in ahead of time),
`stats` (hit-rate picture of a running instance), and `maintenance` (du, prune, verify, pin on a
cache directory), `bundle_export` / `bundle_import` (images as an OCI layout tar, for new and
air-gapped sites; `oci_layout` reads and writes the tar). May import anything below the wiring layer.
"""
