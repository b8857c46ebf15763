"""A local S3 endpoint for tests and benchmarks.

`MotoS3` runs moto's S3 server as a separate process on 127.0.0.1 with an
OS-assigned port, so S3 paths are exercised over real HTTP without any AWS
account. It needs the `dev` extra (moto[server]).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


class MotoS3:
    """A moto S3 server subprocess; `storage_options` are for fsspec/s3fs."""

    def __init__(self, bucket: str = "actstore-test", startup_timeout: float = 30.0) -> None:
        self.bucket = bucket
        self._timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""

    def start(self) -> MotoS3:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self._timeout
        seen = b""
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                break
            seen += line
            m = _RUNNING.search(line)
            if m:
                self.endpoint_url = f"http://127.0.0.1:{int(m.group(1))}"
                break
        if not self.endpoint_url:
            self.stop()
            raise RuntimeError(f"moto server did not start: {seen.decode(errors='replace')[-500:]}")
        # drain the server's request log so its pipe never fills up
        threading.Thread(target=self._proc.stdout.read, daemon=True).start()
        import s3fs  # imported late: only S3 users need it

        s3fs.S3FileSystem(**self.storage_options).mkdir(self.bucket)
        return self

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
