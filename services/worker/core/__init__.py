"""The continuous-batching engine core: requests join and leave the running batch every step.

Parts, one concern each (Redis-free, tested on CPU):

- :mod:`.sequence` -- one request in flight (prompt + generated ids, KV block table).
- :mod:`.blocks` -- the pool of fixed-size KV blocks (allocate / free / usage).
- :mod:`.scheduler` -- waiting and running queues, the per-step token budget, preemption.
- :mod:`.sampling` -- greedy / temperature / top-p / seeded sampling on the device.
- :mod:`.llama` -- the Llama-architecture forward pass over a paged KV cache.
- :mod:`.runner` -- weights, the KV pool tensors, memory profiling, CUDA graphs.
- :mod:`.engine` -- :class:`EngineCore`: ``add``, ``abort``, ``step``, ``apply``, ``stats``.
"""
