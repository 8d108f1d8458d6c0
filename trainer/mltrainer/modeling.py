"""Model, tokenizer and datasets for the supported tasks, from a hub id or a local path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mltrainer.config import TrainConfig
from mltrainer.errors import ConfigError
from mltrainer.pretrained import from_pretrained

TASKS = ("sequence-classification", "causal-lm")


@dataclass
class Prepared:
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any | None
    data_collator: Any | None
    num_labels: int | None
    raw_train: Any = None  # the splits before tokenization: what the run logs as its dataset inputs
    raw_eval: Any | None = None


def load_raw_datasets(cfg: TrainConfig):
    from datasets import load_dataset

    data = cfg.data
    if data.files is not None:
        # One file at a time: loaded together, files whose columns differ fail inside datasets
        # with an error that names neither the setting nor what is missing.
        train = load_dataset(data.files.format, data_files={"train": data.files.train}, split="train")
        evaluation = (load_dataset(data.files.format, data_files={"eval": data.files.eval}, split="eval")
                      if data.files.eval else None)
    else:
        hub = data.hub
        train = load_dataset(hub.name, hub.config, split=hub.split_train)
        evaluation = load_dataset(hub.name, hub.config, split=hub.split_eval) if hub.split_eval else None
    require_column(data.text_column, "data.text_column", train, evaluation)
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if evaluation is not None and data.max_eval_samples:
        evaluation = evaluation.select(range(min(data.max_eval_samples, len(evaluation))))
    return train, evaluation


def require_column(column: str, key: str, train, evaluation) -> None:
    """``column`` (the setting ``key``) in the training data and in the evaluation data, if any."""
    for split, what in ((train, "training"), (evaluation, "evaluation")):
        if split is not None and column not in split.column_names:
            raise ConfigError(key, f"column {column!r} not in the {what} data {split.column_names}")


def _label_mapping(cfg: TrainConfig, train, evaluation) -> dict[Any, int]:
    column = cfg.data.label_column
    require_column(column, "data.label_column", train, evaluation)
    values = set(train[column]) | (set(evaluation[column]) if evaluation is not None else set())
    ordered = sorted(values, key=lambda v: (str(type(v)), v))
    if all(isinstance(v, int) for v in ordered) and ordered == list(range(len(ordered))):
        return {v: v for v in ordered}
    return {v: i for i, v in enumerate(ordered)}


def prepare(cfg: TrainConfig) -> Prepared:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
    )

    m = cfg.model
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path)
    train, evaluation = load_raw_datasets(cfg)
    text_col, max_len = cfg.data.text_column, cfg.data.max_length

    if m.task == "sequence-classification":
        mapping = _label_mapping(cfg, train, evaluation)
        num_labels = m.num_labels or len(mapping)
        if len(mapping) > num_labels:
            raise ConfigError("model.num_labels", f"{num_labels}, but the data has {len(mapping)} labels")
        config = AutoConfig.from_pretrained(m.name_or_path, num_labels=num_labels, **m.config_overrides)
        config.id2label = {i: str(v) for v, i in mapping.items()}
        config.label2id = {str(v): i for v, i in mapping.items()}
        model = (AutoModelForSequenceClassification.from_config(config) if m.from_config
                 else from_pretrained(AutoModelForSequenceClassification, m.name_or_path, config))

        def encode(batch):
            out = tokenizer(batch[text_col], truncation=True, max_length=max_len)
            out["labels"] = [mapping[v] for v in batch[cfg.data.label_column]]
            return out

        collator = DataCollatorWithPadding(tokenizer)
    else:
        num_labels = None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        config = AutoConfig.from_pretrained(m.name_or_path, **m.config_overrides)
        model = (AutoModelForCausalLM.from_config(config) if m.from_config
                 else from_pretrained(AutoModelForCausalLM, m.name_or_path, config))

        def encode(batch):
            return tokenizer(batch[text_col], truncation=True, max_length=max_len)

        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    raw_train, raw_eval = train, evaluation
    remove = train.column_names
    train = train.map(encode, batched=True, remove_columns=remove)
    if evaluation is not None:
        evaluation = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names)
    return Prepared(model, tokenizer, train, evaluation, collator, num_labels, raw_train, raw_eval)
