"""One MLflow LoggedModel per complete checkpoint: the rows a user sees in the MLflow UI.

MLflow 3's LoggedModel is the entity made for a checkpoint: the UI lists a run's models (run
page, "Logged models") and an experiment's (experiment page, "Models" tab) with their metrics,
params, tags and status, and ``search_logged_models`` filters and orders them by metric. So each
checkpoint in the store is one LoggedModel, of ``model_type`` ``checkpoint``, named after its
folder, with:

* status READY, and it exists only once the checkpoint is complete: the model is created after the
  manifest is stored (the uploader's ``on_stored``), never before. A checkpoint still uploading, or
  one whose upload died, has no row.
* params ``step``, ``size_bytes`` and ``store_path`` (the folder in the run's artifacts, where the
  files are), and the metrics the run logged at that step, linked to the model at that step: the
  same (key, value, step, timestamp) the run's history holds, so the history gets no second point.
* tags ``checkpoint.latest`` / ``checkpoint.best`` (value ``true``) on the newest and the best
  checkpoint, moved whenever retention changes which one that is (the run keeps its tags of the
  same names, holding the store paths). The UI shows no model tags, so the same marks are also
  the model's Description (the ``mlflow.note.content`` tag, shown on the model's page): "Step 20:
  latest, best by eval_loss".
* An evicted checkpoint's model is deleted before its manifest and files (``on_evicting``): the UI
  stops listing it before any of its bytes go.

Where the files are: in the run's artifacts, ``checkpoints/<folder>/`` (the ``store_path`` param),
not in the model's own artifact location (``<experiment>/models/<model id>/artifacts``). Every
path that moves checkpoint bytes (the proxied and presigned uploads, server-side copies, resume,
backups, gc) knows the run's artifacts and the permission checks that guard them; moving
checkpoints under ``models/`` would change all of them and every run already stored, for a
download button the run's Artifacts tab already gives.

The models are not logged as run *outputs* (``log_outputs``): MLflow keeps a run's outputs after
their model is deleted, so an evicted checkpoint would stay on the run page; the step is a param
and the step of every linked metric instead.

A run stored before checkpoints were models, or a trainer that died between a manifest and its
model, is put right by ``reconcile`` when the run resumes: a model for every complete checkpoint,
none for anything else.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Iterable

from mltrainer.manifest import Manifest
from mltrainer.policy import CheckpointPolicy, RetentionState

logger = logging.getLogger(__name__)

MODEL_TYPE = "checkpoint"
TAG_LATEST = "checkpoint.latest"  # same names as the run's tags (tracking.TAG_LATEST/TAG_BEST)
TAG_BEST = "checkpoint.best"
MARK = "true"
# The tag MLflow's UI shows as a model's Description (its tags it does not show at all).
DESCRIPTION_TAG = "mlflow.note.content"
_MARK_WORDS = {TAG_LATEST: "latest", TAG_BEST: "best"}
PARAM_STORE_PATH = "store_path"
NAME_PREFIX = "checkpoint-"
# Characters MLflow refuses in a model name (mlflow.utils.validation._validate_logged_model_name);
# a path template can put any of them in a folder name ({eval_loss:.4f}).
_BAD_NAME_CHARS = "/:.%\"'"


def describe(step: int | str, marks: set[str], monitor: str | None) -> str:
    """A checkpoint model's Description in the UI: its step and which of latest/best it is."""
    words = [_MARK_WORDS[tag] + (f" by {monitor}" if tag == TAG_BEST and monitor else "")
             for tag in (TAG_LATEST, TAG_BEST) if tag in marks]
    return f"Step {step}" + (": " + ", ".join(words) if words else "")


def model_name(store_path: str) -> str:
    """``checkpoints/step-00000008`` -> ``checkpoint-step-00000008``; refused characters become ``_``."""
    folder = posixpath.basename(store_path.rstrip("/"))
    return NAME_PREFIX + "".join("_" if c in _BAD_NAME_CHARS else c for c in folder)


class CheckpointModels:
    """The LoggedModels of one run's checkpoints, kept equal to its complete checkpoints."""

    def __init__(self, client, run_id: str, policy: CheckpointPolicy,
                 logged_at: Callable[[int], dict[str, int]] | None = None):
        """``logged_at(step)``: metric key -> timestamp (ms) this process logged it with at ``step``;
        a metric it does not know is looked up in the run's history."""
        self.client = client
        self.run_id = run_id
        self.policy = policy
        self.logged_at = logged_at or (lambda step: {})
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self._models: dict[str, object] = {}  # store path -> LoggedModel (READY)
        self._marks: dict[str, set[str]] = {}  # store path -> alias tags it carries now

    # -- reading back ----------------------------------------------------------------------------

    def existing(self) -> list:
        """Every live checkpoint model of the run (any status), read from the server."""
        found, token = [], None
        while True:
            page = self.client.search_logged_models(
                [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND model_type = '{MODEL_TYPE}'",
                page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def reconcile(self, manifests: Iterable[Manifest], retention: RetentionState) -> None:
        """After a resume: one READY model per complete checkpoint, and no other.

        Models left PENDING (a trainer died between creating and finalizing one), models of
        checkpoints no longer complete, and second models of one checkpoint are deleted; a
        complete checkpoint without a model (stored before checkpoints were models, or a trainer
        that died right after its manifest) gets one.
        """
        from mlflow.entities import LoggedModelStatus

        complete = {m.store_path: m for m in manifests}
        for model in self.existing():
            path = model.params.get(PARAM_STORE_PATH)
            if (path in complete and path not in self._models and model.status == LoggedModelStatus.READY
                    and model.params == self._params(complete[path])):  # not a step stored again since
                self._models[path] = model
                self._marks[path] = {k for k in (TAG_LATEST, TAG_BEST) if model.tags.get(k) == MARK}
            else:
                self.client.delete_logged_model(model.model_id)
        for path, manifest in sorted(complete.items(), key=lambda item: item[1].step):
            if path not in self._models:
                self._create(manifest)
        self.mark(retention)

    # -- the uploader's hooks --------------------------------------------------------------------

    def stored(self, manifest: Manifest, retention: RetentionState) -> None:
        """``manifest``'s checkpoint is complete in the store: its model, then the alias tags."""
        previous = self._models.pop(manifest.store_path, None)
        if previous is not None:  # a resumed run stored this step again: its files were replaced
            self.client.delete_logged_model(previous.model_id)
            self._marks.pop(manifest.store_path, None)
        self._create(manifest)
        self.mark(retention)

    def evicting(self, store_path: str) -> None:
        """Retention is about to delete ``store_path``: its model goes first."""
        model = self._models.pop(store_path, None)
        self._marks.pop(store_path, None)
        if model is not None:
            self.client.delete_logged_model(model.model_id)

    def mark(self, retention: RetentionState) -> None:
        """Tag the latest and the best checkpoint's models; untag the ones that no longer are."""
        wanted = {TAG_LATEST: retention.latest(), TAG_BEST: retention.best(self.policy)}
        for path, model in self._models.items():
            has = self._marks.setdefault(path, set())
            should = {tag for tag, at in wanted.items() if at == path}
            if should != has:
                self.client.set_logged_model_tags(model.model_id, {
                    **{tag: MARK for tag in should - has},
                    DESCRIPTION_TAG: describe(self._step_of(path, model), should, self.policy.monitor)})
            for tag in has - should:
                self.client.delete_logged_model_tag(model.model_id, tag)
            self._marks[path] = should

    @staticmethod
    def _step_of(store_path: str, model) -> str:
        params = getattr(model, "params", None) or {}
        return params.get("step") or store_path.rsplit("/", 1)[-1]

    # -- creating one ----------------------------------------------------------------------------

    def _create(self, manifest: Manifest):
        from mlflow.entities import LoggedModelStatus

        model = self.client.create_logged_model(
            self.experiment_id, name=model_name(manifest.store_path), source_run_id=self.run_id,
            model_type=MODEL_TYPE, params=self._params(manifest),
            tags={DESCRIPTION_TAG: describe(manifest.step, set(), self.policy.monitor)})
        try:
            self._link_metrics(model.model_id, manifest)
            model = self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        except BaseException:
            # Never a PENDING row for a complete checkpoint: gone now, made again on resume.
            try:
                self.client.delete_logged_model(model.model_id)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                logger.debug("could not delete the unfinished model %s", model.model_id, exc_info=True)
            raise
        self._models[manifest.store_path] = model
        self._marks[manifest.store_path] = set()
        return model

    @staticmethod
    def _params(manifest: Manifest) -> dict[str, str]:
        return {"step": str(manifest.step), "size_bytes": str(manifest.total_bytes),
                PARAM_STORE_PATH: manifest.store_path}

    def _link_metrics(self, model_id: str, manifest: Manifest) -> None:
        from mlflow.entities import Metric

        values = {k: v for k, v in manifest.metrics.items() if v is not None}
        if not values:
            return
        stamps = self.logged_at(manifest.step)
        points = [self._point(key, manifest.step, value, stamps) for key, value in sorted(values.items())]
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, ts, manifest.step, model_id=model_id,
                                                           run_id=self.run_id) for key, value, ts in points])

    def _point(self, key: str, step: int, value: float, known: dict[str, int]) -> tuple[str, float, int]:
        """``(key, value, timestamp)`` of the run's own point of ``key`` at ``step``: linking it again
        as it is leaves the history as it is (the server skips an identical point).

        A metric this process did not log at that step was logged by one before a resume, maybe
        with another value (a resumed run's step is not bit-identical): the history's point is
        the one linked. Only a point the history lacks (its process died before sending it) is new.
        """
        if key in known:
            return key, value, known[key]
        at_step = [p for p in self.client.get_metric_history(self.run_id, key) if p.step == step]
        if at_step:
            point = max(at_step, key=lambda p: p.timestamp)
            return key, point.value, point.timestamp
        return key, value, int(time.time() * 1000)
