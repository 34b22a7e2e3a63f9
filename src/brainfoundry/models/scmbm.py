"""SC-MBM: Sparse-Coded Masked Brain Modelling, Stage A of MinD-Vis (Chen et al., CVPR 2023).

A sample is one *frame*: the parcel vector of a short stretch of a run. The trainer hands the model
windows ``x`` of ``frame_points`` time points (``[B, frame_points, N]``); the model averages the
valid points into one frame (MinD-Vis averages ``t // TR`` volumes, about 8 s: at ABIDE's common TR
of 2 s that is 4 points) and z-normalises it across its values (MinD-Vis normalises each subject's
frames by one mean and standard deviation; a per-frame statistic needs no run-level state and no
statistics of other samples).

Patching
    The frame, parcels in the shards' fixed order, is padded by wrapping (parcels ``0, 1, ...``
    repeated after the last) to the next multiple of ``patch_size`` and cut into ``L`` 1-D patches
    of ``patch_size`` values. (MinD-Vis always pads ``patch_size - N % patch_size`` values, a whole
    extra patch when N is a multiple; here none is added then.)
Sparse coding
    Each patch is embedded by a ``Conv1d`` with kernel = stride = ``patch_size`` into ``dim``
    channels; the large ``dim / patch_size`` ratio (1024 / 16 in the paper) is the "sparse-coded"
    part. Positions are fixed 1-D sine-cosine tables (CLS at position 0 with a zero vector).
Masking and objective
    ``int(L * (1 - mask_ratio))`` patches per sample stay visible, chosen at random from the
    sample's seed; the ViT encoder sees them plus a CLS token, a lighter decoder sees all positions
    (a learned mask token where hidden) and predicts each patch's values. The loss is the MSE over
    the hidden patches only; the wrapped copies at the end are left out of it (they repeat parcels
    that are already counted).
Augmentation
    With probability ``mix_prob`` a training frame is replaced by the interpolation
    ``(1 - mix_ratio) * f + mix_ratio * g`` with its partner ``g`` (MinD-Vis adds such midpoints of
    random pairs, ratio 0.5, ``aug_times - 1`` times the data). The partner of the sample at global
    index ``i`` is the one at ``i ^ 1``: pairs never straddle two DDP ranks when the per-rank batch is
    even, so one process and several ranks mix the same frames (an unpaired last sample is not mixed).

``encode`` gives the CLS embedding (``pooled``), every patch token (``tokens [B, L, D]``) and per
parcel the token of the patch holding it (``parcels [B, N, D]``; with ``patch_size: 1`` a patch is a
parcel). :meth:`SCMBM.latent` is what a Stage-B decoder is conditioned on (MinD-Vis feeds the
encoder's full token sequence to the latent diffusion model's cross-attention); the model file's
``latent`` entry records its layout. Stage B itself needs fMRI-image pairs and a pretrained LDM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.models import MODEL_WINDOWS
from brainfoundry.models.base import (FoundationModel, ModelConfig, Transformer, _check_heads, masked_mean_per_sample,
                                      sample_uniform)


@dataclasses.dataclass
class SCMBMConfig(ModelConfig):
    """SC-MBM sizes. Defaults are the MinD-Vis pretraining config (1024-d, depth 24, 16 heads, mlp 1)."""

    n_parcels: int = 200
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 1.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    #: Time points averaged into one frame (MinD-Vis: ``t // TR`` for t = 8 s); the trainer's window.
    frame_points: int = MODEL_WINDOWS["scmbm"][1]
    #: Probability that a training frame is replaced by its interpolation with its pair partner.
    mix_prob: float = 0.5
    mix_ratio: float = 0.5

    @property
    def n_padded(self) -> int:
        return self.n_patches * self.patch_size

    @property
    def n_patches(self) -> int:
        return -(-self.n_parcels // self.patch_size)

    def n_visible(self, mask_ratio: float | None = None) -> int:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return int(self.n_patches * (1.0 - ratio))

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.patch_size <= self.n_parcels:
            raise ConfigError("model.patch_size", f"must be between 1 and n_parcels ({self.n_parcels}), "
                                                  f"got {self.patch_size}")
        if self.frame_points < 1:
            raise ConfigError("model.frame_points", f"must be >= 1 time point per frame, got {self.frame_points}")
        _check_heads("model.heads", self.dim, self.heads)
        _check_heads("model.decoder_heads", self.decoder_dim, self.decoder_heads)
        if self.dim % 2 or self.decoder_dim % 2:
            raise ConfigError("model.dim", f"sine-cosine positions need even dims, got {self.dim}/{self.decoder_dim}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError("model.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        if self.n_visible() < 1:
            raise ConfigError("model.mask_ratio", f"{self.mask_ratio} leaves no visible patch of the "
                                                  f"{self.n_patches} (n_parcels {self.n_parcels} / patch_size "
                                                  f"{self.patch_size})")
        if self.n_visible() == self.n_patches:
            raise ConfigError("model.mask_ratio", f"{self.mask_ratio} hides none of the {self.n_patches} patches")
        if not 0.0 <= self.mix_prob <= 1.0 or not 0.0 <= self.mix_ratio <= 1.0:
            raise ConfigError("model.mix_prob", f"mix_prob and mix_ratio must be in [0, 1], got "
                                                f"{self.mix_prob}, {self.mix_ratio}")


def sincos_positions(n: int, dim: int, cls: bool = True) -> torch.Tensor:
    """Fixed 1-D sine-cosine table ``[n (+1), dim]`` (transformer positions); a zero row for CLS first."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if cls:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def _xavier(module: nn.Module) -> None:
    """MAE initialisation: Xavier-uniform linear weights (and the patch conv seen as a linear map)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SCMBM(FoundationModel):
    family = "scmbm"
    config_class = SCMBMConfig

    def __init__(self, config: SCMBMConfig):
        super().__init__(config)
        c = config
        self.patch_embed = nn.Conv1d(1, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.encoder = Transformer(c.dim, c.depth, c.heads, c.mlp_ratio)
        self.decoder_embed = nn.Linear(c.dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder = Transformer(c.decoder_dim, c.decoder_depth, c.decoder_heads, c.mlp_ratio)
        self.head = nn.Linear(c.decoder_dim, c.patch_size)
        # Fixed tables, rebuilt from the config: not in the state dict (nor the model file).
        self.register_buffer("pos", sincos_positions(c.n_patches, c.dim), persistent=False)
        self.register_buffer("decoder_pos", sincos_positions(c.n_patches, c.decoder_dim), persistent=False)
        wrap = torch.arange(c.n_padded) % c.n_parcels
        self.register_buffer("wrap_index", wrap, persistent=False)
        _xavier(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def tokens_per_sample(self) -> int:
        return self.config.n_patches

    # frames and patches ----------------------------------------------------------------------------
    def frames(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``[B, N]`` z-normalised frames: the mean of each window's valid points (``batch["mask"]``)."""
        x = batch["x"]
        if x.dim() != 3:
            raise InputError("batch", f"x must be [batch, time, parcels], got shape {tuple(x.shape)}")
        b, t, n = x.shape
        self.check_batch_parcels(n)
        valid = batch.get("mask")
        w = torch.ones(b, t, device=x.device) if valid is None else valid.to(x.device).float()
        frame = (x.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        mean = frame.mean(1, keepdim=True)
        std = frame.std(1, unbiased=False, keepdim=True)
        return (frame - mean) / std.clamp_min(1e-6)

    def mix(self, batch: Mapping[str, Any], frames: torch.Tensor) -> torch.Tensor:
        """Interpolate some frames with their pair partner (module docstring), from the per-sample seeds."""
        c = self.config
        b = frames.shape[0]
        if c.mix_prob <= 0 or b < 2:
            return frames
        partner = torch.arange(b, device=frames.device) ^ 1
        has_partner = partner < b
        partner = partner.clamp_max(b - 1)
        u = sample_uniform(batch, b, 1, device=frames.device, stream=21)[:, 0]
        mixed = (u < c.mix_prob) & has_partner
        blend = (1.0 - c.mix_ratio) * frames + c.mix_ratio * frames[partner]
        return torch.where(mixed[:, None], blend, frames)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` -> ``[B, L, P]`` after wrap padding to ``L * P`` values."""
        c = self.config
        if frames.shape[-1] != c.n_parcels:
            raise InputError("batch", f"frames of {frames.shape[-1]} values, the scmbm model expects {c.n_parcels}")
        return frames[:, self.wrap_index].view(frames.shape[0], c.n_patches, c.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, L, P]`` -> ``[B, N]`` (the wrapped copies dropped)."""
        return patches.flatten(1)[:, :self.config.n_parcels]

    def value_weight(self) -> torch.Tensor:
        """``[L, P]``: 1 for real parcel values, 0 for the wrapped copies at the end."""
        c = self.config
        return (torch.arange(c.n_padded, device=self.wrap_index.device) < c.n_parcels).view(c.n_patches, c.patch_size)

    def parcel_patch(self) -> torch.Tensor:
        """``[N]``: the patch each parcel is in (its first occurrence; wrapped copies come later)."""
        return torch.arange(self.config.n_parcels, device=self.wrap_index.device) // self.config.patch_size

    def draw_masks(self, batch: Mapping[str, Any] | None, batch_size: int, mask_ratio: float | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden mask ``[B, L]`` (True = hidden) and visible patch indices ``[B, n_visible]`` (in order)."""
        c = self.config
        n_keep = c.n_visible(mask_ratio)
        if not 1 <= n_keep < c.n_patches:
            raise ConfigError("mask_ratio", f"{mask_ratio} leaves {n_keep} of {c.n_patches} patches visible")
        noise = sample_uniform(batch or {}, batch_size, c.n_patches, device=device, stream=20)
        order = noise.argsort(dim=1, stable=True)
        keep = order[:, :n_keep].sort(dim=1).values
        hidden = torch.ones(batch_size, c.n_patches, dtype=torch.bool, device=noise.device)
        hidden.scatter_(1, keep, False)
        return hidden, keep

    # the network -----------------------------------------------------------------------------------
    def encode_patches(self, patches: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Encoder output ``[B, 1 + n_visible, D]`` (CLS first); all patches when ``keep`` is None."""
        b = patches.shape[0]
        tokens = self.patch_embed(patches.flatten(1)[:, None, :]).transpose(1, 2) + self.pos[1:]
        if keep is not None:
            keep = keep.to(tokens.device)
            tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos[:1]).expand(b, -1, -1)
        return self.encoder(torch.cat([cls.to(tokens.dtype), tokens], dim=1))

    def decode(self, latent: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Predicted patches ``[B, L, P]``."""
        c = self.config
        y = self.decoder_embed(latent)
        cls, vis = y[:, :1], y[:, 1:]
        if keep is None:
            full = vis
        else:
            full = self.mask_token.to(vis.dtype).expand(y.shape[0], c.n_patches, -1).clone()
            full = full.scatter(1, keep.to(vis.device)[..., None].expand(-1, -1, vis.shape[-1]), vis)
        out = self.decoder(torch.cat([cls, full], dim=1) + self.decoder_pos)[:, 1:]
        return self.head(out)

    def reconstruct_frames(self, frames: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted frames ``[B, N]`` given z-normalised frames and a hidden-patch mask ``[B, L]``.

        For evaluation: every sample must hide the same number of patches. Take the hidden values.
        """
        hidden = hidden.to(frames.device).bool()
        n_hidden = hidden.sum(1)
        if bool((n_hidden != n_hidden[0]).any()) or int(n_hidden[0]) in (0, hidden.shape[1]):
            raise ValueError("every frame must hide the same number of patches, at least one and not all")
        n_keep = hidden.shape[1] - int(n_hidden[0])
        keep = (~hidden).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :n_keep].sort(dim=1).values
        patches = self.patchify(frames)
        return self.unpatchify(self.decode(self.encode_patches(patches, keep), keep))

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        frames = self.frames(batch)
        if self.training:
            frames = self.mix(batch, frames)
        patches = self.patchify(frames)
        hidden, keep = self.draw_masks(batch, frames.shape[0], device=frames.device)
        pred = self.decode(self.encode_patches(patches, keep), keep)
        err = (pred.float() - patches) ** 2
        real = self.value_weight()[None]
        loss = masked_mean_per_sample(err, hidden[..., None] & real).mean()
        with torch.no_grad():
            visible = masked_mean_per_sample(err, ~hidden[..., None] & real).mean()
        return loss, {"mse_masked": loss.detach(), "mse_visible": visible}

    @torch.no_grad()
    def zero_loss(self, batch: Mapping[str, Any]) -> float:
        """:meth:`loss` of the all-zero prediction (each frame's mean, frames being z-normalised) on the
        batch's own masks: the learning curve's zero-predictor line."""
        frames = self.frames(batch)
        patches = self.patchify(frames)
        hidden, _ = self.draw_masks(batch, frames.shape[0], device=frames.device)
        return float(masked_mean_per_sample(patches ** 2, hidden[..., None] & self.value_weight()[None]).mean())

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """CLS ``pooled [B, D]``, patch ``tokens [B, L, D]``, ``parcels [B, N, D]`` (each parcel's patch token)."""
        latent = self.latent(batch)
        tokens = latent[:, 1:]
        return {"pooled": latent[:, 0], "tokens": tokens, "parcels": tokens[:, self.parcel_patch()]}

    def latent(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The Stage-B conditioning: encoder output ``[B, 1 + L, D]`` of the unmasked frame (CLS first)."""
        return self.encode_patches(self.patchify(self.frames(batch)), None)

    def payload(self) -> dict[str, Any]:
        c = self.config
        return {**super().payload(),
                "latent": {"method": "latent", "shape": [1 + c.n_patches, c.dim],
                           "layout": "CLS then one token per patch of patch_size parcels in the shards' parcel order, "
                                     "wrap-padded; frames are the mean of frame_points time points, z-normalised",
                           "patch_size": c.patch_size, "frame_points": c.frame_points}}


def frame_windows(series: Any, frame_points: int) -> Any:
    """Cut a ``[T, N]`` series into ``[T // frame_points, frame_points, N]`` windows (the rest dropped)."""
    if frame_points < 1:
        raise ConfigError("model.frame_points", f"must be >= 1, got {frame_points}")
    n = series.shape[0] // frame_points
    if n == 0:
        raise InputError("series", f"{series.shape[0]} time points make no frame of {frame_points} points "
                                   "(model.frame_points)")
    return series[:n * frame_points].reshape(n, frame_points, *series.shape[1:])


__all__ = ["SCMBM", "SCMBMConfig", "frame_windows", "sincos_positions"]
