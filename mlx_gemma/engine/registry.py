"""One engine per model: what generation builds for a model once and keeps across calls.

`engine_for(model)` returns the model's `ModelEngine`, kept on the model handle itself (so it
lives and dies with the model, and a prompt-prefix store or calibration can live across calls).
Its decode steps are built on first use per (compile, backend policy) and reused by every
generate / stream / batch / chat call and by the server; a compiled step traces once per buffer
shape. A compiled trace holds the weights as constants, so the engine rebuilds its steps when
the model's parameters are replaced (a LoRA adapter loaded or fused, a training step, a
reload) or its training flag changes.
"""

from __future__ import annotations

from mlx.utils import tree_flatten

from ..backend import policy
from .step import DecodeStep

_ATTRIBUTE = "_mlx_gemma_engine"


class ModelEngine:
    """The parts of generation built once per model: its decode steps."""

    def __init__(self, model):
        self.model = model
        self._steps: dict = {}  # (compile, backend policy) -> DecodeStep
        self._weights: list = []  # the parameter arrays the steps were built over

    def step(self, compile: bool = True) -> DecodeStep:
        """The model's decode step (built now if the weights or the policy changed since)."""
        weights = [a for _, a in tree_flatten(self.model.parameters())] + [self.model.training]
        if len(weights) != len(self._weights) or any(a is not b for a, b in zip(weights, self._weights)):
            self._steps.clear()
            self._weights = weights
        key = (compile, policy())
        if key not in self._steps:
            self._steps[key] = DecodeStep(self.model, compile)
        return self._steps[key]


def engine_for(model) -> ModelEngine:
    """The model's one ModelEngine, made on first use."""
    engine = getattr(model, _ATTRIBUTE, None)
    if engine is None:
        engine = ModelEngine(model)
        setattr(model, _ATTRIBUTE, engine)
    return engine
