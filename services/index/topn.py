"""Streaming top-n tables for the index pass, and the 32-bit order keys they sort by.

A `TopTable` keeps, per slot, the n entries with the smallest (key, id) pushed so far; the pass keeps two:
per feature its top images (keys from `value_keys`: strongest first) and per feature and octave a uniform
sample of images (keys from `hash_keys`: bottom-r of a hash, the same whatever the block size).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EMPTY_KEY", "NO_ID", "TopTable", "hash_keys", "key_values", "value_keys"]

NO_ID = torch.iinfo(torch.int64).max
"""Above every image id: the id of an empty table entry."""
EMPTY_KEY = 1 << 32
"""Above every 32-bit order key: an empty table entry."""


class TopTable:
    """Per slot, the n entries with the smallest (key, id) pushed so far; a payload row rides with each.

    Keys are 32-bit order keys (int64 holding [0, 2^32)); ids only break ties, and callers push in
    increasing id order (images arrive in store order), so one stable sort of (slot, key) over
    [held entries..., candidates...] orders ties by id without sorting on it.
    """

    def __init__(self, n_slots: int, n: int, payload: tuple[tuple[int, ...], torch.dtype], device: torch.device):
        self.n = n
        self.key = torch.full((n_slots, n), EMPTY_KEY, dtype=torch.int64, device=device)
        self.id = torch.full((n_slots, n), NO_ID, dtype=torch.int64, device=device)
        shape, dtype = payload
        self.payload = torch.zeros((n_slots, n, *shape), dtype=dtype, device=device)

    def admits(self, slots: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Which candidates beat their slot's current n-th entry (and so may enter)."""
        last_key, last_id = self.key[slots, -1], self.id[slots, -1]
        return (keys < last_key) | ((keys == last_key) & (ids < last_id))

    def push(self, slots: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, payload: torch.Tensor) -> None:
        """Merge candidates (ids above every id held, ascending within a slot) into their slots."""
        if slots.numel() == 0:
            return
        dev = slots.device
        present = torch.bincount(slots, minlength=self.key.shape[0]) > 0  # group by slot without a sort
        uslots = present.nonzero().squeeze(1)
        local = (torch.cumsum(present, 0) - 1)[slots]
        u, n = uslots.numel(), self.n
        n_held = u * n
        all_local = torch.cat([torch.arange(u, device=dev).repeat_interleave(n), local])
        all_key = torch.cat([self.key[uslots].reshape(-1), keys])
        all_id = torch.cat([self.id[uslots].reshape(-1), ids])
        order = torch.argsort((all_local << 33) | all_key, stable=True)
        sorted_local = all_local[order]
        starts = torch.searchsorted(sorted_local, torch.arange(u, device=dev))
        rank = torch.arange(order.numel(), device=dev) - starts[sorted_local]
        keep = rank < n
        src, rank = order[keep], rank[keep]
        rows = uslots[sorted_local[keep]]
        # payload rows: move only held entries whose rank changed (copied out first), then write the new ones
        new = src >= n_held
        held_src, held_rows, held_rank = src[~new], rows[~new], rank[~new]
        moved = held_src % n != held_rank
        moving = self.payload[held_rows[moved], held_src[moved] % n].clone()
        self.payload[held_rows[moved], held_rank[moved]] = moving
        self.payload[rows[new], rank[new]] = payload[src[new] - n_held]
        self.key[rows, rank] = all_key[src]
        self.id[rows, rank] = all_id[src]

    def ids(self) -> np.ndarray:
        """int32 ids with -1 where a slot has fewer than n entries."""
        return torch.where(self.id == NO_ID, -1, self.id).to(torch.int32).cpu().numpy()


def value_keys(values: torch.Tensor) -> torch.Tensor:
    """Order keys that sort positive float32 values descending: a positive float's bits grow with it."""
    return (0x7FFFFFFF - values.float().view(torch.int32)).long()


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of value_keys (0 for empty entries)."""
    empty = keys == EMPTY_KEY
    return torch.where(empty, 0, 0x7FFFFFFF - keys).to(torch.int32).view(torch.float32).masked_fill(empty, 0)


def hash_keys(seed: int, image: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """A uniform pseudo-random 32-bit key per (seed, image, feature): splitmix64's finalizer, low 32 bits."""
    x = image * 0x9E3779B1 + feature * 0x85EBCA77 + seed * 0xC2B2AE3D  # wraps in int64, as intended
    for shift, mult in ((30, 0xBF58476D1CE4E5B9 - (1 << 64)), (27, 0x94D049BB133111EB - (1 << 64)), (31, None)):
        x = x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))  # logical shift on int64
        if mult is not None:
            x = x * mult
    return x & 0xFFFFFFFF
