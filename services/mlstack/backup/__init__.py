"""Backups of the whole stack: both PostgreSQL databases and the whole bucket, in one directory.

``python -m mlstack.backup create|restore|verify`` (``make backup``/``make restore`` for the compose
stack, ``make stack-backup``/``make stack-restore`` for the native one). One concern per module:

- ``targets``: how to reach a stack's PostgreSQL tools, its S3 root key and its MLflow server
  (native launcher or compose project);
- ``postgres``: dump, restore and small queries, through ``pg_dump``/``pg_restore``/``psql``;
- ``bucket``: copy every object into the backup by content, and back;
- ``checkpoints``: the rule that no restored checkpoint looks complete when it is not;
- ``layout``: the backup directory, its manifest and its checksums;
- ``create`` and ``restore``: the two procedures, in the order that makes them safe.

What a backup taken while training goes on guarantees is written down in ``create``.
"""
