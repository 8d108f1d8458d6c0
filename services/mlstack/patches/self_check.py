"""Every patch of MLflow's internals proves at server start that it took hold, or the server refuses to start.

A patch finds its target by name (a route path, a module attribute, a class); when a newer MLflow
or FastAPI moves the target, the patch finds nothing, and the server runs as if it were not there.
That happened: on FastAPI 0.165 the streaming download patch no longer found MLflow's download
route, logged one warning per worker and replaced nothing; every test stayed green and every
download went through a temporary file on the server again.

So each patch is a ``Patch`` with a ``check`` that looks at the *effect* (the route's endpoint is
now ours, the store method is wrapped, MLflow's handler still asks for the hook we implement),
not at whether ``install`` raised. ``Patching`` installs the patches and then runs every check;
a patch that did not take hold stops the server with a message naming the patch and the MLflow
version, unless the operator named it in ``MLSTACK_ALLOW_UNPATCHED`` (then: a loud warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from mlstack.settings import MLSTACK_ALLOW_UNPATCHED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    name: str  # what MLSTACK_ALLOW_UNPATCHED names
    without_it: str  # what the server does when the patch is not in effect
    install: Callable[..., object]  # patches of modules take nothing, patches of the app take the app
    check: Callable[[object], str | None]  # given the app: None when in effect, else what is wrong


class PatchesNotInEffect(RuntimeError):
    """One or more patches did not take hold and the operator did not allow running without them."""


def versions() -> str:
    """The versions a patch's targets come from, as the messages name them."""
    from importlib.metadata import version

    import mlflow

    return f"MLflow {mlflow.__version__} (fastapi {version('fastapi')})"


def allowed_unpatched(env: dict[str, str] | None = None) -> set[str]:
    raw = MLSTACK_ALLOW_UNPATCHED.get(env)
    return {name.strip() for name in raw.split(",") if name.strip()}


class Patching:
    """Installs patches, then insists that each one is in effect."""

    def __init__(self) -> None:
        self._installed: list[Patch] = []
        self._install_errors: dict[str, str] = {}

    def install(self, patch: Patch, *args) -> None:
        """Run ``patch.install(*args)``. An exception is not the end: it becomes the reason the
        patch did not take hold, so the operator can still choose to run without this one patch."""
        self._installed.append(patch)
        try:
            patch.install(*args)
        except Exception as exc:  # noqa: BLE001 - reported by require_in_effect, with the patch's name
            logger.debug("installing patch %s failed", patch.name, exc_info=True)
            self._install_errors[patch.name] = f"installing it raised {type(exc).__name__}: {exc}"

    def problems(self, app) -> dict[str, str]:
        """Patch name -> why it is not in effect, for every installed patch that is not."""
        found = {}
        for patch in self._installed:
            problem = self._install_errors.get(patch.name)
            if problem is None:
                try:
                    problem = patch.check(app)
                except Exception as exc:  # noqa: BLE001 - a check that cannot look is a check that failed
                    problem = f"its check raised {type(exc).__name__}: {exc}"
            if problem:
                found[patch.name] = problem
        return found

    def require_in_effect(self, app, allowed: set[str] | None = None) -> None:
        """Raise ``PatchesNotInEffect`` unless every patch took hold or is in ``allowed``
        (default: ``MLSTACK_ALLOW_UNPATCHED``); warn loudly for each allowed one that did not."""
        allowed = allowed_unpatched() if allowed is None else allowed
        names = [p.name for p in self._installed]
        unknown = sorted(allowed - set(names))
        if unknown:
            raise PatchesNotInEffect(
                f"{MLSTACK_ALLOW_UNPATCHED.name} names {', '.join(unknown)}, which is no patch of this server; "
                f"the patches are: {', '.join(names)}")
        by_name = {p.name: p for p in self._installed}
        problems = self.problems(app)
        for name in sorted(problems.keys() & allowed):
            logger.warning(
                "RUNNING WITHOUT PATCH %s on %s, as %s allows: %s. Without it, %s.",
                name, versions(), MLSTACK_ALLOW_UNPATCHED.name, problems[name], by_name[name].without_it)
        refused = [name for name in names if name in problems and name not in allowed]
        if refused:
            raise PatchesNotInEffect(refusal_message({n: problems[n] for n in refused}, by_name))


def refusal_message(problems: dict[str, str], patches: dict[str, Patch]) -> str:
    lines = [f"patch {name} did not take hold on {versions()}: {problem}. Without it, {patches[name].without_it}."
             for name, problem in problems.items()]
    them = "it" if len(problems) == 1 else "them"
    lines.append(f"Refusing to start; set {MLSTACK_ALLOW_UNPATCHED.name}={','.join(problems)} to run without {them} "
                 f"(README: \"Patches of MLflow\").")
    return "\n".join(lines)
