"""mltrainer: fine-tune with the Hugging Face Trainer and stream every checkpoint to MLflow.

The package is split by concern. The pure-logic modules (``naming``, ``policy``,
``manifest``, ``config``, ``params``) do no network or MLflow I/O, so they can be tested
and reasoned about without a server; only the uploader talks to MLflow.
"""
