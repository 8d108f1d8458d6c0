import json

import pytest
from mltrainer.config import checkpoint_policy
from mltrainer.errors import ConfigError
from mltrainer.policy import CheckpointPolicy, RetentionState


def path(step):
    return f"checkpoints/step-{step}"


def stored(losses, *, start=1, monitor="eval_loss"):
    """State with one checkpoint per loss, at steps start, start+1, ..."""
    state = RetentionState()
    for i, loss in enumerate(losses):
        step = start + i
        state.record_stored(path(step), step, {} if loss is None else {monitor: loss})
    return state


def policy(**kw):
    return checkpoint_policy(kw)


# -- config.checkpoint_policy: the checkpoints section ----------------------------------------------------------------


def test_defaults_keep_everything():
    p = checkpoint_policy(None)
    assert p == CheckpointPolicy()
    assert p.upload == "every_save" and p.path_template == "step-{step:08d}" and p.mode == "min"
    assert p.keeps_everything


@pytest.mark.parametrize(
    ("d", "key", "fragment"),
    [
        ({"save_top_k_": 1}, "checkpoints.save_top_k_", "unknown key; did you mean save_top_k?"),
        ({"upload": "sometimes"}, "checkpoints.upload", "must be one of every_save, every_n_steps, last, best"),
        ({"upload": 3}, "checkpoints.upload", "expected a non-empty string, got int 3"),
        ({"mode": "maximum"}, "checkpoints.mode", "must be one of min, max, got 'maximum'; did you mean max?"),
        ({"save_top_k": 2}, "checkpoints.save_top_k", "needs checkpoints.monitor"),
        ({"upload": "best"}, "checkpoints.upload", "needs checkpoints.monitor"),
        ({"every_n_steps": 10}, "checkpoints.every_n_steps", "only applies when upload is every_n_steps"),
        ({"upload": "every_n_steps"}, "checkpoints.every_n_steps", "is required when upload is every_n_steps"),
        (
            {"upload": "every_n_steps", "every_n_steps": 0},
            "checkpoints.every_n_steps",
            "must be >= 1, got 0",
        ),
        ({"save_last_k": -1}, "checkpoints.save_last_k", "must be >= 1, got -1 (leave it unset to keep every checkpoint)"),
        ({"save_last_k": 0}, "checkpoints.save_last_k", "leave it unset to keep every checkpoint"),
        ({"save_last_k": True}, "checkpoints.save_last_k", "expected an integer, got bool True"),
        ({"save_last_k": 2.0}, "checkpoints.save_last_k", "expected an integer, got float 2.0"),
        ({"monitor": ""}, "checkpoints.monitor", "expected a non-empty string, got str ''"),
        ({"upload": "last", "save_last_k": 3}, "checkpoints.save_last_k", "does not apply when upload is 'last'"),
        ({"upload": "best", "monitor": "eval_loss", "save_last_k": 3}, "checkpoints.save_last_k", "upload is 'best'"),
        ({"path_template": "{epoch}"}, "checkpoints.path_template", "must contain {step}"),
    ],
)
def test_checkpoints_errors_name_the_key(d, key, fragment):
    with pytest.raises(ConfigError) as exc:
        checkpoint_policy(d)
    assert exc.value.key == key
    assert fragment in str(exc.value)
    assert str(exc.value).startswith(f"{key}: ")


def test_checkpoints_rejects_non_mapping_and_uses_its_key():
    with pytest.raises(ConfigError, match="^checkpoints: expected a mapping"):
        checkpoint_policy(["x"])
    with pytest.raises(ConfigError) as exc:
        checkpoint_policy({"mode": "x"}, key="a.b")
    assert exc.value.key == "a.b.mode"


def test_checkpoints_section_reports_faults_like_every_other_section(tmp_path):
    """One validation style: the same fault reads the same in checkpoints as in upload or data."""
    from mltrainer.config import build_config

    base = {"experiment": {"name": "e"}, "model": {"name_or_path": "org/m", "task": "causal-lm"},
            "data": {"hub": {"name": "d"}}}
    messages = []
    for section, key in (("checkpoints", "save_last_k"), ("upload", "queue_size"), ("data", "max_length")):
        with pytest.raises(ConfigError) as exc:
            build_config({**base, section: {**base.get(section, {}), key: "two"}})
        messages.append(str(exc.value).split(": ", 1)[1])
    assert messages == ["expected an integer, got str 'two'"] * 3


def test_null_means_default():
    assert checkpoint_policy({"mode": None, "upload": None, "save_top_k": None}) == CheckpointPolicy()


def test_effective_k():
    assert policy(upload="last").keep_last_k == 1
    assert policy(upload="best", monitor="m").keep_top_k == 1
    assert policy(upload="best", monitor="m", save_top_k=3).keep_top_k == 3


# -- evictions ---------------------------------------------------------------------------------


def test_last_2_plus_best_1_min():
    state = stored([0.9, 0.5, 0.7, 0.6, 0.8])
    p = policy(save_last_k=2, save_top_k=1, monitor="eval_loss")
    assert state.evictions(p) == [path(1), path(3)]
    for evicted in state.evictions(p):
        state.mark_deleted(evicted)
    assert set(state.paths()) == {path(2), path(4), path(5)}
    assert state.evictions(p) == []


def test_best_2_max():
    state = stored([0.1, 0.9, 0.5, 0.8, 0.2], monitor="acc")
    p = policy(save_top_k=2, monitor="acc", mode="max")
    # keep best 2 (steps 2, 4) and the latest (step 5)
    assert state.evictions(p) == [path(1), path(3)]


def test_keep_everything_evicts_nothing():
    assert stored([0.3, 0.2, 0.1]).evictions(policy()) == []


def test_last_only_keeps_latest():
    state = stored([0.1, 0.2, 0.3])
    assert state.evictions(policy(upload="last")) == [path(1), path(2)]


def test_current_best_is_never_evicted_even_without_top_k():
    state = stored([0.1, 0.5, 0.6, 0.7])
    assert state.evictions(policy(save_last_k=1, monitor="eval_loss")) == [path(2), path(3)]


def test_resumed_from_is_never_evicted():
    state = stored([0.9, 0.8, 0.7, 0.6])
    state.resumed_from = path(1)
    assert state.evictions(policy(save_last_k=1)) == [path(2), path(3)]
    with pytest.raises(ValueError, match="resumed from"):
        state.mark_deleted(path(1))


def test_checkpoints_without_metric_never_count_as_best():
    state = stored([None, 0.5, None, None])
    p = policy(save_top_k=2, monitor="eval_loss")
    # best: only step 2 has the metric; latest: step 4
    assert state.evictions(p) == [path(1), path(3)]
    assert state.best(p) == path(2)


def test_nan_never_ranks():
    state = RetentionState()
    state.record_stored(path(1), 1, {"eval_loss": float("nan")})
    state.record_stored(path(2), 2, {"eval_loss": 0.4})
    state.record_stored(path(3), 3, {"eval_loss": 0.5})
    p = policy(save_top_k=1, monitor="eval_loss")
    assert state.best(p) == path(2)
    assert state.evictions(p) == [path(1)]


def test_ties_go_to_the_earlier_step():
    state = stored([0.5, 0.5, 0.5, 0.9])
    p = policy(save_top_k=1, monitor="eval_loss")
    assert state.best(p) == path(1)
    assert state.evictions(p) == [path(2), path(3)]


def test_latest_and_best():
    state = RetentionState()
    assert state.latest() is None and state.best(policy(monitor="eval_loss")) is None
    state = stored([0.3, 0.1, 0.2], start=10)
    assert state.latest() == path(12)
    assert state.best(policy(monitor="eval_loss")) == path(11)
    assert state.best(policy(monitor="eval_loss", mode="max")) == path(10)
    assert state.best(policy()) is None  # no monitor, no best


def test_record_same_path_replaces_and_mark_deleted_is_idempotent():
    state = stored([0.3])
    state.record_stored(path(1), 1, {"eval_loss": 0.2})
    assert len(state.stored) == 1 and state.stored[0].metrics == {"eval_loss": 0.2}
    assert state.mark_deleted(path(1)) is True
    assert state.mark_deleted(path(1)) is False


def test_record_stored_validates_step():
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        RetentionState().record_stored("p", -1)


# -- should_upload -----------------------------------------------------------------------------


def test_should_upload_every_save_and_last():
    state = RetentionState()
    assert state.should_upload(policy(), 7, False, {}) is True
    assert state.should_upload(policy(upload="last"), 7, False, {}) is True


def test_should_upload_every_n_steps():
    p = policy(upload="every_n_steps", every_n_steps=100)
    state = RetentionState()
    assert [s for s in (50, 100, 150, 200) if state.should_upload(p, s, False, {})] == [100, 200]
    assert state.should_upload(p, 250, True, {}) is True  # the final save always goes


def test_should_upload_best_top_1():
    p = policy(upload="best", monitor="eval_loss")
    state = RetentionState()
    assert state.should_upload(p, 1, False, {}) is False  # no metric: cannot rank
    assert state.should_upload(p, 1, False, {"eval_loss": 0.5}) is True  # first with the metric
    state.record_stored(path(1), 1, {"eval_loss": 0.5})
    assert state.should_upload(p, 2, False, {"eval_loss": 0.6}) is False
    assert state.should_upload(p, 2, False, {"eval_loss": 0.5}) is False  # tie: earlier wins
    assert state.should_upload(p, 2, True, {"eval_loss": 0.4}) is True
    assert state.should_upload(p, 2, False, {"eval_loss": float("nan")}) is False


def test_should_upload_best_top_2_max():
    p = policy(upload="best", monitor="acc", mode="max", save_top_k=2)
    state = stored([0.7], monitor="acc")
    assert state.should_upload(p, 2, False, {"acc": 0.1}) is True  # fewer than K ranked yet
    state.record_stored(path(2), 2, {"acc": 0.1})
    assert state.should_upload(p, 3, False, {"acc": 0.05}) is False
    assert state.should_upload(p, 3, False, {"acc": 0.2}) is True
    state.record_stored(path(3), 3, {"acc": 0.2})
    assert state.evictions(p) == [path(2)]


# -- serialization -----------------------------------------------------------------------------


def test_state_round_trips_through_json():
    state = stored([0.9, None, 0.7])
    state.record_stored(path(4), 4, {"eval_loss": float("inf"), "note": "x", "acc": 1})
    state.resumed_from = path(2)
    text = json.dumps(state.to_dict(), allow_nan=False)
    again = RetentionState.from_dict(json.loads(text))
    assert again == state
    assert again.stored[-1].metrics == {"acc": 1.0}  # only finite numbers are kept


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        ({"format": 2, "stored": []}, "unsupported format 2"),
        ({"format": 1, "stored": {}}, "'stored' must be a list"),
        ({"format": 1, "stored": [{"step": 1}]}, "stored[0] needs a string 'path'"),
        ({"format": 1, "stored": [{"path": "p", "step": "1"}]}, "stored[0]: step must be"),
        ({"format": 1, "stored": [], "resumed_from": 3}, "'resumed_from' must be a string or null"),
    ],
)
def test_state_from_dict_errors(d, fragment):
    with pytest.raises(ValueError) as exc:
        RetentionState.from_dict(d)
    assert fragment in str(exc.value)


def test_should_upload_best_stores_the_final_save_when_nothing_is_stored():
    # The monitored metric never appeared: the final save still goes up, so the run's trained
    # state is not lost; while something is stored, or before the end, nothing changes.
    p = policy(upload="best", monitor="eval_acc")
    state = RetentionState()
    assert state.should_upload(p, 4, False, {"loss": 0.3}) is False
    assert state.should_upload(p, 8, True, {"loss": 0.2}) is True
    state.record_stored(path(8), 8, {"loss": 0.2})
    assert state.best(p) is None and state.latest() == path(8)
    ranked = stored([0.5], monitor="eval_acc")
    assert ranked.should_upload(p, 9, True, {"loss": 0.1}) is False
