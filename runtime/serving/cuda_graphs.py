"""CUDA graphs for the whole k-step sampling loop of a batch (and its decode), in one module.

One graph per `GraphKey` (adapter architecture, backbone LoRA, batch bucket, resolution, steps,
sampler): warmed up on a side stream, then captured against static input buffers. A request never
hands the graph new tensors: it copies its rows into the static buffers (`StaticInputs.copy_in`),
and an adapter swap copies weights into the live slot's tensors (`LiveSlot.copy_in`), so the data
pointers the graph was captured with stay the ones it reads and a swap never recaptures. With
`debug=True` every replay first checks those pointers (inputs and the watched adapter tensors).

Graphs of one cache share a memory pool: replays are sequential on one stream, as the caching
allocator's graph-pool sharing requires.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Inputs = Mapping[str, "torch.Tensor | list[torch.Tensor]"]


class GraphPointerError(RuntimeError):
    """A tensor a captured graph reads was rebound (new storage) instead of copied into."""


@dataclass(frozen=True)
class GraphKey:
    architecture: str  # live-slot key: adapter kind + architecture config hash
    backbone_lora: str | None  # the active backbone LoRA (its tensors are read by the graph), or None
    batch: int  # the batch bucket
    resolution: int
    steps: int
    sampler: str
    strength: float = 1.0


@dataclass(frozen=True)
class StepGraphKey:
    """A graph of step-level batching: one part of one denoiser evaluation for a bucket of rows."""

    part: str  # an adapter's live-slot key (its residuals), or "unet:<residual kinds>" (the backbone step)
    backbone_lora: str | None
    batch: int  # the row bucket
    shape: tuple[int, ...]  # a row's latent shape (channels, h, w)


class StaticInputs:
    """The input buffers of one captured graph. Lists (the per-step `cm` noise) are kept as lists."""

    def __init__(self, buffers: Mapping[str, torch.Tensor | list[torch.Tensor]]):
        self.buffers = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in buffers.items()}

    @classmethod
    def like(cls, values: Inputs) -> StaticInputs:
        """Zeroed buffers with the shapes, dtypes and devices of `values`."""
        return cls({k: ([torch.zeros_like(t) for t in v] if isinstance(v, (list, tuple)) else torch.zeros_like(v))
                    for k, v in values.items()})

    def _flat(self, values: Inputs) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, v in values.items():
            if isinstance(v, (list, tuple)):
                out += [(f"{name}.{i}", t) for i, t in enumerate(v)]
            else:
                out.append((name, v))
        return out

    def copy_in(self, values: Inputs) -> None:
        """Copy a batch's tensors into the buffers (same names and shapes; never rebinds a buffer)."""
        mine = dict(self._flat(self.buffers))
        theirs = dict(self._flat(values))
        if mine.keys() != theirs.keys():
            raise ValueError(f"graph inputs {sorted(theirs)} do not match the captured inputs {sorted(mine)}")
        for name, src in theirs.items():
            dst = mine[name]
            if src.shape != dst.shape:
                raise ValueError(f"graph input {name}: shape {tuple(src.shape)} != captured {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)

    def args(self) -> dict:
        return dict(self.buffers)

    def data_ptrs(self) -> dict[str, int]:
        return {name: t.data_ptr() for name, t in self._flat(self.buffers)}


def check_pointers(captured: Mapping[str, int], now: Mapping[str, int], what: str) -> None:
    """Raise GraphPointerError naming the tensors whose storage moved since the capture."""
    moved = sorted(k for k in captured if now.get(k) != captured[k])
    if moved or now.keys() != captured.keys():
        extra = sorted(set(now) - set(captured))
        raise GraphPointerError(
            f"{what}: tensors were rebound since the graph was captured (moved: {moved[:5]}, new: {extra[:5]}); "
            "copy into captured tensors (param.copy_) instead of replacing them"
        )


@dataclass
class CapturedGraph:
    key: GraphKey
    graph: "torch.cuda.CUDAGraph"
    inputs: StaticInputs
    output: torch.Tensor
    input_ptrs: dict[str, int]
    watched_ptrs: dict[str, int]

    def check(self, watched: Mapping[str, torch.Tensor]) -> None:
        check_pointers(self.input_ptrs, self.inputs.data_ptrs(), f"graph {self.key} inputs")
        check_pointers(self.watched_ptrs, {k: t.data_ptr() for k, t in watched.items()}, f"graph {self.key} weights")


class GraphCache:
    """Captured graphs by key, captured on first use (`run`), replayed after."""

    def __init__(self, device: torch.device | str, warmup: int = 2, debug: bool = False, metrics=None):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.warmup, self.debug, self.metrics = warmup, debug, metrics
        self.graphs: dict[GraphKey, CapturedGraph] = {}
        self.captures = 0
        self._pool = torch.cuda.graph_pool_handle()

    def run(
        self,
        key: GraphKey | StepGraphKey,
        fn: Callable[..., torch.Tensor],
        values: Inputs,
        watched: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """`fn(**inputs) -> output` for these values, through the graph of `key` (captured if new).
        The returned tensor is the graph's static output: copy it before the next replay."""
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, fn, values, watched)
        captured.inputs.copy_in(values)
        if self.debug:
            captured.check(watched)
        captured.graph.replay()
        if self.metrics:
            self.metrics.graph_replays.inc()
        return captured.output

    def _capture(self, key, fn, values, watched) -> CapturedGraph:
        inputs = StaticInputs.like(values)
        inputs.copy_in(values)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy inits, cuBLAS workspaces, allocator warm-up
                fn(**inputs.args())
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: HTTP threads never touch CUDA, but nothing else should be able to break a capture
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = fn(**inputs.args())
        captured = CapturedGraph(
            key, graph, inputs, output, inputs.data_ptrs(), {k: t.data_ptr() for k, t in watched.items()}
        )
        self.graphs[key] = captured
        self.captures += 1
        if self.metrics:
            self.metrics.graph_captures.inc()
        return captured

    def drop(self, predicate: Callable[[GraphKey], bool]) -> int:
        """Forget the graphs whose key matches (their tensors are gone, e.g. an evicted backbone LoRA)."""
        keys = [k for k in self.graphs if predicate(k)]
        for k in keys:
            del self.graphs[k]
        return len(keys)
