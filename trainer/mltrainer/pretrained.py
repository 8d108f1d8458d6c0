"""Loading a pretrained model for fine-tuning, with the load report explained to a newcomer.

Fine-tuning an encoder for classification adds a task head (``classifier.weight``,
``classifier.bias``) that the pretrained checkpoint cannot have. transformers lists those weights
as MISSING in its LOAD REPORT, in a warning, which reads like something went wrong. When the
missing weights are exactly the head (none inside the pretrained base model), we say in one line
that this is expected; when base-model weights are missing, the warning stands on its own.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def new_head_note(missing_keys: set[str], base_model_prefix: str) -> str | None:
    """One line explaining ``missing_keys`` when they are only the new task head, else ``None``.

    ``base_model_prefix`` is the model's attribute holding the pretrained part (``bert`` in
    ``BertForSequenceClassification``): weights under it should come from the checkpoint.
    """
    if not missing_keys or not base_model_prefix:
        return None
    if any(key == base_model_prefix or key.startswith(f"{base_model_prefix}.") for key in missing_keys):
        return None
    return (f"the load report's MISSING {', '.join(sorted(missing_keys))} is expected: "
            "that is the new task head, which starts from random values and is what fine-tuning trains")


def from_pretrained(model_class, name_or_path: str, config):
    """``model_class.from_pretrained``, followed by :func:`new_head_note` when it applies."""
    model, info = model_class.from_pretrained(name_or_path, config=config, output_loading_info=True)
    if (note := new_head_note(set(info["missing_keys"]), model.base_model_prefix)) is not None:
        logger.info(note)
    return model
