"""Readers for the single files of a Xenium output folder.

Each function reads one file (or one of its alternative forms), tolerates the variations of
the Xenium software generations, and raises a ``ValueError`` naming the file and the fix when
the file cannot be used. Nothing here builds the MuData; see ``_build.py``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from .._errors import InputFileError, InputFileNotFoundError, reading

EXPERIMENT_FILE = "experiment.xenium"
CELLS_PARQUET = "cells.parquet"
CELLS_CSV = ("cells.csv.gz", "cells.csv")
MATRIX_H5 = "cell_feature_matrix.h5"
MATRIX_MEX = "cell_feature_matrix"
MATRIX_ZARR = "cell_feature_matrix.zarr.zip"
NUCLEUS_BOUNDARIES = "nucleus_boundaries.parquet"
HE_SUFFIX = "he_image.ome.tif"
ALIGNMENT_SUFFIX = "he_imagealignment.csv"
DEFAULT_PIXEL_SIZE = 0.2125

GENE_EXPRESSION = "Gene Expression"
PROTEIN_EXPRESSION = "Protein Expression"

# feature types kept out of X, and the obs column holding each cell's total (the cells table's names)
_CONTROL_COLUMNS = {
    "negative control probe": "control_probe_counts",
    "negative control codeword": "control_codeword_counts",
    "genomic control": "genomic_control_counts",
    "unassigned codeword": "unassigned_codeword_counts",
    "deprecated codeword": "deprecated_codeword_counts",
    "blank codeword": "blank_codeword_counts",
}


# ---------------------------------------------------------------------- cell ids
def to_cell_ids(values, source: str) -> tuple[np.ndarray, str]:
    """Cell ids as an array of str, and their style ("integer" or "string"), detected by type.

    Integer ids (Xenium < 1.3) become their decimal text; string ids (``aaabbbcc-1``), possibly stored
    as bytes, are decoded.
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64).astype(str), "integer"
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all() or not np.all(arr == np.round(arr)):
            raise ValueError(f"{source}: the cell ids are non-integer numbers; the file looks damaged.")
        return arr.astype(np.int64).astype(str), "integer"
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8").astype(str), "string"
    if arr.dtype.kind == "U":
        return arr.astype(str), "string"
    flat = arr.ravel()
    kind = pd.api.types.infer_dtype(flat, skipna=False)
    if kind == "string":
        return flat.astype(str), "string"
    if kind == "bytes":
        return np.char.decode(flat.astype(bytes), "utf-8").astype(str), "string"
    if kind == "integer":
        return flat.astype(np.int64).astype(str), "integer"
    if pd.isna(flat).any():
        raise ValueError(f"{source}: {int(pd.isna(flat).sum())} cell id(s) are missing; the file is damaged.")
    out = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat], dtype=str)
    return out, "string"


def zarr_cell_ids(raw: np.ndarray, path) -> np.ndarray:
    """The cell ids of a zarr file's ``cell_id`` array (``cells.zarr.zip``, ``cell_feature_matrix.zarr.zip``):
    ``(prefix, suffix)`` pairs (Xenium 1.3 on) or one column of string / integer ids."""
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 2:
        return cell_id_from_prefix_suffix(raw)
    return to_cell_ids(raw.ravel(), str(path))[0]


def cell_id_from_prefix_suffix(ids: np.ndarray) -> np.ndarray:
    """Xenium's ``(prefix, suffix)`` uint32 pairs (zarr files from 1.3 on) as ``aaabbbcc-1`` strings.

    The prefix is written in hexadecimal with the digits 0-f shifted to the letters a-p and padded
    to 8 letters with ``a``; the suffix (dataset number) follows a dash.
    """
    pairs = np.asarray(ids, dtype=np.uint64).reshape(-1, 2)
    prefix, suffix = pairs[:, 0], pairs[:, 1]
    if len(pairs) and prefix.max() >= 1 << 32:  # wider than Xenium's uint32: one cell at a time
        table = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
        out = [format(int(p), "x").translate(table).rjust(8, "a") + f"-{int(s)}" for p, s in pairs]
        return np.asarray(out, dtype=str)
    # the 8 hexadecimal digits of each prefix, most significant first, as the letters a-p (vectorised: a
    # section has up to ~10^6 cells)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    letters = ((prefix[:, None] >> shifts) & np.uint64(15)).astype(np.uint8) + np.uint8(ord("a"))
    head = np.ascontiguousarray(letters).view("S8").ravel().astype("U8")
    return np.char.add(np.char.add(head, "-"), suffix.astype(np.int64).astype(str))


# ---------------------------------------------------------------------- experiment.xenium
def read_experiment(folder: Path) -> dict:
    """The JSON of ``experiment.xenium`` (required)."""
    path = folder / EXPERIMENT_FILE
    what, fix = "the Xenium experiment file", "Copy experiment.xenium again from the Xenium output."
    if not path.is_file():
        raise InputFileNotFoundError(
            path, what, "it does not exist (a Xenium output folder holds experiment.xenium)",
            "Pass the folder that contains experiment.xenium, cells.parquet (or cells.csv.gz) and "
            "cell_feature_matrix.h5 (or the cell_feature_matrix/ folder, or cell_feature_matrix.zarr.zip).",
        )  # fmt: skip
    with reading(path, what, fix):
        specs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(specs, dict):
        raise InputFileError(path, what, f"it holds a JSON {type(specs).__name__}, not an object", fix)
    return specs


def pixel_size_of(specs: dict, source: str) -> float:
    """Micrometres per morphology pixel (``pixel_size`` of experiment.xenium)."""
    if "pixel_size" not in specs:
        warnings.warn(
            f"{source} records no pixel_size; assuming {DEFAULT_PIXEL_SIZE} um per morphology pixel (all Xenium "
            "instruments so far).",
            UserWarning,
            stacklevel=3,
        )
    value = specs.get("pixel_size", DEFAULT_PIXEL_SIZE)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: pixel_size {value!r} is not a number.") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{source}: pixel_size must be a positive number of micrometres, got {value}.")
    return value


def default_sample_id(specs: dict, folder: Path) -> str:
    """``region_name``, else ``run_name`` of experiment.xenium, else the folder name."""
    for key in ("region_name", "run_name"):
        v = specs.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return folder.resolve().name


# ---------------------------------------------------------------------- cells table
def read_cells_table(folder: Path) -> tuple[pd.DataFrame, Path]:
    """The cells table (``cells.parquet`` preferred over ``cells.csv.gz``), cell ids as str in ``cell_id``."""
    path = folder / CELLS_PARQUET
    if path.is_file():
        with reading(path, "the cells table", "Copy the file again from the Xenium output (or remove it to fall "
                     "back on cells.csv.gz)."):  # fmt: skip
            df = pd.read_parquet(path)
    else:
        path = next((folder / n for n in CELLS_CSV if (folder / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"No cells table in {str(folder)!r}: expected cells.parquet or cells.csv.gz (the per-cell table "
                "of the Xenium output); copy it into the folder."
            )
        with reading(path, "the cells table", "Copy the file again from the Xenium output."):
            df = pd.read_csv(path)
        # an index column written by pandas / R
        df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed:") and str(c) != ""]]
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in df.columns]
    if missing:
        raise InputFileError(
            path, "the cells table", f"it lacks the column(s) {missing} (it has {list(df.columns)})",
            "Pass a Xenium output folder: its cells table has cell_id, x_centroid and y_centroid.",
        )
    ids, style = to_cell_ids(df["cell_id"].to_numpy(), str(path))
    if pd.Index(ids).has_duplicates:
        dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
        raise ValueError(f"{str(path)!r} lists {len(dup)} cell id(s) more than once (e.g. {list(dup[:3])}).")
    df = df.copy()
    df["cell_id"] = ids
    df.attrs["id_style"] = style
    for col in df.columns:
        if df[col].dtype == object and col != "cell_id":
            df[col] = _decode_bytes(df[col].to_numpy())
    return df, path


def parquet_ranges(path: Path, columns) -> dict[str, tuple[float, float]]:
    """Per column, the ``(min, max)`` that a parquet file's own row-group statistics record (read from the
    footer alone); columns without statistics are left out."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # noqa: BLE001 - no statistics to compare with: nothing to check
        return {}
    names = [meta.schema.column(j).name for j in range(meta.num_columns)]
    out = {}
    for col in columns:
        if col not in names:
            continue
        j = names.index(col)
        lo, hi = math.inf, -math.inf
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(j).statistics
            if st is None or not st.has_min_max:
                lo = None
                break
            try:
                lo, hi = min(lo, float(st.min)), max(hi, float(st.max))
            except (TypeError, ValueError):
                lo = None
                break
        if lo is not None and math.isfinite(lo) and math.isfinite(hi):
            out[col] = (lo, hi)
    return out


def check_centroids(xy: np.ndarray, ids: np.ndarray, path: Path, *, extent_um: tuple[float, float] | None = None,
                    extent_source: str = "") -> None:
    """The cell centroids (micrometres) must be finite, lie within the range the parquet file's own statistics
    record (random bytes in a data page decode to values such as 1e111 while the footer keeps the true range),
    and within the section (``extent_um``: width and height of the morphology image), with a margin."""
    what, fix = "the cells table", "The file is damaged or comes from another run: copy it again from the Xenium output."
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InputFileError(
            path, what, f"{int(bad.sum())} of {len(xy)} cells have a missing or non-finite centroid (e.g. "
            f"{[str(v) for v in ids[bad][:3]]})", fix,
        )  # fmt: skip
    if len(xy) == 0:
        return
    if path.name.endswith(".parquet"):
        ranges = parquet_ranges(path, ("x_centroid", "y_centroid"))
        outside = np.zeros(len(xy), dtype=bool)
        for k, col in enumerate(("x_centroid", "y_centroid")):
            if col in ranges:
                lo, hi = ranges[col]
                tol = 1e-6 * max(1.0, abs(lo), abs(hi))
                outside |= (xy[:, k] < lo - tol) | (xy[:, k] > hi + tol)
        if outside.any():
            shown = ", ".join(f"{c[0]} {ranges[c][0]:.6g} to {ranges[c][1]:.6g}" for c in ranges)
            raise InputFileError(
                path, what, f"{int(outside.sum())} of {len(xy)} cells have a centroid outside the range that the "
                f"file's own statistics record ({shown} um; e.g. cell {str(ids[outside][0])} at "
                f"{xy[outside][0].tolist()}): the data pages are damaged", fix,
            )  # fmt: skip
    if extent_um is not None:
        w, h = extent_um
        margin = 0.01 * max(w, h) + 10.0
        off = (xy[:, 0] < -margin) | (xy[:, 1] < -margin) | (xy[:, 0] > w + margin) | (xy[:, 1] > h + margin)
        if off.any():
            raise InputFileError(
                path, what, f"{int(off.sum())} of {len(xy)} cells have a centroid outside the section, which the "
                f"morphology image {extent_source} spans (0 to {w:.6g} x 0 to {h:.6g} um; e.g. cell "
                f"{str(ids[off][0])} at {xy[off][0].tolist()})",
                "The cells table and the morphology image come from different runs, or the table is damaged: "
                "copy the folder again from the Xenium output.",
            )  # fmt: skip


def morphology_extent(folder: Path, pixel_size: float) -> tuple[tuple[float, float] | None, str]:
    """``((width, height) in micrometres, file name)`` of the folder's DAPI morphology image, read from its TIFF
    header only; ``(None, "")`` when there is none or it cannot be read (it is not needed to read the section)."""
    from ._morphology_image import find_dapi

    path = find_dapi(folder)
    if path is None:
        return None, ""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes.upper(), series.shape
            h, w = int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    except Exception:  # noqa: BLE001 - a damaged morphology image is reported by the functions that read it
        return None, ""
    return (w * pixel_size, h * pixel_size), path.name


# ---------------------------------------------------------------------- cells.zarr.zip
CELLS_ZARR = "cells.zarr.zip"


def check_cells_zarr_ids(folder: Path, table_ids: np.ndarray, table_path: Path) -> None:
    """The cell ids of ``cells.zarr.zip`` (segmentation masks of Xenium Explorer, when present) must be those of
    the cells table: the reader does not use the file, but a mismatch means the folder mixes runs."""
    path = folder / CELLS_ZARR
    if not path.is_file():
        return
    import zarr

    what = "the cell segmentation"
    with reading(path, what, "Copy it again from the Xenium output (the reader does not need it: it can also be "
                 "moved out of the folder)."):  # fmt: skip
        store = zarr.storage.ZipStore(path, mode="r")
        try:
            root = zarr.open_group(store, mode="r")
            if "cell_id" not in root:
                return
            raw = np.asarray(root["cell_id"][...])
        finally:
            store.close()
        ids = zarr_cell_ids(raw, path)
    tab, seg = pd.Index(table_ids), pd.Index(ids)
    if tab.equals(seg):
        return
    only_tab, only_seg = tab.difference(seg), seg.difference(tab)
    if len(only_tab) or len(only_seg):
        raise InputFileError(
            path, what, f"its cell ids do not match {table_path.name}: {len(only_tab)} of the {len(tab)} cells of "
            f"the table are not in it (e.g. {[str(v) for v in only_tab[:3]]}) and {len(only_seg)} of its {len(seg)} cells are "
            f"not in the table (e.g. {[str(v) for v in only_seg[:3]]})",
            "The folder mixes files of different runs or segmentations: copy the whole folder from one Xenium "
            "output (or move cells.zarr.zip out of it: the reader does not need it).",
        )  # fmt: skip


def _decode_bytes(values: np.ndarray) -> np.ndarray:
    """An object column with its bytes values decoded as UTF-8 (other values kept), decoding each distinct
    value once: such columns (e.g. ``segmentation_method``) repeat a few values over every cell."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    decoded = np.empty(len(uniques) + 1, dtype=object)
    decoded[:-1] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in uniques]
    out = decoded[codes]  # code -1 (missing) takes the last slot, filled below
    missing = codes < 0
    if missing.any():
        out[missing] = values[missing]
    return out


# ---------------------------------------------------------------------- count matrix
def find_matrix(folder: Path) -> Path:
    for name in (MATRIX_H5, MATRIX_MEX, MATRIX_ZARR):
        p = folder / name
        if p.exists():
            return p
    raise FileNotFoundError(
        f"No cell-feature matrix in {str(folder)!r}: expected cell_feature_matrix.h5, the cell_feature_matrix/ "
        "folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) or cell_feature_matrix.zarr.zip; copy one "
        "of them from the Xenium output."
    )


def read_matrix(path: Path) -> tuple[sparse.csr_matrix, pd.DataFrame, np.ndarray]:
    """``(X cells x features CSR float32, features [id, name, feature_type], cell ids as str)``."""
    try:
        if path.name.endswith(".h5"):
            x, feats, ids = _read_h5(path)
        elif path.name.endswith(".zarr.zip"):
            x, feats, ids = _read_zarr(path)
        else:
            x, feats, ids = _read_mex(path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:
        raise InputFileError(path, "the count matrix", f"{type(err).__name__}: {err}",
                             "Copy it again from the Xenium output.") from err
    if x.shape != (len(ids), len(feats)):
        raise ValueError(
            f"{str(path)!r}: the matrix is {x.shape[0]} x {x.shape[1]} but lists {len(ids)} cells and "
            f"{len(feats)} features; the file is inconsistent."
        )
    x = x.tocsr()
    x.sum_duplicates()
    x.eliminate_zeros()
    if pd.Index(ids).has_duplicates:
        raise ValueError(f"{str(path)!r} lists some cell ids more than once; the file is inconsistent.")
    feats = feats.reset_index(drop=True)
    for col in ("id", "name", "feature_type"):
        feats[col] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in feats[col]]
    return x, feats, ids


def _int_array(a, name: str, path: Path) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "f" and (not np.all(np.isfinite(a)) or not np.all(a == np.round(a))):
        raise ValueError(f"{str(path)!r}: {name} holds non-integer values; the file is damaged.")
    return a.astype(np.int64)


def _read_h5(path: Path):
    import h5py

    with reading(path, "the count matrix", "The file is not a complete HDF5 file: copy it again from the Xenium "
                 "output."):  # fmt: skip
        f = h5py.File(path, "r")
    with f:
        if "matrix" not in f:
            raise ValueError(f"{str(path)!r} has no 'matrix' group; it is not a 10x cell-feature matrix.")
        g = f["matrix"]
        need = ["data", "indices", "indptr", "shape", "barcodes", "features"]
        missing = [k for k in need if k not in g]
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks matrix/{missing}; it is not a complete 10x cell-feature matrix."
            )
        fg = g["features"]
        if "name" not in fg or "id" not in fg:
            raise ValueError(f"{str(path)!r} lacks matrix/features/name or id.")
        n_feat, n_cells = (int(v) for v in _int_array(g["shape"][()], "shape", path)[:2])
        # read straight into the final types (HDF5 converts while reading): float32 values (the counts are
        # integers far below 2**24, and the MuData holds float32) and int32 feature indices. A whole
        # section has 10^8-10^9 non-zero values, so every intermediate copy costs gigabytes.
        data = _h5_read(g["data"], np.float32)
        indices = _index_array(g["indices"], "indices", path, n_feat)
        indptr = _int_array(g["indptr"][()], "indptr", path)
        names = fg["name"][()]
        feats = pd.DataFrame(
            {
                "id": fg["id"][()],
                "name": names,
                "feature_type": fg["feature_type"][()]
                if "feature_type" in fg
                else [GENE_EXPRESSION] * len(names),
            }
        )
        ids, _ = to_cell_ids(g["barcodes"][()], str(path))
        scaling = f.attrs.get("protein_scaling_factor")
    if len(indptr) != n_cells + 1:
        raise ValueError(
            f"{str(path)!r}: indptr has {len(indptr)} entries for {n_cells} cells; the file is inconsistent."
        )
    # the 10x layout is CSC over cells (features x cells): its transpose is cells x features CSR on the same
    # arrays, no copy
    x = sparse.csc_matrix((data, indices, indptr), shape=(n_feat, n_cells)).T.tocsr()
    if scaling is not None:
        is_prot = _kinds(feats["feature_type"]) == "protein"
        if is_prot.any():  # in place, on the stored values of the protein columns
            x.data[is_prot[x.indices]] /= np.float32(np.asarray(scaling).ravel()[0])
    return x, feats, ids


def _h5_read(dset, dtype) -> np.ndarray:
    """A whole HDF5 dataset as ``dtype``, converted by HDF5 while reading (no copy in the file's type)."""
    if dset.dtype == dtype or dset.dtype.kind not in "iuf":
        return np.asarray(dset[()], dtype=dtype)
    return dset.astype(dtype)[()]


def _index_array(dset, name: str, path: Path, bound: int) -> np.ndarray:
    """Column indices (int32 when ``bound`` allows), read without an int64 copy, checked to lie in [0, bound)."""
    dtype = np.int32 if bound < 2**31 else np.int64
    a = _h5_read(dset, dtype) if dset.dtype.kind in "iu" else _int_array(dset[()], name, path).astype(dtype)
    if a.size and (a.min() < 0 or a.max() >= bound):
        raise ValueError(f"{str(path)!r}: {name} holds values outside [0, {bound}); the file is damaged.")
    return a


def _read_mex(folder: Path):
    from scipy.io import mmread

    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is not a folder of matrix.mtx.gz, features.tsv.gz and barcodes.tsv.gz."
        )

    def pick(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(
            f"{str(folder / (stem + '.gz'))!r} not found: the cell_feature_matrix/ folder needs matrix.mtx.gz, "
            "features.tsv.gz and barcodes.tsv.gz; copy the missing file from the Xenium output."
        )

    mtx, feat_path, bc_path = pick("matrix.mtx"), pick("features.tsv"), pick("barcodes.tsv")
    m = sparse.csr_matrix(mmread(str(mtx))).astype(np.float32)  # features x cells
    feats = pd.read_csv(feat_path, sep="\t", header=None, dtype=str)
    if feats.shape[1] < 2:
        raise ValueError(f"{str(feat_path)!r} must have at least two columns (id, name[, type]).")
    if feats.shape[1] < 3:
        feats[2] = GENE_EXPRESSION
    feats = feats.iloc[:, :3]
    feats.columns = ["id", "name", "feature_type"]
    bcs = pd.read_csv(bc_path, sep="\t", header=None, dtype=str)[0].to_numpy()
    ids, _ = to_cell_ids(bcs, str(bc_path))
    return m.T.tocsr(), feats, ids


def _read_zarr(path: Path):
    import zarr

    store = zarr.storage.ZipStore(path, mode="r")
    try:
        root = zarr.open_group(store, mode="r")
        if "cell_features" not in root:
            raise ValueError(
                f"{str(path)!r} has no 'cell_features' group; it is not a Xenium cell-feature zarr."
            )
        g = root["cell_features"]
        attrs = dict(g.attrs)
        names = attrs.get("feature_keys") or attrs.get("feature_names")
        if not names:
            raise ValueError(f"{str(path)!r}: cell_features lacks the feature_keys attribute.")
        types = attrs.get("feature_types") or [GENE_EXPRESSION] * len(names)
        fids = attrs.get("feature_ids") or names
        raw_ids = np.asarray(g["cell_id"][...])
        data = np.asarray(g["data"][...], dtype=np.float32)
        indices = _int_array(g["indices"][...], "indices", path)
        indptr = _int_array(g["indptr"][...], "indptr", path)
    finally:
        store.close()
    ids = zarr_cell_ids(raw_ids, path)
    n_cells, n_feat = len(ids), len(names)
    if len(indptr) == n_feat + 1:  # rows are features (the layout 10x writes)
        x = sparse.csr_matrix((data, indices, indptr), shape=(n_feat, n_cells)).T.tocsr()
    elif len(indptr) == n_cells + 1:
        x = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_feat))
    else:
        raise ValueError(
            f"{str(path)!r}: indptr has {len(indptr)} entries for {n_feat} features and {n_cells} cells; the file "
            "is inconsistent."
        )
    feats = pd.DataFrame({"id": list(fids), "name": list(names), "feature_type": list(types)})
    return x, feats, ids


# ---------------------------------------------------------------------- feature types
def _normalise_type(t: str | bytes) -> str:
    if isinstance(t, bytes):
        t = t.decode("utf-8")
    s = re.sub(r"[_\-\s]+", " ", str(t).strip().lower())
    return re.sub(r"s$", "", s)


def _kinds(types) -> np.ndarray:
    """'gene', 'protein', 'aggregate' or 'control' for each feature type."""
    out = []
    for t in types:
        s = _normalise_type(t)
        if s in ("gene expression", "gene", "rna"):
            out.append("gene")
        elif s in ("protein expression", "protein"):
            out.append("protein")
        elif s.startswith("aggregate"):
            out.append("aggregate")
        else:
            out.append("control")
    return np.asarray(out)


def control_column(feature_type: str) -> str:
    """The obs column holding the per-cell total of a control feature type."""
    s = _normalise_type(feature_type)
    if s in _CONTROL_COLUMNS:
        return _CONTROL_COLUMNS[s]
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_") + "_counts"


def split_features(x: sparse.csr_matrix, feats: pd.DataFrame) -> dict:
    """Split the matrix: gene expression, protein, and per-cell totals of each control type."""
    kinds = _kinds(feats["feature_type"])
    gene = np.flatnonzero(kinds == "gene")
    prot = np.flatnonzero(kinds == "protein")
    controls: dict[str, np.ndarray] = {}
    ctrl = np.flatnonzero(kinds == "control")
    for t in pd.unique(feats["feature_type"].iloc[ctrl]):
        cols = np.flatnonzero((feats["feature_type"] == t).to_numpy() & (kinds == "control"))
        col = control_column(t)
        total = np.asarray(x[:, cols].sum(axis=1)).ravel()
        controls[col] = controls.get(col, 0) + total
    every = len(gene) == x.shape[1]  # nothing to split off: no copy of the whole matrix
    return {
        "gene_x": x if every else x[:, gene].tocsr(),
        "gene_var": feats.iloc[gene].reset_index(drop=True),
        "protein_x": x[:, prot].tocsr() if len(prot) else None,
        "protein_var": feats.iloc[prot].reset_index(drop=True),
        "controls": controls,
    }


# ---------------------------------------------------------------------- nuclei
def polygon_stats(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Area and centroid of each polygon of a boundaries table (vertices in file order per polygon)."""
    keys_df = df[keys]
    codes = keys_df.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    x = df["vertex_x"].to_numpy(np.float64)[order]
    y = df["vertex_y"].to_numpy(np.float64)[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    # the next vertex within the same polygon (the first one after the last)
    nxt = np.arange(1, len(codes) + 1)
    nxt[ends - 1] = starts
    cross = x * y[nxt] - x[nxt] * y
    a2 = np.add.reduceat(cross, starts)  # twice the signed area
    cx = np.add.reduceat((x + x[nxt]) * cross, starts)
    cy = np.add.reduceat((y + y[nxt]) * cross, starts)
    n = ends - starts
    mx = np.add.reduceat(x, starts) / n
    my = np.add.reduceat(y, starts) / n
    ok = np.abs(a2) > 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        px = np.where(ok, cx / (3 * a2), mx)
        py = np.where(ok, cy / (3 * a2), my)
    first = keys_df.iloc[order[starts]].reset_index(drop=True)
    first["area"] = np.abs(a2) / 2
    first["cx"] = px
    first["cy"] = py
    return first


NUCLEUS_MAX_OFFSET_UM = 50.0  # median nucleus-to-cell centroid distance above which the nuclei are refused


def read_nucleus_centroids(
    folder: Path, cell_ids: np.ndarray, centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per cell: the centroid (micrometres) of its largest nucleus (NaN where none) and the number of nuclei.

    None when ``nucleus_boundaries.parquet`` is absent. An error when its cell ids match no cell of the table,
    when vertices are not finite, or (given the cell ``centroids``) when the nuclei lie far from their cells
    (median distance above 50 um: another unit or another run); a warning with counts when only some of its
    cell ids match.
    """
    path = folder / NUCLEUS_BOUNDARIES
    if not path.is_file():
        return None
    what, fix = "the nucleus boundaries", "Copy it again from the Xenium output, or pass nucleus_boundaries=False."
    with reading(path, what, fix):
        df = pd.read_parquet(path)
    missing = [c for c in ("cell_id", "vertex_x", "vertex_y") if c not in df.columns]
    if missing:
        raise InputFileError(path, what, f"it lacks the column(s) {missing}; it is not a Xenium boundaries table",
                             fix)
    n = len(cell_ids)
    centroid = np.full((n, 2), np.nan)
    n_nuclei = np.zeros(n, dtype=np.int64)
    if len(df) == 0:
        return centroid, n_nuclei
    # convert each distinct id once (the file has one row per vertex)
    codes, uniques = pd.factorize(df["cell_id"], sort=False)
    unique_ids, _ = to_cell_ids(np.asarray(uniques), str(path))
    # vertices without a cell id (code -1) belong to no cell; -1 must not index unique_ids below
    has_id = codes >= 0
    if not has_id.any():
        return centroid, n_nuclei
    vx, vy = df["vertex_x"].to_numpy(np.float64), df["vertex_y"].to_numpy(np.float64)
    bad = ~(np.isfinite(vx) & np.isfinite(vy))
    if bad.any():
        raise InputFileError(path, what, f"{int(bad.sum())} of its {len(df)} vertices are missing or not finite",
                             "The file is damaged: " + fix[0].lower() + fix[1:])
    index = pd.Index(cell_ids)
    known = index.get_indexer(unique_ids) >= 0
    if not known.any():
        raise InputFileError(
            path, what, f"none of its {len(unique_ids)} nucleus cell ids matches a cell of the cells table (e.g. "
            f"{[str(v) for v in unique_ids[:3]]} vs {[str(v) for v in cell_ids[:3]]})",
            "It comes from another run or segmentation: copy the nucleus_boundaries.parquet of this run, or pass "
            "nucleus_boundaries=False.",
        )  # fmt: skip
    if not known.all():
        warnings.warn(
            f"{str(path)!r}: {int((~known).sum())} of its {len(unique_ids)} nucleus cell ids are not cells of the "
            f"cells table (e.g. {[str(v) for v in unique_ids[~known][:3]]}); those nuclei are ignored. Check that the file "
            "belongs to this run.",
            UserWarning,
            stacklevel=3,
        )
    df = pd.DataFrame(
        {
            "cell_id": codes[has_id],
            "vertex_x": df["vertex_x"].to_numpy()[has_id],
            "vertex_y": df["vertex_y"].to_numpy()[has_id],
            **({"label_id": df["label_id"].to_numpy()[has_id]} if "label_id" in df.columns else {}),
        }
    )
    keys = ["cell_id", "label_id"] if "label_id" in df.columns else ["cell_id"]
    stats = polygon_stats(df, keys)
    counts = stats.groupby("cell_id", sort=False).size()
    largest = stats.sort_values("area", ascending=False, kind="stable").drop_duplicates("cell_id")
    pos = index.get_indexer(unique_ids[largest["cell_id"].to_numpy()])
    keep = pos >= 0
    centroid[pos[keep]] = largest[["cx", "cy"]].to_numpy()[keep]
    if centroids is not None and keep.any():
        has = np.isfinite(centroid).all(axis=1)
        offset = float(np.median(np.hypot(*(centroid[has] - np.asarray(centroids, np.float64)[has]).T)))
        if offset > NUCLEUS_MAX_OFFSET_UM:
            raise InputFileError(
                path, what, f"its nuclei lie far from their cells (median distance {offset:.4g} um between a "
                f"cell's centroid and its nucleus', over {int(has.sum())} cells; a nucleus lies inside its cell)",
                "The vertices are in another unit than the micrometres of the cells table, or the file belongs to "
                "another run: copy the nucleus_boundaries.parquet of this run, or pass nucleus_boundaries=False.",
            )  # fmt: skip
    cpos = index.get_indexer(unique_ids[counts.index.to_numpy()])
    n_nuclei[cpos[cpos >= 0]] = counts.to_numpy()[cpos >= 0]
    return centroid, n_nuclei


# ---------------------------------------------------------------------- H&E and alignment
def find_he_files(folder: Path) -> tuple[Path | None, Path | None]:
    """The folder's ``*he_image.ome.tif`` and its ``*he_imagealignment.csv`` (None where absent)."""
    images = sorted(p for p in folder.glob("*" + HE_SUFFIX) if not p.name.startswith("._"))
    images += sorted(p for p in folder.glob("*he_image.ome.tiff") if not p.name.startswith("._"))
    if len(images) > 1:
        raise ValueError(
            f"{str(folder)!r} holds several H&E images {[p.name for p in images]}; pass the one to attach with "
            "he_image= (and its alignment with he_alignment=)."
        )
    image = images[0] if images else None
    alignment = None
    if image is not None:
        stem = image.name[: image.name.index("he_image")]
        candidate = folder / (stem + ALIGNMENT_SUFFIX)
        if candidate.is_file():
            alignment = candidate
    if alignment is None:
        found = sorted(p for p in folder.glob("*" + ALIGNMENT_SUFFIX) if not p.name.startswith("._"))
        if len(found) == 1:
            alignment = found[0]
    return image, alignment


def sibling_alignment(image: Path) -> Path | None:
    """The alignment CSV named after an H&E image (10x: ``X_he_image.ome.tif`` -> ``X_he_imagealignment.csv``)."""
    name = image.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs"):
        if name.lower().endswith(suffix):
            candidate = image.with_name(name[: -len(suffix)] + "alignment.csv")
            if candidate.is_file():
                return candidate
            break
    return None


def read_alignment(source) -> np.ndarray:
    """A 3 x 3 alignment from a 10x ``*_he_imagealignment.csv`` or an array, validated."""
    from .._registration import check_alignment

    if isinstance(source, str | Path):
        path = Path(source)
        what = "the H&E alignment file"
        fix = ("Pass the 10x *_he_imagealignment.csv (3 rows of 3 numbers, no header: the affine from H&E pixels "
               "to Xenium morphology pixels) with he_alignment=.")
        if not path.exists():
            raise InputFileNotFoundError(path, what, "it does not exist", fix)
        if path.is_dir():
            raise InputFileError(path, what, "it is a folder, not a file", fix)
        with reading(path, what, fix):
            m = pd.read_csv(path, header=None, sep=None, engine="python").to_numpy()
        with reading(path, what, fix, problem="it does not hold numbers only"):
            m = m.astype(np.float64)
        return check_alignment(m, source=str(path))
    return check_alignment(source, source="he_alignment")
