"""obstore against aiobotocore on a real radosgw (the shared tier's library choice, issue 16).

Starts the tests' throwaway Ceph cluster (tests/support/ceph.py), then per library, in the same run:
a multipart PUT of a 48 MiB object (8 MiB parts), a whole streamed GET, and 48 ranged GETs of 1 MiB
(how a resume or a chunked client reads). Medians of 3; MiB/s. aiobotocore is needed for this
comparison only (`pip install aiobotocore`): it is not a dependency of edgecache. Run:
    .venv/bin/pip install aiobotocore && PYTHONPATH=. .venv/bin/python bench/s3_client_bench.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time

import obstore
from aiobotocore.session import get_session
from obstore.store import S3Store

from tests.support.ceph import ACCESS_KEY, SECRET_KEY, start_ceph

SIZE = 48 * 1024 * 1024
PART = 8 * 1024 * 1024
RANGE = 1024 * 1024
ROUNDS = 3


def create_bucket(endpoint: str, bucket: str) -> None:
    subprocess.run(
        ["curl", "-sf", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3",
         "--user", f"{ACCESS_KEY}:{SECRET_KEY}",
         "-H", "x-amz-content-sha256:UNSIGNED-PAYLOAD", f"{endpoint}/{bucket}"],
        check=True,
    )  # fmt: skip


async def bench_obstore(endpoint: str, data: bytes) -> dict[str, float]:
    store = S3Store(
        "bench", endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True},
    )  # fmt: skip
    put, get, ranged = [], [], []
    for i in range(ROUNDS):
        key = f"o/{i}"
        t = time.perf_counter()
        await obstore.put_async(store, key, data, use_multipart=True, chunk_size=PART, max_concurrency=4)
        put.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = 0
        async for chunk in (await obstore.get_async(store, key)).stream(min_chunk_size=1024 * 1024):
            n += len(chunk)
        get.append(time.perf_counter() - t)
        assert n == SIZE
        t = time.perf_counter()
        for off in range(0, SIZE, RANGE):
            part = await obstore.get_range_async(store, key, start=off, end=off + RANGE)
            assert len(part) == RANGE
        ranged.append(time.perf_counter() - t)
        await obstore.delete_async(store, key)
    mib = SIZE / 1024 / 1024
    return {
        "put": mib / statistics.median(put),
        "get": mib / statistics.median(get),
        "ranged": mib / statistics.median(ranged),
    }


async def bench_aiobotocore(endpoint: str, data: bytes) -> dict[str, float]:
    session = get_session()
    put, get, ranged = [], [], []
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    ) as s3:  # fmt: skip
        for i in range(ROUNDS):
            key = f"b/{i}"
            t = time.perf_counter()
            up = await s3.create_multipart_upload(Bucket="bench", Key=key)
            sem = asyncio.Semaphore(4)

            async def part(
                n: int,
                off: int,
                upload_id: str = up["UploadId"],
                key: str = key,
                sem: asyncio.Semaphore = sem,
            ) -> dict[str, object]:
                async with sem:
                    r = await s3.upload_part(
                        Bucket="bench", Key=key, UploadId=upload_id, PartNumber=n, Body=data[off : off + PART]
                    )
                return {"PartNumber": n, "ETag": r["ETag"]}

            parts = await asyncio.gather(*(part(n + 1, off) for n, off in enumerate(range(0, SIZE, PART))))
            await s3.complete_multipart_upload(
                Bucket="bench", Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": list(parts)}
            )
            put.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = await s3.get_object(Bucket="bench", Key=key)
            n = 0
            async with r["Body"] as body:
                while chunk := await body.read(1024 * 1024):
                    n += len(chunk)
            get.append(time.perf_counter() - t)
            assert n == SIZE
            t = time.perf_counter()
            for off in range(0, SIZE, RANGE):
                r = await s3.get_object(Bucket="bench", Key=key, Range=f"bytes={off}-{off + RANGE - 1}")
                async with r["Body"] as body:
                    assert len(await body.read()) == RANGE
            ranged.append(time.perf_counter() - t)
            await s3.delete_object(Bucket="bench", Key=key)
    mib = SIZE / 1024 / 1024
    return {
        "put": mib / statistics.median(put),
        "get": mib / statistics.median(get),
        "ranged": mib / statistics.median(ranged),
    }


async def main() -> None:
    ceph = start_ceph()
    try:
        create_bucket(ceph.endpoint, "bench")
        data = os.urandom(SIZE)
        for name, fn in (("obstore", bench_obstore), ("aiobotocore", bench_aiobotocore)) * 2:
            cpu = time.process_time()
            figures = await fn(ceph.endpoint, data)
            cpu = time.process_time() - cpu
            print(
                f"{name:12} multipart PUT {figures['put']:6.0f} MiB/s   GET {figures['get']:6.0f} MiB/s   "
                f"1 MiB ranged GETs {figures['ranged']:6.0f} MiB/s   client CPU {cpu:5.2f} s"
            )
    finally:
        ceph.stop()


if __name__ == "__main__":
    asyncio.run(main())
