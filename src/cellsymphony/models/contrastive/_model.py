"""``ContrastiveAligner``: the MuData-aware wrapper of :class:`ContrastiveModule` (fit / transform / save / load)."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from ..._constants import MIN_CONTRASTIVE_CELLS, MOD_MORPH, MOD_RNA
from ..._settings import log_seconds, logger, resolve_device
from ..._validate import check_choice, check_float, check_int, get_modality, get_rep, is_mudata, resolve_rep
from .._base import BaseModel, deprecated_layout, seeded, standardization
from .._config import ModelConfig
from ._data import paired_inputs
from ._metrics import RECALL_KS, retrieval_recall
from ._module import ContrastiveModule, info_nce

__all__ = ["ContrastiveAligner", "ContrastiveConfig", "paired_inputs", "retrieval_recall"]

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

FORMAT = "cellsymphony.ContrastiveAligner"
MODALITIES = (MOD_RNA, MOD_MORPH)


RETRIEVAL_CELLS = 10_000  # held-out cells among which retrieval is scored (a fixed candidate pool)


def held_out_split(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out and training rows (sorted) of ``n`` paired cells: ``test_size`` of them, at least 2 when
    ``test_size > 0``, drawn with ``seed`` (the one rule of :meth:`ContrastiveAligner.fit`)."""
    n_test = max(int(round(test_size * n)), 2) if test_size > 0 else 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_test]), np.sort(order[n_test:])


@dataclasses.dataclass
class ContrastiveConfig(ModelConfig):
    """Architecture of a :class:`ContrastiveAligner` (see its parameters)."""

    dim: int = 128
    hidden: int = 256
    dropout: float = 0.1
    temperature: float = 0.07
    learn_temperature: bool = True

    def __post_init__(self):
        self.dim = check_int("dim", self.dim, min=1)
        self.hidden = check_int("hidden", self.hidden, min=1)
        self.dropout = check_float("dropout", self.dropout, min=0, max=1, max_open=True)
        self.temperature = check_float("temperature", self.temperature, min=0, min_open=True)
        self.learn_temperature = bool(self.learn_temperature)


class ContrastiveAligner(BaseModel):
    """Align expression and morphology embeddings of the same cells in a shared space (CLIP-style).

    Two projection networks (:class:`~cellsymphony.models.contrastive._module.ProjectionHead`) map the
    expression embedding (e.g. scGPT) and the morphology embedding (e.g. UNI2-h) of each cell onto a
    ``dim``-dimensional unit sphere; they are trained with the symmetric InfoNCE loss, the matched
    cell being the positive and the other cells of the batch the negatives. Usually made by
    :func:`cellsymphony.tl.align_contrastive`, which writes the projections.

    Parameters
    ----------
    dim
        Dimension of the shared space.
    hidden
        Width of the hidden layer of each projection network.
    dropout
        Dropout after the hidden layer during training.
    temperature
        Initial softmax temperature of the loss.
    learn_temperature
        Learn the temperature (log-parameterised, clamped to ``[0.01, 1]``) or keep it fixed.
    """

    FORMAT = FORMAT
    FORMAT_VERSION = 2
    CONFIG_CLASS = ContrastiveConfig
    TRAINER = "cs.tl.align_contrastive"
    HISTORY_COLUMNS = ("epoch", "train_loss", "test_loss", "temperature")
    # float32 steps: the InfoNCE logits (cosines / 0.07) lose their ranking in bf16, and the heads are small
    AUTOCAST = False

    def __init__(
        self,
        *,
        dim: int = 128,
        hidden: int = 256,
        dropout: float = 0.1,
        temperature: float = 0.07,
        learn_temperature: bool = True,
    ):
        super().__init__(ContrastiveConfig(dim, hidden, dropout, temperature, learn_temperature))
        self.gene_rep: str | None = None
        self.morph_rep: str | None = None
        self.n_gene: int | None = None
        self.n_morph: int | None = None
        self.retrieval = pd.DataFrame()
        self.metrics_table: pd.DataFrame | None = None
        self.fit_info: dict = {}
        self.train_obs_names = pd.Index([])
        self.test_obs_names = pd.Index([])

    def __repr__(self) -> str:
        state = f"trained on {self.fit_info.get('n_used', '?')} cells" if self.is_trained else "not trained"
        return (
            f"ContrastiveAligner(dim={self.config.dim}, hidden={self.config.hidden}, "
            f"inputs=({self.gene_rep!r}: {self.n_gene}, {self.morph_rep!r}: {self.n_morph}), {state})"
        )

    @property
    def temperature(self) -> float:
        """The current softmax temperature."""
        if self.module is None:
            return self.config.temperature
        return float(self.module.temperature.detach().cpu())

    # ------------------------------------------------------------------ the base's hooks
    def _build_module(self) -> ContrastiveModule:
        c = self.config
        return ContrastiveModule(
            self.n_gene, self.n_morph, dim=c.dim, hidden=c.hidden, dropout=c.dropout, temperature=c.temperature,
            learn_temperature=c.learn_temperature,
        )  # fmt: skip

    def _get_state(self) -> dict:
        return {
            "n_gene": self.n_gene,
            "n_morph": self.n_morph,
            "gene_rep": self.gene_rep,
            "morph_rep": self.morph_rep,
            "fit_info": self.fit_info,
            "retrieval": self.retrieval.to_dict(orient="list"),
            "retrieval_index": list(self.retrieval.index),
            "test_obs_names": [str(x) for x in self.test_obs_names],
        }

    def _set_state(self, state) -> None:
        self.n_gene, self.n_morph = int(state["n_gene"]), int(state["n_morph"])
        self.gene_rep, self.morph_rep = state.get("gene_rep"), state.get("morph_rep")
        self.fit_info = dict(state.get("fit_info") or {})
        self.retrieval = pd.DataFrame(state.get("retrieval") or {}, index=state.get("retrieval_index") or None)
        self.test_obs_names = pd.Index(state.get("test_obs_names") or [])

    @classmethod
    def _upgrade(cls, meta: dict, path: Path) -> dict:
        if meta.get("format") == f"{FORMAT}/1":  # the layout of 0.1
            deprecated_layout(path, "format-1 ContrastiveAligner")
            state = {k: meta.get(k) for k in ("n_gene", "n_morph", "gene_rep", "morph_rep", "fit_info", "retrieval",
                                              "retrieval_index", "test_obs_names")}  # fmt: skip
            return {
                "format": FORMAT,
                "format_version": 1,
                "cellsymphony_version": meta.get("version"),
                "config": meta.get("config", {}),
                "state": state,
                "fit_params": meta.get("fit_params") or {},
                "history": meta.get("history") or {},
            }
        return meta

    # ------------------------------------------------------------------ training
    def fit(
        self,
        mdata: MuData,
        *,
        gene_rep: str | None = None,
        morph_rep: str | None = None,
        epochs: int = 20,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        test_size: float = 0.1,
        retrieval_cells: int | None = RETRIEVAL_CELLS,
        early_stopping: bool = False,
        patience: int = 5,
        seed: int = 0,
        device: str | None = None,
        test_obs_names: Sequence[str] | None = None,
    ) -> ContrastiveAligner:
        """Train on the cells present in both modalities, holding out ``test_size`` of them.

        The aligner reads ``mdata`` and writes nothing into it (:func:`cellsymphony.tl.align_contrastive`
        writes the projections).

        Parameters
        ----------
        mdata
            MuData with ``'rna'`` and ``'morphology'`` modalities; cells are paired by ``obs_names``.
        gene_rep, morph_rep
            Keys of the input embeddings (``None``: the latest written for that modality).
        epochs
            Passes over the training cells.
        batch_size
            Cells per batch (the negatives of each cell are the other cells of its batch);
            clamped, with a warning, to the number of training cells.
        lr
            Peak learning rate of AdamW (cosine decay to zero over training).
        weight_decay
            AdamW weight decay of the linear layers.
        test_size
            Fraction of paired cells held out for the held-out loss and retrieval (0 for none).
        retrieval_cells
            Retrieval is scored among at most this many held-out cells, drawn at random with ``seed``
            (``None``: all of them). Its cost grows with the square of the cells, and recall@k depends on
            how many candidates there are: a fixed number keeps whole sections fast and their figures
            comparable.
        early_stopping
            Stop once the held-out loss has not improved for ``patience`` epochs and keep the weights of the
            best epoch (needs ``test_size > 0``). Off by default (results as in earlier versions, and the
            held-out cells, on which retrieval is reported, do not select the model); turn it on when the
            held-out loss rises early, as in the demo (from epoch 3 of 30).
        patience
            Epochs without improvement before stopping.
        seed
            Seed of the split, initial weights, shuffling and dropout (the global random state is left as it was).
        device
            Torch device; ``None`` uses ``cs.settings.device``.
        test_obs_names
            The cells to hold out, by name, instead of drawing ``test_size`` of them (the stain-augmented
            training of :func:`cellsymphony.tl.align_contrastive` holds out original cells this way); names
            that are not paired cells with finite embeddings are ignored.

        Returns
        -------
        The aligner itself, with ``history``, ``retrieval``, ``metrics_table``, ``fit_info``, ``fit_params``,
        ``provenance``, ``train_obs_names`` and ``test_obs_names`` set.
        """
        epochs = check_int("epochs", epochs, min=1)
        batch_size = check_int("batch_size", batch_size, min=2, hint="InfoNCE needs negatives")
        test_size = check_float("test_size", test_size, min=0, max=1, max_open=True)
        lr = check_float("lr", lr, min=0, min_open=True)
        weight_decay = check_float("weight_decay", weight_decay, min=0)
        retrieval_cells = check_int("retrieval_cells", retrieval_cells, min=2, none=True)
        patience = check_int("patience", patience, min=1)
        seed = check_int("seed", seed)
        t_start = time.perf_counter()
        data = paired_inputs(mdata, gene_rep, morph_rep)
        n = data["n_used"]
        if n < MIN_CONTRASTIVE_CELLS:
            raise ValueError(
                f"Contrastive alignment needs at least {MIN_CONTRASTIVE_CELLS} cells present in both modalities "
                f"with finite embeddings; found {n} ({data['n_paired']} paired by obs_names, {data['n_nan_rna']} "
                f"with NaN rows in {data['gene_rep']!r}, {data['n_nan_morphology']} in {data['morph_rep']!r}). "
                "Use a larger section or several sections."
            )
        if test_obs_names is None:
            test_idx, train_idx = held_out_split(n, test_size, seed)
        else:
            is_test = pd.Index(data["obs_names"]).isin(pd.Index(np.asarray(test_obs_names, dtype=str)))
            test_idx, train_idx = np.flatnonzero(is_test), np.flatnonzero(~is_test)
        n_test, n_train = len(test_idx), len(train_idx)
        if n_train < 2:
            raise ValueError(
                f"test_size={test_size} holds out {n_test} of the {n} paired cells, leaving {n_train} to train on "
                "(at least 2 needed): lower test_size."
            )
        if batch_size > n_train:
            warnings.warn(
                f"batch_size={batch_size} is larger than the {n_train} training cells: clamped to {n_train}.",
                UserWarning,
                stacklevel=2,
            )
            batch_size = n_train
        device = resolve_device(device)
        self.gene_rep, self.morph_rep = data["gene_rep"], data["morph_rep"]
        self.n_gene, self.n_morph = data["x_gene"].shape[1], data["x_morph"].shape[1]
        self._record_inputs(mdata, {"rna": (self.gene_rep, self.n_gene), "morphology": (self.morph_rep, self.n_morph)})

        self.train_obs_names = data["obs_names"][train_idx]
        self.test_obs_names = data["obs_names"][test_idx]

        with seeded(seed, device):
            self.module = module = self._build_module()
            xg = torch.from_numpy(data["x_gene"]).to(device)
            xm = torch.from_numpy(data["x_morph"]).to(device)
            tr = torch.from_numpy(train_idx).to(device)
            te = torch.from_numpy(test_idx).to(device)
            module.gene_head.set_standardization(*standardization(xg[tr]))
            module.morph_head.set_standardization(*standardization(xm[tr]))
            module.to(device)
            self.device = device
            decay = [p for p in module.parameters() if p.ndim == 2]
            no_decay = [p for p in module.parameters() if p.ndim != 2]

            def batches(gen):
                perm = tr[torch.randperm(n_train, generator=gen).to(device)]
                for s in range(0, n_train, batch_size):
                    idx = perm[s : s + batch_size]
                    if idx.numel() >= 2:  # a lone cell has no negatives
                        yield idx

            self.history = self._fit_loop(
                batches=batches,
                loss=lambda idx: module.loss(xg[idx], xm[idx]),
                evaluate=lambda: {"test_loss": self._eval_loss(xg, xm, te, batch_size), "temperature": self.temperature},
                batch_len=lambda idx: int(idx.numel()),
                n_train=n_train, epochs=int(epochs), lr=lr, weight_decay=weight_decay, seed=seed, device=device,
                early_stopping=early_stopping, patience=int(patience),
                param_groups=[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                schedule="cosine", steps_per_epoch=math.ceil(n_train / batch_size), after_step=module.clamp_temperature,
                desc="contrastive",
            )  # fmt: skip
            t_eval = time.perf_counter()
            scored = te
            if retrieval_cells is not None and te.numel() > retrieval_cells:
                pick = np.sort(np.random.default_rng([seed, 1]).choice(te.numel(), int(retrieval_cells), replace=False))
                scored = te[torch.from_numpy(pick).to(te.device)]
            self.retrieval = self._retrieval(xg, xm, scored)
            log_seconds("contrastive retrieval", time.perf_counter() - t_eval, n_cells=int(scored.numel()))
            log_seconds("contrastive fit", time.perf_counter() - t_start)
        from ..._results import retrieval_table

        self.metrics_table = retrieval_table("contrastive", self.retrieval)
        self.fit_info = {k: v for k, v in data.items() if k.startswith("n_")}
        self.fit_info.update(n_train=int(n_train), n_test=int(n_test), batch_size=batch_size)
        self.fit_params = {
            "gene_rep": self.gene_rep, "morph_rep": self.morph_rep, "epochs": int(epochs), "batch_size": batch_size,
            "lr": float(lr), "weight_decay": float(weight_decay), "test_size": float(test_size),
            "retrieval_cells": None if retrieval_cells is None else int(retrieval_cells),
            "early_stopping": bool(early_stopping), "patience": int(patience), "seed": int(seed), "device": device,
        }  # fmt: skip
        last = self.history.iloc[-1]
        logger.info(
            "contrastive: %d epochs, train loss %.3f, held-out loss %.3f, temperature %.3f",
            len(self.history), last.train_loss, last.test_loss, self.temperature,
        )  # fmt: skip
        return self

    @torch.no_grad()
    def _eval_loss(self, xg: torch.Tensor, xm: torch.Tensor, idx: torch.Tensor, batch_size: int) -> float:
        """Mean InfoNCE over the held-out cells in fixed batches of ``batch_size`` (NaN when < 2 cells)."""
        if idx.numel() < 2:
            return float("nan")
        self.module.eval()
        total, count = 0.0, 0
        for s in range(0, idx.numel(), batch_size):
            b = idx[s : s + batch_size]
            if b.numel() < 2:
                continue
            total += float(self.module.loss(xg[b], xm[b])) * b.numel()
            count += b.numel()
        return total / count

    @torch.no_grad()
    def _retrieval(self, xg: torch.Tensor, xm: torch.Tensor, idx: torch.Tensor) -> pd.DataFrame:
        """Recall@k in both directions among the held-out cells, with the chance level k / n."""
        n = int(idx.numel())
        self.module.eval()
        zg, zm = [], []
        for s in range(0, n, 8192):
            b = idx[s : s + 8192]
            zg.append(self.module.gene_head(xg[b]))
            zm.append(self.module.morph_head(xm[b]))
        if n:
            zg, zm = torch.cat(zg), torch.cat(zm)
            r2m, m2r = retrieval_recall(zg, zm), retrieval_recall(zm, zg)
        else:
            r2m = m2r = dict.fromkeys(RECALL_KS, float("nan"))
        return pd.DataFrame(
            {
                "k": list(RECALL_KS),
                "rna_to_morphology": [r2m[k] for k in RECALL_KS],
                "morphology_to_rna": [m2r[k] for k in RECALL_KS],
                "chance": [min(k, n) / n if n else float("nan") for k in RECALL_KS],
                "n_cells": [n] * len(RECALL_KS),
            },
            index=[f"recall@{k}" for k in RECALL_KS],
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def transform_array(
        self, x: np.ndarray, modality: Literal["rna", "morphology"] = MOD_MORPH, *, batch_size: int = 8192
    ) -> np.ndarray:
        """Project an array of one modality's embeddings; rows with NaN/inf give NaN rows.

        Parameters
        ----------
        x
            ``(n_cells, n_features)`` embeddings of the kind the aligner was trained on.
        modality
            ``"rna"`` or ``"morphology"``.
        batch_size
            Cells per forward pass.

        Returns
        -------
        ``(n_cells, dim)`` float32 array of L2-normalised projections.
        """
        self._check_trained()
        check_choice("modality", modality, MODALITIES)
        x = np.asarray(x, dtype=np.float32)
        want = self.n_gene if modality == MOD_RNA else self.n_morph
        if x.ndim != 2 or x.shape[1] != want:
            raise ValueError(
                f"The aligner's {modality!r} network takes {want} features per cell; got an array of shape {x.shape}."
            )
        out = np.full((x.shape[0], self.config.dim), np.nan, dtype=np.float32)
        ok = np.flatnonzero(np.isfinite(x).all(axis=1))
        self.module.eval()
        head = self.module.gene_head if modality == MOD_RNA else self.module.morph_head
        for s in range(0, len(ok), batch_size):
            rows = ok[s : s + batch_size]
            out[rows] = head(torch.from_numpy(x[rows]).to(self.device)).cpu().numpy()
        return out

    def transform(
        self,
        mdata: MuData | AnnData,
        modality: Literal["rna", "morphology"] = MOD_MORPH,
        *,
        rep: str | None = None,
        batch_size: int = 8192,
        key_added: str | None = None,
        allow_mismatch: bool = False,
    ) -> np.ndarray:
        """Project one modality of a (new) section into the shared space.

        Works on a morphology-only MuData (an H&E-only slide read with ``cs.io.read_he_cells``) or
        on an AnnData holding the modality.

        Parameters
        ----------
        mdata
            MuData with the modality, or the modality's AnnData.
        modality
            ``"morphology"`` (default) or ``"rna"``.
        rep
            Key in the modality's ``.obsm`` of the input embedding; ``None`` uses the key the aligner was
            trained on when present, else the latest embedding of that modality.
        batch_size
            Cells per forward pass.
        key_added
            When given, also write the result to the modality's ``.obsm[key_added]``.
        allow_mismatch
            Project even when the input embedding was made by another producer than the one the aligner was
            trained on (another model, weights checksum or patch geometry), with a warning; by default that is
            a ``ValueError`` naming both fingerprints.

        Returns
        -------
        ``(n_cells, dim)`` float32 array of L2-normalised projections (NaN rows for NaN inputs), in the
        modality's cell order.
        """
        self._check_trained()
        check_choice("modality", modality, MODALITIES)
        adata = get_modality(mdata, modality)
        if rep is None:
            trained = self.gene_rep if modality == MOD_RNA else self.morph_rep
            rep = trained if trained in adata.obsm else None
        if is_mudata(mdata):
            rep, x = get_rep(mdata, modality, rep)
        else:
            if rep is None:
                raise ValueError(
                    f"Pass rep=: the AnnData has none of the trained key (it has {sorted(adata.obsm)})."
                )
            rep = resolve_rep(adata, modality, rep)
            x = np.asarray(adata.obsm[rep], dtype=np.float32)
        self._check_provenance(mdata, {modality: rep}, allow_mismatch=allow_mismatch)
        out = self.transform_array(x, modality, batch_size=batch_size)
        if key_added is not None:
            adata.obsm[key_added] = out
            if is_mudata(mdata):
                mdata.update()
            logger.info("added .obsm[%r] to the %r modality", key_added, modality)
        return out

    def loss(self, x_gene: np.ndarray, x_morph: np.ndarray) -> float:
        """Symmetric InfoNCE of paired arrays taken as one batch, with the current temperature (eval mode)."""
        self._check_trained()
        zg = torch.from_numpy(self.transform_array(x_gene, MOD_RNA))
        zm = torch.from_numpy(self.transform_array(x_morph, MOD_MORPH))
        return float(info_nce(zg, zm, self.temperature))
