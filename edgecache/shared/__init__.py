"""The shared object-storage tier (issue 16): a bucket (S3 API, e.g. Ceph RGW) that the nodes of one
datacenter share behind their local disks, so a blob crosses the WAN once per datacenter, not per node.

`bucket` is the only object-store client code (obstore), with the tier's deadlines and a closed set of
error kinds; `source` puts the bucket in front of an upstream behind the fill's `BlobSource` seam (a
miss asks the bucket, then the upstream, within one fill); `uploads` sends verified upstream fills up,
in the background; `tier` holds them together with the tier's health. Layer: between the fills it
feeds (`fill`, whose Protocols it implements) and the pull use case that asks it; it may import the
parts below it (`store`, `upstream.health`/`pace`), never `pull` or the fronts.
"""
