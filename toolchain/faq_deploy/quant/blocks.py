"""Running a decoder block by block on calibration rows: the engine every calibrated method shares.

`block_inputs` stops the model's forward at the first block and keeps what every block is called with;
`run_block` forwards one block, recording only the module inputs and outputs a method asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def block_inputs(model: PreTrainedModel, blocks: nn.ModuleList,
                 calibration: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first block's hidden-state input [rows, seq, hidden] and the keyword arguments
    (rotary embeddings, mask, positions) every block is called with."""
    captured: dict[str, Any] = {}

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(calibration, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"], captured["kwargs"]


@dataclass
class BlockCapture:
    """What one forward pass of a block recorded."""

    calls: dict[str, tuple[tuple, dict]]  # module name → (args, kwargs) it was called with
    outputs: dict[str, torch.Tensor]      # module name → its output
    block_out: torch.Tensor

    def input(self, name: str) -> torch.Tensor:
        args, kwargs = self.calls[name]
        return args[0] if args else kwargs["hidden_states"]


def first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], inputs: set[str],
              outputs: frozenset[str] | set[str] = frozenset()) -> BlockCapture:
    """Forward one block, recording how the `inputs` modules were called and what the `outputs`
    modules returned (only what is asked: a kept activation is megabytes per module)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for name in inputs:
        handles.append(block.get_submodule(name).register_forward_pre_hook(
            lambda _m, a, k, name=name: calls.__setitem__(name, (a, k)), with_kwargs=True))
    for name in outputs:
        handles.append(block.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: kept.__setitem__(name, first_output(out))))
    try:
        block_out = first_output(block(x, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return BlockCapture(calls, kept, block_out)
