"""Generated data for the demo, the tests and the benchmarks; production stages never import it.

Like `zarr.testing`, it ships with the package so that a user can reproduce a test or a benchmark:

- `shapes`: an image dataset of drawn shapes with known factors (the demo's images).
- `synthetic`: ViT-like activations and complete synthetic stores.
- `images`: the bad-image corpus extraction must survive.
- `s3`: moto's S3 server on 127.0.0.1 (needs the `dev` extra).
- `faults`: a proxy in front of it that fails a fraction of the requests (500, 503 SlowDown, resets,
  truncated bodies), to show that retries absorb them.
- `chat`: an OpenAI-compatible chat-completions server that looks at the shapes images it is sent (names the
  highlighted colour or texture, judges by it): the VLM of `actstore explain`'s tests.
"""
