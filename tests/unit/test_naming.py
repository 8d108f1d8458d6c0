import pytest
from mltrainer.naming import (
    checkpoint_store_path,
    metric_field_name,
    render_run_name,
    run_dir_name,
    sanitize_component,
    validate_template,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("bert-base", "bert-base"),
        ("my run!", "my-run"),
        ("a//b  c", "a-b-c"),
        ("..hidden", "hidden"),
        ("--opt", "opt"),
        ("v1.2_x", "v1.2_x"),
        ("über/model", "ber-model"),
        ("a---b", "a-b"),
    ],
)
def test_sanitize_component(raw, expected):
    assert sanitize_component(raw) == expected


@pytest.mark.parametrize("raw", ["", ".", "..", "///", "-.-", "!!!"])
def test_sanitize_component_rejects_nothing_left(raw):
    with pytest.raises(ValueError, match=f"cannot make a path component from {raw!r}"):
        sanitize_component(raw)


def test_run_dir_name_is_unique_per_run_id():
    assert run_dir_name("bert/tiny sst2", "abc123") == "bert-tiny-sst2-abc123"
    assert run_dir_name("same", "r1") != run_dir_name("same", "r2")


def test_metric_field_name():
    assert metric_field_name("eval/loss") == "eval_loss"
    assert metric_field_name("eval.f1-macro") == "eval_f1_macro"


def test_default_template():
    assert checkpoint_store_path(step=40) == "checkpoints/step-00000040"


def test_template_with_epoch_and_metrics():
    path = checkpoint_store_path(
        "{epoch:.1f}-{eval_loss:.4f}-{step}", step=7, epoch=2, metrics={"eval/loss": 0.123456}, root="ckpt"
    )
    assert path == "ckpt/2.0-0.1235-7"


def test_exact_metric_name_wins_over_mapped_one():
    metrics = {"eval_loss": 1.0, "eval/loss": 2.0}
    assert checkpoint_store_path("{eval_loss}-{step}", step=1, metrics=metrics) == "checkpoints/1.0-1"
    assert checkpoint_store_path("{eval_loss}-{step}", step=1, metrics=dict(reversed(metrics.items()))) == (
        "checkpoints/1.0-1"
    )


def test_subdirectories_are_sanitized_per_part():
    assert checkpoint_store_path("run a/step {step}", step=3) == "checkpoints/run-a/step-3"


def test_missing_field_names_it_and_lists_available():
    with pytest.raises(ValueError) as exc:
        checkpoint_store_path("{eval_loss}-{step}", step=5, epoch=1.0, metrics={"loss": 0.3})
    assert "{eval_loss}" in str(exc.value)
    assert "available fields: epoch, loss, step" in str(exc.value)


def test_epoch_missing_when_unknown():
    with pytest.raises(ValueError, match=r"unknown field \{epoch\}"):
        checkpoint_store_path("{epoch}-{step}", step=5)


@pytest.mark.parametrize("template", ["../{step}", "a//{step}", "/abs/{step}", "./{step}", "{step}/.."])
def test_traversal_and_empty_parts_rejected(template):
    with pytest.raises(ValueError, match="absolute|empty"):
        checkpoint_store_path(template, step=1)


def test_metric_cannot_inject_traversal():
    # a metric rendering '..' inside a part is harmless; a part that *is* '..' is refused
    assert checkpoint_store_path("{x}-{step}", step=1, metrics={"x": ".."}) == "checkpoints/1"  # '..-1' -> '1'


@pytest.mark.parametrize("template", ["{}", "{0}-{step}", "{eval.loss}-{step}", "{step", "{eval[0]}"])
def test_bad_field_syntax(template):
    with pytest.raises(ValueError, match="invalid template"):
        checkpoint_store_path(template, step=1)


def test_validate_template_returns_metric_fields():
    assert validate_template("step-{step:08d}") == []
    assert validate_template("{epoch:.2f}-{eval_loss:.4f}-{step}") == ["eval_loss"]


def test_validate_template_requires_step():
    with pytest.raises(ValueError, match=r"must contain \{step\}: every checkpoint needs a unique name"):
        validate_template("{epoch}-{eval_loss:.4f}")


def test_validate_template_rejects_lossy_step_format():
    with pytest.raises(ValueError, match="renders the same name for different steps"):
        validate_template("{step:.1e}")


def test_validate_template_catches_int_spec_on_fractional_epoch():
    with pytest.raises(ValueError, match="cannot render checkpoint path template"):
        validate_template("{epoch:02d}-{step}")


def test_render_run_name():
    assert render_run_name("{model}-{task}", model="bert", task="cls") == "bert-cls"
    with pytest.raises(ValueError, match=r"unknown field \{modle\}; available fields: model, task"):
        render_run_name("{modle}", model="bert", task="cls")


def test_run_dir_name_fits_one_path_component_whatever_the_run_name():
    run_id = "0123456789abcdef0123456789abcdef"
    name = run_dir_name("r" * 250, run_id)  # MLflow's longest run name
    assert len(name.encode()) == 255 and name.endswith("-" + run_id) and name.startswith("r" * 200)
    assert run_dir_name("r" * 250, run_id) != run_dir_name("r" * 250, "f" * 32)


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("x" * 250 + "-{step}", "has a component of 263 bytes; the store reads back at most 255 per component"),
        ("{step:0300d}", "has a component of 300 bytes"),
        ("{eval_loss:0>250}-{step}", "the store reads back at most 255 per component"),  # 0-padded
        ("/".join(["y" * 200] * 3) + "-{step}", "at most 512 fit in an S3 key (1024 bytes)"),
    ],
)
def test_validate_template_refuses_names_the_store_cannot_read_back(template, needle):
    with pytest.raises(ValueError, match="its longest name") as exc:
        validate_template(template)
    assert needle in str(exc.value)


def test_validate_template_takes_the_longest_value_of_each_field():
    # 12 step digits, 18 for a metric under 1e15 with 4 decimals, 19 for a float's repr: fits.
    assert validate_template("{epoch}-{eval_loss:.4f}-{step:08d}") == ["eval_loss"]
    # At the edge: 222 literal characters, the longest epoch (19, "0.30000000000000004"), "-" and
    # 12 step digits make 254 bytes; 3 more characters make 257.
    assert validate_template("e" * 222 + "{epoch}-{step}") == []
    with pytest.raises(ValueError, match="component of"):
        validate_template("e" * 225 + "{epoch}-{step}")


def test_checkpoint_store_path_refuses_a_name_too_long_for_the_store():
    from mltrainer.limits import NameTooLongError

    with pytest.raises(NameTooLongError, match="component of 308 bytes"):
        checkpoint_store_path("{eval_loss:.4f}-{step}", step=1, metrics={"eval_loss": 1e300})
