"""The mark on the methods a custom Learner overrides: :func:`override_point`."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

Method = TypeVar("Method", bound=Callable[..., Any])


def override_point(method: Method) -> Method:
    """Mark ``method`` as an extension point: a method a custom Learner overrides to change what it does.

    Reading a learner class, the marked methods are the ones to look at first:
    ``compute_loss_for_module`` (required), ``configure_optimizers_for_module``,
    ``before_gradient_based_update`` / ``after_gradient_based_update``, the gradient pipeline and
    ``get_learner_state`` / ``set_learner_state`` / ``_check_learner_state``. Everything else is
    the machinery that makes N learners equal one; overriding it is possible but unsupported.

    The decorator returns ``method`` itself after setting ``method.is_override_point = True``, so
    a marked method costs nothing more to call. Tools (and tests) list the extension points of a
    class with ``[name for name in dir(cls) if getattr(getattr(cls, name), "is_override_point", False)]``.

    Example::

        class Learner:
            @override_point
            def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
                raise NotImplementedError
    """
    method.is_override_point = True  # type: ignore[attr-defined]
    return method
