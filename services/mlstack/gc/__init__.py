"""Garbage collection of the stack: ``python -m mlstack.gc [--older-than 30d] [--dry-run]``.

What MLflow's ``mlflow gc`` does (deleted runs, deleted logged models, deleted experiments older
than an age: their objects first, then their rows), read against our store: proxied
``mlflow-artifacts:/`` URIs are resolved to the bucket the server writes to, instead of going
object by object through the server's HTTP API as ``mlflow gc`` would. On top of it, objects that
no run or model owns are swept. One plan is computed and printed; ``--dry-run`` stops there.

Modules: :mod:`.age` (the age option), :mod:`.trainer_contract` (what gc relies on of mltrainer's
layout), :mod:`.records` (what gc reads), :mod:`.plan` (the rules, pure), :mod:`.bucket` (S3),
:mod:`.catalog` (PostgreSQL), :mod:`.cli` (the command: plan, print, apply, summary).
"""
