"""Data parallelism over every device of every host: one 1-D 'batch' mesh and global arrays.

The step is written per device, as under pmap (axis 'batch'), and mapped with `jax.shard_map` under
`jax.jit`. State is replicated (spec P()), batches are split along the batch axis (spec P('batch')).
"""

import itertools
import queue
import threading

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_sharded(mesh):
  return NamedSharding(mesh, P(AXIS))


_barriers = (
  itertools.count()
)  # every process calls sync_processes in the same order: the same numbers


def sync_processes(name: str, timeout_s: int = 600):
  """Waits until every process reaches `name`: at the coordination service, not with a collective.

  gloo's CPU collectives give up after a fixed 30 s, so processes that drifted apart (imports, data loading
  and model init on a busy machine) must meet here before their first collective. A no-op in one process.
  multihost_utils.sync_global_devices is such a collective (its source: an all-gather of the name's
  crc32 over every device), and its broadcast_one_to_all a psum of arrays, not strings of any length.
  """
  if jax.process_count() > 1:
    # The coordination client has no public handle; orbax reaches it the same way.
    from jax._src import distributed

    client = distributed.global_state.client
    client.wait_at_barrier(f'{name}-{next(_barriers)}', timeout_in_ms=timeout_s * 1000)


_shared = itertools.count()  # every process calls from_process_zero in the same order


def from_process_zero(name: str, value: str = '', timeout_s: int = 600) -> str:
  """Process 0's `value` on every process, through the coordination service's key-value store.

  Also a meeting point: the other processes wait for process 0 to get here (a decision such as the
  workdir lock's, which only process 0 may take). A no-op in one process.
  """
  if jax.process_count() == 1:
    return value
  from jax._src import distributed  # as in sync_processes

  client = distributed.global_state.client
  key = f'resnet_jax/{name}-{next(_shared)}'
  if jax.process_index() == 0:
    client.key_value_set(key, f'={value}')  # never empty
    return value
  return client.blocking_key_value_get(key, timeout_in_ms=timeout_s * 1000)[1:]


def from_all_processes(name: str, value: str, timeout_s: int = 600) -> list:
  """Every process's `value`, in process order, on every process (the key-value store, as above)."""
  if jax.process_count() == 1:
    return [value]
  from jax._src import distributed  # as in sync_processes

  client = distributed.global_state.client
  prefix = f'resnet_jax/{name}-{next(_shared)}'
  client.key_value_set(f'{prefix}/{jax.process_index()}', f'={value}')
  return [
    client.blocking_key_value_get(f'{prefix}/{i}', timeout_in_ms=timeout_s * 1000)[1:]
    for i in range(jax.process_count())
  ]


def map_step(fn, mesh, in_specs, out_specs, donate_argnums=()):
  """jit(shard_map(fn)): `fn` sees each device's share and may use collectives over AXIS."""
  return jax.jit(
    jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
    donate_argnums=donate_argnums,
  )


def to_global(batch, mesh):
  """This process's numpy batch -> global arrays split over the mesh (every process passes its share)."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch(batches, mesh, size=2, join_timeout_s=60.0):
  """Prepares and places `size` batches ahead on a background thread, so host work overlaps the step.

  Closing the generator stops the thread and waits for it: a thread still inside JAX when the interpreter
  exits can abort the process. The wait is bounded: a source blocked for good (a stuck reader) must not
  turn an error into a hang, so after `join_timeout_s` it says so and leaves the daemon thread behind.
  (flax's pmap-era `prefetch_to_device` builds per-device stacks, which shard_map inputs do not take.)
  """
  if size <= 0:
    yield from (to_global(b, mesh) for b in batches)
    return
  q = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return
      except queue.Full:
        continue

  def work():
    try:
      for b in batches:
        if stop.is_set():
          return
        put(to_global(b, mesh))
      put(done)
    except BaseException as e:  # surfaced in the consumer
      put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(join_timeout_s)
    if thread.is_alive():
      logging.warning(
        'The input thread is still blocked reading the data after %.0f s; going on without it.',
        join_timeout_s,
      )
