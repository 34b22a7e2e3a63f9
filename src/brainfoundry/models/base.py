"""What every model family shares: the config base class, the model interface, transformer blocks.

The interface (DESIGN.md section 5), implemented by :mod:`~brainfoundry.models.brainlm`,
:mod:`~brainfoundry.models.brainmass` and :mod:`~brainfoundry.models.lcm`:

``loss(batch) -> (loss, metrics)``
    The pretraining objective on one batch (a dict from :mod:`brainfoundry.data`); ``metrics`` maps
    names to detached 0-d tensors (the trainer turns them into floats only when it logs, so no
    device sync per step). ``forward`` is ``loss`` so that DDP wraps the objective.
``encode(batch) -> {"pooled": [B, D], "tokens": [B, L, D], "parcels": [B, N, D]}``
    Embeddings without any masking, for evaluation: CLS/pooled, per token, and per parcel.
``save(path)`` / :func:`brainfoundry.models.load_model`
    A model file (:mod:`brainfoundry.models.files`): safetensors weights and a JSON sidecar holding
    the family name, the config (``n_parcels`` included), the parameter count and the weights' sha256,
    so a model file alone is enough to rebuild the model, and reading one never runs code.

Randomness (masks, view choice) is drawn per sample from ``batch["seed"]`` when the batch has it
(the trainer sets it from the global seed, the step and the sample's global index), so a sample gets
the same masks whether it sits in a batch of 8 on one process or a batch of 4 on each of 2 DDP
ranks, and a resumed run redraws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.models.files import MODEL_FORMAT_VERSION


# -- configs ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelConfig:
    """Base of every family's config: plain fields, so it round-trips through YAML/JSON and the file."""

    #: Parcels (ROIs) per sample; fixed by the atlas of the shards the model is trained on.
    n_parcels: int = 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, key: str = "model") -> "ModelConfig":
        """Build from a mapping; unknown keys are an error naming them (typos must not pass silently)."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(key, f"unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> "ModelConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> None:
        if self.n_parcels < 2:
            raise ConfigError("model.n_parcels", f"need at least 2 parcels, got {self.n_parcels}")


def _check_heads(key: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ConfigError(key, f"dim {dim} is not divisible by {heads} heads")


# -- building blocks --------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash/mem-efficient on GPU)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (ViT/GPT-2 style)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SpatialEmbedding(nn.Module):
    """Parcel position embedding ``[N, D]``.

    ``mode="coords"``: Fourier features of the parcel centroid (MNI mm / 50) through a small MLP, so the
    same weights apply to any atlas (A424, CC200, the demo's) and nearby parcels start out similar.
    ``mode="learned"``: one free vector per parcel index, for data without centroids.
    The centroids live in a buffer, so they are saved with the model.
    """

    def __init__(self, n_parcels: int, dim: int, mode: str = "coords", n_freqs: int = 8):
        super().__init__()
        self.mode = mode
        self.register_buffer("coords", torch.zeros(n_parcels, 3))
        if mode == "coords":
            self.register_buffer("freqs", (2.0 ** torch.arange(n_freqs)) * math.pi, persistent=False)
            self.mlp = nn.Sequential(nn.Linear(3 + 6 * n_freqs, dim), nn.GELU(), nn.Linear(dim, dim))
        elif mode == "learned":
            self.table = nn.Parameter(torch.zeros(n_parcels, dim))
            nn.init.trunc_normal_(self.table, std=0.02)
        else:
            raise ConfigError("model.spatial_embedding", f"must be 'coords' or 'learned', got {mode!r}")

    def set_coords(self, coords: Any) -> None:
        """Store the parcel centroids (MNI mm, ``[N, 3]``); NaN centroids are an error in coords mode."""
        coords = torch.as_tensor(coords, dtype=torch.float32)
        if coords.shape != self.coords.shape:
            raise ConfigError("model.n_parcels", f"parcel coordinates have shape {tuple(coords.shape)}, "
                                                 f"the model expects {tuple(self.coords.shape)}")
        if self.mode == "coords" and not torch.isfinite(coords).all():
            raise ConfigError("model.spatial_embedding", "parcel centroids contain NaN/inf; use "
                                                         "spatial_embedding: learned for an atlas without centroids")
        self.coords.copy_(coords)

    def forward(self) -> torch.Tensor:
        if self.mode == "learned":
            return self.table
        c = self.coords / 50.0
        angles = c[:, :, None] * self.freqs                                  # [N, 3, F]
        feats = torch.cat([c, angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)
        return self.mlp(feats)


def init_weights(module: nn.Module) -> None:
    """ViT/MAE initialisation: truncated normal linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)


# -- per-sample randomness ----------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding 32-bit values; products stay below 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def sample_uniform(batch: Mapping[str, Any], batch_size: int, n: int, device: torch.device | str = "cpu",
                   stream: int = 0) -> torch.Tensor:
    """Uniform float64 ``[B, n]`` in [0, 1): row ``b`` is a function of ``batch["seed"][b]`` and ``stream``.

    A counter-based hash of (seed, stream, index), computed with integer tensor ops on ``device``:
    no generator per sample, no host-device traffic, the same numbers on CPU and GPU, and
    independent of which other samples share the batch. Without ``batch["seed"]`` the global torch
    RNG is used. ``stream`` separates independent draws from one sample seed (masks, views, ...).
    """
    seeds = batch.get("seed") if isinstance(batch, Mapping) else None
    if seeds is None:
        return torch.rand(batch_size, n, device=device, dtype=torch.float64)
    s = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(device)
    if s.numel() != batch_size:
        raise ValueError(f"batch['seed'] has {s.numel()} entries for a batch of {batch_size}")
    return _counter_uniform(s, n, int(stream))


@torch.compiler.disable
def _counter_uniform(s: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """The hash of :func:`sample_uniform`, kept out of ``torch.compile`` graphs: Inductor folds
    ``arange(n) * 2654435761`` into an int32 Triton index expression and fails to build the kernel
    (torch 2.11 on CUDA: "Scalar 2654435761 is out of range for type int32"). Run eagerly it is a
    dozen small integer kernels per step."""
    key = _hash32(_hash32(_hash32(s & _M32) ^ ((s >> 32) & _M32)) ^ ((stream * _GOLDEN) & _M32))
    index = torch.arange(n, device=s.device, dtype=torch.int64)
    bits = _hash32((key[:, None] + index[None, :] * _GOLDEN) & _M32)
    return bits.to(torch.float64) / 2.0**32


def masked_mean_per_sample(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over all but the batch dim, weighted by 0/1 ``weight``; ``[B]``.

    Each sample is normalised by its own count, so the batch loss (a mean of per-sample means) is the
    same whether the batch is split across DDP ranks or not.
    """
    dims = tuple(range(1, values.dim()))
    weight = weight.to(values.dtype)
    return (values * weight).sum(dims) / weight.sum(dims).clamp_min(1.0)


# -- the interface ------------------------------------------------------------------------------------
class FoundationModel(nn.Module):
    """Base class of the model families (see the module docstring for the interface)."""

    family: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # the objective and the embeddings ------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(batch)

    def set_coords(self, coords: Any) -> None:
        """Give the model its atlas's parcel centroids ``[N, 3]`` (MNI mm)."""

    def tokens_per_sample(self) -> int:
        """Input tokens one sample contributes (for the tokens/s figure)."""
        return self.config.n_parcels

    def on_step_end(self, progress: float) -> None:
        """Called by the trainer after each optimizer step with ``step / total_steps`` (EMA updates)."""

    def input_keys(self) -> tuple[str, ...]:
        """Batch fields the objective reads (the trainer moves only these to the device)."""
        return ("x", "mask")

    # bookkeeping ----------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def check_batch_parcels(self, n: int, source: str = "batch") -> None:
        if n != self.config.n_parcels:
            raise InputError(source, f"data have {n} parcels but the {self.family} model was built for "
                                     f"{self.config.n_parcels}")

    def payload(self) -> dict[str, Any]:
        """What a model file (and the model part of a checkpoint) holds."""
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "family": self.family,
            "config": self.config.to_dict(),
            "n_parcels": self.config.n_parcels,
            "n_parameters": self.num_parameters(),
            "state_dict": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                           for k, v in self.state_dict().items()},
        }

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write the model file (``<name>.safetensors`` and ``<name>.json``) atomically; ``extra`` entries
        (parcel names, train config: plain JSON values) ride along in the JSON."""
        from brainfoundry.models.files import save_model

        return save_model(self, path, **extra)

    def describe(self) -> str:
        return f"{self.family}: {self.num_parameters():,} trainable parameters, config {self.config.to_dict()}"
