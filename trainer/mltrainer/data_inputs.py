"""The run's training and eval data as MLflow dataset inputs: name, digest, source, schema, profile.

MLflow shows them in the runs table's Datasets column and on the run page; runs trained on the
same data show the same digest, whatever machine or path it was read from.

What is logged is the raw data the run trained on (after ``max_train_samples`` /
``max_eval_samples``), before tokenization: the columns a user recognises.

The digest is our own, over every row: MLflow's default digest reads only the first 10,000 rows,
so two datasets that differ further down would look the same.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from mltrainer.config import TrainConfig

CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag for a dataset input's role (the UI shows it)
TRAINING, EVAL = "training", "eval"
DIGEST_BATCH_ROWS = 10_000


def content_digest(ds) -> str:
    """A digest of ``ds``'s rows and columns, the same for the same data on any machine.

    Each row is hashed with pandas' fixed-key row hash, batch by batch (row order counts, batch
    boundaries do not); values pandas cannot hash (lists, nested records) are hashed as JSON.
    """
    import pandas as pd

    digest = hashlib.sha256()
    digest.update(json.dumps({"columns": ds.column_names, "rows": ds.num_rows}).encode())
    for batch in ds.to_pandas(batch_size=DIGEST_BATCH_ROWS, batched=True):
        for column in batch.columns:
            try:
                pd.util.hash_pandas_object(batch[column].head(1), index=False)
            except TypeError:  # unhashable values (lists, dicts, arrays): hash their JSON instead
                batch[column] = batch[column].map(_as_json)
        digest.update(pd.util.hash_pandas_object(batch, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


def dataset_inputs(cfg: TrainConfig, train, evaluation) -> list:
    """The DatasetInputs of a run's raw train and (if any) eval splits, each tagged with its role."""
    from mlflow.entities import DatasetInput, InputTag

    splits = [(TRAINING, train)] + ([(EVAL, evaluation)] if evaluation is not None else [])
    with warnings.catch_warnings():
        # MLflow's schema inference warns, for every integer column (a label), that integers
        # cannot hold missing values: advice for model signatures, noise for a record of the data.
        warnings.simplefilter("ignore", UserWarning)
        return [DatasetInput(_dataset(cfg, role, ds)._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, role)])
                for role, ds in splits]


def _dataset(cfg: TrainConfig, role: str, ds):
    """An MLflow HuggingFaceDataset of ``ds`` (it supplies the schema and the row/byte profile)."""
    import mlflow.data
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    digest = content_digest(ds)
    if cfg.data.files is not None:
        path = cfg.data.files.train if role == TRAINING else cfg.data.files.eval
        # "local" with the file's path: what LocalArtifactDatasetSource writes (built from its JSON:
        # resolving a path warns that two sources claim it).
        source = get_dataset_source_from_json(json.dumps({"uri": path}), "local")
        return mlflow.data.from_huggingface(ds, source=source, name=Path(path).name, digest=digest)
    hub = cfg.data.hub
    split = hub.split_train if role == TRAINING else hub.split_eval
    name = hub.name + (f"/{hub.config}" if hub.config else "") + f":{split}"
    return mlflow.data.from_huggingface(ds, path=hub.name, name=name, digest=digest)


def log_data_inputs(client, run_id: str, cfg: TrainConfig, train, evaluation) -> None:
    """Log the splits as the run's inputs. Logging the same data again (a resume) adds nothing:
    the server keeps one input per (name, digest)."""
    client.log_inputs(run_id, datasets=dataset_inputs(cfg, train, evaluation))
