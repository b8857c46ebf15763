"""Joining or starting Ray, in one place, for every stage that runs on it (extract, train, serve)."""

from __future__ import annotations


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (None: $RAY_ADDRESS, else a new local Ray with `num_cpus`, default all), quietly;
    a no-op when already connected."""
    import ray  # imported here: Ray takes seconds to import and most commands never need it

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
