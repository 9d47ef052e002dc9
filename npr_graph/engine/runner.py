"""One batched forward step of an unmodified transformers model over the paged KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import KVCache, StepPlan, attention_implementation
from .backends import AttentionBackend, TorchBackend, flat_level
from .graphs import CudaGraph, DecodeGraphs
from .kv import PagePool, slot_table
from .lanes import Lane


@dataclass
class ModelShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            config.num_hidden_layers,
            kv_heads,
            head_dim,
            model.get_output_embeddings().weight.shape[0],
        )


class ModelRunner:
    """Owns the KV tensors; feeds each lane's pending tokens and returns next-token logits.

    A step takes lanes with one or more pending tokens (prompts, or one token while decoding),
    left-pads them to the longest, writes their keys and values into the lanes' slots and
    returns, per lane, the logits after its last token.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool: PagePool,
        device: torch.device | str = "cpu",
        backend: AttentionBackend | None = None,
    ):
        self.model = model
        self.pool = pool
        self.device = torch.device(device)
        self.shape = ModelShape.of(model)
        dtype = next(model.parameters()).dtype
        slots = pool.num_pages * pool.page_size
        self.kv = KVCache(
            self.shape.num_layers,
            slots,
            self.shape.kv_heads,
            self.shape.head_dim,
            dtype,
            self.device,
        )
        self.slot_positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.needs_positions = bool(getattr(_text_config(model), "sliding_window", None))
        self.backend = backend or TorchBackend()
        self.backend.attach(model, self.device)
        self.graphs: DecodeGraphs | None = None

    def enable_graphs(
        self, max_batch: int, graph_factory: Callable[[], CudaGraph] | None = None
    ) -> None:
        """Run decode steps of up to ``max_batch`` lanes as CUDA graphs (:mod:`.graphs`).
        ``graph_factory`` replaces ``torch.cuda.CUDAGraph`` (tests on the CPU)."""
        if graph_factory is None and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self.needs_positions:
            raise ValueError("CUDA graphs do not support sliding-window attention layers")
        if not self.backend.can_graph():
            raise ValueError(
                f"the {self.backend.name} attention backend cannot run in a CUDA graph "
                "(use flashinfer)"
            )
        self.graphs = DecodeGraphs(
            self.model,
            self.kv,
            self.backend.graph_decoder,
            max_batch,
            self.device,
            graph_factory,
        )

    @staticmethod
    def bytes_per_slot(model: torch.nn.Module) -> int:
        """KV bytes one token takes over all layers (keys and values)."""
        shape = ModelShape.of(model)
        itemsize = next(model.parameters()).element_size()
        return 2 * shape.num_layers * shape.kv_heads * shape.head_dim * itemsize

    def step(self, lanes: Sequence[Lane]) -> torch.Tensor:
        """Feed every lane's pending tokens; return ``logits [B, V]`` (float32) after each."""
        counts = [len(lane.pending) for lane in lanes]
        width = max(counts)
        write = []
        for lane, count in zip(lanes, counts, strict=True):
            write.append(lane.kv.append_slots(count))
        self._apply_copies()
        table = slot_table([lane.kv for lane in lanes])  # on the CPU: masks and plans start here
        batch = len(lanes)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        write_slots = torch.zeros(
            batch, width, dtype=torch.long
        )  # padding writes to scratch slot 0
        for row, (lane, count) in enumerate(zip(lanes, counts, strict=True)):
            input_ids[row, width - count :] = torch.tensor(lane.pending)
            positions[row, width - count :] = torch.tensor(lane.pending_positions)
            write_slots[row, width - count :] = torch.tensor(write[row])
        if width == 1 and self.graphs is not None:
            level = flat_level(table)
            logits = self.graphs.step(
                input_ids, positions, write_slots[:, 0], level.kv_indptr, level.kv_indices
            )
            if logits is not None:
                for lane in lanes:
                    lane.fed()
                return logits
        positions = positions.to(self.device)
        write_slots = write_slots.flatten().to(self.device)

        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            # Query j of a row is view token (length - width + j); it sees view tokens up to
            # itself. Padding rows (query index < 0) see anything real.
            query_index = table.lengths[:, None] - width + torch.arange(width)
            visible = table.mask[:, None, :] & (
                torch.arange(table.slots.shape[1])[None, None, :] <= query_index[:, :, None]
            )
            visible |= (query_index < 0)[:, :, None] & table.mask[:, None, :]
            return table.slots.to(self.device), visible[:, None].to(self.device)

        plan = StepPlan(write_slots, None, None, self.kv, gather=gather)
        if width == 1:
            plan.decode = self.backend.plan_decode(lanes, table)
        if plan.decode is None or self.needs_positions:
            plan.gather_inputs()  # every layer gathers: build the indices before the forward
        if self.needs_positions:
            self.slot_positions[write_slots] = positions.flatten()
            plan.query_positions = positions
            plan.key_positions = self.slot_positions[plan.read_slots]
        with torch.inference_mode(), attention_implementation(self.model):
            out = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
                npr_plan=plan,
            )
        for lane in lanes:
            lane.fed()
        # Sampling runs on the CPU (per-sample CPU generators); a no-op copy on a CPU model.
        return out.logits[:, -1].float().cpu()

    def _apply_copies(self) -> None:
        copies = self.pool.drain_copies()
        if not copies:
            return
        size = self.pool.page_size
        source = torch.cat([torch.arange(c.src * size, c.src * size + c.num_slots) for c in copies])
        target = torch.cat([torch.arange(c.dst * size, c.dst * size + c.num_slots) for c in copies])
        self.kv.copy_slots(source.to(self.device), target.to(self.device))
        self.slot_positions[target] = self.slot_positions[source]


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
