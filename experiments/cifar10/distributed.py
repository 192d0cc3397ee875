"""Several JAX processes (one per host) as one run: start-up, fault timeouts, per-process batches.

One process per host (or per GPU) runs the same command; ``jax.distributed`` connects
them and ``jax.devices()`` then lists every device of every process, so the experiment's
``Mesh`` spans all of them and one compiled step runs on all. Each process feeds only
the rows of a global batch that live on its own devices.

Example (two processes on one machine; ``--coordinator-address`` names process 0's host)::

    python -m experiments.cifar10 --workdir runs/c --coordinator-address 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0 &
    python -m experiments.cifar10 --workdir runs/c --coordinator-address 127.0.0.1:12355 \\
        --num-processes 2 --process-id 1
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from .errors import BadInputError

# JAX's defaults (300 s to start, 100 s without heartbeats, 300 s in the shutdown barrier)
# keep the survivors of a dead peer alive for minutes; these end such a run in seconds.
INIT_TIMEOUT_S = 120  # how long a process waits for all the others to start
HEARTBEAT_TIMEOUT_S = 10  # a process silent this long is dead, and the run with it
SHUTDOWN_TIMEOUT_S = 30  # how long a finished process waits for the others to finish
# Processes must meet at each collective within gloo's fixed 30 s (CPU runs), so after work
# only some do (compiling at different speeds, process 0 writing plots) they first meet at a
# barrier of the coordination service, which waits this long.
BARRIER_TIMEOUT_S = 1800
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")  # gRPC's


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a run, as ``jax.distributed.initialize`` takes it.

    Attributes:
      coordinator_address: ``HOST:PORT`` of process 0, the same for all; None where the
        cluster (SLURM, Open MPI, Cloud TPU) tells JAX itself.
      num_processes: processes in the run; None: detected.
      process_id: this process's index in ``0 .. num_processes - 1``; None: detected.
      init_timeout_s: seconds to wait for all processes to start.
      heartbeat_timeout_s: seconds after which a silent process counts as dead.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = INIT_TIMEOUT_S
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise BadInputError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or np.inf):
            raise BadInputError(f"--process-id must be in 0 .. --num-processes - 1, got {self.process_id}")
        if self.coordinator_address is not None:
            _split_address(self.coordinator_address)
        for name in ("init_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name[:-2].replace('_', '-')} must be >= 1 second, got {getattr(self, name)}")

    @property
    def explicit(self) -> bool:
        """Whether any of JAX's three flags was given (else the cluster may be detected)."""
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def initialize(cluster: Cluster) -> None:
    """Joins the run ``cluster`` describes; must come before anything touches a device.

    Without flags, a cluster that JAX detects (SLURM, Open MPI, Cloud TPU, Kubernetes;
    :func:`detected_cluster`) is joined, and a failure to join it is an error; with no
    cluster detected the run is one process. With flags, a mistake is an error:

    - the coordinator's host is added to ``no_proxy``, since gRPC would otherwise send the
      processes' own connections through an ``http_proxy``;
    - process 0 first checks that the coordinator's port is free on its host (JAX would
      crash on a busy one);
    - the other processes first wait up to ``init_timeout_s`` for the coordinator's port
      to accept connections, and raise if it never does;
    - a process still missing after ``init_timeout_s`` makes JAX abort the others (in C++,
      so no Python error can be raised); the line printed before explains that abort.

    Args:
      cluster: the flags.

    Raises:
      BadInputError: a busy port, processes that did not all start in time, or a detected
        cluster that could not be joined (never N independent runs in one workdir).
    """
    if not cluster.explicit:
        found = detected_cluster()
        if found is None:
            return  # one process
        try:
            jax.distributed.initialize(initialization_timeout=cluster.init_timeout_s,
                                       heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
                                       shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
        except Exception as e:  # JaxRuntimeError, or RuntimeError when JAX is already in use
            raise BadInputError(
                f"JAX detected a {found} cluster but this process could not join it ({type(e).__name__}: {e}); "
                "running on as one process would make every task a separate run writing into one workdir. "
                "Pass --coordinator-address/--num-processes/--process-id, or run outside the cluster job."
            ) from e
        return
    if cluster.coordinator_address is not None:
        host, port = _split_address(cluster.coordinator_address)
        _bypass_proxy(host)
        if cluster.process_id == 0:
            _check_port_free(port)
        else:
            _wait_for_coordinator(host, port, cluster)
    print(f"process {cluster.process_id} of {cluster.num_processes}: joining the run at "
          f"{cluster.coordinator_address}; if JAX aborts with DEADLINE_EXCEEDED, a process did not start "
          f"within --init-timeout {cluster.init_timeout_s} s", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(
            cluster.coordinator_address, cluster.num_processes, cluster.process_id,
            initialization_timeout=cluster.init_timeout_s, heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except (ValueError, RuntimeError) as e:
        if isinstance(e, jax.errors.JaxRuntimeError):
            raise _join_error(cluster, e) from e
        raise  # JAX's own words on the flags
    except Exception as e:  # XlaRuntimeError on older JAX versions (deadline exceeded, unavailable, ...)
        raise _join_error(cluster, e) from e


def _join_error(cluster: Cluster, e: Exception) -> BadInputError:
    return BadInputError(
        f"process {cluster.process_id} could not join the run at {cluster.coordinator_address} "
        f"within {cluster.init_timeout_s} s: were all {cluster.num_processes} processes started with the "
        f"same --coordinator-address and --num-processes, and can they reach it? ({type(e).__name__}: {e})"
    )


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX's ``jax.distributed.initialize()`` would detect, or None.

    JAX's own detection, in its order (the first cluster class, not opt-in only, whose
    ``is_env_present`` is true), so this sees what ``initialize()`` without arguments uses.
    """
    # The one use of JAX internals in the project: no public API lists the cluster environments.
    # tests/test_multiprocess.py calls this, so a JAX that moves them fails there with this message.
    try:
        from jax._src import clusters

        environments = list(clusters.ClusterEnv._cluster_types)
        found = [env.__name__ for env in environments if not env.opt_in_only_method and env.is_env_present()]
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            f"jax {jax.__version__} no longer has jax._src.clusters.ClusterEnv._cluster_types (or its fields), "
            "which detected_cluster reads to name the cluster jax.distributed.initialize() would join: "
            "update experiments/cifar10/distributed.py"
        ) from error
    return found[0] if found else None


def _bypass_proxy(host: str) -> None:
    if not any(os.environ.get(name) for name in PROXY_VARIABLES):
        return  # JAX warns about any proxy variable, no_proxy included: add none needlessly
    for name in ("no_proxy", "NO_PROXY"):
        entries = [e for e in os.environ.get(name, "").split(",") if e]
        if host not in entries:
            os.environ[name] = ",".join([*entries, host])


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As a server socket: an old connection in TIME_WAIT does not make the port busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            raise BadInputError(
                f"--coordinator-address: port {port} is already in use on this host (process 0's); "
                f"choose another port ({e.strerror})"
            ) from e


def _wait_for_coordinator(host: str, port: int, cluster: Cluster) -> None:
    deadline = time.monotonic() + cluster.init_timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise BadInputError(
                    f"process {cluster.process_id} could not reach the coordinator at {host}:{port} within "
                    f"--init-timeout {cluster.init_timeout_s} s ({e}): is process 0 running with the same "
                    "--coordinator-address, and is its host reachable from here?"
                ) from e
            time.sleep(0.2)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (unique per call); no-op alone.

    A coordination-service barrier, not a collective: it has no 30 s gloo deadline.
    """
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(
            name, timeout=BARRIER_TIMEOUT_S, processes=set(range(jax.process_count())))


def is_primary() -> bool:
    """Whether this is process 0, the one that writes outputs and prints progress."""
    return jax.process_index() == 0


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a global batch that live on this process's devices (one contiguous block).

    Args:
      sharding: the batch sharding (along the leading axis).
      batch_size: the global batch.

    Returns:
      A slice into the global batch.
    """
    index = sharding.addressable_devices_indices_map((batch_size,))
    starts = sorted({(s.start or 0, s.stop or batch_size) for (s,) in index.values()})
    for (_, stop), (start, _) in zip(starts, starts[1:]):
        if stop != start:
            raise ValueError(f"this process's rows of the batch are not contiguous: {starts}")
    return slice(starts[0][0], starts[-1][1])


def global_batch(sharding: NamedSharding, batch_size: int, *local: np.ndarray) -> tuple[jax.Array, ...]:
    """Assembles global arrays from each process's rows (:func:`process_rows`) of them.

    Args:
      sharding: the batch sharding.
      batch_size: the global batch.
      *local: this process's rows of each array.

    Returns:
      One global array per input, of leading dimension ``batch_size``.
    """
    return tuple(
        jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:])) for rows in local
    )
