"""Joining or starting Ray, in one place, for every stage that runs on it (extract, train, serve)."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (None: $RAY_ADDRESS, else a new local Ray with `num_cpus`, default all), quietly;
    a no-op when already connected."""
    import ray  # imported here: Ray takes seconds to import and most commands never need it

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")


def refuse_local_paths_on_a_cluster(address: str | None, **paths: str) -> None:
    """ConfigError when the Ray cluster (`address`, $RAY_ADDRESS or the one joined) has more than one
    node and a path is local: tasks on other nodes would not find it, or would write where nobody
    reads. Object-store URLs (s3://, gs://, ...) work anywhere. A Ray started here has one node."""
    import ray

    from actstore.errors import ConfigError
    from actstore.store import is_local

    local = {k: v for k, v in paths.items() if is_local(v)}
    if not local or not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        return
    init_ray(address)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1:
        name, path = next(iter(local.items()))
        raise ConfigError(f"--{name.replace('_', '-')} {path}: a local path, but the Ray cluster has {nodes} "
                          "nodes whose tasks cannot reach it; use an object-store URL (s3://...)")
