"""Where a denoiser receives its time conditioning: the slots an MTEO row replaces, and the model's own rows.

Two kinds, told apart by the model's modules:
- per-block embedders (DiT: every block's `norm1` owns a `CombinedTimestepLabelEmbeddings`): a slot is one call of a
  `timestep_embedder` in a forward pass, in call order (the bundled DiT: blocks 0-3, then the output layer, which
  calls block 0's embedder again); a row replaces that call's output.
- adaLN-single (PixArt): `adaln_single` embeds the timestep once and one shared linear layer turns it into every
  block's six modulation vectors. A slot is a transformer block, plus the output layer last: block i's modulation
  becomes `adaln_single.linear(silu(row_i))` and the output layer's shift and scale use its row in place of the
  embedded timestep. Every row starts at the model's own embedding, where the model is reproduced exactly; per-block
  rows through the frozen shared projection are our design (MTEO's method section is not available to us).

A kind installs forward hooks that ask a `RowSource` for slot i's vector, broadcast to the call's rows; a source
returning None leaves the call as the model computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tmpdiff.formats.errors import TmpdiffError

EMBEDDER_SUFFIX = "timestep_embedder"
# The architectures whose time conditioning is one of the two kinds above (DiT's per-block embedders of the timestep
# and class label; PixArt's adaLN-single). SD3, Flux and Sana embed t together with pooled text or guidance
# (`time_text_embed`, `time_embed`), UNets through `time_embedding`: neither kind, refused by name.
SUPPORTED_ARCHITECTURES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
_EMBEDDER_PARENT = "CombinedTimestepLabelEmbeddings"  # DiT's: timestep + class label, what the probe passes


def check_supported(architecture: str) -> None:
    """Refuse learned / input time embeddings for an architecture whose time conditioning is neither kind."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise TmpdiffError(f"learned time embeddings (--time-embedding-input, distill-embeddings) support "
                           f"{' and '.join(SUPPORTED_ARCHITECTURES)} only, not {architecture}: its time conditioning "
                           "is neither per-block timestep embedders nor adaLN-single")
OUTPUT_SLOT = "adaln_single"  # adaLN-single: the output layer's slot, named by the module whose output it replaces


class RowSource(Protocol):
    rows: int | torch.Tensor | None  # set while exporting: the call's rows are known apart from the hooked call

    def vector(self, index: int, rows: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Slot `index`'s (rows, dim) input, or None to keep the model's own."""


class TimeSites(Protocol):
    """One model's time-conditioning slots."""

    def slots(self) -> list[str]: ...

    def own(self, timesteps: Sequence[float], rows: int | None = None) -> torch.Tensor:
        """(len(timesteps), slots, dim): what each slot receives from the model itself. `rows` copies of each timestep
        reproduce a sampler's batch bit for bit; None embeds all timesteps in one batch (a table)."""
        ...

    def install(self, source: RowSource) -> list:
        """Register the hooks (their handles are returned for removal)."""
        ...


class EmbedderCalls:
    """DiT-style: each `timestep_embedder` call is a slot."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.embedders = {n: m for n, m in model.named_modules() if n.endswith(EMBEDDER_SUFFIX)}
        self._slots: list[str] | None = None
        self._calls = 0

    def slots(self) -> list[str]:
        if self._slots is None:
            self._slots = self._probe()
        return list(self._slots)

    @torch.no_grad()
    def _probe(self) -> list[str]:
        calls: list[str] = []
        handles = [m.register_forward_hook(lambda _m, _i, _o, name=name: calls.append(name))
                   for name, m in self.embedders.items()]
        try:
            config = self.model.config
            size, channels = int(config.sample_size), int(config.in_channels)
            dtype = next(self.model.parameters()).dtype  # a 16-bit copy (fp16 graphs) takes 16-bit inputs
            self.model(hidden_states=torch.zeros(1, channels, size, size, dtype=dtype), timestep=torch.zeros(1),
                       class_labels=torch.zeros(1, dtype=torch.long))
        finally:
            for handle in handles:
                handle.remove()
        seen: dict[str, int] = {}
        slots = []
        for name in calls:
            seen[name] = seen.get(name, 0) + 1
            slots.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return slots

    @torch.no_grad()
    def own(self, timesteps: Sequence[float], rows: int | None = None) -> torch.Tensor:
        modules = dict(self.model.named_modules())

        def embed(name: str, t: torch.Tensor) -> torch.Tensor:
            parent = modules[name.rsplit(".", 1)[0]] if "." in name else self.model
            return modules[name](parent.time_proj(t).to(next(modules[name].parameters()).dtype)).float()

        names = [slot.split("#")[0] for slot in self.slots()]
        if rows is None:
            t = torch.as_tensor(list(timesteps), dtype=torch.float32)
            return torch.stack([embed(name, t) for name in names], dim=1).contiguous()
        return torch.stack([torch.stack([embed(name, torch.full((rows,), float(t)))[0] for name in names])
                            for t in timesteps])

    def install(self, source: RowSource) -> list:
        slots = self.slots()

        def reset(*_args) -> None:
            self._calls = 0

        def replace(name: str, out: torch.Tensor) -> torch.Tensor | None:
            index, self._calls = self._calls, self._calls + 1
            vector = source.vector(index, out.shape[0], out.dtype)
            if vector is not None and (index >= len(slots) or slots[index].split("#")[0] != name):
                raise TmpdiffError(f"time embedding call {index} is {name}, not the slot recorded for it")
            return vector

        handles = [self.model.register_forward_pre_hook(reset)]
        for name, module in self.embedders.items():
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: replace(name, out)))
        return handles


class AdaLNSingle:
    """PixArt-style: one slot per transformer block, then the output layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.adaln = model.adaln_single
        self.blocks = list(model.transformer_blocks)
        if getattr(self.adaln.emb, "use_additional_conditions", False):
            raise TmpdiffError(f"{type(model).__name__} adds resolution and aspect-ratio embeddings to its time "
                               "embedding (use_additional_conditions): learned time embeddings are not supported for it")

    def slots(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(self.blocks))] + [OUTPUT_SLOT]

    @torch.no_grad()
    def own(self, timesteps: Sequence[float], rows: int | None = None) -> torch.Tensor:
        def embed(t: torch.Tensor) -> torch.Tensor:
            dtype = next(self.adaln.parameters()).dtype
            return self.adaln.emb(t, resolution=None, aspect_ratio=None, batch_size=len(t), hidden_dtype=dtype).float()

        count = len(self.slots())
        if rows is None:
            e = embed(torch.as_tensor(list(timesteps), dtype=torch.float32))
            return e[:, None].expand(-1, count, -1).contiguous()
        return torch.stack([embed(torch.full((rows,), float(t)))[0].expand(count, -1) for t in timesteps])

    def _modulation(self, vector: torch.Tensor, one_row: bool) -> torch.Tensor:
        if one_row:  # a graph: project the one vector, then broadcast (a 1-row GEMM per block instead of a batch's)
            return self.adaln.linear(self.adaln.silu(vector[:1])).expand(vector.shape[0], -1)
        # broadcast first, then project: the model's own row count, so the model's rows give the model's bits
        return self.adaln.linear(self.adaln.silu(vector))

    def install(self, source: RowSource) -> list:
        last = len(self.blocks)

        def block_hook(index: int, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs["hidden_states"]
            vector = source.vector(index, hidden.shape[0], hidden.dtype)
            if vector is None:
                return None
            return args, {**kwargs, "timestep": self._modulation(vector, one_row=source.rows is not None)}

        def output_hook(_module, _inputs, out: tuple[torch.Tensor, torch.Tensor]):
            modulation, embedded = out
            vector = source.vector(last, embedded.shape[0], embedded.dtype)
            # the blocks' modulation is replaced at each block: the shared one is dead code in a traced graph
            return None if vector is None else (modulation, vector)

        handles = [self.adaln.register_forward_hook(output_hook)]
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: block_hook(i, args, kwargs), with_kwargs=True))
        return handles


def time_sites(model: torch.nn.Module) -> TimeSites:
    """The model's kind of time-conditioning slots; a model of another architecture (`SUPPORTED_ARCHITECTURES`) or
    with neither kind is refused."""
    check_supported(type(model).__name__)
    if hasattr(model, "adaln_single") and hasattr(model, "transformer_blocks"):
        return AdaLNSingle(model)
    calls = EmbedderCalls(model)
    modules = dict(model.named_modules())
    others = sorted({type(modules[name.rsplit(".", 1)[0]]).__name__ for name in calls.embedders if "." in name}
                    - {_EMBEDDER_PARENT})
    if others:
        raise TmpdiffError(f"{type(model).__name__} embeds its timestep in {', '.join(others)}, not DiT's "
                           f"{_EMBEDDER_PARENT}: learned time embeddings are not supported for it")
    if not calls.embedders:
        raise TmpdiffError(f"{type(model).__name__} has no adaLN-single and no '*.{EMBEDDER_SUFFIX}' modules: "
                           "no time embedding to replace")
    return calls
