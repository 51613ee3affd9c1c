"""Training checkpoints: orbax CheckpointManager over one workdir, resumable onto any mesh.

Each step directory `<workdir>/checkpoints/<step>/` holds three items:
  state:  the train-state pytree (policy params, optimizer state, step, rng, ...) as sharded arrays (OCDBT);
          typed PRNG keys are stored as their raw key data and re-wrapped on restore.
  data:   the data-iterator state (JSON; `bytes` states such as grain's are base64-wrapped).
  meta:   the run config (JSON) and bookkeeping (PRNG key implementations, wall time).

Saves are asynchronous: `save` returns once arrays are copied off the devices and orbax writes in the
background; a step directory only appears (atomic rename) once every item is complete, so a run killed with
`kill -9` mid-write leaves the previous checkpoint as the latest usable one. SIGTERM (the usual preemption
notice) sets a flag: the next `should_save` is True, and `should_stop` turns True once that save is done (a
signal arriving between a save and the stop check therefore costs one more step, never a lost checkpoint).

Restoring takes an *abstract* target (`parallel.abstract_with_shardings`): arrays are read straight into the
target's shardings, so a run saved on one mesh restores onto another.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from balcap_jax.parallel.sharding import map_with_names, path_to_str

_log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
_BYTES_TAG = "__base64_bytes__"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every_steps: periodic save interval (0 disables periodic saves; preemption saves still happen).
    keep_last: how many most recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
    save_on_signals: signals that request a save-and-stop (SIGTERM is what schedulers send before a kill);
      single process only: multi-process runs use jax.distributed's preemption notice (see `should_save`).
    """

    save_every_steps: int = 100
    keep_last: int | None = 3
    async_save: bool = True
    save_on_signals: Sequence[int] = (signal.SIGTERM,)

    def __post_init__(self):
        if self.save_every_steps < 0:
            raise ValueError(f"checkpoint.save_every_steps={self.save_every_steps}: use >= 1, or 0 to disable")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: keep at least 1 (or None to keep all)")


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: Any
    config: dict[str, Any] | None


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _encode_keys(state: Any) -> tuple[Any, dict[str, str]]:
    """Typed PRNG keys -> raw uint32 key data (what orbax can store), plus {path: key implementation}."""
    impls: dict[str, str] = {}

    def encode(name: str, leaf: Any) -> Any:
        if _is_key(leaf):
            impls[name] = str(jax.random.key_impl(leaf))
            return jax.random.key_data(leaf)
        return leaf

    return map_with_names(encode, state), impls


def _key_data_target(leaf: Any) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def _encode_json(value: Any) -> Any:
    return {_BYTES_TAG: base64.b64encode(value).decode()} if isinstance(value, bytes) else value


def _decode_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_BYTES_TAG}:
        return base64.b64decode(value[_BYTES_TAG])
    return value


def config_to_json(config: Any) -> dict[str, Any] | None:
    """An ml_collections ConfigDict (or any mapping) as plain JSON-able data."""
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


class Checkpointer:
    """Periodic + preemption-triggered async checkpoints of a training run, with keep-last-k and resume.

    Typical loop:
        ckpt = Checkpointer(workdir, CheckpointConfig(save_every_steps=50))
        if (restored := ckpt.restore(abstract_state)) is not None: state, data_state = ...
        for step in range(start, total):
            state = train_step(state, batch)
            if ckpt.should_save(step + 1):
                ckpt.save(step + 1, state, data_state=iterator.get_state(), config=config)
            if ckpt.should_stop:
                break
        ckpt.close()  # waits for the last async write
    """

    def __init__(self, workdir: str | Path, config: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last,
            enable_async_checkpointing=config.async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a killed write are removed, never mistaken for a step
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, META))
        self._preempted = threading.Event()
        self._saved_since_preemption = False
        self._warned_no_preemption_service = False
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_handlers()

    # ---- preemption ---------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if jax.process_count() > 1:
            # jax.distributed's preemption sync manager owns SIGTERM and makes every process agree on the step
            # to save at (`should_save`); a local handler would let one process decide alone and deadlock.
            return
        if threading.current_thread() is not threading.main_thread():
            _log.warning("Checkpointer created off the main thread: no save-on-signal handlers installed")
            return
        for signum in self.config.save_on_signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        _log.warning("received %s: saving a checkpoint at the next step, then stopping", signal.Signals(signum).name)
        self._preempted.set()

    @property
    def preemption_requested(self) -> bool:
        """True once a save-on-signal arrived (in multi-process runs: on any process, agreed collectively)."""
        return self._preempted.is_set()

    @property
    def should_stop(self) -> bool:
        """True once a preemption was requested *and* a checkpoint was saved after it: the loop may exit."""
        return self._saved_since_preemption

    def request_preemption(self) -> None:
        """What the signal handler does (single process); for schedulers that notify differently, and tests."""
        self._preempted.set()

    # ---- saving -------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True at every `save_every_steps`-th step and at the first step after a preemption notice.

        Multi-process runs must call this on every process at every step: the preemption decision is agreed
        collectively (`multihost_utils.reached_preemption_sync_point`), so all processes save the same step.
        """
        if jax.process_count() > 1 and not self._preempted.is_set():
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self._preempted.set()
            except (RuntimeError, ValueError) as error:  # no preemption service in this jax.distributed setup
                if not self._warned_no_preemption_service:
                    _log.warning("preemption sync unavailable (%s): only periodic saves", error)
                    self._warned_no_preemption_service = True
        every = self.config.save_every_steps
        return self._preempted.is_set() or (every > 0 and step % every == 0)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        config: Any = None,
        wait: bool | None = None,
    ) -> bool:
        """Saves `state` (pytree of arrays), the iterator state (JSON or bytes) and the config at `step`.

        Returns False if `step` is already saved. Waits for the write to finish when a preemption was requested
        (the process is about to die) or `wait=True`; otherwise returns while orbax writes in the background.
        """
        preempted = self._preempted.is_set()
        if step in self._manager.all_steps():
            self._saved_since_preemption |= preempted
            return False
        encoded, key_impls = _encode_keys(state)
        meta = {"config": config_to_json(config), "key_impls": key_impls, "saved_at_unix": time.time()}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(encoded),
                    DATA: ocp.args.JsonSave(_encode_json(data_state)),
                    META: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        if wait or (wait is None and preempted):
            self._manager.wait_until_finished()
        self._saved_since_preemption |= preempted
        _log.info("checkpoint step %d %s to %s", step, "saving" if saved else "skipped", self.directory)
        return saved

    def wait(self) -> None:
        self._manager.wait_until_finished()

    # ---- restoring ----------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored | None:
        """Restores `step` (default: the latest) into the shardings of `abstract_state`; None if none exists.

        abstract_state: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or arrays, shaped like what was
        saved; leaves without a sharding land on the first device.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        default = SingleDeviceSharding(jax.devices()[0])

        def target(leaf: Any) -> jax.ShapeDtypeStruct:
            sharding = getattr(leaf, "sharding", None) or default
            leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            return _key_data_target(leaf) if _is_key(leaf) else leaf

        abstract = jax.tree.map(target, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract), DATA: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()}
            ),
        )
        meta = restored[META] or {}
        impls: Mapping[str, str] = meta.get("key_impls", {})
        state = jax.tree_util.tree_map_with_path(
            lambda path, leaf, want: jax.random.wrap_key_data(leaf, impl=impls[path_to_str(path)])
            if _is_key(want)
            else leaf,
            restored[STATE],
            abstract_state,
        )
        return Restored(step=step, state=state, data_state=_decode_json(restored[DATA]), config=meta.get("config"))

    def restore_data_state(self, step: int | None = None) -> Any:
        """Only the data-iterator state of `step` (default: the latest), e.g. to learn what the state item holds
        before building its restore target; None if no checkpoint exists."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))
        return _decode_json(restored[DATA])

    def close(self) -> None:
        """Waits for pending writes and restores the previous signal handlers."""
        self._manager.wait_until_finished()
        self._manager.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
