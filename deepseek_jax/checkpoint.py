"""Run checkpoints: orbax CheckpointManager with the train state and the data iterator's state.

Saves are async and atomic (orbax writes to a temporary directory and renames it when complete,
so a half-written step is never listed). A checkpoint that exists but cannot be read is an
error naming the step and directory; a run never silently starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from deepseek_jax.config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message says which and what to do."""


def _plain_array_saves_on_cpu() -> None:
    """Orbax splits replicated arrays across replicas with one compiled slice per replica and array:
    worth it on accelerator pods, but on CPU it costs seconds of compiling on the first save."""
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        _plain_array_saves_on_cpu()
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, wait: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state laid out like `abstract_state` (ShapeDtypeStructs with shardings), data state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many kinds; all mean the same to the user
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {e}). "
                "It may be corrupt or from a different model config; delete that step directory to resume "
                "from an earlier one, or start a fresh --workdir") from e
        return step, out.state, out.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish any save still in flight, then release the manager."""
        self.wait()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`, the restore target for orbax."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def is_run(path: str) -> bool:
    """A training workdir: config.json from launch.train beside a checkpoints/ directory."""
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, "config.json"))


def run_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig of a training run, from the `model` section of its config.json."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            model = json.load(f)["model"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not the config.json of a launch.train run ({e}); point at a training "
                              "workdir, or use --hf_dir for a HuggingFace checkpoint") from e
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})


def restore_params(directory: str, like: Any, step: int | None = None) -> tuple[int, Any]:
    """Only the params of a training checkpoint (not the optimizer state), placed like `like` (arrays or
    ShapeDtypeStructs with shardings). A checkpoint of another shape is a CheckpointError naming the step."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {os.path.abspath(directory)}: train first (python -m launch.train "
                              "--workdir=...), or wait for its first checkpoint_every steps")
    item = {"params": abstract_like(like)}
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    except Exception as e:  # orbax raises many kinds; all mean the same to the user
        raise CheckpointError(
            f"cannot restore the params of step {step} in {os.path.abspath(directory)} ({type(e).__name__}: "
            f"{str(e)[:500]}); the checkpoint may be corrupt, or not match its run's config.json") from e
    finally:
        manager.close()
    return step, out.state["params"]


def load_run(workdir: str, step: int | None = None, shardings: Any = None) -> tuple[ModelConfig, Any, int]:
    """(model config, float32 params, step) of a training run's latest (or given) checkpoint; params on the
    default device, or in `shardings` (a pytree like the params)."""
    from deepseek_jax.model import abstract_params

    workdir = os.path.abspath(workdir)
    if not is_run(workdir):
        raise CheckpointError(f"{workdir} is not a training workdir (it needs config.json and checkpoints/ "
                              "from python -m launch.train)")
    cfg = run_model_config(workdir)
    like = nn.meta.unbox(abstract_params(cfg))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, like)
    like = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    step, params = restore_params(os.path.join(workdir, "checkpoints"), like, step)
    return cfg, params, step


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict]:
    """While open, SIGTERM (a preemption, `kill`) only sets flag["signal"]: the training loop saves its step and
    exits cleanly instead of dying mid-step. The previous handler comes back on exit."""
    flag: dict = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda sig, _: flag.update(signal=sig))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
