"""TrainingArguments whose pickled form holds no secret: ``training_args.bin`` is safe to store.

The Trainer writes ``torch.save(self.args)`` as ``training_args.bin`` into every checkpoint (and
into the output folder when it pushes to the Hub), and every checkpoint is uploaded where any
reader of the experiment can download it. The arguments hold what the config gave them:
``hub_token``, and whatever sits in dict fields such as ``fsdp_config``, ``deepspeed`` or the
``*_kwargs`` (and strings such as ``optim_args``).

The live object must keep the real values (pushing to the Hub needs ``hub_token``), so only its
pickled form is scrubbed: every way the Trainer, now or in a later version, writes the arguments
goes through pickling, so none is missed, and the local checkpoint file is as clean as the stored
one. It unpickles as a plain ``TrainingArguments`` (no mltrainer needed to read it), with each
secret replaced by ``***REDACTED***``. Copies (``copy``/``deepcopy``) keep the real values.

Resuming never reads ``training_args.bin``: ``Trainer.train(resume_from_checkpoint=...)`` restores
from ``trainer_state.json``, the weights, optimizer, scheduler and RNG files, and takes its
arguments from the config, so a scrubbed file costs nothing.
"""

from __future__ import annotations

import copy
import copyreg
from typing import Any

from transformers import TrainingArguments

from mltrainer.redaction import Scrubber

_SCRUBBER = "_mltrainer_scrubber"  # instance attribute, never pickled


class SecretFreeTrainingArguments(TrainingArguments):
    @classmethod
    def create(cls, scrubber: Scrubber, **kwargs: Any) -> SecretFreeTrainingArguments:
        """``TrainingArguments(**kwargs)`` whose pickled form goes through ``scrubber``."""
        args = cls(**kwargs)
        object.__setattr__(args, _SCRUBBER, scrubber)
        return args

    def __reduce_ex__(self, protocol: int):
        state = {k: v for k, v in self.__dict__.items() if k != _SCRUBBER}
        # Made by dataclasses.replace() or the like, it has no scrubber of its own: the
        # environment's secrets and the key and shape rules still apply.
        scrubber = self.__dict__.get(_SCRUBBER) or Scrubber.for_run()
        # Unpickles as a plain TrainingArguments: created without __init__, then given the state
        # (how pickle rebuilds any object; __newobj__ would insist on this subclass).
        return copyreg._reconstructor, (TrainingArguments, object, None), scrubber.tree(state)

    def __copy__(self) -> SecretFreeTrainingArguments:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> SecretFreeTrainingArguments:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone
