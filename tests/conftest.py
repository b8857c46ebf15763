"""Shared fixtures: one local Ray instance and one moto S3 server per test session."""

from __future__ import annotations

import uuid

import pytest

from actstore.testing import MotoS3


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (OS-assigned port), a separate process, real HTTP."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_url(s3):
    """A fresh s3:// prefix per test."""
    return s3.url(f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (num_cpus=2), started once and shared by every test that asks."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
