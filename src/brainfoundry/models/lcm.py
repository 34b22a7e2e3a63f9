"""Large Connectome Model in its published form (Chrisa142857/brain_network_decoder, ``BNDecoder``).

Node tokens are the rows of the run's Fisher-z functional connectivity (any atlas: the model computes
``arctanh(corr)`` of the window it is given, so it reads the same ``x`` as every family). A decoder of
learned *query tokens* cross-attends to them: one query per class of every categorical target (sex,
diagnosis, ...) and one per continuous target (age); a shared linear layer turns every query's output
into one logit. A categorical target's class probabilities are the softmax over its own queries'
logits; a continuous target's (standardised) value is its query's logit.

Pretraining is multitask over every labelled target at once: each (sample, target) slot with an
observed label adds its loss (cross-entropy or MSE on the standardised value), slots without a label
are masked, never imputed; as in DETR (``return_intermediate``) every decoder layer's output is
scored. The sum is divided by ``B * V`` so it does not depend on how a batch is split over DDP ranks.

Fine-tuning (:meth:`LCM.with_targets`) keeps the pretrained queries of known labels and adds fresh
queries for new targets or new classes, as ``BNDecoder.add_token`` does. The semi-supervised round
(:func:`assign_pseudo_labels`, :func:`balance_pseudo_labels`) gives unlabelled *training* runs the
head's class where its probability reaches a threshold, then keeps the same number per class (most
confident first) so the round does not amplify the majority class; the trainer records threshold,
balance and counts in the model file.

Target statistics (mean/std, classes) come from the training split only (:func:`fit_env_stats`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainfoundry.errors import ConfigError
from brainfoundry.models.base import FoundationModel, ModelConfig, Transformer, _check_heads, init_weights

KINDS = ("continuous", "categorical")
BALANCES = ("equal", "none")
_MISSING_TEXT = {"", "nan", "none", "n/a", "na", "null", "-1", "-9999"}


def default_env() -> list[dict[str, Any]]:
    # The published pretraining targets: every dataset's class label, plus sex and age.
    return [{"name": "diagnosis", "kind": "categorical"}, {"name": "sex", "kind": "categorical"},
            {"name": "age", "kind": "continuous"}]


@dataclasses.dataclass
class EnvSpec:
    """One target: its batch field, kind, loss weight and training-split statistics."""

    name: str
    kind: str
    weight: float = 1.0
    mean: float | None = None
    std: float | None = None
    classes: list[str] | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EnvSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown or "name" not in values or "kind" not in values:
            raise ConfigError("model.env", f"each entry needs name and kind (and may have {sorted(names)}), got {dict(values)}")
        spec = cls(**values)
        if spec.kind not in KINDS:
            raise ConfigError("model.env", f"variable {spec.name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
        return spec

    @property
    def fitted(self) -> bool:
        if self.kind == "continuous":
            return self.mean is not None and self.std is not None
        return bool(self.classes) and len(self.classes) >= 2

    @property
    def n_out(self) -> int:
        return 1 if self.kind == "continuous" else len(self.classes or [])


def value_key(value: Any) -> str | None:
    """Canonical text of a categorical value, or None when missing (1, 1.0 and "1" are one class)."""
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return None
        if float(value).is_integer():
            value = int(value)
    text = str(value).strip()
    return None if text.lower() in _MISSING_TEXT else text


def continuous_value(value: Any) -> float:
    """Float value or NaN when missing."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out if math.isfinite(out) else float("nan")


def fit_env_stats(records: Mapping[str, Sequence[Any]], specs: Sequence[Mapping[str, Any] | EnvSpec],
                  source: str = "training split") -> list[dict[str, Any]]:
    """Fill mean/std (continuous) or classes (categorical) from the *training* records only.

    ``records`` maps a variable name to its values over the training runs (a DataFrame works). A
    variable with no column, or with fewer than two observed values / classes in training, is left
    out with a warning: it cannot be a target. Returns the fitted specs as dicts (for the config).
    """
    fitted = []
    for spec in specs:
        spec = spec if isinstance(spec, EnvSpec) else EnvSpec.from_dict(spec)
        spec = dataclasses.replace(spec)
        if spec.name not in records:
            warnings.warn(f"environment variable {spec.name!r} is not a column of the {source}; left out", stacklevel=2)
            continue
        values = list(records[spec.name])
        if spec.kind == "continuous":
            x = np.array([continuous_value(v) for v in values], dtype=np.float64)
            x = x[np.isfinite(x)]
            if x.size < 2:
                warnings.warn(f"environment variable {spec.name!r} has {x.size} observed values in the {source}; left out",
                              stacklevel=2)
                continue
            spec.mean, spec.std = float(x.mean()), float(max(x.std(), 1e-6))
        else:
            classes = sorted({k for k in map(value_key, values) if k is not None})
            if len(classes) < 2:
                warnings.warn(f"environment variable {spec.name!r} has {len(classes)} class(es) in the {source}; left out",
                              stacklevel=2)
                continue
            spec.classes = classes
        fitted.append(dataclasses.asdict(spec))
    return fitted


def merge_env(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``old`` targets with ``new`` ones added: a known categorical target keeps its classes (and their
    order, so its queries keep their meaning) and gains any new class at the end; a new target is appended."""
    out = [dict(e) for e in old]
    by_name = {e["name"]: e for e in out}
    for entry in new:
        have = by_name.get(entry["name"])
        if have is None:
            out.append(dict(entry))
            by_name[entry["name"]] = out[-1]
        elif have["kind"] != entry["kind"]:
            raise ConfigError("trainer.target", f"{entry['name']!r} is {have['kind']} in the pretrained model, "
                                                f"{entry['kind']} here")
        elif have["kind"] == "categorical":
            have["classes"] = list(have["classes"]) + [c for c in entry["classes"] if c not in have["classes"]]
    return out


def fisher_z_fc(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fisher-z FC ``[B, N, N]`` of series ``[B, T, N]``; the diagonal (z = inf) is set to 0."""
    x = x.float()
    x = x - x.mean(1, keepdim=True)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    r = (x.transpose(1, 2) @ x).clamp(-0.999, 0.999)
    z = torch.atanh(r)
    return z * (1.0 - torch.eye(z.shape[-1], device=z.device, dtype=z.dtype))


@dataclasses.dataclass
class LCMConfig(ModelConfig):
    n_parcels: int = 424
    #: Width of node and query tokens.
    dim: int = 128
    #: Decoder layers (query self-attention, cross-attention to the node tokens, MLP).
    depth: int = 2
    #: Self-attention layers over the node tokens before the decoder (0: the FC rows projected, as the
    #: published identity backbone).
    encoder_depth: int = 0
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    #: Targets: dicts with name, kind (continuous/categorical), optional weight; the trainer adds the
    #: training split's statistics (mean/std, classes) before the model is built.
    env: list = dataclasses.field(default_factory=default_env)
    #: Score every decoder layer's output (DETR's auxiliary losses), not just the last.
    deep_supervision: bool = True

    def env_specs(self) -> list[EnvSpec]:
        return [EnvSpec.from_dict(e) for e in self.env]

    def validate(self) -> None:
        super().validate()
        _check_heads("model.heads", self.dim, self.heads)
        if self.depth < 1 or self.encoder_depth < 0:
            raise ConfigError("model.depth", f"need depth >= 1 and encoder_depth >= 0, got {self.depth}, {self.encoder_depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")
        names = [s.name for s in self.env_specs()]
        if len(set(names)) != len(names):
            raise ConfigError("model.env", f"duplicate variable names {names}")


def query_layout(specs: Sequence[EnvSpec]) -> list[tuple[str, str | None]]:
    """One ``(target, class)`` per query: a class per categorical target, ``(name, None)`` per continuous one."""
    return [(s.name, c) for s in specs for c in (s.classes if s.kind == "categorical" else [None])]


class LCM(FoundationModel):
    family = "lcm"
    config_class = LCMConfig

    def __init__(self, config: LCMConfig):
        super().__init__(config)
        c = config
        self.specs = c.env_specs()
        if not self.specs:
            raise ConfigError("model.env", "the LCM needs at least one target")
        unfitted = [s.name for s in self.specs if not s.fitted]
        if unfitted:
            raise ConfigError("model.env", f"variables {unfitted} have no training-split statistics; fit them with "
                                           "brainfoundry.models.lcm.fit_env_stats (the trainer does) before building")
        self.layout = query_layout(self.specs)
        self.slices = []
        start = 0
        for s in self.specs:
            self.slices.append(slice(start, start + s.n_out))
            start += s.n_out
        self.node_proj = nn.Linear(c.n_parcels, c.dim)
        self.node_embed = nn.Parameter(torch.zeros(c.n_parcels, c.dim))  # which parcel a row is
        self.encoder = Transformer(c.dim, c.encoder_depth, c.heads, c.mlp_ratio, c.dropout) if c.encoder_depth else None
        self.memory_norm = nn.LayerNorm(c.dim)
        self.queries = nn.Parameter(torch.zeros(len(self.layout), c.dim))
        # No biases in the decoder: an attention key bias gets an exactly-zero gradient (softmax ignores
        # it), and Adam would turn its rounding noise into full-size steps that differ between DDP layouts.
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(c.dim, c.heads, int(c.dim * c.mlp_ratio), c.dropout, activation="gelu",
                                       batch_first=True, norm_first=True, bias=False) for _ in range(c.depth))
        self.decoder_norm = nn.LayerNorm(c.dim)
        self.logit = nn.Linear(c.dim, 1)  # one logit per query, shared over queries (BNDecoder.class_embed)
        for part in (self.node_proj, self.encoder, self.memory_norm, self.decoder_norm, self.logit):
            if part is not None:
                init_weights(part)
        for m in self.decoder.modules():  # bias-free: only the linear weights (init_weights expects biases)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
        for p in (self.node_embed, self.queries):
            nn.init.trunc_normal_(p, std=0.02)

    def tokens_per_sample(self) -> int:
        return self.config.n_parcels + len(self.layout)

    def input_keys(self) -> tuple[str, ...]:
        return ("x",)

    def spec(self, name: str) -> tuple[int, EnvSpec]:
        for j, s in enumerate(self.specs):
            if s.name == name:
                return j, s
        raise ConfigError("target", f"{name!r} is not a target of this LCM ({[s.name for s in self.specs]})")

    # targets -------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def env_values(self, batch: Mapping[str, Any], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised values / class indices ``[B, V]`` (float) and which are observed ``[B, V]``.

        Fields absent from the batch count as missing for every sample.
        """
        values = torch.zeros(batch_size, len(self.specs), dtype=torch.float32)
        observed = torch.zeros(batch_size, len(self.specs), dtype=torch.bool)
        for j, s in enumerate(self.specs):
            raw = batch.get(s.name)
            if raw is None:
                continue
            raw = raw.tolist() if isinstance(raw, (torch.Tensor, np.ndarray)) else list(raw)
            if len(raw) != batch_size:
                raise ValueError(f"batch field {s.name!r} has {len(raw)} values for a batch of {batch_size}")
            if s.kind == "continuous":
                col = torch.tensor([continuous_value(r) for r in raw], dtype=torch.float32)
                ok = torch.isfinite(col)
                values[:, j] = torch.where(ok, (col - s.mean) / s.std, torch.zeros_like(col))
            else:
                index = {k: i for i, k in enumerate(s.classes)}
                col = torch.tensor([index.get(value_key(r), -1) for r in raw], dtype=torch.float32)
                ok = col >= 0
                values[:, j] = col.clamp_min(0)
            observed[:, j] = ok
        return values, observed

    # the network ----------------------------------------------------------------------------------------
    def nodes(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Node tokens ``[B, N, D]`` from the rows of the window's Fisher-z FC."""
        x = batch["x"]
        self.check_batch_parcels(x.shape[-1])
        fc = fisher_z_fc(x).to(self.node_proj.weight.dtype)
        tokens = self.node_proj(fc) + self.node_embed
        if self.encoder is not None:
            tokens = self.encoder(tokens)
        return self.memory_norm(tokens)

    def decode(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """Query outputs of every decoder layer, each ``[B, Q, D]`` (normalised)."""
        h = self.queries.expand(memory.shape[0], -1, -1)
        outs = []
        for layer in self.decoder:
            h = layer(h, memory)
            outs.append(self.decoder_norm(h))
        return outs

    def _slot_losses(self, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Loss of every (sample, target) slot ``[B, V]`` from one layer's logits ``[B, Q]``."""
        cols = []
        for j, s in enumerate(self.specs):
            part = logits[:, self.slices[j]]
            if s.kind == "continuous":
                cols.append((part[:, 0] - values[:, j]) ** 2)
            else:
                cols.append(F.cross_entropy(part, values[:, j].long(), reduction="none"))
        return torch.stack(cols, 1)

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Multitask loss over every observed label (missing labels masked)."""
        memory = self.nodes(batch)
        b = memory.shape[0]
        values, observed = (t.to(memory.device) for t in self.env_values(batch, b))
        outs = self.decode(memory)
        layers = outs if self.config.deep_supervision else outs[-1:]
        weights = torch.tensor([s.weight for s in self.specs], device=memory.device)
        total = memory.new_zeros(())
        for h in layers:
            slots = self._slot_losses(self.logit(h).squeeze(-1).float(), values)
            total = total + (torch.where(observed, slots, torch.zeros_like(slots)) * weights).sum() / (b * len(self.specs))
        loss = total / len(layers)
        logits = self.logit(outs[-1]).squeeze(-1).float()
        metrics = {"target_loss": loss.detach()}
        with torch.no_grad():
            slots = self._slot_losses(logits, values)
            for j, s in enumerate(self.specs):
                n = observed[:, j].sum().clamp_min(1)
                if s.kind == "continuous":
                    metrics[f"{s.name}_mse"] = (slots[:, j] * observed[:, j]).sum() / n
                else:
                    hit = logits[:, self.slices[j]].argmax(1) == values[:, j].long()
                    metrics[f"{s.name}_acc"] = (hit & observed[:, j]).sum() / n
        return loss, metrics

    def forward(self, batch: Mapping[str, Any], finetune: Mapping[str, Any] | None = None):
        """The pretraining loss, or with ``finetune={"target", "labels", "weights"}`` the fine-tuning loss
        (one entry point, so DDP wraps both)."""
        if finetune is None:
            return self.loss(batch)
        return self.finetune_loss(batch, finetune["target"], finetune["labels"], finetune["weights"])

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Pooled = mean of the last layer's query outputs; tokens/parcels = the node tokens (no label is read)."""
        memory = self.nodes(batch)
        queries = self.decode(memory)[-1]
        return {"pooled": queries.mean(1), "tokens": memory, "parcels": memory, "queries": queries}

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.logit(self.decode(self.nodes(batch))[-1]).squeeze(-1).float()

    def predict_env(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Every target from the FC alone: continuous in original units ``[B]``; categorical: class
        probabilities ``[B, C]`` in the order of the target's ``classes``."""
        logits = self.logits(batch)
        out = {}
        for j, s in enumerate(self.specs):
            part = logits[:, self.slices[j]]
            out[s.name] = part[:, 0] * s.std + s.mean if s.kind == "continuous" else part.softmax(-1)
        return out

    def finetune_loss(self, batch: Mapping[str, Any], target: str, labels: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted cross-entropy of the ``target`` queries on class indices ``labels`` (``-1`` = none).

        Summed over labelled samples and divided by the batch size (DDP-invariant).
        """
        j, s = self.spec(target)
        if s.kind != "categorical":
            raise ConfigError("trainer.target", f"fine-tuning with pseudo-labels needs a categorical target, "
                                                f"{target!r} is {s.kind}")
        logits = self.logits(batch)[:, self.slices[j]]
        b = logits.shape[0]
        labels, weights = labels.to(logits.device), weights.to(logits.device).float()
        has = labels >= 0
        ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        loss = (ce * weights * has).sum() / b
        with torch.no_grad():
            acc = ((logits.argmax(1) == labels) & has).sum() / has.sum().clamp_min(1)
        return loss, {"ce": loss.detach(), "acc": acc, "n_labelled": has.sum().float()}

    def with_targets(self, env: Sequence[Mapping[str, Any]]) -> "LCM":
        """A copy whose targets are ``merge_env(self.config.env, env)``: the pretrained queries of known
        (target, class) pairs are reused, queries for new targets or classes are new (fresh init)."""
        merged = merge_env(self.config.env, env)
        new = LCM(self.config.replace(env=merged))
        state = {k: v for k, v in self.state_dict().items() if k != "queries"}
        new.load_state_dict(state, strict=False)
        old_index = {key: i for i, key in enumerate(self.layout)}
        with torch.no_grad():
            for i, key in enumerate(new.layout):
                if key in old_index:
                    new.queries[i] = self.queries[old_index[key]]
        return new.to(self.queries.device)


# -- pseudo-labels -----------------------------------------------------------------------------------
def pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index where the top probability is ``>= threshold``, else ``-1``; and the top probability.

    ``probs`` is ``[B, C]`` (rows sum to 1).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    conf, label = probs.max(dim=1)
    return torch.where(conf >= threshold, label, torch.full_like(label, -1)), conf


def balance_pseudo_labels(found: Mapping[str, tuple[int, float]], n_classes: int,
                          balance: str = "equal") -> dict[str, tuple[int, float]]:
    """Class balance of confident pseudo-labels: ``"equal"`` keeps, per class, the ``k`` most confident
    runs with ``k`` the count of the rarest class (0 when a class has none: nobody is labelled);
    ``"none"`` keeps them all."""
    if balance not in BALANCES:
        raise ConfigError("trainer.pseudo_balance", f"must be one of {BALANCES}, got {balance!r}")
    if balance == "none":
        return dict(found)
    by_class: dict[int, list[tuple[float, str]]] = {c: [] for c in range(n_classes)}
    for run_id, (label, conf) in found.items():
        by_class[int(label)].append((float(conf), str(run_id)))
    k = min(len(v) for v in by_class.values())
    out = {}
    for label, items in by_class.items():
        for conf, run_id in sorted(items, key=lambda t: (-t[0], t[1]))[:k]:
            out[run_id] = (label, conf)
    return out


@torch.no_grad()
def assign_pseudo_labels(model: LCM, batches: Iterable[Mapping[str, Any]], target: str, threshold: float,
                         split: str = "train", device: torch.device | str | None = None
                         ) -> tuple[dict[str, tuple[int, float]], int]:
    """Confident predictions ``{run_id: (class index, confidence)}`` for unlabelled ``split`` runs, and
    how many unlabelled ``split`` runs there were.

    Runs that have a true label, runs of another split (no test or validation run is ever labelled)
    and predictions under ``threshold`` get nothing. Batches need ``run_id`` (and ``split``) fields.
    """
    j, spec = model.spec(target)
    if spec.kind != "categorical":
        raise ConfigError("trainer.target", f"pseudo-labels need a categorical target, {target!r} is {spec.kind}")
    was_training = model.training
    model.eval()
    out: dict[str, tuple[int, float]] = {}
    n_unlabelled = 0
    try:
        for batch in batches:
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            run_ids = list(batch["run_id"])
            splits = list(batch["split"]) if "split" in batch else [split] * len(run_ids)
            _, observed = model.env_values(batch, len(run_ids))
            labels, conf = pseudo_labels(model.predict_env(batch)[target].float().cpu(), threshold)
            for i, run_id in enumerate(run_ids):
                if splits[i] != split or bool(observed[i, j]):
                    continue
                n_unlabelled += 1
                if int(labels[i]) >= 0:
                    out[str(run_id)] = (int(labels[i]), float(conf[i]))
    finally:
        model.train(was_training)
    return out, n_unlabelled
