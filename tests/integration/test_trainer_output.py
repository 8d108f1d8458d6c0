"""What a newcomer reads after a training: each link once, no warnings that ask nothing of them.

The run is the demo's situation in miniature: a pretrained encoder checkpoint (the tiny BERT,
saved without a head) fine-tuned for classification on a machine without an accelerator, with
``use_cpu`` left unset as configs/demo-minilm.yaml does.
"""

from __future__ import annotations

import pytest

from trainer_support import REPO, train, unique_experiment

TINY_BERT = REPO / "configs" / "models" / "tiny-bert"


@pytest.fixture(scope="module")
def demo_like_run(native_stack, tmp_path_factory):
    from transformers import AutoConfig, BertModel

    checkpoint = tmp_path_factory.mktemp("encoder")
    BertModel(AutoConfig.from_pretrained(TINY_BERT)).save_pretrained(checkpoint)  # no classifier in it
    experiment = unique_experiment("trainer-output")
    run = train(native_stack, tmp_path_factory.mktemp("out"), experiment,
                f"model.name_or_path={checkpoint}", "model.from_config=false", f"model.tokenizer={TINY_BERT}",
                "training.use_cpu=false", "training.max_steps=8")
    return run, native_stack


def test_the_run_link_is_printed_once(demo_like_run):
    run, stack = demo_like_run
    output = run.stdout + run.stderr
    assert output.count(f"/runs/{run.run_id}") == 1, output[-3000:]
    assert f"  UI:          {stack.uri.rstrip('/')}/#/experiments/" in run.stdout
    assert "View run" not in output and "View experiment" not in output


def test_no_pin_memory_warning_without_an_accelerator(demo_like_run):
    run, _ = demo_like_run
    assert "pin_memory" not in run.stdout + run.stderr


def test_the_missing_classifier_in_the_load_report_is_explained_once(demo_like_run):
    run, _ = demo_like_run
    assert "LOAD REPORT" in run.stderr and "classifier.weight" in run.stderr  # transformers' own report
    note = ("the load report's MISSING classifier.bias, classifier.weight is expected: that is the new task head, "
            "which starts from random values and is what fine-tuning trains")
    assert run.stderr.count(note) == 1
    assert run.stderr.index("LOAD REPORT") < run.stderr.index(note)
