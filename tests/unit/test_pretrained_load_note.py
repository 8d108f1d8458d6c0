"""A newly added task head, reported MISSING by transformers, gets one line saying that is expected."""

from __future__ import annotations

import logging
from pathlib import Path

from mltrainer.pretrained import from_pretrained, new_head_note

TINY_BERT = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-bert"


def test_a_real_encoder_checkpoint_gets_the_note_for_its_new_classifier(tmp_path, caplog):
    """A base BERT checkpoint (no head), loaded for sequence classification, as the demo does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertModel

    BertModel(AutoConfig.from_pretrained(TINY_BERT)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, num_labels=2)
    with caplog.at_level(logging.INFO, logger="mltrainer.pretrained"):
        model = from_pretrained(AutoModelForSequenceClassification, str(tmp_path), config)
    assert model.config.num_labels == 2
    notes = [r.getMessage() for r in caplog.records if r.name == "mltrainer.pretrained"]
    assert notes == ["the load report's MISSING classifier.bias, classifier.weight is expected: that is the new "
                     "task head, which starts from random values and is what fine-tuning trains"]


def test_a_complete_checkpoint_gets_no_note(tmp_path, caplog):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(TINY_BERT, num_labels=2)) \
        .save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="mltrainer.pretrained"):
        from_pretrained(AutoModelForSequenceClassification, str(tmp_path), AutoConfig.from_pretrained(tmp_path))
    assert not [r for r in caplog.records if r.name == "mltrainer.pretrained"]


def test_missing_base_model_weights_are_not_explained_away():
    assert new_head_note({"classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"}, "bert") is None
    assert new_head_note(set(), "bert") is None
    assert new_head_note({"score.weight"}, "model") == (
        "the load report's MISSING score.weight is expected: that is the new task head, "
        "which starts from random values and is what fine-tuning trains")
