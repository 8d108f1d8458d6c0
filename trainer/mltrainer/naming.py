"""Names for runs and checkpoints: unique, deterministic and safe as paths.

Every checkpoint lands in the store under a name rendered from a template (Lightning style,
``"step-{step:08d}"`` or ``"{epoch}-{eval_loss:.4f}-{step}"``). Names must never collide, so a
template has to contain ``{step}``; and since names become object-store keys and local
directories, every path component is sanitized and traversal (``..``, absolute paths, empty
components) is refused rather than silently repaired.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from .limits import PATH_COMPONENT_MAX_BYTES, check_store_path, preview

DEFAULT_PATH_TEMPLATE = "step-{step:08d}"
DEFAULT_ROOT = "checkpoints"

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DASH_RUNS = re.compile(r"-{2,}")
_NON_IDENTIFIER = re.compile(r"\W")

# Dummy values used to render templates at config time, before real metrics exist. The epoch
# is fractional because the HF Trainer reports ``state.epoch`` as a float (1.5 mid-epoch), so a
# spec such as ``{epoch:02d}`` is caught here instead of failing at the first mid-epoch save.
_DUMMY_EPOCH = 1.5
_DUMMY_METRIC = 0.1234
# Steps rendered to check that a template really tells checkpoints apart.
_UNIQUENESS_PROBE_STEPS = (0, 1, 2, 9, 10, 11, 99, 100, 101, 12345, 12346, 10**8, 10**8 + 1)
# Values rendered to find a template's longest name at config time, so a name the store cannot
# read back is refused before any run. Each field takes, of its probes, the one that renders
# longest. The bounds are those of real runs (steps below 10^12, metrics below 10^15 in
# magnitude); a value beyond them is caught when that checkpoint is named (see
# checkpoint_store_path), and the callback then stores it under the default name.
_LENGTH_PROBE_STEPS = (0, 10**12 - 1)
_LENGTH_PROBE_EPOCHS = (_DUMMY_EPOCH, 0.30000000000000004, 99999.99999999999)
_LENGTH_PROBE_METRICS = (
    _DUMMY_METRIC, -2.2250738585072014e-308, -123456789012345.67, -0.12345678901234568, float("nan"), float("-inf"),
)


def sanitize_component(s: str) -> str:
    """Make ``s`` safe as a single path component (one directory or object-key level).

    Characters outside ``[A-Za-z0-9._-]`` become ``-``, runs of ``-`` collapse to one, and
    leading dots/dashes are stripped (no hidden files, nothing that reads as a CLI option).
    Trailing dashes are stripped too, so ``"my run!"`` becomes ``"my-run"``.

    Raises:
        ValueError: if nothing usable is left (``""``, ``"."``, ``".."``, ``"///"``).
    """
    if not isinstance(s, str):
        raise TypeError(f"path component must be a str, got {type(s).__name__}: {s!r}")
    cleaned = _DASH_RUNS.sub("-", _UNSAFE_CHARS.sub("-", s))
    cleaned = cleaned.lstrip(".-").rstrip("-")
    if cleaned in ("", ".", ".."):
        raise ValueError(f"cannot make a path component from {s!r}: nothing safe is left")
    return cleaned


def run_dir_name(run_name: str, run_id: str) -> str:
    """Local directory name for one run: ``"{run_name}-{run_id}"``, both sanitized.

    Run names repeat across runs (they come from a template); the MLflow run id does not, so
    appending it gives every run its own directory even when two runs share a name. A name too
    long for one path component next to the id (MLflow allows 250 characters) is cut: the id
    alone already tells runs apart.
    """
    run_part = sanitize_component(run_id)
    room = max(1, PATH_COMPONENT_MAX_BYTES - 1 - len(run_part))
    name_part = sanitize_component(run_name)[:room].rstrip("-")  # sanitized: ASCII, so chars are bytes
    return f"{name_part}-{run_part}"


def metric_field_name(metric: str) -> str:
    """Template field under which metric ``metric`` is available: ``"eval/loss"`` -> ``"eval_loss"``.

    ``str.format`` reads ``.`` and ``[`` in a field as attribute/index access, so every
    character that is not valid in an identifier is replaced by ``_``.
    """
    return _NON_IDENTIFIER.sub("_", metric)


def template_fields(template: str) -> list[str]:
    """Names of the fields referenced by ``template``, in order of first appearance.

    Raises:
        ValueError: on malformed braces, positional fields (``{}``, ``{0}``) or attribute/index
            access (``{eval.loss}``), none of which can name a value here.
    """
    if not isinstance(template, str):
        raise ValueError(f"template must be a str, got {type(template).__name__}: {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid template {template!r}: {exc}") from None
    names: list[str] = []
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(
                f"invalid template {template!r}: positional field {{{field}}} is not allowed; "
                "use a named field such as {step}"
            )
        if "." in field or "[" in field:
            raise ValueError(
                f"invalid template {template!r}: field {{{field}}} uses attribute/index access; "
                f"write metric names with '_' instead, e.g. {{{metric_field_name(field)}}}"
            )
        if spec and "{" in spec:
            raise ValueError(f"invalid template {template!r}: nested fields in format specs are not allowed")
        if field not in names:
            names.append(field)
    return names


def _render(template: str, fields: Mapping[str, Any], what: str) -> str:
    """Render ``template`` with ``fields``; errors name the field and list what is available."""
    for name in template_fields(template):
        if name not in fields:
            available = ", ".join(sorted(fields)) or "(none)"
            raise ValueError(
                f"{what} template {template!r} uses unknown field {{{name}}}; available fields: {available}"
            )
    try:
        return template.format_map(fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot render {what} template {template!r}: {exc}") from None


def checkpoint_fields(
    *, step: int, epoch: float | None = None, metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Values a checkpoint path template can use.

    ``step`` is the global step; ``epoch`` (only when known) is the HF Trainer's fractional epoch
    as a float. Each metric is available under :func:`metric_field_name` of its name; when two
    metrics map to the same field (``eval/loss`` and ``eval_loss``), the one whose name already
    is the field wins, so the result does not depend on dict order. The ``step`` and ``epoch``
    arguments take precedence over metrics of the same name (the HF Trainer logs ``epoch`` too).
    """
    fields: dict[str, Any] = {}
    for name in sorted((metrics or {}), key=lambda n: (metric_field_name(n) == n, n)):
        fields[metric_field_name(name)] = metrics[name]  # exact names sort last and win
    fields["step"] = int(step)
    if epoch is not None:
        fields["epoch"] = float(epoch)
    return fields


def _safe_relative_path(rendered: str, what: str) -> str:
    """Sanitize each '/'-separated part; refuse absolute paths, empty parts and traversal."""
    if rendered.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rendered):
        raise ValueError(f"{what} {rendered!r} is an absolute path; it must be relative")
    parts = rendered.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"{what} {rendered!r} has an empty, '.' or '..' component")
    return "/".join(sanitize_component(p) for p in parts)


def checkpoint_store_path(
    template: str = DEFAULT_PATH_TEMPLATE,
    *,
    step: int,
    epoch: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    root: str = DEFAULT_ROOT,
) -> str:
    """Store path (artifact path inside the run) for the checkpoint saved at ``step``.

    >>> checkpoint_store_path("step-{step:08d}", step=40)
    'checkpoints/step-00000040'
    >>> checkpoint_store_path("{epoch:.1f}-{eval_loss:.3f}-{step}", step=7, epoch=2.0, metrics={"eval/loss": 0.25})
    'checkpoints/2.0-0.250-7'

    Raises:
        ValueError: naming the field when the template uses one that is not available (e.g. a
            metric not computed at this save), or when the result is not a safe relative path.
        NameTooLongError: (a ValueError) when the result is longer than the store can read back.
    """
    fields = checkpoint_fields(step=step, epoch=epoch, metrics=metrics)
    rendered = _render(template, fields, "checkpoint path")
    safe_root = _safe_relative_path(root, "checkpoint root")
    path = f"{safe_root}/{_safe_relative_path(rendered, 'rendered checkpoint path')}"
    check_store_path(path, what=f"the checkpoint path rendered from {preview(template)}")
    return path


def _longest_store_path(template: str, metric_names: list[str]) -> str:
    """The longest store path ``template`` renders over the length probes (module constants).

    A rendered name is its literals plus each field's text, so taking for every field the probe
    that renders longest (the others fixed) gives the longest name over all probe combinations.
    """
    chosen: dict[str, Any] = {"step": _LENGTH_PROBE_STEPS[0], "epoch": _LENGTH_PROBE_EPOCHS[0],
                              **{n: _LENGTH_PROBE_METRICS[0] for n in metric_names}}
    probes = {"step": _LENGTH_PROBE_STEPS, "epoch": _LENGTH_PROBE_EPOCHS,
              **{n: _LENGTH_PROBE_METRICS for n in metric_names}}

    def rendered(values: dict[str, Any]) -> str:
        metrics = {n: values[n] for n in metric_names}
        fields = checkpoint_fields(step=values["step"], epoch=values["epoch"], metrics=metrics)
        text = _render(template, fields, "checkpoint path")
        return f"{DEFAULT_ROOT}/{_safe_relative_path(text, 'rendered checkpoint path')}"

    for name, candidates in probes.items():
        chosen[name] = max(candidates, key=lambda v: len(rendered({**chosen, name: v})))
    return rendered(chosen)


def validate_template(template: str) -> list[str]:
    """Check a checkpoint path template at config time; return the metric fields it needs.

    Fields other than ``step`` and ``epoch`` are taken to be metric names (their values are
    unknown until training runs) and rendered with a dummy float, which catches bad format specs.
    The template must contain ``{step}`` and render distinct names for distinct steps, because
    each checkpoint needs a unique name: two saves must never overwrite each other in the store.
    Its longest name (over realistic steps, epochs and metric values) must fit the store's key
    limits (see ``limits``), or the checkpoint could be stored but never read back.

    Raises:
        ValueError: with a message saying what is wrong with the template.
    """
    names = template_fields(template)
    if "step" not in names:
        raise ValueError(
            f"checkpoint path template {template!r} must contain {{step}}: every checkpoint needs a "
            "unique name, and only the step tells two saves apart (e.g. 'step-{step:08d}' or "
            "'{epoch}-{eval_loss:.4f}-{step}')"
        )
    metric_names = [n for n in names if n not in ("step", "epoch")]
    longest = _longest_store_path(template, metric_names)
    check_store_path(longest, what=f"checkpoint path template {preview(template)}: its longest name")
    dummy_metrics = {n: _DUMMY_METRIC for n in metric_names}
    rendered = {
        checkpoint_store_path(template, step=s, epoch=_DUMMY_EPOCH, metrics=dummy_metrics)
        for s in _UNIQUENESS_PROBE_STEPS
    }
    if len(rendered) != len(_UNIQUENESS_PROBE_STEPS):
        raise ValueError(
            f"checkpoint path template {template!r} renders the same name for different steps; "
            "its {step} format spec must keep every digit (e.g. {step} or {step:08d})"
        )
    return metric_names


def render_run_name(template: str, **fields: Any) -> str:
    """Render a run name such as ``"{model}-{task}-{timestamp}"`` from ``fields``.

    The result is a display name for MLflow and is not sanitized; use :func:`run_dir_name` for
    anything that becomes a path.

    Raises:
        ValueError: naming the unknown field and listing the available ones.
    """
    return _render(template, fields, "run name")
