"""scGPT-compatible expression embeddings: binning, tokenisation, loading, layer parity, embed_expression."""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import cellsymphony as cs
from cellsymphony.models.encoders._scgpt import (
    PostNormEncoderLayer,
    ScGPTEncoder,
    load_scgpt,
    read_vocab,
    rename_checkpoint_keys,
)
from cellsymphony.models.encoders._scgpt_inputs import (
    CellDraws,
    bin_values,
    cell_genes,
    collate,
    embed_rows,
    scan_counts,
    tokenize_block,
    tokenize_cell,
)

# the tiny checkpoint is untrained and some cells are empty by design; tests that check these warnings
# use pytest.warns, which records them regardless of these filters
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*untrained:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*have no non-zero count:UserWarning"),
]
cs.settings.progress = False

PANEL = [f"GENE{i}" for i in range(60)]
IN_VOCAB = PANEL[:54]  # the last 6 panel genes are not in the vocabulary


# ------------------------------------------------------------------------------------------
# fixtures


@cache
def _checkpoint(root: str, specials_in_vocab: bool = True) -> Path:
    return cs.datasets.tiny_scgpt_checkpoint(
        Path(root) / f"tiny_{specials_in_vocab}", IN_VOCAB, seed=3, specials_in_vocab=specials_in_vocab
    )


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("scgpt_ckpt"))


@pytest.fixture
def ckpt(ckpt_root) -> Path:
    return _checkpoint(ckpt_root)


def _load(path) -> ScGPTEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_scgpt(path)


def _counts(n_cells: int = 120, seed: int = 0) -> sp.csr_matrix:
    """Xenium-like counts: many 1s (ties), a long tail of genes per cell, one all-zero cell."""
    rng = np.random.default_rng(seed)
    rows = []
    for _i in range(n_cells):
        k = int(np.clip(rng.lognormal(np.log(15), 0.7), 1, len(PANEL)))
        cols = rng.choice(len(PANEL), k, replace=False)
        vals = rng.geometric(0.5, k).astype(np.float32)
        row = np.zeros(len(PANEL), np.float32)
        row[cols] = vals
        rows.append(row)
    X = np.stack(rows)
    X[7] = 0
    X[8] = 0
    X[8, -1] = 5  # only an unmatched gene: empty too
    return sp.csr_matrix(X)


def _mudata(n_cells: int = 120, seed: int = 0) -> md.MuData:
    X = _counts(n_cells, seed)
    a = ad.AnnData(X)
    a.var_names = PANEL
    a.obs_names = [f"cell{i}" for i in range(n_cells)]
    morph = ad.AnnData(np.zeros((n_cells, 0), np.float32), obs=a.obs.copy())
    return md.MuData({"rna": a, "morphology": morph})


def _roundtrip(m, tmp_path) -> md.MuData:
    path = tmp_path / "out.h5mu"
    m.write(path)
    return md.read_h5mu(path)


def _embed(data, ckpt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cs.pp.embed_expression(data, model_dir=ckpt, **kw)


# ------------------------------------------------------------------------------------------
# binning, as scgpt.preprocess.binning + _digitize(side="both")


def _official_binning(row: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """The official algorithm, restated: per-row quantile edges, digitize from both sides, ties broken by
    one ``np.random.rand`` draw per value of the row (the global legacy stream)."""
    row = row.astype(np.float32)
    if row.max() == 0:
        return np.zeros_like(row)

    def digitize(x):
        edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
        lo, hi = np.digitize(x, edges), np.digitize(x, edges, right=True)
        return np.ceil(np.random.rand(len(x)) * (hi - lo) + lo).astype(np.int64)  # noqa: NPY002 - as the official code

    if row.min() <= 0:
        out = np.zeros(row.shape, np.int64)
        nz = row.nonzero()
        out[nz] = digitize(row[nz])
        return out.astype(np.float32)
    return digitize(row).astype(np.float32)


def test_binning_hand_cases():
    rng = np.random.default_rng(0)
    # two distinct values: edges run from 1 to 2, the minimum gets bin 1 and the maximum bin 50
    np.testing.assert_array_equal(bin_values(np.array([1.0, 2.0]), rng), [1, 50])
    np.testing.assert_array_equal(bin_values(np.array([2.0, 1.0]), rng), [50, 1])
    # zeros stay 0 (values may include zeros in the library function)
    np.testing.assert_array_equal(bin_values(np.array([0.0, 3.0, 0.0, 7.0]), rng), [0, 1, 0, 50])
    # all zero -> zeros; empty -> empty
    np.testing.assert_array_equal(bin_values(np.zeros(3), rng), [0, 0, 0])
    assert bin_values(np.zeros(0), rng).shape == (0,)
    # [1, 1, 1, 4]: the edges k/49 <= 2/3 (k = 0..32, 33 edges) equal 1, so each 1 falls on 33 edges
    # (left digit 33, right digit 0) and gets a bin drawn uniformly in 1..33; 4 is the maximum -> 50.
    draws = np.random.default_rng(5).random(4)
    got = bin_values(np.array([1.0, 1.0, 1.0, 4.0]), np.random.default_rng(5))
    expected = np.ceil(draws * (np.array([0, 0, 0, 49]) - np.array([33, 33, 33, 50])) + [33, 33, 33, 50])
    np.testing.assert_array_equal(got, expected)
    assert got[3] == 50
    seen = np.concatenate(
        [bin_values(np.array([1.0, 1.0, 1.0, 4.0]), np.random.default_rng(s))[:3] for s in range(400)]
    )
    assert seen.min() == 1 and seen.max() == 33
    assert len(np.unique(seen)) == 33
    # distinct values spread over the bins, increasing with the value
    b = bin_values(np.arange(1, 101, dtype=np.float32), rng)
    assert b[0] == 1 and b[-1] == 50 and np.all(np.diff(b) >= 0)
    assert b.dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binning_equals_official_algorithm(seed):
    """Given the same uniform draws (the legacy global stream the official code uses), bins are identical."""
    rng = np.random.default_rng(100 + seed)
    row = rng.geometric(0.4, 200).astype(np.float32) * (rng.random(200) < 0.6)
    np.random.seed(seed)  # noqa: NPY002 - the official code draws from the global stream
    ref = _official_binning(row)
    ours = bin_values(row, np.random.RandomState(seed))  # same stream as np.random.rand after seeding
    np.testing.assert_array_equal(ours, ref)
    assert set(np.unique(ours[row > 0])) <= set(range(1, 51))


def test_tokenize_cell_and_collate():
    X = sp.csr_matrix(np.array([[0, 3, 0, 1, 2], [4, 0, 0, 0, 0]], np.float32))
    X.data[X.data == 4] = 0  # an explicit stored zero
    X = sp.csr_matrix((np.r_[X.data, 0.0], np.r_[X.indices, 4], [0, 3, 5]), shape=(2, 5))
    col2tok = np.array([10, 11, -1, 13, 14])  # column 2 is not in the vocabulary
    tokens, counts = cell_genes(X, col2tok, 0)
    np.testing.assert_array_equal(tokens, [11, 13, 14])  # column order, unmatched dropped
    np.testing.assert_array_equal(counts, [3, 1, 2])
    tokens1, _ = cell_genes(X, col2tok, 1)
    assert len(tokens1) == 0  # explicit zeros are not expressed genes
    genes, values = tokenize_cell(
        tokens, counts, np.random.default_rng(0), cls_id=99, pad_value=-2, max_length=1200
    )
    np.testing.assert_array_equal(genes, [99, 11, 13, 14])
    np.testing.assert_array_equal(values, [-2, 50, 1, 25])  # 3 max, 1 min, 2 halfway: ceil of edge 24.5
    g, v, mask = collate(
        [(genes, values), (np.array([99, 12]), np.array([-2, 1], np.float32))], pad_id=0, pad_value=-2
    )
    np.testing.assert_array_equal(g, [[99, 11, 13, 14], [99, 12, 0, 0]])
    np.testing.assert_array_equal(v, [[-2, 50, 1, 25], [-2, 1, -2, -2]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [0, 0, 1, 1]])


def test_binning_precedes_sampling():
    """Above max_length, <cls> is kept and max_length - 1 genes are sampled AFTER binning all genes."""
    tokens = np.arange(100, 150)
    counts = np.arange(1, 51, dtype=np.float32)  # distinct: bins need no draw
    full = dict(zip(tokens, bin_values(counts, np.random.default_rng(0)), strict=True))
    genes, values = tokenize_cell(tokens, counts, np.random.default_rng(1), cls_id=5, pad_value=-2, max_length=8)
    assert len(genes) == 8 and genes[0] == 5 and values[0] == -2
    assert len(set(genes[1:])) == 7 and set(genes[1:]) <= set(tokens)
    for g, v in zip(genes[1:], values[1:], strict=True):
        assert v == full[g]  # bins of the whole cell, not re-binned among the 7 kept
    # the sample is random (drawn from the cell's generator), each gene kept with equal chance
    picks = np.concatenate(
        [
            tokenize_cell(tokens, counts, np.random.default_rng(s), cls_id=5, pad_value=-2, max_length=8)[0][1:]
            for s in range(300)
        ]
    )
    freq = np.bincount(picks - 100, minlength=50)
    assert freq.min() > 20 and freq.max() < 70  # expected 42 each
    # exactly max_length tokens: no sampling
    genes, _ = tokenize_cell(tokens[:7], counts[:7], np.random.default_rng(1), cls_id=5, pad_value=-2, max_length=8)
    np.testing.assert_array_equal(genes, np.r_[5, tokens[:7]])


@pytest.mark.parametrize("variant", ["counts", "floats in row groups", "tied draws"])
@pytest.mark.parametrize("trial", range(8))
def test_tokenize_block_equals_per_cell_definition(trial, variant, monkeypatch):
    """The batch tokeniser (array operations over the block) gives exactly the per-cell definition:
    tokenize_cell with each cell's counter stream, then collate. Ties, unmatched genes, explicit zeros,
    empty rows and sampled rows included; also non-integer values binned in row groups (a tiny table
    limit), and draws coarsened to quarters so that sampling keys tie at the cut."""
    import cellsymphony._utils as utils
    import cellsymphony.models.encoders._scgpt_inputs as inputs
    from cellsymphony._utils import cell_seeds

    rng = np.random.default_rng(trial)
    n, g = int(rng.integers(1, 50)), int(rng.integers(1, 80))
    dense = rng.geometric(0.5, (n, g)).astype(np.float32) * (rng.random((n, g)) < rng.random())
    if variant == "floats in row groups":
        dense = dense * rng.random((n, g)).astype(np.float32)
        monkeypatch.setattr(inputs, "_TABLE_LIMIT", 16)
    elif variant == "tied draws":
        draws = utils.counter_uniforms
        monkeypatch.setattr(utils, "counter_uniforms", lambda s, p: np.floor(draws(s, p) * 4) / 4)
    if trial % 3 == 0:
        dense[0] = 0  # an empty row
    X = sp.csr_matrix(dense)
    X.data[: len(X.data) // 10] = 0  # explicit stored zeros
    col2tok = np.where(rng.random(g) < 0.8, np.arange(g) + 10, -1)
    seeds = cell_seeds(trial, [f"cell{i}" for i in range(n)])
    max_length = int(rng.integers(2, 40))
    cells = [
        tokenize_cell(*cell_genes(X, col2tok, i), CellDraws(seeds[i]), cls_id=3, pad_value=-2, max_length=max_length)
        for i in range(n)
    ]
    expected = collate(cells, pad_id=0, pad_value=-2)
    got = tokenize_block(X, seeds, col2tok, cls_id=3, pad_id=0, pad_value=-2, max_length=max_length)
    for e, o in zip(expected, got, strict=True):
        np.testing.assert_array_equal(o, e)
    assert got[1].dtype == np.float32 and got[0].dtype == np.int64


def test_cell_seeds_depend_on_seed_and_id_only():
    from cellsymphony._utils import cell_seeds

    ids = [f"cell{i}" for i in range(1000)] + ["é-unicode", "", "x" * 40]
    seeds = cell_seeds(7, ids)
    assert seeds.dtype == np.uint64 and len(np.unique(seeds)) == len(ids)
    np.testing.assert_array_equal(cell_seeds(7, ids[500:]), seeds[500:])  # independent of the others
    np.testing.assert_array_equal(cell_seeds(7, np.array(ids[::-1], dtype=object)), seeds[::-1])
    assert not np.any(cell_seeds(8, ids) == seeds)
    assert cell_seeds(0, [12])[0] == cell_seeds(0, ["12"])[0]
    # the streams are uniform: 53-bit draws, mean 1/2, variance 1/12
    draws = CellDraws(seeds[0]).random(200_000)
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.var() - 1 / 12) < 0.002


# ------------------------------------------------------------------------------------------
# checkpoint layout, renaming, strict loading


def test_rename_checkpoint_keys():
    t = torch.zeros(1)
    state = {
        "module.transformer_encoder.layers.0.self_attn.Wqkv.weight": t,
        "module.transformer_encoder.layers.0.self_attn.Wqkv.bias": t,
        "module.transformer_encoder.layers.1.self_attn._impl.Wqkv.weight": t,
        "module.transformer_encoder.layers.1.self_attn._impl.out_proj.bias": t,
        "module.encoder.embedding.weight": t,
    }
    assert sorted(rename_checkpoint_keys(state)) == [
        "encoder.embedding.weight",
        "transformer_encoder.layers.0.self_attn.in_proj_bias",
        "transformer_encoder.layers.0.self_attn.in_proj_weight",
        "transformer_encoder.layers.1.self_attn.in_proj_weight",
        "transformer_encoder.layers.1.self_attn.out_proj.bias",
    ]


def test_state_dict_keys_match_scgpt():
    """The keys of scGPT's TransformerModel (torch layers) for the parts the encoder builds."""
    layer = [
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
        "self_attn.out_proj.weight",
        "self_attn.out_proj.bias",
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
    ]
    expected = [
        "encoder.embedding.weight",
        "encoder.enc_norm.weight",
        "encoder.enc_norm.bias",
        "value_encoder.linear1.weight",
        "value_encoder.linear1.bias",
        "value_encoder.linear2.weight",
        "value_encoder.linear2.bias",
        "value_encoder.norm.weight",
        "value_encoder.norm.bias",
    ] + [f"transformer_encoder.layers.{i}.{k}" for i in range(2) for k in layer]
    model = ScGPTEncoder(20, 16, 4, 24, 2, pad_token_id=0)
    assert sorted(model.state_dict()) == sorted(expected)
    # and they are torch's own TransformerEncoder names
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, batch_first=True), 2, enable_nested_tensor=False)
    assert sorted(f"transformer_encoder.{k}" for k in ref.state_dict()) == sorted(
        k for k in expected if k.startswith("transformer_encoder")
    )


def test_tiny_checkpoint_layout_and_loading(ckpt, caplog):
    args = json.loads((ckpt / "args.json").read_text())
    assert args["cellsymphony_untrained"] is True
    for k in ("embsize", "nheads", "d_hid", "nlayers", "pad_token", "pad_value"):
        assert k in args
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state
    assert not any("in_proj" in k for k in state)
    assert any(k.startswith("mvc_decoder.") for k in state) and any(k.startswith("cls_decoder.") for k in state)
    vocab = json.loads((ckpt / "vocab.json").read_text())
    assert list(vocab)[-3:] == ["<pad>", "<cls>", "<eoc>"]
    with caplog.at_level("INFO", logger="cellsymphony"), pytest.warns(UserWarning, match="untrained"):
        model = load_scgpt(ckpt)
    assert "cls_decoder (14 tensors), decoder (6 tensors), mvc_decoder (3 tensors)" in caplog.text
    assert not model.training
    # the renamed weights are the ones written
    np.testing.assert_array_equal(
        model.transformer_encoder.layers[1].self_attn.in_proj_weight.detach().numpy(),
        state["transformer_encoder.layers.1.self_attn.Wqkv.weight"].numpy(),
    )
    assert model.cls_token_id == vocab["<cls>"] and model.pad_token_id == vocab["<pad>"]
    assert model.pad_value == -2


def test_vocab_specials_appended(ckpt_root, tmp_path):
    path = _checkpoint(ckpt_root, specials_in_vocab=False)
    vocab_file = json.loads((path / "vocab.json").read_text())
    assert "<cls>" not in vocab_file
    vocab = read_vocab(path / "vocab.json")
    n = len(vocab_file)
    assert [vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"]] == [n, n + 1, n + 2]
    model = _load(path)  # the embedding has len(vocab) rows: loads strictly only with the specials
    assert model.encoder.embedding.num_embeddings == n + 3
    bad = tmp_path / "gap.json"
    bad.write_text(json.dumps({"A": 0, "B": 2}))
    with pytest.raises(ValueError, match="without gaps"):
        read_vocab(bad)


@pytest.mark.parametrize("name", ["args.json", "vocab.json", "best_model.pt"])
def test_missing_file_is_named(ckpt, tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("args.json", "vocab.json", "best_model.pt"):
        if f != name:
            (folder / f).write_bytes((ckpt / f).read_bytes())
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_scgpt(folder)


def _copy_ckpt(ckpt, tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("args.json", "vocab.json", "best_model.pt"):
        (folder / f).write_bytes((ckpt / f).read_bytes())
    return folder


def test_mismatched_checkpoint_lists_keys(ckpt, tmp_path):
    folder = _copy_ckpt(ckpt, tmp_path)
    args = json.loads((folder / "args.json").read_text())
    args["nlayers"] = 3
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: transformer_encoder\.layers\.2\.self_attn"):
        load_scgpt(folder)
    args["nlayers"], args["d_hid"] = 2, 48
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"shape .*transformer_encoder\.layers\.0\.linear1\.weight \(64, 32\) vs \(48, 32\)"):
        load_scgpt(folder)
    args["d_hid"] = 64
    del args["pad_value"]
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match="pad_value"):
        load_scgpt(folder)
    args["pad_value"] = -2
    (folder / "args.json").write_text(json.dumps(args))
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["transformer_encoder.layers.5.norm1.weight"] = torch.ones(32)
    del state["value_encoder.norm.bias"]
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ValueError, match="value_encoder.norm.bias") as err:
        load_scgpt(folder)
    assert "in the checkpoint but not in the model: transformer_encoder.layers.5.norm1.weight" in str(err.value)


# ------------------------------------------------------------------------------------------
# numerical parity of the layers


def _official_torch_stack(model: ScGPTEncoder) -> nn.TransformerEncoder:
    """torch's TransformerEncoder (what scGPT builds without flash-attn) with the encoder's weights."""
    layer = model.transformer_encoder.layers[0]
    d, h = layer.linear1.in_features, layer.self_attn.nhead
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, h, layer.linear1.out_features, dropout=0.2, batch_first=True),
        len(model.transformer_encoder.layers),
        enable_nested_tensor=False,
    )
    ref.load_state_dict(
        {k[len("transformer_encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("transformer_encoder.")}
    )
    return ref.eval()


def test_layer_matches_torch_transformer_layer():
    torch.manual_seed(0)
    ours = PostNormEncoderLayer(32, 4, 48)
    ref = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.1, batch_first=True).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())  # identical key names
    x = torch.randn(5, 9, 32)
    pad = torch.zeros(5, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[3, 2:] = True
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=pad)
        got = ours(x, (~pad)[:, None, None, :])
        got_first = ours(x, (~pad)[:, None, None, :], first_only=True)
        got_nomask = ours(x, None)
        expected_nomask = ref(x)
    valid = ~pad
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_first[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_nomask, expected_nomask, atol=1e-5, rtol=1e-5)


def test_encoder_matches_torch_stack_and_clamps(ckpt):
    model = _load(ckpt)
    ref = _official_torch_stack(model)
    g = torch.tensor([[model.cls_token_id, 1, 2, 3, 4], [model.cls_token_id, 5, 6, model.pad_token_id, model.pad_token_id]])
    v = torch.tensor([[-2.0, 1, 50, 7, 600], [-2.0, 3, 1, -2, -2]])
    pad = g.eq(model.pad_token_id)
    with torch.no_grad():
        x = model.encoder.enc_norm(model.encoder.embedding(g)) + model.value_encoder(v)
        expected = ref(x, src_key_padding_mask=pad)
        full = model(g, v, pad)
        cls = model.encode_cls(g, v, pad)
        # the value encoder clamps from above at 512 only
        clamped = model.value_encoder(torch.tensor([[600.0, 512.0, -2.0]]))
    torch.testing.assert_close(full[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, expected[:, 0], atol=1e-5, rtol=1e-5)
    ve = model.value_encoder

    def by_hand(value):  # Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm of one number
        h = torch.relu(ve.linear1.weight[:, 0] * value + ve.linear1.bias)
        return torch.nn.functional.layer_norm(ve.linear2(h), (h.shape[0],), ve.norm.weight, ve.norm.bias)

    with torch.no_grad():
        torch.testing.assert_close(clamped[0, 0], by_hand(512.0))  # 600 -> 512
        torch.testing.assert_close(clamped[0, 1], by_hand(512.0))
        torch.testing.assert_close(clamped[0, 2], by_hand(-2.0))  # no lower clamp: <cls> keeps -2
        assert not torch.allclose(by_hand(-2.0), by_hand(0.0))


def _reference_embedding(model: ScGPTEncoder, X: sp.csr_matrix, cell_ids, col2tok, *, seed, max_length, batch_size):
    """embed_data's path: dense rows, cells in the given order, batches padded to their longest cell,
    torch's TransformerEncoder, <cls> position, L2 norm (tokenisation with the same per-cell draws)."""
    from cellsymphony._utils import cell_seeds

    ref = _official_torch_stack(model)
    seeds = cell_seeds(seed, cell_ids)
    dense = X.toarray()
    out = np.full((X.shape[0], model.d_model), np.nan, np.float32)
    keep = [i for i in range(X.shape[0]) if np.any((dense[i] != 0) & (col2tok >= 0))]
    for s in range(0, len(keep), batch_size):
        rows = keep[s : s + batch_size]
        cells = []
        for i in rows:
            nz = np.flatnonzero((dense[i] != 0) & (col2tok >= 0))
            cells.append(
                tokenize_cell(
                    col2tok[nz], dense[i, nz], CellDraws(seeds[i]), cls_id=model.cls_token_id,
                    pad_value=model.pad_value, max_length=max_length,
                )
            )
        g, v, _ = collate(cells, pad_id=model.pad_token_id, pad_value=model.pad_value)
        g, v = torch.from_numpy(g), torch.from_numpy(v)
        with torch.no_grad():
            x = model.encoder(g) + model.value_encoder(v)
            emb = ref(x, src_key_padding_mask=g.eq(model.pad_token_id))[:, 0].numpy()
        out[rows] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return out


# ------------------------------------------------------------------------------------------
# embed_expression


def test_embed_expression_mudata(ckpt, tmp_path, caplog):
    m = _mudata()
    with caplog.at_level("INFO", logger="cellsymphony"), pytest.warns(UserWarning, match="2 of 120 cells"):
        cs.pp.embed_expression(m, model_dir=ckpt, max_length=12, batch_size=16)
    assert "matched 54/60 genes" in caplog.text
    m = _roundtrip(m, tmp_path)
    rna = m["rna"]
    emb = rna.obsm["X_scgpt"]
    assert emb.shape == (120, 32) and emb.dtype == np.float32
    empty = rna.obs["X_scgpt_empty"].to_numpy()
    np.testing.assert_array_equal(np.flatnonzero(empty), [7, 8])
    assert np.isnan(emb[empty]).all() and np.isfinite(emb[~empty]).all()
    np.testing.assert_allclose(np.linalg.norm(emb[~empty], axis=1), 1, atol=1e-5)
    assert m.uns["cellsymphony"]["latest"]["rna"] == "X_scgpt"
    rec = rna.uns["X_scgpt"]
    assert list(rec["unmatched_genes"]) == PANEL[54:]
    p = rec["params"]
    assert p["max_length"] == 12 and p["seed"] == 0 and p["n_matched_genes"] == 54 and p["n_genes"] == 60
    assert p["n_bins"] == 51 and p["n_empty_cells"] == 2 and bool(p["untrained"]) and p["model_dir"] == str(ckpt)
    assert "X_scgpt" not in m["morphology"].obsm
    # the same computation as embed_data's path (given order, torch TransformerEncoder, per-batch padding)
    model = _load(ckpt)
    col2tok = np.array([model.vocab.get(g, -1) for g in PANEL])
    ref = _reference_embedding(model, _counts(), rna.obs_names, col2tok, seed=0, max_length=12, batch_size=64)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    cos = np.sum(emb[~empty] * ref[~empty], axis=1)
    assert cos.min() > 0.99999


def test_embed_expression_deterministic_across_batching_and_order(ckpt, tmp_path):
    m = _mudata()
    _embed(m, ckpt, batch_size=64, max_length=10)
    base = m["rna"].obsm["X_scgpt"]
    # other batch size, cells in another order, a different chunking (two halves embedded apart)
    perm = np.random.default_rng(1).permutation(120)
    a = m["rna"][perm].copy()
    del a.obsm["X_scgpt"]
    _embed(a, ckpt, batch_size=5, max_length=10)
    np.testing.assert_allclose(a.obsm["X_scgpt"], base[perm], atol=1e-5)
    halves = [m["rna"][:50].copy(), m["rna"][50:].copy()]
    for h in halves:
        _embed(h, ckpt, batch_size=7, max_length=10)
    np.testing.assert_allclose(np.vstack([h.obsm["X_scgpt"] for h in halves]), base, atol=1e-5)
    # repeatable; another seed changes cells whose bins or sampling involve draws
    m2 = _mudata()
    _embed(m2, ckpt, batch_size=64, max_length=10)
    np.testing.assert_array_equal(m2["rna"].obsm["X_scgpt"], base)
    _embed(m2, ckpt, batch_size=64, max_length=10, seed=1)
    diff = np.abs(m2["rna"].obsm["X_scgpt"] - base).max(axis=1)
    assert np.nanmax(diff) > 1e-3
    m2 = _roundtrip(m2, tmp_path)
    assert m2["rna"].uns["X_scgpt"]["params"]["seed"] == 1


def test_embed_expression_anndata_dense_csc_copy(ckpt, tmp_path):
    m = _mudata(60, seed=2)
    _embed(m, ckpt)
    base = m["rna"].obsm["X_scgpt"]
    for conv in (lambda x: x.toarray(), lambda x: x.tocsc()):
        a = m["rna"].copy()
        a.X = conv(a.X)
        del a.obsm["X_scgpt"]
        _embed(a, ckpt)
        np.testing.assert_allclose(a.obsm["X_scgpt"], base, atol=1e-6)
        assert a.uns["cellsymphony"]["latest"]["rna"] == "X_scgpt"
    # copy=True leaves the input untouched; layer= and gene_key= and key_added=
    m2 = _mudata(60, seed=2)
    m2["rna"].layers["counts"] = m2["rna"].X.copy()
    m2["rna"].X = np.log1p(m2["rna"].X)
    m2["rna"].var["symbol"] = list(m2["rna"].var_names)
    m2["rna"].var_names = [f"ENSG{i:05d}" for i in range(60)]
    out = _embed(m2, ckpt, layer="counts", gene_key="symbol", key_added="X_scgpt_counts", copy=True)
    assert "X_scgpt_counts" not in m2["rna"].obsm and "cellsymphony" not in m2.uns
    np.testing.assert_allclose(out["rna"].obsm["X_scgpt_counts"], base, atol=1e-6)
    assert out.uns["cellsymphony"]["latest"]["rna"] == "X_scgpt_counts"
    out = _roundtrip(out, tmp_path)
    assert out["rna"].uns["X_scgpt_counts"]["params"]["layer"] == "counts"


def test_embed_expression_bad_input(ckpt, tmp_path):
    m = _mudata(40)
    m["rna"].X = m["rna"].X * 0.5  # non-integer
    with pytest.raises(ValueError, match=r"non-integer.*layer="):
        _embed(m, ckpt)
    m = _mudata(40)
    m["rna"].X.data[3] = -1
    with pytest.raises(ValueError, match=r"1 negative.*layer="):
        _embed(m, ckpt)
    m = _mudata(40)
    with pytest.raises(ValueError, match="layer='counts' is not in .layers"):
        _embed(m, ckpt, layer="counts")
    with pytest.raises(ValueError, match="gene_key='symbol' is not a column"):
        _embed(m, ckpt, gene_key="symbol")
    with pytest.raises(ValueError, match="no modality 'protein'"):
        _embed(m, ckpt, mod="protein")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "args.json").write_text("{}")
    (empty / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="best_model.pt"):
        cs.pp.embed_expression(m, model_dir=empty)
    # nothing matches: an error suggesting gene_key
    m["rna"].var_names = [f"ENSG{i:05d}" for i in range(60)]
    with pytest.raises(ValueError, match="gene_key="):
        _embed(m, ckpt)
    assert "X_scgpt" not in m["rna"].obsm
    # few genes in the vocabulary: a warning with the count and examples, still embedded
    m = _mudata(40)
    m["rna"].var_names = PANEL[:20] + [f"ENSG{i:05d}" for i in range(40)]
    with pytest.warns(UserWarning, match=r"Only 20/60 genes \(33%\).*'ENSG00000'"):
        cs.pp.embed_expression(m, model_dir=ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(untrained|have no non-zero).*")
        cs.pp.embed_expression(m, model_dir=ckpt, min_gene_fraction=0.3)
    m = _roundtrip(m, tmp_path)
    assert len(m["rna"].uns["X_scgpt"]["unmatched_genes"]) == 40


def test_scan_counts_and_embed_rows_block(ckpt):
    """The per-block unit (the future dask hook) gives the rows' embeddings on its own."""
    model = _load(ckpt)
    X = _counts(30, seed=4)
    col2tok = np.array([model.vocab.get(g, -1) for g in PANEL])
    lengths, report = scan_counts(X, col2tok, chunk_size=7)
    dense = X.toarray()
    np.testing.assert_array_equal(lengths, ((dense != 0) & (col2tok >= 0)).sum(1))
    assert report["n_negative"] == 0 and report["n_noninteger"] == 0
    ids = [f"cell{i}" for i in range(30)]
    whole = embed_rows(model, X, ids, col2tok, batch_size=4)
    part = embed_rows(model, X[10:20], ids[10:20], col2tok, batch_size=3, bucketed=False)
    np.testing.assert_allclose(part, whole[10:20], atol=1e-5)


def test_embed_rows_with_dataloader_workers(ckpt):
    """Tokenising in DataLoader worker processes gives the same embeddings."""
    model = _load(ckpt)
    X = _counts(40, seed=5)
    col2tok = np.array([model.vocab.get(g, -1) for g in PANEL])
    ids = [f"cell{i}" for i in range(40)]
    a = embed_rows(model, X, ids, col2tok, batch_size=8)
    b = embed_rows(model, X, ids, col2tok, batch_size=8, num_workers=2)
    np.testing.assert_array_equal(a, b)


def test_embed_rows_streams_from_backed_matrix(ckpt, tmp_path):
    """Rows can be read batch by batch from an on-disk (backed) CSR matrix."""
    model = _load(ckpt)
    a = _mudata(30, seed=6)["rna"]
    a.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    assert not sp.issparse(backed.X)  # an h5 dataset, not a matrix in memory
    col2tok = np.array([model.vocab.get(g, -1) for g in PANEL])
    ids = list(a.obs_names)
    np.testing.assert_array_equal(
        embed_rows(model, backed.X, ids, col2tok, batch_size=4), embed_rows(model, a.X, ids, col2tok, batch_size=4)
    )
    backed.file.close()
