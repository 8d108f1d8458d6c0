"""The bookkeeping of checkpoint LoggedModels (names, which model carries latest/best) against a
recording client; the real server is in tests/integration/test_logged_checkpoints.py."""

from __future__ import annotations

from types import SimpleNamespace

from mltrainer.checkpoint_models import DESCRIPTION_TAG, TAG_BEST, TAG_LATEST, CheckpointModels, describe, model_name
from mltrainer.manifest import Manifest
from mltrainer.policy import CheckpointPolicy, RetentionState

POLICY = CheckpointPolicy(monitor="eval_loss", mode="min", save_last_k=1, save_top_k=1)


class RecordingClient:
    def __init__(self):
        self.calls: list[tuple] = []
        self.tags: dict[str, dict[str, str]] = {}
        self.params: dict[str, dict[str, str]] = {}
        self.made = 0

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))

    def create_logged_model(self, experiment_id, name, source_run_id, model_type, params, tags):
        self.made += 1
        model_id = f"m-{self.made}"
        self.tags[model_id] = dict(tags)
        self.params[model_id] = params
        self.calls.append(("create", name, params["step"]))
        return SimpleNamespace(model_id=model_id, params=params)

    def log_batch(self, run_id, metrics):
        self.calls.append(("link", metrics[0].model_id, sorted(m.key for m in metrics)))

    def finalize_logged_model(self, model_id, status):
        return SimpleNamespace(model_id=model_id, status=status, params=self.params[model_id])

    def set_logged_model_tags(self, model_id, tags):
        self.tags[model_id].update(tags)

    def delete_logged_model_tag(self, model_id, key):
        del self.tags[model_id][key]

    def delete_logged_model(self, model_id):
        self.calls.append(("delete", model_id))
        del self.tags[model_id]


def manifest(step: int, loss: float) -> Manifest:
    return Manifest(step=step, metrics={"eval_loss": loss}, store_path=f"checkpoints/step-{step:08d}",
                    created_at="2026-11-25T00:00:00Z")


def test_a_folder_name_becomes_a_model_name_mlflow_accepts():
    assert model_name("checkpoints/step-00000008") == "checkpoint-step-00000008"
    assert model_name("checkpoints/epoch=1-eval_loss=0.1234") == "checkpoint-epoch=1-eval_loss=0_1234"


def test_latest_and_best_move_with_retention_and_an_evicted_checkpoint_loses_its_model():
    client = RecordingClient()
    models = CheckpointModels(client, "run", POLICY, logged_at=lambda step: {"eval_loss": 1000 + step})
    state = RetentionState()
    for step, loss in ((4, 0.5), (8, 0.3), (12, 0.4)):
        state.record_stored(f"checkpoints/step-{step:08d}", step, {"eval_loss": loss})
        for evicted in state.evictions(POLICY):
            models.evicting(evicted)
            state.mark_deleted(evicted)
        models.stored(manifest(step, loss), state)
    # 4 was evicted once 8 was newer and better; 12 is latest, 8 best.
    assert ("delete", "m-1") in client.calls
    assert client.tags == {"m-2": {TAG_BEST: "true", DESCRIPTION_TAG: "Step 8: best by eval_loss"},
                           "m-3": {TAG_LATEST: "true", DESCRIPTION_TAG: "Step 12: latest"}}
    assert ("link", "m-3", ["eval_loss"]) in client.calls


def test_the_description_the_ui_shows_names_the_step_and_the_marks():
    assert describe(20, set(), "eval_loss") == "Step 20"
    assert describe(20, {TAG_BEST, TAG_LATEST}, "eval_loss") == "Step 20: latest, best by eval_loss"
    assert describe("4", {TAG_BEST}, None) == "Step 4: best"
