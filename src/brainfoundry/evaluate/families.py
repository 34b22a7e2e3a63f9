"""Adapters for the pretrained model families (`brainfoundry.models`): BrainLM, BrainMass, LCM.

Each wraps a model file (``results/models/<family>/model.safetensors`` with its ``model.json``, or an
``brainfoundry export-model`` folder) behind `ModelAdapter`:

- BrainLM: windows of ``config.window`` points; CLS = pooled, parcel tokens averaged over patches;
  reconstruction through the decoder with the evaluation's own masks; forecasting by hiding the last
  ``horizon / patch`` patches of a window whose future is unknown (zeros, never read: hidden tokens
  are dropped before the encoder).
- BrainMass: the FC of the whole run (``x`` without stored views: the model computes it), ROI tokens
  as parcel embeddings; no time-series decoder, so no reconstruction or forecasting.
- LCM: the FC of the whole run; pooled = mean of its query outputs, parcel embeddings = its node
  tokens; its query heads predict the phenotypes; no time-series decoder. The training split's
  subjects are its label subjects (it saw their phenotypes), kept out of test folds.
- SC-MBM (MinD-Vis Stage A): windows of ``FRAMES_PER_WINDOW`` frames of ``frame_points`` points; each
  frame is embedded on its own and the window's embedding is the mean over its frames (a run's
  embedding, the mean over its windows, is then the mean over its frames); parcel embeddings are the
  tokens of the patch holding each parcel. Masked reconstruction works on frames and patches of
  parcels, not on the windows x time patches of the reconstruction task, so it is not offered here;
  :meth:`SCMBMAdapter.reconstruct_frames` serves a per-frame protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainfoundry.errors import InputError
from brainfoundry.evaluate.adapters import ModelAdapter
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import TaskSkipped


class _Pooled:
    """A torch module windows -> pooled embedding, for fine-tuning (built lazily to keep torch optional)."""

    @staticmethod
    def make(model):
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner.encode({"x": x})["pooled"]

        return Pooled(model)


class TorchModelAdapter(ModelAdapter):
    """Any `brainfoundry.models.FoundationModel` (see the module docstring for the per-family choices)."""

    def __init__(self, model, name: str, label_subjects=(), batch_size: int = 16, device: str = "cpu"):
        import torch

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name
        self.family = model.family
        self.batch_size = batch_size
        self.label_subjects = frozenset(map(str, label_subjects))
        cfg = model.config
        brain = model
        self.embedding_dim = int(cfg.dim)
        caps = {"embed", "parcel_embed", "finetune"}
        if brain.family == "brainlm":
            self.window = int(brain.config.window)
            self.min_length = self.window
            self.patch = int(brain.config.patch_size)
            caps |= {"reconstruct", "cls_attention"}
            # One time patch per window (patch_size == window) leaves no later patch to forecast.
            if brain.config.n_patches > 1:
                caps |= {"forecast", "forecast_features"}
        else:  # BrainMass and the LCM read a connectivity matrix: any series long enough for a correlation
            self.window = None
            self.min_length = 20
            self.patch = None
        if self.family == "lcm":
            caps.add("env_heads")
        self.capabilities = frozenset(caps)
        self._brain = brain

    # -- helpers ---------------------------------------------------------------------------------
    def _tensor(self, x: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def embed(self, windows: np.ndarray):
        import torch

        with torch.no_grad():
            out = self.model.encode({"x": self._tensor(windows)})
        parcels = out.get("parcels")
        return out["pooled"].float().cpu().numpy(), None if parcels is None else parcels.float().cpu().numpy()

    def reconstruct(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            pred = self._brain.reconstruct(self._tensor(x), torch.from_numpy(np.asarray(mask, bool)))
        return pred.float().cpu().numpy()

    def cls_attention(self, windows: np.ndarray) -> np.ndarray:
        """CLS attention per parcel ``[B, N]`` (BrainLM's last encoder layer; network identification)."""
        import torch

        with torch.no_grad():
            return self._brain.cls_attention(self._tensor(windows)).float().cpu().numpy()

    def forecast(self, context: np.ndarray, horizon: int) -> np.ndarray:
        c = self._brain.config
        self._check_forecast_fit(context.shape[1], horizon)
        b, _, n = context.shape
        x = np.concatenate([context, np.zeros((b, horizon, n), np.float32)], axis=1)
        hidden = self._brain.future_mask(b, horizon // c.patch_size).numpy()
        return self.reconstruct(x, hidden)[:, -horizon:]

    def forecast_features(self, context: np.ndarray, horizon: int) -> np.ndarray:
        """Per-parcel encoder features ``[B, N, F]`` of ``context`` for a trained forecasting head."""
        import torch

        c = self._brain.config
        self._check_forecast_fit(context.shape[1], horizon)
        with torch.no_grad():
            out = self._brain.context_features(self._tensor(context), horizon // c.patch_size)
        return out.float().cpu().numpy()

    def _check_forecast_fit(self, n_context: int, horizon: int) -> None:
        c = self._brain.config
        if n_context + horizon != c.window or horizon % c.patch_size:
            raise TaskSkipped(f"model '{self.name}' forecasts whole {c.patch_size}-point patches at the end of "
                              f"{c.window}-point windows; context {n_context} + horizon {horizon} does not fit")

    def finetune_encoder(self):
        return _Pooled.make(self.model)

    def env_predict(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """The LCM's query heads on the FC of each window (no phenotype is read)."""
        import torch

        with torch.no_grad():
            out = self.model.predict_env({"x": self._tensor(windows)})
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def env_specs(self):
        return list(self.model.specs) if self.family == "lcm" else []


#: SC-MBM windows hold this many frames (so a run's up to ``max_windows`` windows cover up to 8x as many frames).
FRAMES_PER_WINDOW = 8


class _FramePooled:
    """A torch module windows ``[B, W, N]`` -> mean CLS embedding over the window's frames (fine-tuning)."""

    @staticmethod
    def make(model):
        import torch

        class FramePooled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                b, w, n = x.shape
                k = int(self.inner.config.frame_points)
                frames = x[:, :w // k * k].reshape(b * (w // k), k, n)
                return self.inner.encode({"x": frames})["pooled"].view(b, w // k, -1).mean(1)

        return FramePooled(model)


class SCMBMAdapter(TorchModelAdapter):
    """The SC-MBM family: a window is cut into frames of ``frame_points`` points, each embedded alone."""

    def __init__(self, model, name: str, batch_size: int = 16, device: str = "cpu"):
        super().__init__(model, name, batch_size=batch_size, device=device)
        self.frame_points = int(model.config.frame_points)
        self.window = FRAMES_PER_WINDOW * self.frame_points
        self.min_length = self.frame_points
        self.patch = None
        self.capabilities = frozenset({"embed", "parcel_embed", "finetune"})

    def embed(self, windows: np.ndarray):
        import torch

        from brainfoundry.models.scmbm import frame_windows

        b, w, n = windows.shape
        frames = np.concatenate([frame_windows(x, self.frame_points) for x in windows])  # [B * F, k, N]
        per = w // self.frame_points
        with torch.no_grad():
            out = self.model.encode({"x": self._tensor(frames)})
        pooled = out["pooled"].float().view(b, per, -1).mean(1)
        parcels = out["parcels"].float().view(b, per, n, -1).mean(1)
        return pooled.cpu().numpy(), parcels.cpu().numpy()

    def reconstruct_frames(self, frames: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Predicted z-normalised frames ``[B, N]`` from frames ``[B, N]`` and hidden patches ``[B, L]``."""
        import torch

        with torch.no_grad():
            pred = self.model.reconstruct_frames(self._tensor(frames), torch.from_numpy(np.asarray(hidden, bool)))
        return pred.float().cpu().numpy()

    def finetune_encoder(self):
        return _FramePooled.make(self.model)


def wrap_model(model, name: str, label_subjects=(), device: str = "cpu") -> TorchModelAdapter:
    """The adapter of a model of any family (SC-MBM reads frames, the others windows)."""
    if model.family == "scmbm":
        return SCMBMAdapter(model, name, device=device)
    return TorchModelAdapter(model, name, label_subjects=label_subjects, device=device)


def load_adapter(family: str, checkpoint: str | Path, evalset: EvalSet, name: str | None = None,
                 device: str = "cpu") -> TorchModelAdapter:
    """Load ``checkpoint`` (a model file) and wrap it; parcel count checked against the evaluation set."""
    from brainfoundry.models.files import model_from_payload, read_model_file

    # safetensors + JSON, sha256 checked on the bytes parsed; a pickle file is refused unread.
    payload = read_model_file(checkpoint)
    model = model_from_payload(payload, checkpoint)
    train_config = payload.get("train_config") or {}
    if family not in (model.family, name) and not str(family).startswith(model.family):
        raise InputError(checkpoint, f"holds a {model.family} model, not {family}")
    n = int(model.config.n_parcels)
    if n != evalset.n_parcels:
        raise InputError(checkpoint, f"model built for {n} parcels, the evaluation shards have {evalset.n_parcels}")
    labels = ()
    if model.family == "lcm":
        runs = evalset.runs
        labels = runs.loc[runs["split"].astype(str) == "train", "subject"].astype(str).unique()
    adapter = wrap_model(model, name or family, label_subjects=labels, device=device)
    # A model file from the trainer's pseudo-label fine-tuning (LCM): its target head is fine-tuned.
    adapter.finetuned_target = train_config.get("target") if train_config.get("mode") == "finetune" else None
    # The semi-supervised round's record (threshold, balance, counts): a round that labelled nobody is reported.
    adapter.pseudo_round = payload.get("pseudo_label_round")
    return adapter
