"""Config dataclasses of the trainable models (no torch): the base :class:`ModelConfig` and JSON helpers."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def json_safe(v: Any) -> Any:
    """``v`` as JSON values: numpy scalars and arrays to Python numbers and lists, DataFrames to dicts of
    lists, paths to strings, non-finite floats kept (``json.dumps(allow_nan=True)``)."""
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, pd.DataFrame):
        return {str(c): json_safe(v[c].to_numpy()) for c in v.columns}
    if isinstance(v, np.ndarray):
        return [json_safe(x) for x in v.tolist()]
    if isinstance(v, tuple | list | pd.Index):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


@dataclasses.dataclass
class ModelConfig:
    """Base of the config dataclasses: the hyper-parameters a model's module is built from.

    Saved as ``config.json["config"]``; :meth:`from_dict` refuses unknown or missing fields, naming the file.
    """

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | Path = "config") -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown {cls.__name__} fields {unknown} (known: {sorted(names)}); the file was "
                "written by another cellsymphony version or edited by hand."
            )
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"{source}: {err}; the file is incomplete: save the model again.") from err

    def __getitem__(self, name: str) -> Any:
        """Dict-style access (``aligner.config["dim"]``), deprecated: read the attribute (``config.dim``)."""
        warnings.warn(
            f"model.config[{name!r}] is deprecated: the config is a dataclass, write model.config.{name}.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(self, name)

    def __call__(self) -> dict[str, Any]:
        """``model.config()`` of earlier versions, deprecated: the config is a dataclass attribute now."""
        warnings.warn(
            "model.config() is deprecated: model.config is a dataclass; use model.config.to_dict() (or "
            "dataclasses.asdict(model.config)).",
            FutureWarning,
            stacklevel=2,
        )
        return self.to_dict()
