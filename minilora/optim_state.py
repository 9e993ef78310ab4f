"""How an optimizer's state is saved, checked and restored: ``state_dict`` / ``load_state_dict``.

``Optimizer`` (``minilora.optim``) takes these methods from ``SavedState``. The state is a
JSON-able part (type, hyperparameters, groups, one entry per parameter) and host arrays (the
moments), so it travels through JSON and safetensors; ``check_state`` checks all of it before
``load_state_dict`` changes anything.
"""

from __future__ import annotations

import numpy as np

from . import backend as bk

__all__ = ["SavedState"]


class SavedState:
    """The checkpoint half of ``Optimizer``.

    It reads what ``Optimizer.__init__`` sets: ``names``, ``steps``, ``state``, ``param_groups``,
    ``group_of``, ``_layouts`` (backend, dtype, shape per parameter), and the class's
    ``_hyperparameters``, ``_group_options``, ``_nonnegative_state`` and ``_check_option``.
    """

    def state_meta(self) -> dict:
        """The JSON-able part of the state: type, hyperparameters, groups, and per-parameter name, shape, dtype and step.

        ``hyperparameters`` holds the first group's values (all a one-group optimizer has);
        ``param_groups`` lists every group's options and parameter names.
        """
        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {
            "optimizer": type(self).__name__,
            "format": 1,
            "hyperparameters": {key: plain(getattr(self, key)) for key in self._hyperparameters},
            "param_groups": [
                {**{key: plain(group[key]) for key in self._group_options},
                 "params": [n for n, g in zip(self.names, self.group_of) if g == k]}
                for k, group in enumerate(self.param_groups)
            ],
            "params": [
                {"name": name, "shape": list(shape), "dtype": str(dtype), "step": step}
                for name, (_, dtype, shape), step in zip(self.names, self._layouts, self.steps)
            ],
        }

    def state_arrays(self) -> dict:
        """The state arrays as host NumPy copies, keyed ``"<param name>.<state key>"``.

        The dict is ready for ``safetensors.numpy.save_file``. The arrays are copies, so later
        steps do not change a saved state.
        """
        out = {}
        for name, state in zip(self.names, self.state):
            for key, buf in state.items():
                host = bk.to_numpy(buf)
                out[f"{name}.{key}"] = host.copy() if host is buf else host
        return out

    def state_dict(self) -> dict:
        """``{"meta": state_meta(), "arrays": state_arrays()}``. ``load_state_dict`` takes it back."""
        return {"meta": self.state_meta(), "arrays": self.state_arrays()}

    def load_state_dict(self, state: dict, arrays: dict | None = None, strict: bool = True,
                        restore_hyperparameters: bool = True) -> None:
        """Restore a saved state in place: ``load_state_dict(sd)`` or ``load_state_dict(meta, arrays)``.

        ``sd`` comes from ``state_dict()``. ``meta`` and ``arrays`` come from ``state_meta()``
        and ``state_arrays()``, possibly after a trip through JSON and safetensors. As in
        PyTorch, the hyperparameters (lr included) are restored too. Training then continues
        bit for bit as if it had never stopped. Everything is checked (``check_state``) before
        anything changes. With ``strict=False``, keys in ``arrays`` that belong to no parameter
        are ignored. With ``restore_hyperparameters=False`` the optimizer keeps its own lr, betas,
        eps and weight decay, group by group (the step counts and moments still come from the
        state): the way to resume with a lower learning rate.
        """
        meta = state["meta"] if arrays is None else state
        arrays = state["arrays"] if arrays is None else arrays
        saved, group_options = self.check_state(meta, arrays, strict)
        # All checked: now change things.
        if restore_hyperparameters:
            for key, value in meta["hyperparameters"].items():
                if key in self._hyperparameters and key not in self._group_options:
                    setattr(self, key, self._check_option(key, tuple(value) if isinstance(value, list) else value))
            for group, options in zip(self.param_groups, group_options):
                group.update(options)
        for i, (name, buffers) in enumerate(zip(self.names, self.state)):
            self.steps[i] = int(saved[name]["step"])
            for key, buf in buffers.items():
                source = bk.asarray(arrays[f"{name}.{key}"], dtype=buf.dtype, backend=bk.backend_of(buf))
                bk.get_array_module(buf).copyto(buf, source)

    def check_state(self, meta: dict, arrays: dict, strict: bool = True) -> tuple[dict, list[dict]]:
        """Check a saved state against this optimizer; raise ValueError saying what is wrong, change nothing.

        Checked: the optimizer type, one entry (name, shape, step) per parameter and no other,
        valid hyperparameters and groups, and every state array present, of its parameter's
        shape and dtype, finite (second moments >= 0). Returns ({name: entry}, each group's
        options), what ``load_state_dict`` applies.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not (isinstance(meta, dict) and isinstance(meta.get("params"), list)
                and isinstance(meta.get("hyperparameters"), dict)):
            raise ValueError(f"{where}: the saved state is malformed (it needs 'optimizer', 'params' and 'hyperparameters')")
        if meta.get("optimizer") != type(self).__name__:
            raise ValueError(f"{where}: the state was saved by {meta.get('optimizer')!r}, not {type(self).__name__!r}; "
                             f"load it into a {meta.get('optimizer')} (or start a fresh run)")
        saved = self._check_saved_params(meta["params"], where)
        for key, value in meta["hyperparameters"].items():
            if key in self._hyperparameters:
                try:
                    self._check_option(key, tuple(value) if isinstance(value, list) else value)
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: the saved {key} = {value!r} is not a valid value") from None
        self._check_layout(meta["hyperparameters"], where)
        self._check_saved_arrays(arrays, strict, where)
        try:
            group_options = self._saved_group_options(meta, where)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"{where}: the saved parameter groups are malformed ({exc!r})") from None
        return saved, group_options

    def _check_layout(self, hyperparameters: dict, where: str) -> None:
        """Refuse saved hyperparameters that would need other state arrays or buffers (SGD: momentum, nesterov)."""

    def _check_saved_params(self, entries: list, where: str) -> dict:
        """{name: entry} of the saved per-parameter entries, each checked against this optimizer's parameters."""
        saved = {}
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("shape"), list)
                    and isinstance(entry.get("step"), int) and not isinstance(entry.get("step"), bool)
                    and entry["step"] >= 0):
                raise ValueError(f"{where}: the saved state has a malformed parameter entry {str(entry)[:80]}")
            saved[entry["name"]] = entry
        missing = [n for n in self.names if n not in saved]
        ours = set(self.names)
        unexpected = [n for n in saved if n not in ours]
        if missing or unexpected:
            raise ValueError(
                f"{where}: the saved parameters do not match this optimizer's: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                "Build the optimizer from the same (named) parameters, with the same ones trainable"
            )
        for name, (_, _, shape) in zip(self.names, self._layouts):
            if tuple(saved[name]["shape"]) != tuple(shape):
                raise ValueError(f"{where}: the saved state of {name!r} is for shape {tuple(saved[name]['shape'])}, "
                                 f"the parameter's is {tuple(shape)}")
        return saved

    def _check_saved_arrays(self, arrays: dict, strict: bool, where: str) -> None:
        """Every state array present, of its buffer's shape and dtype, finite; second moments >= 0."""
        wanted = {f"{name}.{key}": buf for name, state in zip(self.names, self.state) for key, buf in state.items()}
        missing = sorted(set(wanted) - set(arrays))
        if missing:
            raise ValueError(f"{where}: the state arrays {missing[:5]} are missing from the saved state")
        if strict and set(arrays) - set(wanted):
            raise ValueError(f"{where}: unexpected state arrays {sorted(set(arrays) - set(wanted))[:5]} "
                             f"that this {type(self).__name__} has no place for (pass strict=False to ignore)")
        for key, buf in wanted.items():
            a = arrays[key]
            if tuple(a.shape) != tuple(buf.shape) or np.dtype(a.dtype) != np.dtype(buf.dtype):
                raise ValueError(f"{where}: the state array {key} is {a.dtype} {tuple(a.shape)}, this optimizer's is "
                                 f"{buf.dtype} {tuple(buf.shape)}")
            xp = bk.get_array_module(a)
            if not bool(xp.isfinite(a).all()):
                raise ValueError(f"{where}: the state array {key} holds NaN or inf values")
            if key.endswith(self._nonnegative_state) and bool((a < 0).any()):
                raise ValueError(f"{where}: the state array {key} holds negative values (a second moment is >= 0)")

    def _saved_group_options(self, meta: dict, where: str) -> list[dict]:
        """Each group's saved options, checked against this optimizer's groups (nothing is changed)."""
        def unlist(value):
            return tuple(value) if isinstance(value, list) else value

        saved_groups = meta.get("param_groups")
        if saved_groups is None:  # a state saved before parameter groups existed: one group
            if len(self.param_groups) != 1:
                raise ValueError(f"{where}: the state has one parameter group, this optimizer {len(self.param_groups)}")
            saved_groups = [{key: value for key, value in meta["hyperparameters"].items() if key in self._group_options}]
        else:
            ours = [[n for n, g in zip(self.names, self.group_of) if g == k] for k in range(len(self.param_groups))]
            theirs = [list(group["params"]) for group in saved_groups]
            if ours != theirs:
                raise ValueError(
                    f"{where}: the saved parameter groups {[len(t) for t in theirs]} (parameters per group) do not "
                    f"match this optimizer's {[len(o) for o in ours]}, or hold other names; build the optimizer "
                    "from the same groups (e.g. the same lora_plus_param_groups call)"
                )
        return [{key: self._check_option(key, unlist(value)) for key, value in group.items()
                 if key in self._group_options} for group in saved_groups]
