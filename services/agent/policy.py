"""The agent's policy: one worker's observations in, at most one settings change out.

Pure code (no Redis, no torch, no clock): :meth:`AgentPolicy.decide` takes the worker's
:class:`WorkerControlState` and an :class:`Observation` (telemetry of the worker's GPU,
the cycles and OOMs since the last call, the time) and returns a :class:`PolicyDecision`
or ``None``. It updates the state's learnt parts (memory model, throughput table, OOM
memory) and, when it decides, the state's settings.

Rules, first match wins (thresholds in :class:`PolicyConfig`):

1. OOM -> halve the batch (at batch 1: lower precision from fp32, else cap the sequence
   length) and remember the (batch, length) shape: no later candidate of that batch or
   larger at that length or longer. OOMs of settings already replaced don't halve again.
2. Predicted over budget (budget = (total - other processes) less safety margin and overhead;
   a neighbour just allocated, or prompts got longer) -> shrink at once to the largest
   batch the memory model fits, ignoring the cooldown; at batch 1, cap the length.
3. Memory above the high watermark (after the shrink cooldown) -> at fp32 lower the
   precision (never bf16 <-> fp16: same bytes; int8 only if allowed), else shrink.
   Rules 2 and 3 change only the precision of a worker running the engine core: its KV
   memory is a pool allocated up front, sized by the KV rule, which a smaller batch or a
   length cap would not free.
4. Long sequences degrading throughput -> cap max_seq_len near the typical length.
5. A grow that did not raise tokens/s -> back to the best-known batch, and hold there.
6. Memory below the low watermark, batches full, grow cooldown over -> grow (hill
   climbing), to at most what the model predicts fits under ``grow_target``.
7. A capped length with low memory and no degradation for a while -> relax the cap.

Hysteresis: grow needs memory < low, shrink > high, grows wait longer than shrinks, and
grows aim below the high watermark, so noise does not flip settings back and forth.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from services.agent.state import (
    GIB,
    Inputs,
    MemoryView,
    Observation,
    PolicyConfig,
    PolicyDecision,
    WorkerControlState,
    cycle_len,
    cycle_memory_view,
    length_bucket,
    memory_view,
    pct,
)
from shared.schemas import ControlSettings, CycleStats, DecisionAction

__all__ = [
    "AgentPolicy",
    "MemoryView",
    "Observation",
    "PolicyConfig",
    "PolicyDecision",
    "WorkerControlState",
    "cycle_memory_view",
    "memory_view",
]


@dataclass
class _Context:
    """Derived numbers of one decision (shared by the rules)."""

    now: float
    memory: MemoryView | None
    pressure: float | None  # own use / (total - other processes' memory)
    budget: float | None  # bytes the worker's peak may reach (hard limit)
    neighbour_growth: int  # bytes other processes took since the last observation
    seq_len: int | None  # padded length of recent cycles
    prompt_len: int
    new_tokens: int
    tokens_per_s: float | None
    inputs: Inputs


class AgentPolicy:
    """Decides one worker's settings from its observations (see module docstring)."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def decide(self, state: WorkerControlState, obs: Observation) -> PolicyDecision | None:
        """Learn from ``obs``, then return the change to make (already applied to state)."""
        self._ingest(state, obs)
        ctx = self._context(state, obs)
        rules = (
            lambda: self._on_oom(state, obs, ctx),
            lambda: self._kv_budget(state, ctx),
            lambda: self._over_budget(state, ctx),
            lambda: self._over_watermark(state, ctx),
            lambda: self._ttft_target(state, ctx),
            lambda: self._long_sequences(state, ctx),
            lambda: self._plateau(state, ctx),
            lambda: self._grow(state, ctx),
            lambda: self._relax_seq(state, ctx),
        )
        for rule in rules:
            decision = rule()
            if decision is not None:
                state.adopt(decision.after, obs.ts)
                return decision
        return None

    # -- learning ---------------------------------------------------------------------

    def _ingest(self, state: WorkerControlState, obs: Observation) -> None:
        for oom in obs.ooms:
            shape = (oom.batch_size, cycle_len(oom))
            if shape not in state.oom_shapes:
                state.oom_shapes.append(shape)
        alpha = 0.3  # EWMA: recent cycles matter most, one noisy cycle does not decide
        for cycle in obs.cycles:
            state.model.observe_cycle(cycle)
            state.recent.append(cycle)
            if cycle.settings_version >= state.settings.version:
                state.cycles_since_change += 1
            if self._full(state, cycle) and cycle.tokens_per_s > 0:
                batch = state.version_batch.get(cycle.settings_version, cycle.batch_size)
                key = (batch, length_bucket(cycle_len(cycle)))
                old = state.throughput.get(key)
                new = (
                    cycle.tokens_per_s if old is None else old + alpha * (cycle.tokens_per_s - old)
                )
                state.throughput[key] = new

    def _full(self, state: WorkerControlState, cycle: CycleStats) -> bool:
        """Whether the batch was limited by the setting rather than by demand."""
        return cycle.queue_depth > 0 or (
            cycle.batch_size >= self.config.full_batch_fraction * state.settings.batch_size
        )

    def _context(self, state: WorkerControlState, obs: Observation) -> _Context:
        recent = list(state.recent)[-5:]
        last = recent[-1] if recent else None
        seq_len = max(cycle_len(c) for c in recent) if recent else None
        if seq_len is not None:
            seq_len = min(seq_len, state.settings.max_seq_len)
        new_tokens = max((c.max_new_tokens for c in recent), default=0)
        prompt_len = max(0, (seq_len or 0) - new_tokens)
        mem = obs.memory
        pressure, budget = self._pressure(mem, last)
        if pressure is not None and obs.cycles:
            state.pressures.append(pressure)  # one reading per measured cycle
        growth = self._neighbour_growth(state, mem)
        tps = last.tokens_per_s if last is not None else None
        inputs: Inputs = {
            "memory_pct": round(100 * pressure, 1) if pressure is not None else None,
            "used_bytes": mem.used_bytes if mem else None,
            "total_bytes": mem.total_bytes if mem else None,
            "other_bytes": mem.other_bytes if mem else None,
            "peak_bytes": last.memory_peak_bytes if last else None,
            "tokens_per_s": tps,
            "seq_len": seq_len,
            "cycles_since_change": state.cycles_since_change,
        }
        return _Context(
            obs.ts, mem, pressure, budget, growth, seq_len, prompt_len, new_tokens, tps, inputs
        )

    def _pressure(
        self, mem: MemoryView | None, last: CycleStats | None
    ) -> tuple[float | None, float | None]:
        """(this worker's share of the memory it can use, bytes its peak may reach) or Nones.

        The watermarks judge what the worker controls: its own use against the memory
        other processes leave it. A neighbour's allocation shrinks that room (and the
        budget) at once; memory the worker can't free never reads as its own pressure.
        With a measured peak, own use = overhead + last peak: NVML's figure for the worker
        includes allocator cache that stays after a shrink.
        """
        if mem is None or mem.total_bytes <= 0:
            return None, None
        cfg = self.config
        peak = last.memory_peak_bytes if last is not None else None
        own = cfg.overhead_bytes + peak if peak else max(0, mem.used_bytes - mem.other_bytes)
        usable = max(1, mem.total_bytes - mem.other_bytes)
        return own / usable, usable * (1 - cfg.safety_margin) - cfg.overhead_bytes

    def _neighbour_growth(self, state: WorkerControlState, mem: MemoryView | None) -> int:
        """Bytes other processes took since last time; freed memory lifts the ceilings."""
        if mem is None:
            return 0
        growth = 0
        if state.last_other_bytes is not None:
            growth = mem.other_bytes - state.last_other_bytes
        state.last_other_bytes = mem.other_bytes
        if growth <= -self.config.neighbour_min_bytes:
            state.ceilings.clear()  # room came back: limits learnt under pressure may go
        return growth

    def _hold(
        self, state: WorkerControlState, bucket: int, batch: int, now: float, hold_s: float
    ) -> None:
        """Don't grow past ``batch`` at this length for a while; a repeat doubles the hold."""
        old = state.ceilings.get(bucket)
        if old is not None and old[0] == batch:
            hold_s = max(hold_s, 2 * old[2])
        state.ceilings[bucket] = (batch, now + hold_s, hold_s)

    # -- helpers ----------------------------------------------------------------------

    def _cooled(self, state: WorkerControlState, now: float, grow: bool) -> bool:
        cfg = self.config
        secs, cycles = (
            (cfg.grow_cooldown_s, cfg.grow_cooldown_cycles)
            if grow
            else (cfg.shrink_cooldown_s, cfg.shrink_cooldown_cycles)
        )
        return now - state.last_change_ts >= secs and state.cycles_since_change >= cycles

    def _oom_limit(self, state: WorkerControlState, seq_len: int) -> int:
        """The largest batch not at or above an OOMed shape at this length or shorter."""
        margin = self.config.oom_margin
        limits = [min(b - 1, int(b * margin)) for b, n in state.oom_shapes if n <= seq_len]
        return min([self.config.max_batch, *limits])

    def _fit_batch(self, state: WorkerControlState, ctx: _Context, budget: float) -> int | None:
        """Largest batch the memory model fits in ``budget`` at the recent shape."""
        if ctx.seq_len is None:
            return None
        return state.model.max_batch_within(
            budget, ctx.prompt_len, ctx.new_tokens, state.settings.precision
        )

    def _target_fit(self, state: WorkerControlState, ctx: _Context) -> int | None:
        """Largest batch predicted to keep the worker under ``grow_target`` of its room."""
        if ctx.memory is None:
            return None
        cfg = self.config
        room = (ctx.memory.total_bytes - ctx.memory.other_bytes) * cfg.grow_target
        return self._fit_batch(state, ctx, room - cfg.overhead_bytes)

    def _change(
        self,
        state: WorkerControlState,
        ctx: _Context,
        action: DecisionAction,
        reason: str,
        **changes: object,
    ) -> PolicyDecision | None:
        before = state.settings
        after = before.model_copy(
            update={
                **changes,
                "version": before.version + 1,
                "reason": reason,
                "updated_at": ctx.now,
            }
        )
        if _knobs(after) == _knobs(before):
            return None
        return PolicyDecision(action, reason, before, after, dict(ctx.inputs))

    def _clamp(self, batch: int) -> int:
        return max(self.config.min_batch, min(self.config.max_batch, batch))

    # -- rules ------------------------------------------------------------------------

    def _kv_budget(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        """Size the engine core's KV pool to the room other processes leave: shrink at
        once when a neighbour takes memory, grow back (after the grow cooldown) when it
        frees it. Only for a worker that reports a pool, on a GPU the monitor sees."""
        last = state.recent[-1] if state.recent else None
        mem, cfg = ctx.memory, self.config
        if last is None or not last.kv_pool_bytes or not last.kv_blocks_total or mem is None:
            return None
        block_bytes = last.kv_pool_bytes / last.kv_blocks_total
        fixed = (last.memory_peak_bytes or 0) - last.kv_blocks_used * block_bytes
        usable: float = mem.total_bytes - mem.other_bytes
        if mem.peer_workers:
            # Other AEGIS workers share this GPU: what the rest leave is split evenly, so
            # the first to start does not keep it all and none is starved.
            usable = (usable + mem.peer_bytes) / (1 + mem.peer_workers)
        target = int(max(cfg.min_kv_bytes, usable * cfg.kv_target_fraction - fixed))
        current = state.settings.kv_budget_bytes or last.kv_pool_bytes
        change = target / current - 1
        growing = change > cfg.kv_resize_min
        if not (change < -cfg.kv_resize_min or (growing and self._cooled(state, ctx.now, True))):
            return None
        ctx.inputs.update(kv_pool_bytes=current, kv_target_bytes=target, fixed_bytes=int(fixed))
        why = (
            f"KV pool {_gib(current)} -> {_gib(target)} GiB: other processes hold "
            f"{_gib(mem.other_bytes)} of {_gib(mem.total_bytes)} GiB, the worker's weights "
            f"and activations {_gib(fixed)}"
        )
        if mem.peer_workers:
            ctx.inputs.update(peer_workers=mem.peer_workers, peer_bytes=mem.peer_bytes)
            why += (f"; an even share with {mem.peer_workers} other AEGIS worker(s) on this "
                    f"GPU ({_gib(mem.peer_bytes)} GiB of that memory)")  # fmt: skip
        return self._change(state, ctx, DecisionAction.KV_BUDGET, why, kv_budget_bytes=target)

    def _on_oom(
        self, state: WorkerControlState, obs: Observation, ctx: _Context
    ) -> PolicyDecision | None:
        current = state.settings
        # An OOM of replaced settings at a batch larger than now is already handled.
        live = [
            o
            for o in obs.ooms
            if o.settings_version >= current.version or o.batch_size <= current.batch_size
        ]
        if not live:
            return None
        oom = min(live, key=lambda o: o.batch_size)
        ctx.inputs.update(oom_batch=oom.batch_size, oom_seq_len=cycle_len(oom))
        shape = f"OOM at batch {oom.batch_size} x {cycle_len(oom)} tokens"
        if min(current.batch_size, oom.batch_size) > self.config.min_batch:
            batch = min(current.batch_size, oom.batch_size) // 2
            fit = self._target_fit(state, ctx)
            why = f"{shape}: halve"
            if fit is not None and self.config.min_batch <= fit < batch:
                batch, why = fit, f"{shape}: halve, and below to fit {pct(self.config.grow_target)}"
            return self._change(
                state, ctx, DecisionAction.HALVE, why, batch_size=self._clamp(batch)
            )
        return self._relieve_at_min_batch(state, ctx, shape, cap_to=cycle_len(oom) // 2)

    def _relieve_at_min_batch(
        self, state: WorkerControlState, ctx: _Context, why: str, cap_to: int
    ) -> PolicyDecision | None:
        """At the smallest batch: lower the precision if possible, else cap the length."""
        lower = self._lower_precision(state, ctx, why)
        if lower is not None:
            return lower
        s = state.settings
        cap = max(self.config.min_seq_len, min(s.max_seq_len // 2, length_bucket(cap_to)))
        return self._change(
            state, ctx, DecisionAction.CAP_SEQ, f"{why}: cap sequence length", max_seq_len=cap
        )

    def _lower_precision(
        self, state: WorkerControlState, ctx: _Context, why: str
    ) -> PolicyDecision | None:
        """fp32 -> the reduced precision; bf16/fp16 -> int8 where allowed; else None."""
        precision = state.settings.precision
        if precision == "fp32":
            target = self.config.reduced_precision
        elif self.config.allow_int8 and precision in ("bf16", "fp16"):
            target = "int8"
        else:
            return None
        return self._change(state, ctx, DecisionAction.PRECISION,
                            f"{why}: {precision} -> {target}", precision=target)  # fmt: skip

    def _over_budget(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        if ctx.budget is None or ctx.seq_len is None or ctx.memory is None:
            return None
        if _paged(state):
            return None  # its memory is its pool, which _kv_budget fits to the room
        s = state.settings
        predicted = state.model.predict_peak(
            s.batch_size, ctx.prompt_len, ctx.new_tokens, s.precision
        )
        ctx.inputs.update(predicted_peak_bytes=int(predicted), budget_bytes=int(ctx.budget))
        if predicted <= ctx.budget:
            return None
        other = ctx.memory.other_bytes
        grew = ctx.neighbour_growth
        if grew >= self.config.neighbour_min_bytes:
            why = f"other processes took {grew / GIB:.1f} GiB (now {other / GIB:.1f} GiB)"
        else:
            why = f"{ctx.seq_len}-token sequences predicted {predicted / GIB:.1f} GiB"
        why += f" > budget {max(0.0, ctx.budget) / GIB:.1f} GiB"
        # Go straight to where growth would stop (grow_target), not just under the line.
        fits = [self._target_fit(state, ctx), self._fit_batch(state, ctx, ctx.budget)]
        fit = min((f for f in fits if f), default=0)
        if fit >= self.config.min_batch:
            batch = self._clamp(min(fit, s.batch_size - 1))
            return self._change(state, ctx, DecisionAction.SHRINK, why, batch_size=batch)
        if s.batch_size > self.config.min_batch:
            return self._change(
                state, ctx, DecisionAction.SHRINK, why, batch_size=self.config.min_batch
            )
        return self._relieve_at_min_batch(state, ctx, why, cap_to=ctx.seq_len // 2)

    def _over_watermark(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        cfg = self.config
        if ctx.pressure is None or ctx.pressure <= cfg.high_watermark:
            return None
        # A neighbour's allocation shrinks the budget at once, even during the cooldown.
        neighbour = ctx.neighbour_growth >= cfg.neighbour_min_bytes
        if not neighbour and not self._confirmed_high(state, ctx):
            return None
        s = state.settings
        why = f"memory {pct(ctx.pressure)} > {pct(cfg.high_watermark)}"
        if neighbour:
            why += f", other processes took {ctx.neighbour_growth / GIB:.1f} GiB"
        if s.precision == "fp32" or _paged(state):
            # On the engine core a smaller batch or a length cap frees none of a pool
            # allocated up front (and starved a worker started beside a full card).
            return self._lower_precision(state, ctx, why)
        if s.batch_size <= cfg.min_batch:
            return self._relieve_at_min_batch(state, ctx, why, cap_to=(ctx.seq_len or 256) // 2)
        batch = int(s.batch_size * cfg.shrink_factor)
        fit = self._target_fit(state, ctx)
        batch = min(batch, fit) if fit else batch
        batch = self._clamp(min(batch, s.batch_size - 1))
        if ctx.seq_len is not None:
            self._hold(state, length_bucket(ctx.seq_len), batch, ctx.now, cfg.pressure_hold_s)
        return self._change(state, ctx, DecisionAction.SHRINK, why, batch_size=batch)

    def _confirmed_high(self, state: WorkerControlState, ctx: _Context) -> bool:
        """Shrink cooldown over and the last few readings all above the high watermark."""
        n = self.config.high_confirm_cycles
        recent = list(state.pressures)[-n:]
        confirmed = len(recent) >= n and min(recent) > self.config.high_watermark
        return confirmed and self._cooled(state, ctx.now, grow=False)

    def _long_sequences(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        cfg = self.config
        cycles = list(state.recent)
        if len(cycles) < cfg.long_seq_cycles + 2:
            return None
        typical_len = statistics.median(cycle_len(c) for c in cycles)
        short = [c for c in cycles if cycle_len(c) <= typical_len]
        typical_tps = statistics.median(c.tokens_per_s for c in short)
        degraded = [
            c
            for c in cycles[-cfg.window_cycles :]
            if cycle_len(c) > cfg.long_seq_factor * typical_len
            and c.tokens_per_s < cfg.long_seq_slowdown * typical_tps
        ]
        if not degraded:
            return None
        state.last_degraded_ts = ctx.now
        cap = max(cfg.min_seq_len, length_bucket(int(cfg.long_seq_factor * typical_len)))
        if len(degraded) < cfg.long_seq_cycles or cap >= state.settings.max_seq_len:
            return None
        if not self._cooled(state, ctx.now, grow=False):
            return None
        worst = min(degraded, key=lambda c: c.tokens_per_s)
        ctx.inputs.update(typical_len=typical_len, typical_tokens_per_s=typical_tps)
        why = (
            f"{len(degraded)} long batches ({cycle_len(worst)} tokens) ran at "
            f"{worst.tokens_per_s:.0f} tokens/s vs {typical_tps:.0f} typical"
        )
        return self._change(state, ctx, DecisionAction.CAP_SEQ, why, max_seq_len=cap)

    def _plateau(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        if state.grow_from is None:
            return None
        previous, bucket, since = state.grow_from
        s = state.settings
        now_tps = state.throughput.get((s.batch_size, bucket))
        if now_tps is None or not self._cooled(state, ctx.now, grow=True):
            if ctx.now - since > self.config.grow_eval_timeout_s:
                state.grow_from = None  # no full batches to judge by: stop waiting
            return None
        state.grow_from = None
        before_tps = state.throughput.get((previous, bucket))
        if before_tps is None or now_tps >= before_tps * (1 + self.config.throughput_gain_min):
            return None
        options = {
            b: v for (b, n), v in state.throughput.items() if n == bucket and b <= s.batch_size
        }
        best = max(options, key=lambda b: options[b])
        self._hold(state, bucket, best, ctx.now, self.config.plateau_hold_s)
        gain = now_tps / before_tps - 1
        ctx.inputs.update(best_batch=best, tokens_per_s_gain=round(gain, 3))
        why = (
            f"tokens/s {gain:+.0%} from batch {previous} to {s.batch_size}"
            f" < {self.config.throughput_gain_min:+.0%}: back to best-known batch {best}"
        )
        if best == s.batch_size:
            return None
        return self._change(state, ctx, DecisionAction.SHRINK, why, batch_size=best)

    def _ttft_target(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        """Keep the p95 time to first token under the target (``AEGIS_TTFT_TARGET_MS``).

        Requests waiting for a slot while every slot is taken: more slots (memory
        permitting). Otherwise prefill is too slow inside the steps: a larger step token
        budget, so waiting prompts get more of each step; at the largest, fewer
        sequences per step (each step gets faster; tokens/s is what is given up), unless
        requests waited for a slot lately: fewer slots would only queue them. The
        decision's inputs keep the p95, the target, tokens/s and the queue, so the log
        shows the trade-off."""
        cfg = self.config
        last = state.recent[-1] if state.recent else None
        if cfg.ttft_target_ms is None or last is None or last.ttft_p95_s is None:
            return None
        target_s = cfg.ttft_target_ms / 1000
        if last.ttft_p95_s <= target_s or not self._cooled(state, ctx.now, grow=False):
            return None
        s = state.settings
        ctx.inputs.update(ttft_p95_s=round(last.ttft_p95_s, 4), ttft_target_s=target_s,
                          running=last.running, waiting=last.waiting,
                          max_batched_tokens=last.max_batched_tokens)  # fmt: skip
        why = f"TTFT p95 {1000 * last.ttft_p95_s:.0f} ms > target {cfg.ttft_target_ms:.0f} ms"
        safe = ctx.pressure is None or ctx.pressure < cfg.high_watermark
        if last.waiting and last.running >= s.batch_size and safe:
            fit = self._target_fit(state, ctx) or cfg.max_batch
            batch = self._clamp(min(math.ceil(s.batch_size * cfg.grow_factor), fit))
            if batch > s.batch_size:
                why += f" with {last.waiting} waiting for a slot"
                return self._change(state, ctx, DecisionAction.GROW, why, batch_size=batch)
        tokens = s.max_batched_tokens or last.max_batched_tokens
        if tokens and tokens < cfg.max_step_tokens:
            bigger = min(cfg.max_step_tokens, 2 * tokens)
            why += ": prefill gets more of each step"
            return self._change(state, ctx, DecisionAction.TTFT, why, max_batched_tokens=bigger)
        batch = self._clamp(int(s.batch_size * cfg.shrink_factor))
        queued = any(c.waiting for c in list(state.recent)[-cfg.ttft_queue_cycles :])
        if batch >= s.batch_size or queued:
            return None
        why += f": fewer sequences per step ({last.running} running)"
        return self._change(state, ctx, DecisionAction.SHRINK, why, batch_size=batch)

    def _ttft_blocks_growth(self, state: WorkerControlState) -> bool:
        """Near or over the TTFT target, concurrency does not grow for throughput."""
        last = state.recent[-1] if state.recent else None
        target = self.config.ttft_target_ms
        if target is None or last is None or last.ttft_p95_s is None:
            return False
        return 1000 * last.ttft_p95_s > 0.8 * target

    def _grow(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        cfg = self.config
        s = state.settings
        if self._ttft_blocks_growth(state):
            return None
        # Every reading since the cooldown began below the low watermark: noise won't grow.
        readings = list(state.pressures)[-cfg.grow_cooldown_cycles :] if ctx.pressure else []
        low = all(p < cfg.low_watermark for p in [*readings, ctx.pressure or 0.0])
        demand = any(self._full(state, c) for c in list(state.recent)[-cfg.grow_cooldown_cycles :])
        if not (low and demand and ctx.seq_len is not None and state.grow_from is None):
            return None
        if not self._cooled(state, ctx.now, grow=True):
            return None
        bucket = length_bucket(ctx.seq_len)
        limit = self._oom_limit(state, ctx.seq_len)
        held = state.ceilings.get(bucket)
        if held is not None and ctx.now < held[1]:
            limit = min(limit, held[0])
        fit = self._target_fit(state, ctx)
        limit = min(limit, fit if fit is not None else limit)
        stride = math.ceil(s.batch_size * cfg.grow_factor)
        backlog = state.recent[-1].queue_depth if state.recent else 0
        if fit is not None and backlog > stride:
            # Requests are waiting beyond one stride: take a longer one (as far as memory
            # fits) instead of doubling batch by batch while they wait. Capped, because
            # the memory model has only seen the batches run so far.
            longest = math.ceil(s.batch_size * max(cfg.grow_factor, cfg.backlog_grow_factor))
            stride = min(backlog, longest)
        batch = self._clamp(min(limit, stride))
        if batch <= s.batch_size:
            return None
        state.grow_from = (s.batch_size, bucket, ctx.now)
        why = self._grow_reason(state, ctx, bucket)
        return self._change(state, ctx, DecisionAction.GROW, why, batch_size=batch)

    def _grow_reason(self, state: WorkerControlState, ctx: _Context, bucket: int) -> str:
        parts = ["no GPU memory signal"]
        if ctx.pressure is not None:
            parts = [f"memory {pct(ctx.pressure)} < {pct(self.config.low_watermark)}"]
        batch = state.settings.batch_size
        now_tps = state.throughput.get((batch, bucket))
        below = [v for (b, n), v in state.throughput.items() if n == bucket and b < batch]
        if now_tps is not None and below and max(below) > 0:
            gain = now_tps / max(below) - 1
            parts.append(f"tokens/s {gain:+.0%}")
            ctx.inputs["tokens_per_s_gain"] = round(gain, 3)
        return ", ".join(parts)

    def _relax_seq(self, state: WorkerControlState, ctx: _Context) -> PolicyDecision | None:
        cfg = self.config
        s = state.settings
        # Each cap doubles the calm needed before relaxing (up to 16x): no cap/relax cycle.
        wait = cfg.seq_relax_s * 2 ** min(4, max(0, state.seq_caps - 1))
        ceiling = min(cfg.max_seq_len, state.context_length or cfg.max_seq_len)
        if s.max_seq_len >= ceiling or ctx.now - state.last_degraded_ts < wait:
            return None
        if ctx.pressure is not None and ctx.pressure >= cfg.low_watermark:
            return None
        if not self._cooled(state, ctx.now, grow=True):
            return None
        cap = min(ceiling, s.max_seq_len * 2)
        if s.batch_size > self._oom_limit(state, cap):
            return None
        if ctx.memory is not None and ctx.budget is not None:
            predicted = state.model.predict_peak(s.batch_size, cap, 0, s.precision)
            if predicted > ctx.budget:
                return None
        why = "memory low and no slow long sequences"
        if ctx.pressure is not None:
            why = f"memory {pct(ctx.pressure)} < {pct(cfg.low_watermark)}, no slow long sequences"
        return self._change(state, ctx, DecisionAction.RELAX_SEQ, why, max_seq_len=cap)


def _paged(state: WorkerControlState) -> bool:
    """Whether the worker runs the engine core: its KV memory is a pool sized up front."""
    return bool(state.recent and state.recent[-1].kv_pool_bytes)


def _knobs(settings: ControlSettings) -> tuple[object, ...]:
    """The settings a decision may change (a decision changing none is no decision)."""
    return (settings.batch_size, settings.max_seq_len, settings.precision,
            settings.max_batched_tokens, settings.kv_budget_bytes)  # fmt: skip


def _gib(value: float) -> str:
    return f"{value / (1 << 30):.1f}"
