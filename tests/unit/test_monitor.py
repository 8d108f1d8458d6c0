import logging

from mltrainer.monitor import MonitorWatch, metric_problem


def test_metric_problem_knows_what_the_trainer_logs():
    assert metric_problem("loss", has_eval_data=False, evaluates=False) is None
    assert metric_problem("eval_loss", has_eval_data=True, evaluates=True) is None
    assert "needs evaluation data" in metric_problem("eval_loss", has_eval_data=False, evaluates=True)
    assert "training.eval_strategy" in metric_problem("eval_loss", has_eval_data=True, evaluates=False)
    assert "did you mean loss?" in metric_problem("los", has_eval_data=True, evaluates=True)
    assert "after the last save" in metric_problem("train_runtime", has_eval_data=True, evaluates=True)


def test_watch_warns_once_naming_the_metric_and_what_was_logged(caplog):
    watch = MonitorWatch("eval_acc")
    with caplog.at_level(logging.WARNING, logger="mltrainer.monitor"):
        watch.at_save(4, {"loss": 0.5, "eval_loss": 0.4})
        watch.at_save(8, {"loss": 0.3})
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "checkpoints.monitor 'eval_acc' is not among the metrics logged at step 4" in message
    assert "(logged there: eval_loss, loss)" in message
    problem = watch.problem("checkpoints/step-00000008")
    assert problem.startswith("checkpoints.monitor 'eval_acc' was not logged at any save (steps 4, 8)")
    assert "checkpoint.best is not set" in problem and "stored as checkpoints/step-00000008" in problem
    assert "no checkpoint is stored" in watch.problem(None)


def test_watch_has_no_problem_once_the_metric_appeared_or_without_monitor(caplog):
    watch = MonitorWatch("eval_loss")
    watch.at_save(4, {"loss": 0.5})
    watch.at_save(8, {"eval_loss": 0.4})
    assert watch.problem("x") is None
    assert MonitorWatch("eval_loss", seen=True).problem("x") is None  # resumed: the store has ranked ones
    unmonitored = MonitorWatch(None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mltrainer.monitor"):
        unmonitored.at_save(4, {})
    assert unmonitored.problem("x") is None and not caplog.records


def test_config_evaluates_only_with_an_eval_strategy():
    from mltrainer.config import build_config

    base = {"experiment": {"name": "e"}, "model": {"name_or_path": "org/m", "task": "causal-lm"},
            "data": {"hub": {"name": "d"}}}
    assert not build_config(base).evaluates  # TrainingArguments' default: no evaluation
    assert not build_config({**base, "training": {"eval_strategy": "no"}}).evaluates
    assert build_config({**base, "training": {"eval_strategy": "steps"}}).evaluates
