"""Random patch batches from an activation store, for SAE training (DESIGN.md, "Loader").

Per epoch, every chunk of the layer (`images_per_chunk` images, the store's read
unit) is visited once, in an order drawn from (seed, epoch) that is the same on
every rank; rank r takes positions r, r + world_size, ... of it. Up to
`concurrency` chunks are read and decoded ahead by a thread pool (byte-range
reads of the shard objects, shard indices cached), but the chunks enter the
shuffle buffer strictly in that order, so thread timing never changes the
stream. The buffer keeps rows in the stored 16-bit dtype; each batch draws
`batch_size` distinct rows uniformly at random from it, gathers them with one
vectorized take per block, converts them to the output dtype, and frees their
slots for the next chunks. At the end of an epoch the buffer drains in random
order, so every selected row is delivered exactly once per epoch.

Mixing: a batch of B rows drawn uniformly from a whole store of N images holds
N(1 - (1 - 1/N)^B) distinct images on average. From a buffer of M images' rows
it is less: right after filling, M(1 - e^(-B/M)); in steady state, where old
images have fewer rows left, M * Ein(B/M) with Ein(x) = sum_k (-1)^(k+1) x^k / (k k!).
The default buffer (3 GiB, ~10,700 images of 196 x 768 bf16 rows) gives 0.93x
the uniform figure on a 20k-image store, averaged over an epoch (simulated, and
measured by benchmarks/bench_loader.py). On ImageNet-scale stores the uniform
figure is ~B (every patch from another image) and a 3 GiB buffer reaches only
0.65-0.7x of it (196-256 patches per image); more memory is the only lever
(4x the buffer for ~0.9x). Ranks each hold their own buffer.

Resume: the position is (epoch, batches delivered). A restored loader replays
that epoch's chunk admissions and draws on index arrays only, then reads just
the chunks that still have rows in the buffer (up to ~8 buffer-lengths back)
and continues with exactly the stream it would have delivered.

Modules: _config (LoaderConfig, Normalization, LoaderStats), _buffer (the
shuffle buffer, chunk plans), _order (which rows, the epoch's chunk order, rank
assignment, draw seeds), _reads (read-ahead and decode threads, the
refill-and-draw loop, resume's rehydration), _gather (batch assembly), _loader
(PatchLoader: lifecycle, position, the background thread).
"""

from actstore.loader._config import DEFAULT_BUFFER_BYTES, TOKENS, LoaderConfig, LoaderStats, Normalization
from actstore.loader._loader import PatchLoader

__all__ = ["DEFAULT_BUFFER_BYTES", "TOKENS", "LoaderConfig", "LoaderStats", "Normalization", "PatchLoader"]
