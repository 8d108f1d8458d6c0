"""Resume a training from the store on a fresh machine, into the same MLflow run.

Everything that can refuse a resume (unknown run, mismatched config, a FINISHED run, a run another
live trainer holds, no usable checkpoint) is decided before anything in the store changes: the
run's lease is claimed only then (lease.py), undone if no checkpoint downloads, and only once a
verified checkpoint is on local disk does the run go back to RUNNING.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mltrainer import server_errors, tracking
from mltrainer.config import TrainConfig
from mltrainer.errors import EXIT_OK, EXIT_RESUME, MltrainerError
from mltrainer.lease import LeaseKeeper, RunInUseError, holder, in_use_message
from mltrainer.manifest import Manifest
from mltrainer.naming import run_dir_name
from mltrainer.policy import RetentionState
from mltrainer.store import scan
from mltrainer.transfer import RunArtifacts

logger = logging.getLogger(__name__)


LATEST_PAGE_SIZE = 100
# A resume downloads into <run folder>/<this prefix><lease owner> and moves the checkpoint into
# place once its claim holds; the leading dot keeps the Trainer's checkpoint-* globs off it.
STAGING_PREFIX = ".resume-download-"


class ResumeError(MltrainerError):
    """A resume that cannot proceed; the message says why. Nothing in the store was changed."""

    exit_code = EXIT_RESUME
    label = "resume error"


class RunAlreadyFinished(MltrainerError):
    """The run to resume ended FINISHED: there is nothing to do, and nothing is done."""

    exit_code = EXIT_OK  # not a failure: a restart loop ends here

    def __init__(self, run):
        self.run_id = run.info.run_id
        latest = run.data.tags.get(tracking.TAG_LATEST) or "none"
        super().__init__(f"run {run.info.run_name} ({self.run_id}) already finished (status FINISHED, latest "
                         f"checkpoint {latest}): nothing to resume, nothing changed; to train further, start "
                         f"a new run")


@dataclass
class ResumePoint:
    run_id: str
    run_name: str
    checkpoint: Manifest
    local_dir: Path  # the downloaded, verified checkpoint folder
    run_dir: Path
    manifests: list[Manifest]  # every complete checkpoint of the run, for dedup and retention
    retention: RetentionState
    logged_steps: dict[str, int]  # metric key -> last step already in the run


# MLflow's error codes for "no such run", and the one its auth layer answers (403) for a run it
# cannot find: to this user, both mean the run is not there.
RUN_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND", "PERMISSION_DENIED"})


def run_lookup_error(run_id: str, exc: Exception) -> str:
    """One line for a failed ``get_run``: not found (or not readable), or the server's own words."""
    if getattr(exc, "error_code", None) in RUN_NOT_FOUND_CODES:
        return f"run {run_id!r} not found (or not readable by this MLflow user)"
    return f"run {run_id!r} could not be read: {server_errors.describe(exc)}"


def resolve_run(client, cfg: TrainConfig, ref: str):
    """``ref`` is a run id, or ``latest``: the newest run of this config's experiment and run name."""
    from mlflow.exceptions import MlflowException

    if ref != "latest":
        try:
            return client.get_run(ref)
        except MlflowException as exc:
            raise ResumeError(run_lookup_error(ref, exc)) from None
    experiment = client.get_experiment_by_name(cfg.experiment.name)
    if experiment is None:
        raise ResumeError(f"--resume latest: experiment {cfg.experiment.name!r} has no runs")
    pattern = cfg.run_name_pattern()
    # The server's LIKE can match more than this config's name (see run_match): page through its
    # answers, newest first, until one has exactly the name.
    page_token = None
    while True:
        runs = client.search_runs([experiment.experiment_id], filter_string=pattern.search_filter(),
                                  order_by=["attributes.start_time DESC"], max_results=LATEST_PAGE_SIZE,
                                  page_token=page_token)
        for run in runs:
            if pattern.matches(run.info.run_name):
                return run
        page_token = runs.token
        if not page_token:
            raise ResumeError(f"--resume latest: no run named {str(pattern)!r} in experiment "
                              f"{cfg.experiment.name!r}")


def check_compatible(run, cfg: TrainConfig) -> None:
    tags = run.data.tags
    for tag, expected, key in [(tracking.TAG_MODEL, cfg.model.name_or_path, "model.name_or_path"),
                               (tracking.TAG_TASK, cfg.model.task, "model.task")]:
        logged = tags.get(tag)
        if logged is None:
            raise ResumeError(f"run {run.info.run_id} was not created by mltrainer (no {tag} tag)")
        if logged != expected:
            raise ResumeError(f"{key} is {expected!r} but run {run.info.run_id} trained {logged!r}")


def download_checkpoint(store: RunArtifacts, manifest: Manifest, dest: Path, concurrency: int = 4) -> str | None:
    """Download and verify every file; returns the problem when one fails (``dest`` removed).

    Files download side by side (largest first), each verified as soon as it is there.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)

    def one(entry) -> str | None:
        target = dest / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        algorithm, expected = entry.check
        try:
            digest = store.download_file(entry.stored_at, target, size=entry.size, checksum=algorithm)
            size = target.stat().st_size
        except Exception as exc:  # noqa: BLE001 - any failure disqualifies this checkpoint
            return f"{entry.stored_at} could not be downloaded: {exc}"
        if size != entry.size:
            return f"{entry.stored_at} does not match its manifest (size {size}, expected {entry.size})"
        if digest != expected:
            return f"{entry.stored_at} does not match its manifest ({algorithm} {digest}, expected {expected})"
        return None

    entries = sorted(manifest.files, key=lambda e: e.size, reverse=True)
    with tqdm(total=manifest.total_bytes, unit="B", unit_scale=True, desc=f"Downloading {manifest.store_path}") as bar:
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="checkpoint-download") as pool:
            futures = [(entry, pool.submit(one, entry)) for entry in entries]
            problems = []
            for entry, future in futures:
                if (problem := future.result()) is not None:
                    problems.append(problem)
                else:
                    bar.update(entry.size)
    if problems:
        shutil.rmtree(dest, ignore_errors=True)
        return problems[0]
    return None


def _pick(candidates: list[Manifest], which: str | None) -> list[Manifest]:
    """Newest first; or just the one the user named, by step or store path."""
    ordered = sorted(candidates, key=lambda m: m.step, reverse=True)
    if which is None:
        return ordered
    for manifest in ordered:
        if which in (manifest.store_path, str(manifest.step)):
            return [manifest]
    raise ResumeError(f"--resume-checkpoint {which!r}: no complete checkpoint with that step or store path "
                      f"(complete: {', '.join(m.store_path for m in ordered) or 'none'})")


@dataclass
class ResumePlan:
    """What a resume will claim and download: decided before anything in the store changes."""

    run: object  # mlflow.entities.Run
    store: RunArtifacts
    complete: list[Manifest]  # every complete checkpoint of the run
    candidates: list[Manifest]  # the ones to try, in order
    run_dir: Path


def plan_resume(client, cfg: TrainConfig, ref: str, which: str | None = None) -> ResumePlan:
    """Find the run and check it: everything that can refuse a resume, before anything is written.

    Raises :class:`RunAlreadyFinished` for a FINISHED run, ``RunInUseError`` for a run another
    live process trains, and :class:`ResumeError` for the rest.
    """
    run = resolve_run(client, cfg, ref)
    check_compatible(run, cfg)
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        raise RunAlreadyFinished(run)
    now = time.time()
    if (live := holder(run.data.tags, now)) is not None:
        raise RunInUseError(in_use_message(run_id, live, now))
    store = RunArtifacts.for_artifact_uri(run.info.artifact_uri)
    found = scan(client, run_id, store=store)
    for c in found:
        if c.manifest is None:
            logger.warning("skipping checkpoint %s: %s", c.store_path, c.problem)
    complete = [c.manifest for c in found if c.manifest is not None]
    if not complete:
        raise ResumeError(f"run {run_id} has no complete checkpoint in the store")
    return ResumePlan(run, store, complete, _pick(complete, which),
                      Path(cfg.output_root).resolve() / run_dir_name(run.info.run_name, run_id))


def claim_and_fetch(plan: ResumePlan, lease: LeaseKeeper) -> ResumePoint:
    """Claim the run's lease and download its checkpoint.

    Raises ``RunInUseError`` once a rival's claim of it at the same moment wins. On success
    ``lease`` holds the run (and keeps renewing it); on any later failure the claim is undone.
    """
    run, run_dir = plan.run, plan.run_dir
    run_id = run.info.run_id
    # The download runs while the claim settles (a 2 s wait otherwise), into a folder of this
    # process alone: a rival resumer that wins the claim finds none of it in the run's folder.
    staging = run_dir / f"{STAGING_PREFIX}{lease.owner}"
    try:
        manifest, staged = lease.claim(run_id, while_settling=lambda: _download_first_good(
            run_id, plan.store, plan.candidates, staging))
        local = run_dir / staged.name
        if local.exists():
            shutil.rmtree(local)
        staged.rename(local)
    except BaseException:
        if lease.run_id == run_id:  # the claim held: what failed came after it
            lease.abandon(run_id)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    clear_dead_trainers_leftovers(run_dir, manifest.step)
    retention = RetentionState(resumed_from=manifest.store_path)
    for m in sorted(plan.complete, key=lambda m: m.step):
        retention.record_stored(m.store_path, m.step, m.metrics)
    return ResumePoint(run_id, run.info.run_name, manifest, local, run_dir, plan.complete, retention,
                       last_logged_steps(run))


class ClaimInBackground:
    """:func:`claim_and_fetch` on a thread of its own, so the rest of the start (torch's import, the
    model, the data) runs meanwhile: a resume then takes the longer of the two, not their sum (the
    claim alone settles for 2 s)."""

    def __init__(self, plan: ResumePlan, lease: LeaseKeeper):
        self._lease = lease
        self._point: ResumePoint | None = None
        self._error: BaseException | None = None
        self._handed_out = False  # result() gave the run to the caller: from then on it is theirs
        self._thread = threading.Thread(target=self._claim, args=(plan,), name="resume-claim", daemon=True)
        self._thread.start()

    def _claim(self, plan: ResumePlan) -> None:
        try:
            self._point = claim_and_fetch(plan, self._lease)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by result()
            self._error = exc

    def result(self) -> ResumePoint:
        """The claimed run's resume point, once the claim holds and the checkpoint is on disk."""
        try:
            self._thread.join()
        except BaseException:  # interrupted while waiting (Ctrl-C): the run is given back once the claim ends
            self.undo()
            raise
        if self._error is not None:
            raise self._error
        self._handed_out = True
        return self._point

    def undo(self) -> None:
        """What the caller did before taking the result failed: wait for the claim, and give the
        run back if it held. Once the result was taken, the run is the caller's: nothing to undo."""
        if self._handed_out:
            return
        self._thread.join()
        if self._point is not None:
            self._lease.abandon(self._point.run_id)


def clear_dead_trainers_leftovers(run_dir: Path, resume_step: int) -> None:
    """Remove what the run's previous trainer left in ``run_dir`` that this one would write again.

    Resuming on the machine (or compose volume) the killed trainer used finds its local folders.
    Its checkpoints past ``resume_step`` are redone by this training, and the Trainer saves into an
    existing folder in place, mixing the two; its upload snapshots are hard links to those files.
    None of it is in the store as a complete checkpoint (the resume starts from the newest
    one that is), so nothing stored is lost; earlier local checkpoints are left alone.
    """
    from mltrainer.callback import SNAPSHOT_DIR

    stale = sorted((p for p in run_dir.glob("checkpoint-*") if _step_of(p) is not None and _step_of(p) > resume_step),
                   key=_step_of)
    snapshots = run_dir / SNAPSHOT_DIR
    if snapshots.exists():
        stale.append(snapshots)
    # A resumer killed mid-download leaves its staging folder; a rival still downloading into
    # its own has lost the claim this trainer holds, and stops.
    stale += sorted(run_dir.glob(f"{STAGING_PREFIX}*"))
    if stale:
        logger.warning("removing what the run's previous trainer left past step %d in %s (training redoes it): %s",
                       resume_step, run_dir, ", ".join(p.name for p in stale))
    for path in stale:
        shutil.rmtree(path)


def _step_of(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if path.is_dir() and suffix.isdigit() else None


def _download_first_good(run_id: str, store: RunArtifacts, candidates: list[Manifest],
                         into: Path) -> tuple[Manifest, Path]:
    """Download the newest candidate that arrives whole and verified, into ``into``/checkpoint-N."""
    for manifest in candidates:
        local = into / f"checkpoint-{manifest.step}"
        problem = download_checkpoint(store, manifest, local)
        if problem is None:
            return manifest, local
        logger.warning("skipping checkpoint %s: %s", manifest.store_path, problem)
    raise ResumeError(f"run {run_id}: no checkpoint could be downloaded and verified (see warnings above)")


def last_logged_steps(run) -> dict[str, int]:
    """The highest step logged of each metric, so a resumed run logs each step once.

    The run's latest value of a metric is the one at its highest step (MLflow orders its
    "latest" by step first), so the run we already fetched holds the answer; asking the
    history of each key instead cost a round trip per metric (~0.5 s of a MiniLM resume).
    """
    return {m.key: m.step for m in run.data._metric_objs}  # the Metric entities behind run.data.metrics
