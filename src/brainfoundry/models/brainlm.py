"""BrainLM: a masked autoencoder over parcel x time-patch tokens (Caro et al., ICLR 2024).

A sample is a window ``x`` of ``[T, N]`` robust-scaled parcel series. Each parcel's series is cut
into ``T / P`` patches of ``P`` points; a token is one (parcel, patch), so a sample has
``L = N * T / P`` tokens, ordered parcel-major (token ``n * n_patches + p``). Its embedding is a
linear map of the ``P`` values plus a spatial embedding of the parcel's centroid and a learned
embedding of the patch index.

Masking: ``round(mask_ratio * L)`` tokens per sample are hidden (the same count for every sample,
so the visible tokens batch without padding). With probability ``future_prob`` a sample's last
``future_patches`` patches of every parcel are among the hidden ones (forecasting), the rest drawn
at random. The ViT encoder sees a CLS token plus the visible tokens only; a lighter decoder sees
all tokens (a learned mask token where hidden) and predicts each token's ``P`` values. The loss is
the MSE over hidden tokens (time points outside ``batch["mask"]``, i.e. padding, do not count),
averaged per sample and then over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import nn

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.models import MODEL_WINDOWS
from brainfoundry.models.base import (FoundationModel, ModelConfig, SpatialEmbedding, Transformer, _check_heads,
                                      init_weights, masked_mean_per_sample, sample_uniform)


@dataclasses.dataclass
class BrainLMConfig(ModelConfig):
    """BrainLM sizes. Defaults are the paper's model (424 parcels, 512-d, 4 encoder + 2 decoder layers)."""

    n_parcels: int = 424
    window: int = MODEL_WINDOWS["brainlm"][1]
    patch_size: int = 20
    dim: int = 512
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    dropout: float = 0.0
    mask_ratio: float = 0.75
    #: Patches at the end of the window hidden together when a sample is a forecasting sample.
    future_patches: int = 1
    #: Probability that a sample's last ``future_patches`` patches are all hidden.
    future_prob: float = 0.5
    spatial_embedding: str = "coords"
    #: Time-patch position embedding: "learned" (a table, ViT init std 0.02) or "sincos" (BrainLM's fixed
    #: sinusoidal encoding of the patch index, unit amplitude; see the README's ABIDE learning curves).
    temporal_embedding: str = "learned"

    @property
    def n_patches(self) -> int:
        return self.window // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.n_parcels * self.n_patches

    def n_hidden(self, mask_ratio: float | None = None) -> int:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return int(round(ratio * self.n_tokens))

    def validate(self) -> None:
        super().validate()
        if self.patch_size < 1 or self.window % self.patch_size:
            raise ConfigError("model.patch_size", f"window {self.window} is not a multiple of patch_size {self.patch_size}")
        _check_heads("model.heads", self.dim, self.heads)
        _check_heads("model.decoder_heads", self.decoder_dim, self.decoder_heads)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError("model.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.future_patches < self.n_patches:
            raise ConfigError("model.future_patches", f"must be in [0, {self.n_patches}), got {self.future_patches}")
        if self.future_patches * self.n_parcels > self.n_hidden():
            raise ConfigError("model.future_patches", f"{self.future_patches} future patches x {self.n_parcels} "
                                                      f"parcels exceed the {self.n_hidden()} hidden tokens of "
                                                      f"mask_ratio {self.mask_ratio}")
        if self.temporal_embedding not in ("learned", "sincos"):
            raise ConfigError("model.temporal_embedding", f"must be 'learned' or 'sincos', got {self.temporal_embedding!r}")
        if not 0.0 <= self.future_prob <= 1.0:
            raise ConfigError("model.future_prob", f"must be in [0, 1], got {self.future_prob}")


@torch.compiler.disable
def visible_indices(hidden: torch.Tensor) -> torch.Tensor:
    """Indices ``[B, n_visible]`` (token order) of the tokens a hidden mask ``[B, N, n_patches]`` leaves.

    For masks from outside (evaluation): checked and worked out on the CPU, outside
    ``torch.compile``'s graph (the visible count is data). Training uses :meth:`BrainLM.draw_masks`,
    which knows the count and stays on the device.
    """
    flat = hidden.flatten(1).cpu()
    n_hidden = flat.sum(1)
    if bool((n_hidden != n_hidden[0]).any()):
        raise ValueError("every sample must hide the same number of tokens")
    n_visible = flat.shape[1] - int(n_hidden[0])
    # A stable sort of the hidden flags puts the visible tokens first, in token order.
    return flat.to(torch.int8).argsort(dim=1, stable=True)[:, :n_visible]


class BrainLM(FoundationModel):
    family = "brainlm"
    config_class = BrainLMConfig

    def __init__(self, config: BrainLMConfig):
        super().__init__(config)
        c = config
        self.patch_embed = nn.Linear(c.patch_size, c.dim)
        self.spatial = SpatialEmbedding(c.n_parcels, c.dim, c.spatial_embedding)
        self._temporal_table("temporal", c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.encoder = Transformer(c.dim, c.depth, c.heads, c.mlp_ratio, c.dropout)

        self.decoder_embed = nn.Linear(c.dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder_spatial = SpatialEmbedding(c.n_parcels, c.decoder_dim, c.spatial_embedding)
        self._temporal_table("decoder_temporal", c.decoder_dim)
        self.decoder = Transformer(c.decoder_dim, c.decoder_depth, c.decoder_heads, c.mlp_ratio, c.dropout)
        self.head = nn.Linear(c.decoder_dim, c.patch_size)

        init_weights(self)
        # PyTorch's default (Kaiming-uniform) for the patch embedding: with the ViT 0.02 the content of
        # a patch starts far below the position embeddings and training sits on a long plateau.
        self.patch_embed.reset_parameters()
        for p in (self.temporal, self.cls_token, self.mask_token, self.decoder_temporal):
            if isinstance(p, nn.Parameter):
                nn.init.trunc_normal_(p, std=0.02)

    def _temporal_table(self, name: str, dim: int) -> None:
        n = self.config.n_patches
        if self.config.temporal_embedding == "learned":
            setattr(self, name, nn.Parameter(torch.zeros(n, dim)))
            return
        # Fixed sin/cos of the patch index (Vaswani et al.), as BrainLM's encoder and decoder add them.
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(n, dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, :dim // 2]
        self.register_buffer(name, table, persistent=False)

    # helpers -------------------------------------------------------------------------------------
    def set_coords(self, coords: Any) -> None:
        self.spatial.set_coords(coords)
        self.decoder_spatial.set_coords(coords)

    def tokens_per_sample(self) -> int:
        return self.config.n_tokens

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, N]`` -> ``[B, N, n_patches, P]``."""
        b, t, n = x.shape
        c = self.config
        if t != c.window:
            raise InputError("batch", f"windows of {t} time points, the model expects {c.window}")
        self.check_batch_parcels(n)
        return x.transpose(1, 2).reshape(b, n, c.n_patches, c.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, n_patches, P]`` -> ``[B, T, N]``."""
        b, n = patches.shape[:2]
        return patches.reshape(b, n, -1).transpose(1, 2)

    def _positions(self, spatial: SpatialEmbedding, temporal: torch.Tensor) -> torch.Tensor:
        """``[L, D]`` position embedding, parcel-major like the tokens."""
        return (spatial()[:, None, :] + temporal[None, :, :]).flatten(0, 1)

    def draw_masks(self, batch: Mapping[str, Any] | None, batch_size: int, mask_ratio: float | None = None,
                   future_prob: float | None = None, future_patches: int | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden mask ``[B, N, n_patches]`` (True = hidden) and visible indices ``[B, n_visible]``.

        Random masking at ``mask_ratio``, the same hidden count in every sample; with probability
        ``future_prob`` (per sample) the last ``future_patches`` patches of every parcel are hidden
        first. Drawn on ``device`` from the per-sample seeds (``batch["seed"]``) when present.
        """
        c = self.config
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        prob = c.future_prob if future_prob is None else future_prob
        n_future = c.future_patches if future_patches is None else future_patches
        n_hidden = c.n_hidden(ratio)
        if n_future * c.n_parcels > n_hidden:
            raise ValueError(f"{n_future} future patches need more than the {n_hidden} hidden tokens")
        u = sample_uniform(batch or {}, batch_size, c.n_tokens + 1, device=device)
        noise, pick_future = u[:, :-1].view(batch_size, c.n_parcels, c.n_patches), u[:, -1] < prob
        if n_future:
            # Future tokens of forecasting samples sort after every other token, so they are hidden first.
            noise[:, :, c.n_patches - n_future:] += 2.0 * pick_future[:, None, None]
        order = noise.flatten(1).argsort(dim=1, descending=True, stable=True)
        hidden = torch.zeros(batch_size, c.n_tokens, dtype=torch.bool, device=u.device)
        hidden.scatter_(1, order[:, :n_hidden], True)
        keep = order[:, n_hidden:].sort(dim=1).values  # visible tokens in token order
        return hidden.view(batch_size, c.n_parcels, c.n_patches), keep

    def random_mask(self, batch: Mapping[str, Any] | None, batch_size: int, mask_ratio: float | None = None,
                    future_prob: float | None = None, future_patches: int | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """The hidden mask of :meth:`draw_masks` (what the training step hides for these seeds)."""
        return self.draw_masks(batch, batch_size, mask_ratio, future_prob, future_patches, device)[0]

    def future_mask(self, batch_size: int, future_patches: int) -> torch.Tensor:
        """Hide exactly the last ``future_patches`` patches of every parcel (forecasting evaluation)."""
        c = self.config
        hidden = torch.zeros(batch_size, c.n_parcels, c.n_patches, dtype=torch.bool)
        hidden[:, :, c.n_patches - future_patches:] = True
        return hidden

    # the network ---------------------------------------------------------------------------------
    def encode_tokens(self, patches: torch.Tensor, hidden: torch.Tensor | None,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder output ``[B, 1 + n_visible, D]`` (CLS first) and the visible token indices.

        ``keep`` (visible indices) may come with ``hidden``; otherwise it is worked out from it.
        """
        b = patches.shape[0]
        tokens = self.patch_embed(patches).flatten(1, 2) + self._positions(self.spatial, self.temporal)
        if hidden is not None:
            if keep is None:
                keep = visible_indices(hidden)
            keep = keep.to(tokens.device, non_blocking=True)
            tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return self.encoder(x), keep

    def decode(self, latent: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Predicted patches ``[B, N, n_patches, P]`` from encoder output and visible indices."""
        c = self.config
        b = latent.shape[0]
        y = self.decoder_embed(latent)
        cls, vis = y[:, :1], y[:, 1:]
        if keep is None:
            full = vis
        else:
            full = self.mask_token.to(vis.dtype).expand(b, c.n_tokens, -1).clone()
            full = full.scatter(1, keep[..., None].expand(-1, -1, vis.shape[-1]), vis)
        full = full + self._positions(self.decoder_spatial, self.decoder_temporal)
        out = self.decoder(torch.cat([cls, full], dim=1))[:, 1:]
        return self.head(out).view(b, c.n_parcels, c.n_patches, c.patch_size)

    def reconstruct(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted series ``[B, T, N]`` given the windows and a hidden-token mask ``[B, N, n_patches]``.

        For evaluation: masked reconstruction (``random_mask`` at a ratio) and forecasting
        (``future_mask``). Visible positions are predictions too; take the hidden ones.
        """
        patches = self.patchify(x)
        latent, keep = self.encode_tokens(patches, hidden)
        return self.unpatchify(self.decode(latent, keep))

    @torch.no_grad()
    def zero_loss(self, batch: Mapping[str, Any]) -> float:
        """The masked-patch MSE of the all-zero prediction on the batch's own masks (the batch seeds draw
        the ones the model is scored on). Series are robust-scaled, so zero is the training median."""
        x = batch["x"]
        b = x.shape[0]
        patches = self.patchify(x).float()
        hidden, _ = self.draw_masks(batch, b, device=x.device)
        valid = batch.get("mask")
        valid = torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device)
        valid = valid.view(b, 1, *patches.shape[2:4])
        return float(masked_mean_per_sample(patches ** 2, hidden[..., None] & valid).mean())

    def ssl_forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss, metrics and per-parcel tokens ``[B, N, D]`` (mean of each parcel's visible tokens)."""
        c = self.config
        x = batch["x"]
        patches = self.patchify(x)
        b = x.shape[0]
        hidden, keep = self.draw_masks(batch, b, device=x.device)
        latent, keep = self.encode_tokens(patches, hidden, keep)
        pred = self.decode(latent, keep)

        valid = batch.get("mask")
        if valid is None:
            valid = torch.ones(b, c.window, dtype=torch.bool, device=x.device)
        valid = valid.to(x.device).view(b, 1, c.n_patches, c.patch_size)
        err = (pred.float() - patches.float()) ** 2
        loss_per_sample = masked_mean_per_sample(err, hidden[..., None] & valid)
        loss = loss_per_sample.mean()
        with torch.no_grad():
            visible_mse = masked_mean_per_sample(err, ~hidden[..., None] & valid).mean()
        # Per-parcel tokens: visible encoder outputs scattered back to their places, averaged per parcel.
        vis = latent[:, 1:]
        full = vis.new_zeros(b, c.n_tokens, vis.shape[-1]).scatter(1, keep[..., None].expand_as(vis), vis)
        counts = (~hidden).sum(2)[..., None].clamp_min(1).to(vis.dtype)
        parcels = full.view(b, c.n_parcels, c.n_patches, -1).sum(2) / counts
        metrics = {"mse_masked": loss.detach(), "mse_visible": visible_mse}
        return loss, metrics, parcels

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics, _ = self.ssl_forward(batch)
        return loss, metrics

    def context_features(self, context: torch.Tensor, future_patches: int) -> torch.Tensor:
        """Encoder tokens ``[B, N, n_context * D]`` of a context window whose last patches are hidden.

        ``context`` is ``[B, T - future_patches * P, N]``; the hidden future is zero-filled and never
        reaches the encoder. Each parcel's visible tokens (its context patches, in time order) are
        concatenated: what a forecasting head reads.
        """
        c = self.config
        b, t, n = context.shape
        x = torch.cat([context, context.new_zeros(b, c.window - t, n)], dim=1)
        hidden = self.future_mask(b, future_patches).to(x.device)
        latent, _ = self.encode_tokens(self.patchify(x), hidden)
        return latent[:, 1:].reshape(b, c.n_parcels, -1)

    def cls_attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights ``[B, heads, 1 + L]`` of the CLS query in the encoder's last layer (no masking)."""
        patches = self.patchify(x)
        b = patches.shape[0]
        tokens = self.patch_embed(patches).flatten(1, 2) + self._positions(self.spatial, self.temporal)
        h = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        blocks = self.encoder.blocks
        for block in blocks[:-1]:
            h = block(h)
        attn = blocks[-1].attn
        q, k, _ = attn.qkv(blocks[-1].norm1(h)).view(b, h.shape[1], 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
        # The same scaled dot product F.scaled_dot_product_attention uses, for the CLS query only.
        return torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)[:, :, 0]

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """CLS attention per parcel ``[B, N]``: last encoder layer, mean over heads and time patches.

        BrainLM identifies a parcel's network from the attention the CLS token pays it. The CLS
        token's weight on itself is left out, so a row sums to at most ``1 / n_patches``.
        """
        c = self.config
        w = self.cls_attention_weights(x)[:, :, 1:].mean(1)
        return w.view(w.shape[0], c.n_parcels, c.n_patches).mean(2)

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """CLS embedding ``pooled``, all ``tokens`` ``[B, N * n_patches, D]`` and ``parcels`` ``[B, N, D]``."""
        c = self.config
        patches = self.patchify(batch["x"])
        latent, _ = self.encode_tokens(patches, None)
        tokens = latent[:, 1:]
        parcels = tokens.view(tokens.shape[0], c.n_parcels, c.n_patches, -1).mean(2)
        return {"pooled": latent[:, 0], "tokens": tokens, "parcels": parcels}
