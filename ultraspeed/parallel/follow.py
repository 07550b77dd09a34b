"""Serving on several ranks: rank 0 runs the server and its engine unchanged, the other ranks replay rank 0's
target-model calls, so that every collective inside the sharded forward has all its participants.

Only what changes the sharded model's state crosses over: creating a KV cache, a forward (its token ids, cache
rows, captured layers) and moving a cache row. Each message carries the cache's row lengths, which is how crop
and reset (length-only changes) reach the followers. Sampling, drafting, acceptance and the HTTP side stay on
rank 0: the LM head and the drafter are replicated, so followers never need their results.

Messages travel over a separate gloo (CPU) group: they are a few hundred bytes, need no GPU synchronization, and
its timeout can be long, as a follower may wait for the next request through an idle night.
"""

from __future__ import annotations

import inspect
import logging
import threading
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.parallel.dist import DistEnv

log = logging.getLogger(__name__)

NEW_CACHE, FORWARD, MOVE_ROW, STOP = range(4)
HEADER = 64            # int64 slots: op, cache, three arguments, then the captured layer ids


class Channel:
    """Rank 0 -> every other rank, in order."""

    def __init__(self) -> None:
        # Collective: every rank creates the channel at the same point of its program.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def send(self, header: list[int], *tensors: torch.Tensor) -> None:
        if len(header) > HEADER:
            raise UltraSpeedError(f"a message of {len(header)} fields does not fit the {HEADER}-slot header")
        self._broadcast(torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.long))
        for t in tensors:
            self._broadcast(t.detach().to("cpu", torch.long).contiguous())

    def receive_header(self) -> list[int]:
        return self._broadcast(torch.empty(HEADER, dtype=torch.long)).tolist()

    def receive(self, *shape: int) -> torch.Tensor:
        return self._broadcast(torch.empty(shape, dtype=torch.long))

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.group)
        return t


def lead(model: Decoder, env: DistEnv) -> Callable[[], None]:
    """On rank 0: make `model` announce its caches and forwards to the followers. Returns `stop`, which releases
    them. A lock keeps each announcement and the call it announces together whatever thread makes them."""
    channel, lock = Channel(), threading.Lock()
    caches: list[KVCache] = []
    new_cache, forward = model.new_cache, model.forward
    signature = inspect.signature(forward)

    def number_of(cache: KVCache) -> int:
        for i, c in enumerate(caches):
            if c is cache:
                return i
        raise UltraSpeedError("a KV cache not made by model.new_cache cannot be mirrored on the other ranks")

    def leader_new_cache(*args, **kwargs) -> KVCache:
        with lock:
            cache = new_cache(*args, **kwargs)
            channel.send([NEW_CACHE, len(caches), cache.max_batch, cache.max_len])
            caches.append(cache)
        move_row = cache.move_row

        def leader_move_row(src: int, dst: int) -> None:
            with lock:
                channel.send([MOVE_ROW, number_of(cache), src, dst], cache.lengths)
                move_row(src, dst)
        cache.move_row = leader_move_row
        return cache

    def leader_forward(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        ids, cache = call.arguments["input_ids"], call.arguments["cache"]
        capture = list(call.arguments["capture_layers"])
        with lock:
            channel.send([FORWARD, number_of(cache), call.arguments["first_row"], len(capture), *capture],
                         cache.lengths, torch.tensor(ids.shape), ids)
            return forward(*args, **kwargs)

    # Instance attributes shadow the class's methods: nn.Module.__call__ then runs leader_forward.
    model.new_cache, model.forward = leader_new_cache, leader_forward

    def stop() -> None:
        with lock:
            channel.send([STOP])
    return stop


@torch.inference_mode()
def follow(model: Decoder, env: DistEnv) -> None:
    """On every other rank: replay rank 0's calls until it says stop."""
    channel = Channel()
    caches: list[KVCache] = []
    while True:
        op, number, *rest = channel.receive_header()
        if op == STOP:
            return
        if op == NEW_CACHE:
            caches.append(model.new_cache(rest[0], rest[1]))
            continue
        cache = caches[number]
        cache.lengths.copy_(channel.receive(*cache.lengths.shape))
        if op == MOVE_ROW:
            cache.move_row(rest[0], rest[1])
        elif op == FORWARD:
            first_row, num_capture = rest[0], rest[1]
            capture = tuple(rest[2:2 + num_capture])
            shape = channel.receive(2).tolist()
            ids = channel.receive(*shape).to(env.device)
            try:
                model(ids, cache, capture, first_row)
            except Exception:
                # The same inputs fail the same way on rank 0 (a context overflow is caught before any
                # collective), where the engine reports it; here the next message simply follows.
                log.exception("replayed forward failed")
