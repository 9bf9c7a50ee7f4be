"""``cs.tl.train_classifier``: train a transformer cell-type classifier and write its predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from .._constants import PRED_KEY
from .._docs import inject_docs

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from ..models.classifier._model import CellTypeClassifier


@inject_docs()
def train_classifier(
    mdata: MuData | AnnData,
    label_key: str,
    *,
    arch: Literal["unimodal", "spatial", "dual", "multi_input", "morphology"] = "dual",
    gene_rep: str | None = None,
    morph_rep: str | None = None,
    stain_augmentation: int | dict | None = None,
    exclude: Sequence[str] = ("ambiguous",),
    confident_key: str | None = None,
    split: Literal["random", "spatial", "sample"] | Sequence[str] = "random",
    test_size: float = 0.2,
    block_size: float | None = None,
    test_samples: Sequence[str] | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-5,
    weight_decay: float = 0.01,
    d_model: int = 512,
    n_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    wavelengths_um: Sequence[float] | None = None,
    dim_feedforward: int | None = None,
    class_weight: Literal["balanced"] | None = "balanced",
    early_stopping: bool = False,
    patience: int = 5,
    seed: int = 0,
    device: str | None = None,
    key_added: str = PRED_KEY,
) -> CellTypeClassifier:
    """Train a transformer cell-type classifier on embeddings (and positions), evaluate it, predict every cell.

    Each input becomes one token (projected to ``d_model``, plus a learned modality embedding); a
    transformer encoder fuses the tokens, which are mean-pooled and classified by a linear head.
    Training uses AdamW and class-weighted cross-entropy, batched on the device (bf16 autocast on
    CUDA). The weights of the last epoch are kept, so the test split never selects a model, unless
    ``early_stopping=True``.

    Parameters
    ----------
    mdata
        {mdata} For ``arch="unimodal"`` or ``"morphology"`` an AnnData of that modality also works.
    label_key
        Column of cell labels, looked up in ``mdata.obs``, then as ``mod:label_key``, then in each
        modality's ``obs``.
    arch
        ``"unimodal"``: expression token; ``"spatial"``: expression + spatial token (sinusoidal
        encoding of the section-relative centroid with wavelengths from 50 um to 25 mm);
        ``"dual"``: expression + morphology tokens; ``"multi_input"``: expression + morphology +
        spatial tokens with relative positional attention (a learned attention bias for every
        ordered token pair, per head and layer); ``"morphology"``: morphology token alone (applies
        to H&E-only slides).
    gene_rep
        {gene_rep}
    morph_rep
        {morph_rep}
    stain_augmentation
        Train on the cells and stain-jittered copies of them, embedded again from perturbed patches by
        :func:`cellsymphony.pp.augment_stain` (so the model sees each cell under several stains and transfers
        better to slides stained and scanned elsewhere): ``None`` (off), the number of copies per cell, or a
        dict with ``n_copies`` (2), ``strength`` (0.15) and ``seed`` (default ``seed``). The split is drawn
        on the original cells; copies of training cells are trained on, copies of test cells are left out,
        so the metrics and the outputs are those of the original cells. Needs a morphology input embedded
        from the patches as scanned, by an encoder named in its params. Recorded in
        ``params["stain_augmentation"]`` and in the saved model.
    exclude
        Labels left out of training and evaluation (e.g. ``"ambiguous"``). Cells with a missing
        label, not confident, or with missing / NaN inputs are left out too; the log counts each.
    confident_key
        Boolean column (looked up like ``label_key``); cells where it is False or missing are left out.
    split
        ``"random"``: stratified by label, ``test_size`` of each label to test (a label with a
        single usable cell stays in training, with a warning); ``"spatial"``: square blocks of
        ``block_size`` micrometres held out whole until ``test_size`` of the cells are in test, so
        neighbouring cells do not leak; ``"sample"``: whole sections held out (``test_samples``, or
        drawn until ``test_size`` is reached). A per-cell array of ``"train"`` / ``"test"`` /
        ``"unused"`` (e.g. an earlier run's ``obs["cs_pred_split"]``) is used as given.
    test_size
        Fraction of the usable labelled cells to hold out.
    block_size
        Side of the spatial blocks in micrometres; ``None`` uses 1/8 of each section's longer side.
    test_samples
        Sections to hold out with ``split="sample"``; ``None`` draws them with ``seed``.
    epochs
        Passes over the training cells.
    batch_size
        Cells per optimisation step.
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    d_model
        Token width of the transformer.
    n_layers
        Encoder layers.
    n_heads
        Attention heads (must divide ``d_model``).
    dropout
        Dropout in the encoder and before the head.
    wavelengths_um
        Wavelengths of the spatial encoding in micrometres; ``None`` uses
        ``(50, 100, 200, 500, 1000, 2000, 5000, 10000, 25000)``.
    dim_feedforward
        Hidden width of the feed-forward blocks; ``None`` uses ``4 * d_model``.
    class_weight
        ``"balanced"``: cross-entropy weights ``n / (n_classes * n_class)`` from the training cells;
        ``None``: unweighted.
    early_stopping
        Stop once the test loss has not improved for ``patience`` epochs and keep the weights of the best
        epoch. Off by default: the test cells are also the ones the metrics are reported on, so stopping on
        them selects the model on its own test set (a mild optimism); use it when ``cs.pl.history`` shows the
        test loss rising early.
    patience
        Epochs without improvement of the test loss before stopping (with ``early_stopping``).
    seed
        {seed}
    device
        {device}
    key_added
        Prefix of the keys written.

    Returns
    -------
    The trained :class:`~cellsymphony.models.CellTypeClassifier`, and writes

    - ``mdata.obs[key_added]``: categorical prediction for every cell with the needed inputs (NaN otherwise);
    - ``mdata.obsm[f"{{key_added}}_proba"]``: ``(n_cells, n_classes)`` probabilities, columns in the order of
      ``uns[key_added]["classes"]``;
    - ``mdata.obs[f"{{key_added}}_split"]``: ``"train"`` / ``"test"`` / ``"unused"``;
    - ``mdata.uns[key_added]``: ``params``, ``classes``, ``model`` (architecture, representation keys
      and dimensions), ``history`` (per-epoch arrays ``train_loss``, ``test_loss``,
      ``test_macro_f1``, ``test_accuracy``), ``metrics`` (``per_class`` DataFrame of precision,
      recall, f1 and support on the test split; ``macro_f1`` and ``weighted_f1`` over the classes
      with test support; ``accuracy``; ``n_test``; ``confusion``, rows true and columns predicted
      class), ``metrics_table`` (the same metrics as a long table ``model, sample, class, metric, value``,
      model = ``key_added``, per section and pooled as ``"all"``; the table ``cs.pl.metrics`` and the report
      read) and ``exclusions`` (cells left out, per reason);
    - ``mdata.uns["cellsymphony"]["outputs"][key_added]``: this function's name and the keys it wrote.
    """
    from .._results import write_classifier
    from ..models.classifier._config import training_from
    from ..models.classifier._model import CellTypeClassifier
    from ._stain_augmentation import augmentation_spec, fit_classifier

    model = CellTypeClassifier(
        arch, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=dropout, dim_feedforward=dim_feedforward,
        wavelengths_um=wavelengths_um,
    )  # fmt: skip
    training = training_from(locals())
    spec = augmentation_spec(stain_augmentation, seed)
    if spec is None:
        model._fit(mdata, label_key, training)
    else:
        fit_classifier(model, mdata, label_key, training, spec)
    write_classifier(mdata, model, key_added)
    return model
