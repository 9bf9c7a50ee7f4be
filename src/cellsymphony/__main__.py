"""Command line: ``cellsymphony demo``, ``cellsymphony run``, ``cellsymphony register``, ``cellsymphony info``.

Only the standard library is imported at start-up, so ``cellsymphony --help`` is fast; each
command imports what it needs when it runs. Every bad argument is reported as one line and exit
code 2; a failure while running gives exit code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

EXIT_FAILURE = 1
EXIT_USAGE = 2

# environment variables the command line (and the encoders) read for weights
ENV_UNI2H = "CELLSYMPHONY_UNI2H_WEIGHTS"
ENV_UNI = "CELLSYMPHONY_UNI_WEIGHTS"
ENV_SCGPT = "CELLSYMPHONY_SCGPT_DIR"
SCGPT_FILES = ("best_model.pt", "vocab.json", "args.json")


class CLIError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------- checks
def _xenium_dir(path: str) -> Path:
    """The ``--xenium`` folder, which must hold ``experiment.xenium``."""
    xenium = _existing_dir(path, "--xenium")
    if not (xenium / "experiment.xenium").is_file():
        raise CLIError(f"--xenium {path}: no experiment.xenium in it; pass the Xenium output folder")
    return xenium


def _existing_dir(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{flag} {path}: no such folder")
    if not p.is_dir():
        raise CLIError(f"{flag} {path}: is a file, expected a folder")
    return p


def _existing_file(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a folder, expected a file")
    return p


def _out_dir(path: str, *, overwrite: bool, product: str) -> Path:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"--out {path}: is a file, expected a folder")
    if (p / product).exists() and not overwrite:
        raise CLIError(f"--out {path}: already holds {product}; pass --overwrite or choose another folder")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _uni2_weights(path: str | None) -> Path:
    source = "--uni2"
    if path is None:
        path = os.environ.get(ENV_UNI2H)
        source = f"${ENV_UNI2H}"
    if not path:
        found = hf_cache_files("MahmoodLab/UNI2-h")
        if found:
            return found[0]
        raise CLIError(
            f"--uni2 is required (or set ${ENV_UNI2H}): the UNI2-h weights are gated; request access at "
            "https://huggingface.co/MahmoodLab/UNI2-h, download pytorch_model.bin and pass its path"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{source} {path}: no such file or folder")
    return p


def _scgpt_dir(path: str | None) -> Path:
    source = "--scgpt"
    if path is None:
        path = os.environ.get(ENV_SCGPT)
        source = f"${ENV_SCGPT}"
    if not path:
        raise CLIError(
            f"--scgpt is required (or set ${ENV_SCGPT}): a folder with {', '.join(SCGPT_FILES)}, e.g. the "
            "whole-human scGPT model (see the docs page on weights)"
        )
    p = _existing_dir(path, source)
    missing = [f for f in SCGPT_FILES if not (p / f).is_file()]
    if missing:
        raise CLIError(f"{source} {path}: missing {', '.join(missing)} (an scGPT model folder holds {', '.join(SCGPT_FILES)})")
    return p


def hf_cache_files(repo_id: str) -> list[Path]:
    """Checkpoint files of ``repo_id`` already in the local Hugging Face cache (no network, no imports)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"),
        "hub",
    )
    snaps = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snaps.is_dir():
        return []
    found = []
    for name in ("pytorch_model.bin", "model.safetensors"):
        found += sorted(p for p in snaps.glob(f"*/{name}") if p.exists())
    return found


# ------------------------------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace) -> int:
    if args.n_cells < 200:
        raise CLIError(f"--n-cells {args.n_cells}: the demo needs at least 200 cells")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out}: is a file, expected a folder")
    from ._demo import run_demo

    run_demo(out, n_cells=args.n_cells, seed=args.seed, spatialdata=args.spatialdata)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    xenium = _xenium_dir(args.xenium)
    he_image = _existing_file(args.he_image, "--he-image")
    he_alignment = _existing_file(args.he_alignment, "--he-alignment")
    uni2 = _uni2_weights(args.uni2) if args.morph_model == "uni2-h" else None
    scgpt = _scgpt_dir(args.scgpt)
    labels, reference = args.labels, None
    if labels == "singler":
        reference = _existing_file(args.reference, "--reference")
        if reference is None:
            raise CLIError("--labels singler needs --reference REF.h5ad (a single-cell reference with cell-type labels)")
        if reference.suffix != ".h5ad":
            raise CLIError(f"--reference {args.reference}: expected an .h5ad file")
        if not args.ref_label_key:
            raise CLIError("--labels singler needs --ref-label-key (the reference's obs column of cell-type labels)")
    elif labels is not None:
        labels = _existing_file(labels, "--labels")
        if args.reference:
            raise CLIError("--reference is only used with --labels singler")
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    known = ("unimodal", "spatial", "dual", "multi_input", "morphology")
    unknown = [a for a in archs if a not in known]
    if unknown or not archs:
        raise CLIError(f"--archs {args.archs}: unknown architecture(s) {unknown}; choose from {', '.join(known)}")
    if args.d_model % args.n_heads:
        raise CLIError(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}")
    out = _out_dir(args.out, overwrite=args.overwrite, product="cellsymphony.h5mu")
    from ._run import preflight, run_pipeline

    try:  # every input opened now: a bad one fails in seconds, not after the embeddings
        preflight(
            xenium, he_image=he_image, he_alignment=he_alignment, uni2=uni2, scgpt=scgpt, labels=labels,
            reference=reference, ref_label_key=args.ref_label_key, cell_id_col=args.cell_id_col,
            label_col=args.label_col, device=args.device,
        )  # fmt: skip
    except ValueError as err:
        raise CLIError(str(err).strip().splitlines()[0]) from err
    if not args.skip_memory_check:
        # before anything heavy: a section whose largest step cannot fit fails now, not an hour in
        from ._memory import check_memory

        try:
            check_memory(
                xenium, morph_model=args.morph_model, morph_weights=uni2, scgpt_dir=scgpt, labels=labels is not None,
                n_archs=len(archs), train_cells=args.train_cells,
            )  # fmt: skip
        except ValueError as err:
            raise CLIError(str(err)) from None
    with _removed_if_left_empty(out):
        run_pipeline(
            xenium, out, he_image=he_image, he_alignment=he_alignment, uni2=uni2, morph_model=args.morph_model,
            morph_mode=args.morph_mode, scgpt=scgpt, labels=labels, reference=reference,
            ref_label_key=args.ref_label_key, cell_id_col=args.cell_id_col, label_col=args.label_col,
            epochs=args.epochs, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, archs=archs,
            train_cells=args.train_cells, device=args.device, seed=args.seed, spatialdata=args.spatialdata,
        )  # fmt: skip
    return 0


@contextlib.contextmanager
def _removed_if_left_empty(out: Path):
    """On failure, remove the ``--out`` folder (and the parents made for it) when this run created it and left
    nothing in it."""
    made = []
    p = out
    while not p.exists():
        made.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        yield
    except BaseException:
        for d in made:  # the deepest first
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        raise


def _cmd_register(args: argparse.Namespace) -> int:
    xenium = _xenium_dir(args.xenium)
    he = _existing_file(args.he, "--he")
    nuclei = _existing_file(args.nuclei, "--nuclei")
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise CLIError(f"--out {args.out}: is a folder, expected the path of the alignment CSV")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {args.out}: already exists; pass --overwrite or choose another path")
    if not out.parent.is_dir():
        raise CLIError(f"--out {args.out}: the folder {out.parent} does not exist")
    if args.he_mpp is not None and not args.he_mpp > 0:
        raise CLIError(f"--he-mpp {args.he_mpp}: expected a positive number of micrometres per pixel")
    from .io import register_he

    reg = register_he(xenium, he, sample=args.sample, he_mpp=args.he_mpp, nuclei=nuclei)
    for line in registration_lines(reg):
        print(line)
    if args.figure:
        reg.plot(save=args.figure, show=False)
        print(f"QC figure: {args.figure}")
    if not reg.qc["ok"]:
        print(f"cellsymphony register: registration failed its QC ({reg.qc['reason']}); nothing written",
              file=sys.stderr)
        return EXIT_FAILURE
    reg.write_csv(out)
    print(f"alignment: {out}")
    return 0


def registration_lines(reg) -> list[str]:
    """What ``cellsymphony register`` prints: the QC, one figure per line."""
    lines = [f"registration of {Path(reg.he_path).name} to sample {reg.sample!r}:"]
    for key in ("ok", "reason", "n_matched", "median_um", "p95_um", "inlier_fraction", "match_rate",
                "chance_match_rate", "scale_um_per_px", "scale_estimated", "mpp_recorded", "scale_ratio", "angle_deg",
                "flipped", "coarse_source", "time_total_s"):
        v = reg.qc.get(key)
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"  {key}: {v}")
    return lines


def info_lines() -> list[str]:
    """What ``cellsymphony info`` prints: versions, devices, weights found, cache folder."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    from ._settings import settings

    lines = [f"cellsymphony {__version__}  (Python {platform.python_version()}, {platform.platform()})", "versions:"]
    for pkg in ("numpy", "pandas", "anndata", "mudata", "scanpy", "squidpy", "spatialdata", "torch", "timm", "singler"):
        try:
            lines.append(f"  {pkg:12s} {version(pkg)}")
        except PackageNotFoundError:
            lines.append(f"  {pkg:12s} not installed")
    try:
        import torch

        devs = ["cpu"]
        if torch.cuda.is_available():
            devs += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devs.append("mps")
        lines.append(f"devices: {', '.join(devs)}  (settings.device = {settings.device!r})")
    except ImportError:
        lines.append("devices: torch is not installed")
    lines.append("weights:")
    for label, env, repo in (("UNI2-h", ENV_UNI2H, "MahmoodLab/UNI2-h"), ("UNI", ENV_UNI, "MahmoodLab/uni")):
        val = os.environ.get(env)
        if val:
            state = "found" if Path(val).expanduser().exists() else "MISSING"
            lines.append(f"  {label:8s} ${env} = {val} ({state})")
        else:
            cached = hf_cache_files(repo)
            where = f"Hugging Face cache: {cached[0]}" if cached else f"not found (set ${env} or pass the path)"
            lines.append(f"  {label:8s} {where}")
    val = os.environ.get(ENV_SCGPT)
    if val:
        p = Path(val).expanduser()
        missing = [f for f in SCGPT_FILES if not (p / f).is_file()]
        state = "found" if not missing else f"MISSING {', '.join(missing)}"
        lines.append(f"  {'scGPT':8s} ${ENV_SCGPT} = {val} ({state})")
    else:
        lines.append(f"  {'scGPT':8s} not found (set ${ENV_SCGPT} or pass --scgpt)")
    lines.append(f"cache: {settings.cache_dir}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cellsymphony",
        description="Cell-level multimodal analysis of 10x Xenium runs and their matched H&E slides.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic tissue")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--n-cells", type=_positive_int, default=4000, help="cells in the synthetic section (default 4000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--spatialdata", action="store_true",
                      help="also write OUT/cellsymphony.zarr (SpatialData, for napari and spatialdata-plot)")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser(
        "run", help="run the pipeline on a real Xenium folder and its H&E",
        description="Read a Xenium run (and its H&E), embed both modalities, label, train and compare "
        "classifiers, align the modalities, find niches; write OUT/cellsymphony.h5mu and OUT/report.html.",
    )  # fmt: skip
    run.add_argument("--xenium", required=True, metavar="DIR", help="Xenium output folder")
    run.add_argument("--he-image", metavar="FILE", help="H&E image (default: *he_image.ome.tif in the folder)")
    run.add_argument("--he-alignment", metavar="FILE", help="H&E alignment CSV (default: *he_imagealignment.csv)")
    run.add_argument("--uni2", metavar="PATH", help=f"UNI2-h weights file or folder (default ${ENV_UNI2H}, then the HF cache)")
    run.add_argument("--scgpt", metavar="DIR", help=f"scGPT model folder (default ${ENV_SCGPT})")
    run.add_argument("--morph-model", default="uni2-h", choices=("uni2-h", "handcrafted", "tiny"),
                     help="morphology encoder (default uni2-h; handcrafted needs no weights; tiny: an untrained "
                          "small ViT for smoke runs of big sections on CPU, not for results)")  # fmt: skip
    run.add_argument("--morph-mode", default="cell", choices=("cell", "tile"), help="per-cell patches or shared tiles")
    run.add_argument("--labels", metavar="singler|FILE", help="label source: 'singler' (with --reference) or a CSV of cell_id,label")
    run.add_argument("--reference", metavar="H5AD", help="single-cell reference for SingleR")
    run.add_argument("--ref-label-key", metavar="COL", help="the reference's obs column of labels")
    run.add_argument("--cell-id-col", default="cell_id", help="cell-id column of a labels FILE (default cell_id)")
    run.add_argument("--label-col", default="label", help="label column of a labels FILE (default label)")
    run.add_argument("--epochs", type=_positive_int, default=20, help="training epochs (default 20, as the paper)")
    run.add_argument("--d-model", type=_positive_int, default=512, help="classifier width (default 512, as the paper)")
    run.add_argument("--n-layers", type=_positive_int, default=6, help="classifier depth (default 6, as the paper)")
    run.add_argument("--n-heads", type=_positive_int, default=8, help="classifier attention heads (default 8)")
    run.add_argument("--archs", default="unimodal,spatial,dual,multi_input,morphology",
                     help="architectures to compare, comma-separated (default all five)")  # fmt: skip
    run.add_argument("--train-cells", type=_positive_int, default=None, metavar="N",
                     help="train the classifiers on at most N labelled cells drawn at random (default all); "
                     "predictions still cover every cell")  # fmt: skip
    run.add_argument("--skip-memory-check", action="store_true",
                     help="run even when the section's estimated memory exceeds what is available")  # fmt: skip
    run.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder")
    run.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    run.add_argument("--spatialdata", action="store_true",
                     help="also write OUT/cellsymphony.zarr (SpatialData, for napari and spatialdata-plot)")
    run.set_defaults(func=_cmd_run)

    register = sub.add_parser(
        "register", help="register an H&E to a Xenium section without an alignment file",
        description="Register the H&E to the Xenium section (DAPI image and nuclei), print the QC and write the "
        "alignment as 10x's *_he_imagealignment.csv (readable by Xenium Explorer and cellsymphony run). Exits with "
        "code 1, writing nothing, when the registration fails its QC.",
    )  # fmt: skip
    register.add_argument("--xenium", required=True, metavar="DIR", help="Xenium output folder")
    register.add_argument("--he", required=True, metavar="FILE", help="H&E image (OME-TIFF, SVS or tiled TIFF)")
    register.add_argument("--out", required=True, metavar="FILE", help="alignment CSV to write")
    register.add_argument("--sample", default=None, help="sample id (default: the folder's region name)")
    register.add_argument("--he-mpp", type=float, default=None, metavar="UM",
                          help="H&E micrometres per pixel, when the file records none (the scale is measured anyway)")
    register.add_argument("--nuclei", metavar="FILE", help="H&E nucleus detections to use instead of the built-in detector")
    register.add_argument("--figure", metavar="PNG", help="also save the QC figure (written on failure too)")
    register.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    register.set_defaults(func=_cmd_register)

    info = sub.add_parser("info", help="print versions, devices and the model weights found")
    info.set_defaults(func=_cmd_info)
    return parser


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO):
    """The command line's log output: the package's messages on stderr as ``cellsymphony: <message>``
    while a command runs (the library itself only adds a NullHandler)."""
    logger = logging.getLogger("cellsymphony")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cellsymphony: %(message)s"))
    handler.setLevel(level)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level or level))
    logger.propagate = False  # printed once, by this handler
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_logging():
        return _main(args)


def _main(args) -> int:
    # mudata 0.3 warns on every .update() about a default that changes in 0.4; the package calls update()
    # on purpose after writing into a modality, so the warning is noise for command-line users
    warnings.filterwarnings("ignore", message=r".*update\(\) will not pull", category=FutureWarning)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"cellsymphony {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cellsymphony {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users; --debug for the traceback
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"cellsymphony {args.command}: error: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
