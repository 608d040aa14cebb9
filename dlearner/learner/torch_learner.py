"""TorchLearner: the Learner on torch, the class algorithms subclass.

It turns a validated batch into tensors on the learner's device (pinned, non-blocking copies
towards a GPU), takes the gradient steps (forward, loss, backward, one all-reduce of all gradients
with the other learners, clipping, optimizer steps) and keeps its optimizers' state as numpy.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from dlearner.batch import MultiBatch, ShardInfo
from dlearner.columns import DEFAULT_OPTIMIZER, Columns
from dlearner.devices import host_transfer
from dlearner.learner.core import Learner, ParamDict
from dlearner.learner.optimizers import (
    RegisteredOptimizer,
    check_optimizer_state,
    load_optimizer_state,
    optimizer_state,
)
from dlearner.learner.override import override_point
from dlearner.learner.rollback import first_non_finite, is_finite_scalar
from dlearner.schedules import PiecewiseSchedule


class _ModuleTensors(NamedTuple):
    """One module's columns of an update, on the learner's device."""

    rows: int
    columns: Dict[str, torch.Tensor]


class StepRows(NamedTuple):
    """A learner's rows in the running gradient step's global minibatch (see ``TorchLearner.step_rows``)."""

    global_size: int  # rows of the step's minibatch over all learners
    positions: Optional[np.ndarray]  # where this learner's rows sit in it, in order (None: all of it)


class TorchLearner(Learner):
    """The torch implementation of :class:`Learner`; subclass it to write an algorithm.

    ``compute_loss_for_module`` returns one loss tensor, or ``{optimizer name: loss}`` when each of a
    module's optimizers has a loss of its own (SAC): each loss then reaches only its optimizer's
    parameters, and ``total_loss`` reports their sum.

    During a gradient step, ``self.step_rows[module_id]`` (a :class:`StepRows`) says where this
    learner's rows sit in the step's minibatch over all learners; a loss that draws random numbers per
    row draws them for the whole minibatch and keeps its own rows', so N learners equal one.
    """

    #: ``{module_id: StepRows}`` of the running gradient step.
    step_rows: Dict[str, StepRows] = {}

    @override_point
    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        """One Adam over all of the module's parameters, with ``config.lr`` (a float or a schedule)."""
        config = config or self.config
        lr = getattr(config, "lr", 3e-4)
        initial = PiecewiseSchedule(lr, name="lr").value(self._last_timestep)
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer_name=DEFAULT_OPTIMIZER,
            optimizer=torch.optim.Adam(params, lr=initial),
            params=params,
            lr_or_lr_schedule=lr,
        )

    def _to_tensors(self, batch: MultiBatch) -> Dict[str, "_ModuleTensors"]:
        # Pinned memory and non-blocking copies only towards a CUDA device (see dlearner.devices.host_transfer).
        transfer = host_transfer(self._device.type, torch.cuda.is_available())
        out = {}
        for mid, cols in batch.items():
            discrete = _is_discrete(self._module[mid].action_space)
            tensors = {}
            rows = 0
            for col, array in cols.items():
                rows = len(array)
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    tensor = tensor.float()
                if col == Columns.ACTIONS and discrete:
                    tensor = tensor.long()
                if transfer.pin_memory:
                    tensor = tensor.pin_memory()
                tensors[col] = tensor.to(self._device, non_blocking=transfer.non_blocking)
            out[mid] = _ModuleTensors(rows, tensors)
        return out

    def _gradient_step(self, tensors, step: Mapping[str, np.ndarray], layout: ShardInfo, last: bool = False) -> None:
        self.step_rows = {}
        minibatch: Dict[str, Dict[str, torch.Tensor]] = {}
        scale: Dict[str, float] = {}
        weights: Dict[str, float] = {}
        for mid, global_idx in step.items():
            local = tensors.get(mid)
            if local is None:
                continue  # this learner's shard has no rows of the module; it still joins the all-reduce
            offset, rows, mask = layout.row_offsets[mid], local.rows, layout.global_loss_masks.get(mid)
            if offset == 0 and rows == layout.global_rows[mid]:
                local_idx = global_idx  # the whole batch is here: no filtering needed
                positions = None
            else:
                positions = np.flatnonzero((global_idx >= offset) & (global_idx < offset + rows))
                local_idx = global_idx[positions] - offset
                if len(local_idx) == 0:
                    continue
            global_weight = float(mask[global_idx].sum()) if mask is not None else float(len(global_idx))
            local_weight = float(mask[local_idx + offset].sum()) if mask is not None else float(len(local_idx))
            # Where this learner's rows sit in the step's global minibatch: losses that draw random
            # numbers per row (SAC) draw them for the whole minibatch and keep their rows', so N
            # learners draw exactly what one learner would.
            self.step_rows[mid] = StepRows(len(global_idx), positions)
            index = torch.from_numpy(local_idx).to(self._device)
            minibatch[mid] = {col: t.index_select(0, index) for col, t in local.columns.items()}
            weights[mid] = local_weight
            scale[mid] = local_weight / global_weight if global_weight > 0 else 0.0

        losses, raw_losses = {}, {}
        if minibatch:
            fwd_out = self._module.forward_train(minibatch)
            for mid in minibatch:
                self.metrics.default_weight = weights[mid]
                loss = self.compute_loss_for_module(module_id=mid, config=self.config, batch=minibatch[mid], fwd_out=fwd_out[mid])
                total = self._check_optimizer_losses(mid, loss) if isinstance(loss, Mapping) else loss
                self.metrics.log_value((mid, "total_loss"), total)
                raw_losses[mid] = total
                losses[mid] = loss if scale[mid] == 1.0 else _scaled(loss, scale[mid])
            self.metrics.default_weight = 1.0
        module_ids = sorted(step)
        gradients = self.compute_gradients(losses, module_ids=module_ids)
        if self._collective is not None and self._collective.world_size > 1:
            # The last step's all-reduce also checks that all learners logged the same metric keys,
            # which saves the metrics reduction a collective of its own. It carries each learner's
            # non-finite-loss flags too and checks the summed gradients, so all learners reject the
            # same step (and roll back together) without a collective of their own.
            loss_flags = (
                [float(mid in raw_losses and not is_finite_scalar(raw_losses[mid])) for mid in module_ids]
                if raw_losses
                else [0.0] * len(module_ids)
            )
            if last:
                self._log_step_metrics_once()  # before the last all-reduce, which carries the metric sums
            gradients = self._all_reduce_gradients(module_ids, check_metric_keys=last, loss_flags=loss_flags)
        else:
            # Checked once, at the end of the update (see Learner._check_finite_after_update).
            self._step_losses.extend((self._step_position, mid, loss.detach()) for mid, loss in raw_losses.items())
        gradients = self.postprocess_gradients(gradients)
        self.apply_gradients(gradients)
        self._counters["num_gradient_steps"] += 1

    def _step_optimizers(self, module_ids: Iterable[str]) -> List[RegisteredOptimizer]:
        wanted = set(module_ids)
        return [reg for reg in self._optimizers.values() if reg.module_id in wanted]

    @override_point
    def compute_gradients(
        self, loss_per_module: Mapping[str, torch.Tensor], *, module_ids: Optional[Sequence[str]] = None, **kwargs
    ) -> ParamDict:
        """Back-propagate the sum of the module losses; returns ``{parameter: gradient}``."""
        regs = self._step_optimizers(module_ids if module_ids is not None else loss_per_module.keys())
        for reg in regs:
            reg.optimizer.zero_grad(set_to_none=True)
        # A module's loss given per optimizer reaches only that optimizer's parameters (SAC's policy
        # loss must not move the Q networks it differentiates through); the rest are summed.
        plain = [loss for loss in loss_per_module.values() if not isinstance(loss, Mapping)]
        backward = [(sum(plain[1:], plain[0]), None)] if plain else []
        for mid, losses in loss_per_module.items():
            if isinstance(losses, Mapping):
                backward += [(loss, self._optimizers[(mid, name)].params) for name, loss in losses.items()]
        for i, (loss, params) in enumerate(backward):
            loss.backward(inputs=params, retain_graph=i < len(backward) - 1)
        return {p: p.grad for reg in regs for p in reg.params if p.grad is not None}

    def _check_optimizer_losses(self, module_id: str, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The total of a loss given per optimizer (``{optimizer name: loss}``); names must be the module's optimizers."""
        own = [name for name, _ in self.get_optimizers_for_module(module_id)]
        unknown = sorted(set(losses) - set(own))
        if unknown or not losses:
            raise ValueError(
                f"compute_loss_for_module returned losses for optimizer(s) {unknown or '{}'} of module {module_id!r}, "
                f"which has the optimizers {own}; return one loss tensor, or one per optimizer name."
            )
        values = list(losses.values())
        return sum(values[1:], values[0])

    def _all_reduce_gradients(
        self, module_ids: Sequence[str], *, check_metric_keys: bool = False, loss_flags: Optional[Sequence[float]] = None
    ) -> ParamDict:
        """Average the gradients over all learners with ONE all-reduce of a flat buffer.

        The buffer ends with one has-gradient flag per parameter, so a parameter that got no gradient
        on any learner keeps ``grad=None`` (exactly as on a single learner); then, with
        ``loss_flags``, one "loss was non-finite" flag per module of ``module_ids``; with
        ``check_metric_keys`` (the last step of an update) it also carries the metric sums of the keys
        reduced in the last update and the key-agreement probe of the others. A non-finite
        loss on any learner, or a non-finite summed gradient, raises :class:`NonFiniteUpdateError`
        on every learner alike, since all of them see the same summed buffer.
        """
        params = [p for reg in self._step_optimizers(module_ids) for p in reg.params]
        pieces = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype) for p in params
        ]
        flags = torch.tensor(
            [p.grad is not None for p in params] + list(loss_flags or ()), dtype=pieces[0].dtype, device=pieces[0].device
        )
        # The metric sums ride along too when the gradients are float32 (see MetricsLogger.fold_values).
        fold = self.metrics.fold_values(self._collective) if check_metric_keys and flags.dtype == torch.float32 else None
        fold = flags[:0] if fold is None else fold.to(flags)
        probe = self.metrics.key_probe().to(flags) if check_metric_keys else flags[:0]
        flat = torch.cat(pieces + [flags, fold, probe])
        self._collective.all_reduce_sum(flat)
        if check_metric_keys:
            tail = flat[len(flat) - len(fold) - len(probe) :].cpu()
            if len(fold):
                self.metrics.accept_fold(tail[: len(fold)])
            self.metrics.accept_key_probe(tail[len(fold) :], self._collective.world_size)
            flat = flat[: len(flat) - len(fold) - len(probe)]
        num_values = len(flat) - len(flags)
        # The flags as Python numbers in one conversion (not one tensor comparison per parameter).
        summed_flags = flat[num_values:].tolist()
        has_grads, bad_losses = summed_flags[: len(params)], summed_flags[len(params) :]
        if any(count > 0 for count in bad_losses):
            bad = [
                f"{mid!r} (on {int(count)} of {self._collective.world_size} learners)"
                for mid, count in zip(module_ids, bad_losses)
                if count > 0
            ]
            raise self._non_finite_step_error(f"the loss of module(s) {', '.join(bad)} is not finite (NaN or inf)")
        if first_non_finite([flat[:num_values]]) is not None:
            offset, bad_params = 0, []
            for p in params:
                if not bool(torch.isfinite(flat[offset : offset + p.numel()]).all()):
                    bad_params.append(p)
                offset += p.numel()
            raise self._non_finite_step_error(
                f"{self._describe_parameters(bad_params)}, summed over all {self._collective.world_size} learners"
            )
        gradients: ParamDict = {}
        offset = 0
        for p, has_grad in zip(params, has_grads):
            n = p.numel()
            if has_grad > 0:
                # A view into the reduced buffer, not a copy (as DDP's gradient_as_bucket_view): the
                # next step's zero_grad(set_to_none=True) lets the buffer go.
                p.grad = flat[offset : offset + n].view_as(p)
                gradients[p] = p.grad
            offset += n
        return gradients

    @override_point
    def postprocess_gradients_for_module(self, *, module_id: str, config: Any, module_gradients_dict: ParamDict) -> ParamDict:
        """Clip the module's gradients per optimizer, by ``config.grad_clip`` and ``config.grad_clip_by``
        (``"value"``, ``"norm"`` per tensor, or ``"global_norm"`` over the optimizer's parameters)."""
        clip = getattr(config, "grad_clip", None)
        if clip is None:
            return module_gradients_dict
        clip_by = getattr(config, "grad_clip_by", "global_norm")
        for name, _optimizer in self.get_optimizers_for_module(module_id):
            reg = self._optimizers[(module_id, name)]
            grads = [module_gradients_dict[p] for p in reg.params if p in module_gradients_dict]
            if not grads:
                continue
            # The norm before clipping is reported in every mode, so clipping shows in the results.
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            # With several learners these are the summed gradients: the same norm on every learner.
            self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), norm, replicated=True)
            if clip_by == "value":
                for g in grads:
                    g.clamp_(-clip, clip)
            elif clip_by == "norm":
                for g in grads:
                    g.mul_(torch.clamp(clip / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))
            else:
                torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        return module_gradients_dict

    @override_point
    def apply_gradients(self, gradients: ParamDict) -> None:
        """Take one step of every optimizer whose parameters have gradients."""
        stepped = set()
        for p, g in gradients.items():
            if p.grad is not g:
                p.grad = g
        for reg in self._optimizers.values():
            # Only optimizers with parameters in `gradients`: a module outside this step may still
            # hold gradients of an earlier update, which must not be applied again.
            if reg.full_name not in stepped and any(p in gradients and p.grad is not None for p in reg.params):
                reg.optimizer.step()
                stepped.add(reg.full_name)

    # -- optimizer state as numpy ---------------------------------------------------------------
    def get_optimizer_state(self) -> Dict[str, Any]:
        """``{"<module_id>_<name>": {"state": {"<i>": {key: np.ndarray}}, "param_groups": [...]}}``."""
        return optimizer_state(self._optimizers.values())

    def _check_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless every optimizer can take its part of ``state`` and keep stepping
        (see :func:`dlearner.learner.optimizers.check_optimizer_state`)."""
        check_optimizer_state(self._optimizers.values(), state)

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        load_optimizer_state(self._optimizers.values(), state)


def _scaled(loss: Any, scale: float) -> Any:
    # A loss tensor, or one per optimizer, times a learner's share of the global minibatch.
    return {name: value * scale for name, value in loss.items()} if isinstance(loss, Mapping) else loss * scale


def _is_discrete(space) -> bool:
    import gymnasium as gym

    return isinstance(space, gym.spaces.Discrete)
