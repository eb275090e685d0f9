"""The pyarrow filesystems Ray Data and Ray Train read and write through: pyarrow's own C++ S3
and GCS clients for s3:// and gs://, fsspec through a handler for other schemes, and a run
store's arguments for Ray Train's RunConfig."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from fsspec.core import split_protocol

from rayganx.store.storage import absolute, filesystem, is_remote, s3_endpoint

log = logging.getLogger("rayganx")


def pyarrow_filesystem(url: str, endpoint_url: str | None = None, background_writes: bool = True):
    """The pyarrow filesystem Ray Train and Ray Data use for a URL: pyarrow's own C++ S3 and GCS
    clients for s3:// and gs:// (parallel, no Python in the data path), fsspec through a handler
    for other schemes. Credentials are never passed: the clients read the environment, profile
    or instance role themselves, so nothing secret is pickled to the workers."""
    import pyarrow.fs as pafs

    protocol, _ = split_protocol(url)
    if protocol in (None, "file", "local"):
        return pafs.LocalFileSystem()
    if protocol in ("s3", "s3a"):
        kwargs: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 60,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
                                  "background_writes": background_writes}
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs |= {"endpoint_override": host.rstrip("/"), "scheme": scheme}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not endpoint:
            region = bucket_region(split_protocol(url)[1].split("/", 1)[0])
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    if protocol in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    fs, _ = filesystem(url, endpoint_url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@functools.lru_cache(maxsize=32)
def bucket_region(bucket: str) -> str | None:
    """An AWS bucket's region (pyarrow's C++ client signs for one region and fails on a bucket in
    another); None when it cannot be told: the client's default stands. Only for AWS itself:
    S3-compatible endpoints (MinIO, moto) have no regions to resolve."""
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as e:
        log.debug("no region for bucket %s: %s", bucket, e)
        return None


def ray_storage(url: str, endpoint_url: str | None = None) -> dict:
    """RunConfig's storage arguments for a run store: a local path, or the store's path inside
    its pyarrow filesystem (Ray Train then writes checkpoints straight to the store)."""
    if not is_remote(url):
        return {"storage_path": absolute(url)}
    return {"storage_path": split_protocol(url)[1].rstrip("/"),
            "storage_filesystem": pyarrow_filesystem(url, endpoint_url)}
