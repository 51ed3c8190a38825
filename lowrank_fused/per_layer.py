"""Per-layer update in backward: each parameter is stepped as soon as its gradient is complete
and the gradient is freed at once, so a step never holds every gradient of the model (the
memory trick of GaLore's and AdaRankGrad's training scripts, made correct here with gradient
accumulation and with methods that need a global phase).

    stepper = PerLayerStep(opt)              # registers post-accumulate-grad hooks
    for i, batch in enumerate(loader):
        with stepper.accumulate(i % accum != accum - 1):   # no step on non-final micro-batches
            loss(batch).backward()            # the optimizer steps during this call
        sched.step()                          # no opt.step() / opt.zero_grad() needed

* A step ends when backward does (``queue_callback`` on the autograd engine): the
  optimizer's end-of-step work (LDAdam's global counter, AdaptiveAdamW's group counters) runs
  then, once.
* Steps with a phase over all gradients (AdaptiveAdamW's rank allocation; a randomized
  GaLore / AdaMeM refresh that batches same-shape layers) keep the gradients and run the whole
  step at the end of backward; every other step frees each gradient after its update.
* ``nonfinite="raise"`` checks each gradient before its own update (layers whose gradients
  came earlier in the same backward are already updated, which the error says);
  ``nonfinite="skip"`` needs the whole step and is refused; ``"ignore"`` checks nothing.
* The result equals ``opt.step()`` after a full backward, bit for bit (tested per method).
* Single-process training only (as in GaLore's and AdaRankGrad's scripts): under DDP the hook
  fires before the gradient's bucket is all-reduced, and FSDP2 assigns sharded gradients
  after its reduce-scatter instead of accumulating them, so neither gives the hook the final
  gradient: ``PerLayerStep`` refuses a process group of more than one rank or sharded
  parameters; use ``opt.step()`` there.
"""
from __future__ import annotations

import contextlib

import torch


class PerLayerStep:
    """Step ``optimizer`` (a lowrank_fused optimizer) from inside backward, one parameter at
    a time. ``free_grads`` (default True) sets each gradient to None after its update."""

    def __init__(self, optimizer, *, free_grads: bool = True):
        from lowrank_fused.optim._base import LowRankOptimizer

        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError("PerLayerStep needs a lowrank_fused optimizer, got "
                            f"{type(optimizer).__name__}")
        import torch.distributed as dist

        from lowrank_fused.optim._base import is_sharded

        if any(is_sharded(p) for g in optimizer.param_groups for p in g["params"]) or (
                dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise ValueError("per-layer mode is single-process: under DDP the hook would see "
                             "gradients before their all-reduce, and FSDP2 assigns sharded "
                             "gradients instead of accumulating them; use opt.step()")
        if optimizer.nonfinite == "skip":
            raise ValueError("nonfinite='skip' skips a whole step, which per-layer mode cannot "
                             "do (earlier layers are already updated); use 'raise' or 'ignore'")
        self.optimizer = optimizer
        self.free_grads = bool(free_grads)
        self._accumulating = False
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    @contextlib.contextmanager
    def accumulate(self, enabled: bool = True):
        """Within this context, backward only accumulates gradients (a non-final
        micro-batch); the step happens in the first backward outside it."""
        previous, self._accumulating = self._accumulating, bool(enabled)
        try:
            yield self
        finally:
            self._accumulating = previous

    def _hook(self, p):
        if self._accumulating:
            return
        opt = self.optimizer
        if not self._active:
            self._active = True
            try:
                opt._per_layer_begin()
            except BaseException:
                self._active = False
                raise
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        if opt._per_layer_param(p) and self.free_grads:
            p.grad = None

    def _finish(self):
        self._active = False
        if self.optimizer._per_layer_end() and self.free_grads:
            self.optimizer.zero_grad(set_to_none=True)

    def remove(self):
        """Unregister the hooks (the optimizer works with ``step()`` again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
