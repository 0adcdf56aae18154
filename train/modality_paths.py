"""How a step gets the [U, F] feature rows of one content modality for its item ids (train.media):

- `EncoderPath`: the modality's encoder runs on the step's prepared media (token batches or pixels). Frozen: no
  gradients, any batching. Trained (top_layers / lora; its parameters are in the DeepSpeed engine): one encoder call
  per step or catalogue chunk, so that every rank calls the encoder as often (ZeRO-3 gathers a module's parameters
  in lockstep on every rank); a rank with nothing to encode runs a one-item dummy whose output enters the rows with
  weight zero, so its backward (ZeRO's gradient reduction) stays in step too.
- `SideAdapterPath`: the frozen backbone's per-layer states of every item, encoded once per run
  (`MediaStream.fit_side_states`) and kept on the rank's device as fp16 [N + 1, layers + 1, F]; a step runs no
  backbone, only the side network (cammsr.side_adapter) over the states of its ids. Items without that input keep
  a zero row.
"""

from __future__ import annotations

import torch

from cammsr.side_adapter import SideAdapter
from data_shards.features.media_batches import MediaBatch


class EncoderPath:
    needs_media = True

    def __init__(self, modality: str, encoder, trains: bool, batch_size: int):
        self.modality, self.encoder, self.trains, self.batch_size = modality, encoder, trains, batch_size
        self.dim = encoder.dim

    def _pieces(self, batch: MediaBatch, device: torch.device) -> list[tuple[torch.Tensor, object]]:
        """(row positions, encoder input) per encoder call: one call when the encoder trains."""
        if self.modality == "text":
            rows = torch.from_numpy(batch.text_rows).to(device)
            return [(rows[positions.to(device)], tokens) for positions, tokens in batch.texts.batches]
        rows = torch.from_numpy(batch.image_rows).to(device)
        size = max(len(rows), 1) if self.trains else self.batch_size
        return [(rows[s:s + size], batch.pixels[s:s + size]) for s in range(0, len(rows), size)]

    def rows(self, batch: MediaBatch, ids: torch.Tensor, training: bool) -> torch.Tensor:
        out = torch.zeros(len(ids), self.dim, device=ids.device)
        pieces = self._pieces(batch, ids.device)
        with torch.set_grad_enabled(self.trains and training):
            for target, inputs in pieces:
                out = out.index_put((target,), self.encoder.pool(inputs))
            if self.trains and not pieces:  # keep the ranks in step (module docstring)
                out = out + 0.0 * self._dummy(ids.device).sum()
        return out

    def _dummy(self, device: torch.device) -> torch.Tensor:
        if self.modality == "text":
            return self.encoder.pool(self.encoder.tokenize(["-"]).batches[0][1])
        size = self.encoder.image_size
        return self.encoder.pool(torch.zeros(1, 3, size, size, device=device))


class SideAdapterPath:
    needs_media = False
    trains = True

    def __init__(self, modality: str, encoder, bottleneck: int):
        self.modality, self.encoder = modality, encoder
        self.dim = encoder.dim
        self.side = SideAdapter(len(encoder.model.encoder.layer), encoder.dim, bottleneck).to(encoder.device)
        self.states: torch.Tensor | None = None  # [N + 1, layers + 1, F] fp16, set by MediaStream.fit_side_states

    def layer_states(self, batch: MediaBatch, ids: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's pooled states at every layer for a prepared batch, [U, layers + 1, F]."""
        out = torch.zeros(len(ids), self.side.num_layers + 1, self.dim, device=ids.device)
        with torch.no_grad():
            if self.modality == "text":
                rows = torch.from_numpy(batch.text_rows).to(ids.device)
                for positions, tokens in batch.texts.batches:
                    out[rows[positions.to(ids.device)]] = self.encoder.layer_states(tokens)
            elif len(batch.image_rows):
                out[torch.from_numpy(batch.image_rows).to(ids.device)] = self.encoder.layer_states(batch.pixels)
        return out

    def rows(self, batch: MediaBatch, ids: torch.Tensor, training: bool) -> torch.Tensor:
        states = self.states[ids].float()
        present = (states.abs().sum(dim=(1, 2)) > 0).float()[:, None]
        with torch.set_grad_enabled(training):
            return self.side(states) * present

    def memory_mb(self) -> float:
        return 0.0 if self.states is None else self.states.numel() * self.states.element_size() / 2 ** 20
