"""Compiled training and evaluation over all devices: the `jit` and `pmap` back ends.

Both back ends offer the same methods, so the loop does not care which one runs:

- device-resident fast path: the whole training split (uint8) lives on the device(s);
  `train_steps(state, data, first_step, n)` runs n steps, each gathering its batch by the
  data-order contract and preprocessing it on device, so the host never touches a batch.
  Two ways to run the n steps, both chunking-invariant (the result does not depend on how
  steps are grouped into calls, bit for bit):
    * `compiled_loop=True`: one call runs all n steps in a `lax.fori_loop` whose trip count is
      a traced value (every chunk length shares one executable);
    * `compiled_loop=False`: one asynchronous dispatch per step of a compiled single step,
      with the metric sums carried on device (the host only syncs at the end of the chunk).
      On XLA:CPU this is the faster one: inside a while loop the convolution gradients
      are not canonicalised onto the fast Eigen kernels (measured 5x slower for LeNet-5 and
      50x for the small ConvNet, benchmarks/RESULTS.md), and dispatch costs ~0.1 ms against
      a 6-80 ms step.
- streaming: `train_batch(state, batch)` for host-fed uint8 batches.
- evaluation: `evaluate_resident(state, data)` / `eval_batch(state, batch)` return masked sums.

Data order (`cnn_jax.data.order`): step s belongs to epoch e = s // steps_per_epoch, whose
permutation is `permutation(fold_in(data_key, e), N)`; its batch is perm[i*B:(i+1)*B] with
i = s % steps_per_epoch. A call never crosses an epoch boundary, so the permutation is computed
once per call (loop) or once per epoch (per-step dispatch) instead of once per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax import fast_paths, parallel
from cnn_jax.data.order import epoch_permutation
from cnn_jax.train import steps as steps_lib
from cnn_jax.train.state import TrainState, abstract_train_state, create_train_state

# preprocess(images_u8 [B, H, W, C], key, train) -> float32 [B, H', W', C]
PreprocessFn = Callable[[jax.Array, jax.Array, bool], jax.Array]
PMAP_AXIS = "batch"
TRAIN_SUMS = ("loss", "accuracy", "top5_accuracy")


class ResidentSplit(NamedTuple):
    """A split held on device: images uint8 [N, H, W, C], labels int32 [N], mask float32 [N]."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the compiled functions close over besides model and optimizer."""

    batch_size: int  # global train batch
    eval_batch_size: int  # global eval batch
    steps_per_epoch: int
    data_key: jax.Array  # uint32[2]: epoch permutations
    aug_key: jax.Array  # uint32[2]: augmentation of step s uses fold_in(aug_key, s)
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    compiled_loop: bool = False  # device-resident steps in one lax loop per call


def default_compiled_loop(devices) -> bool:
    """Per-step dispatch on CPU (see the module docstring), one compiled loop elsewhere."""
    return devices[0].platform != "cpu"


def pad_eval_split(
    images: np.ndarray, labels: np.ndarray, eval_batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads a split to a multiple of `eval_batch_size`; mask marks the real examples.

    images: uint8 [N, H, W, C], labels: int [N] -> padded images, labels int32, mask float32.
    """
    n = len(labels)
    pad = -(-n // eval_batch_size) * eval_batch_size - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels.astype(np.int32), np.zeros((pad,), np.int32)])
    mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    return images, labels, mask


def _zero_sums() -> dict:
    sums = {k: np.zeros((), np.float32) for k in TRAIN_SUMS}
    sums["first_bad_step"] = np.asarray(-1, np.int32)
    return sums


def _accumulate(sums: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds a step's metrics; records the first step whose loss is NaN/inf (-1 while finite)."""
    new = {k: sums[k] + metrics[k] for k in TRAIN_SUMS}
    bad = sums["first_bad_step"]
    new["first_bad_step"] = jnp.where((bad < 0) & ~jnp.isfinite(metrics["loss"]), step, bad)
    return new


class _Backend:
    """The step logic shared by both back ends; subclasses supply the parallel view.

    Subclass hooks: `_batch_slice` (which examples of a global batch this program handles),
    `_aug_key`, `_constrain` (sharding annotation), `_compile`, and the placement methods.
    """

    name = ""

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        preprocess: PreprocessFn,
        settings: StepSettings,
        devices=None,
    ):
        self.model = model
        self.tx = tx
        self.preprocess = preprocess
        self.settings = settings
        self.devices = list(jax.devices() if devices is None else devices)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.num_devices = len(self.devices)
        self._perm_cache: tuple[int, object] | None = None
        self._perm_fn = None
        self._setup()
        s = self.settings
        self._train_step = steps_lib.make_train_step(
            model,
            tx,
            label_smoothing=s.label_smoothing,
            grad_accum_steps=s.grad_accum_steps,
            axis_name=self.axis_name,
            microbatch_sharding=self._microbatch_sharding(),
        )
        self._eval_step = steps_lib.make_eval_step(model, axis_name=self.axis_name)
        self.resident_step_fn = self._compile(self._resident_step, donate=(0, 1))
        self.resident_loop_fn = self._compile(self._resident_loop, donate=(0, 1))
        self.train_batch_fn = self._compile(self._train_batch, donate=(0,))
        self.evaluate_resident_fn = self._compile(self._evaluate_resident)
        self.eval_batch_fn = self._compile(self._eval_batch)

    axis_name: str | None = None

    def _setup(self) -> None: ...

    def _microbatch_sharding(self):
        return None

    def abstract_state(self, image_shape: tuple[int, ...]) -> TrainState:
        """Shapes of the host-layout state (as saved in checkpoints)."""
        return abstract_train_state(self.model, self.tx, image_shape)

    # -- traced bodies -----------------------------------------------------------------------
    def _prepared_train_step(self, state, images_u8, labels):
        images = self._constrain(self.preprocess(images_u8, self._aug_key(state.step), True))
        return self._train_step(state, {"image": images, "label": labels})

    def _resident_step(self, state: TrainState, sums: dict, data: ResidentSplit, perm):
        """One step on the batch of `state.step`, gathered from the resident split."""
        s = self.settings
        start = (state.step % s.steps_per_epoch) * s.batch_size
        idx = self._constrain(self._batch_slice(perm, start, s.batch_size))
        step = state.step
        state, metrics = self._prepared_train_step(
            state, self._constrain(data.images[idx]), data.labels[idx]
        )
        return state, _accumulate(sums, metrics, step)

    def _resident_loop(self, state: TrainState, sums: dict, data: ResidentSplit, num_steps):
        """`num_steps` steps (all in the epoch of `state.step`) in one `lax.fori_loop`."""
        perm = self._epoch_perm(state.step // self.settings.steps_per_epoch, data.labels.shape[0])

        def body(_, carry):
            return self._resident_step(*carry, data, perm)

        return jax.lax.fori_loop(0, num_steps, body, (state, sums))

    def _epoch_perm(self, epoch, num_examples: int):
        return epoch_permutation(self.settings.data_key, epoch, num_examples).astype(jnp.int32)

    def _train_batch(self, state: TrainState, batch: dict):
        step = state.step
        state, metrics = self._prepared_train_step(state, batch["image"], batch["label"])
        return state, _accumulate(_zero_sums(), metrics, step)

    def _eval_sums(self, state, images_u8, labels, mask):
        images = self._constrain(self.preprocess(images_u8, jax.random.PRNGKey(0), False))
        return self._eval_step(state, {"image": images, "label": labels, "mask": mask})

    def _evaluate_resident(self, state: TrainState, data: ResidentSplit):
        eb = self.settings.eval_batch_size

        def body(j, sums):
            take = lambda a: self._constrain(self._batch_slice(a, j * eb, eb))
            part = self._eval_sums(state, take(data.images), take(data.labels), take(data.mask))
            return jax.tree.map(jnp.add, sums, part)

        zeros = {k: jnp.zeros((), jnp.float32) for k in steps_lib.EVAL_SUMS}
        return jax.lax.fori_loop(0, data.labels.shape[0] // eb, body, zeros)

    def _eval_batch(self, state: TrainState, batch: dict):
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        return self._eval_sums(state, batch["image"], batch["label"], mask)

    # -- public calls ------------------------------------------------------------------------
    def train_steps(self, state: TrainState, data: ResidentSplit, first_step: int, num_steps: int):
        """Runs steps first_step .. first_step + num_steps - 1 (one epoch at most) on the
        resident split. `first_step` must equal state.step. Returns (state, sums) with sums
        {'loss', 'accuracy', 'top5_accuracy': summed over the steps, 'first_bad_step'} on
        device (fetch them with `jax.device_get`)."""
        spe = self.settings.steps_per_epoch
        assert first_step // spe == (first_step + num_steps - 1) // spe, "crosses an epoch"
        sums = self._put_replicated(_zero_sums())
        if self.settings.compiled_loop:
            n = self._put_replicated(np.asarray(num_steps, np.int32))
            state, sums = self.resident_loop_fn(state, sums, data, n)
        else:
            perm = self._cached_perm(first_step // spe, data)
            for _ in range(num_steps):
                state, sums = self.resident_step_fn(state, sums, data, perm)
        return state, self._unreplicate_output(sums)

    def _cached_perm(self, epoch: int, data: ResidentSplit):
        """The permutation of `epoch`, computed on device once per epoch."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            if self._perm_fn is None:
                self._perm_fn = self._compile_perm(data)
            perm = self._perm_fn(self._put_replicated(np.asarray(epoch, np.int32)))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def train_batch(self, state: TrainState, batch: dict):
        """One step on a host batch (process-local slice, uint8) -> (state, sums)."""
        state, sums = self.train_batch_fn(state, self.put_batch(batch))
        return state, self._unreplicate_output(sums)

    def evaluate_resident(self, state: TrainState, data: ResidentSplit):
        return self._unreplicate_output(self.evaluate_resident_fn(state, data))

    def eval_batch(self, state: TrainState, batch: dict):
        return self._unreplicate_output(self.eval_batch_fn(state, self.put_batch(batch)))


class JitBackend(_Backend):
    """One global program over a 1-D mesh: params replicated, batches sharded along 'data'."""

    name = "jit"

    def _setup(self) -> None:
        self.mesh: Mesh = parallel.make_mesh(self.devices)
        self.replicated = parallel.replicated(self.mesh)
        self.sharded = parallel.data_sharded(self.mesh)

    def _microbatch_sharding(self):
        if self.settings.grad_accum_steps == 1:
            return None
        return NamedSharding(self.mesh, PartitionSpec(None, parallel.DATA_AXIS))

    def _compile(self, fn, donate=()):
        return jax.jit(
            fn, donate_argnums=donate, out_shardings=self.replicated,
            compiler_options=fast_paths.compiler_options(self.devices),
        )

    def _compile_perm(self, data: ResidentSplit):
        n = data.labels.shape[0]
        return jax.jit(lambda epoch: self._epoch_perm(epoch, n), out_shardings=self.replicated)

    # traced hooks: the global view
    def _batch_slice(self, a, start, size):
        return jax.lax.dynamic_slice_in_dim(a, start, size)

    def _aug_key(self, step):
        return jax.random.fold_in(self.settings.aug_key, step)

    def _constrain(self, x):
        return jax.lax.with_sharding_constraint(x, self.sharded)

    # placement
    def create_state(self, image_shape: tuple[int, ...], rng: jax.Array) -> TrainState:
        return create_train_state(self.model, self.tx, image_shape, rng, self.replicated)

    def to_device_state(self, host_state: TrainState) -> TrainState:
        return self._put_replicated(jax.tree.map(np.asarray, host_state))

    def to_host_layout(self, state: TrainState) -> TrainState:
        return state  # already one logical copy

    def put_resident(self, images, labels, mask=None) -> ResidentSplit:
        mask = np.ones(len(labels), np.float32) if mask is None else mask
        return ResidentSplit(*self._put_replicated([np.asarray(a) for a in (images, labels, mask)]))

    def put_batch(self, batch: dict) -> dict:
        """A process-local slice of a global batch -> global arrays sharded along 'data'."""
        return {
            k: jax.make_array_from_process_local_data(self.sharded, np.asarray(v))
            for k, v in batch.items()
        }

    def _put_replicated(self, tree):
        """Host values every process holds in full -> global replicated arrays (multi-host safe)."""
        return jax.tree.map(
            lambda v: jax.make_array_from_callback(np.shape(v), self.replicated, lambda i: v[i]),
            tree,
        )

    def _unreplicate_output(self, tree):
        return tree


class PmapBackend(_Backend):
    """`jax.pmap` over the local devices with axis 'batch'; the state is stacked per device.

    Differences from `jit` (both from per-device execution): BatchNorm normalises with each
    device's own batch statistics (running averages are then averaged over devices), and
    dropout / augmentation draw per-device random numbers (`fold_in(key, device_index)`).
    Without BatchNorm, dropout and random augmentation, both give the same updates up to
    float32 rounding. `jax.pmap` takes no compiler options, so on CPU this back end runs without
    `fast_paths.compiler_options` (single-threaded YNNPACK convolutions); `jit` is the CPU default.
    """

    name = "pmap"
    axis_name = PMAP_AXIS

    def _setup(self) -> None:
        self.per_device_batch = self.settings.batch_size // self.num_devices
        self.per_device_eval_batch = self.settings.eval_batch_size // self.num_devices

    def _compile(self, fn, donate=()):
        return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=donate)

    def _compile_perm(self, data: ResidentSplit):
        n = data.labels.shape[1]  # [local devices, N]
        return jax.pmap(lambda epoch: self._epoch_perm(epoch, n), devices=self.devices)

    # traced hooks: the per-device view (`size` is the global batch; take this device's part)
    def _batch_slice(self, a, start, size):
        local = size // self.num_devices
        return jax.lax.dynamic_slice_in_dim(a, start + jax.lax.axis_index(PMAP_AXIS) * local, local)

    def _aug_key(self, step):
        key = jax.random.fold_in(self.settings.aug_key, step)
        return jax.random.fold_in(key, jax.lax.axis_index(PMAP_AXIS))

    def _constrain(self, x):
        return x

    # placement
    def _put_replicated(self, tree):
        return flax.jax_utils.replicate(tree, devices=self.local_devices)

    def _unreplicate_output(self, tree):
        """Outputs equal on every device (psum/pmean results): keep one."""
        return jax.tree.map(lambda x: x[0], tree)

    def create_state(self, image_shape: tuple[int, ...], rng: jax.Array) -> TrainState:
        return self._put_replicated(create_train_state(self.model, self.tx, image_shape, rng))

    def to_device_state(self, host_state: TrainState) -> TrainState:
        return self._put_replicated(jax.tree.map(np.asarray, host_state))

    def to_host_layout(self, state: TrainState) -> TrainState:
        return flax.jax_utils.unreplicate(state)

    def put_resident(self, images, labels, mask=None) -> ResidentSplit:
        mask = np.ones(len(labels), np.float32) if mask is None else mask
        return ResidentSplit(*(self._put_replicated(np.asarray(a)) for a in (images, labels, mask)))

    def put_batch(self, batch: dict) -> dict:
        """Process-local batch [B_local, ...] -> [local devices, B_local / devices, ...]."""
        d = len(self.local_devices)
        return {k: np.asarray(v).reshape(d, -1, *np.shape(v)[1:]) for k, v in batch.items()}


BACKENDS = {"jit": JitBackend, "pmap": PmapBackend}


def make_backend(name: str, *args, **kwargs) -> _Backend:
    """`JitBackend` or `PmapBackend` by config name ('jit' | 'pmap')."""
    return BACKENDS[name](*args, **kwargs)
