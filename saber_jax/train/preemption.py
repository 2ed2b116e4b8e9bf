"""Stopping a run cleanly on SIGTERM / SIGINT (a preempted TPU slice or cloud VM, Ctrl-C).

A loop that can resume (training, the reference pass, generate) asks `reached(step)` at
each of its step boundaries; once a stop was asked for, it finishes the step in flight,
saves that step, waits until the save is durable and raises `Stopped`, which `main`
turns into exit status 0 and one line saying where the run stopped.

Every process must stop at the same step. With `jax.distributed`, SIGTERM goes to JAX's
preemption service (its notifier catches the signal; the coordination service tells every
process), and `multihost_utils.reached_preemption_sync_point` is True on all processes at
the same step (the largest step any process had reached, plus one): no host sync per step,
the same mechanism Orbax's CheckpointManager reads. SIGINT is handed to it as a SIGTERM.
Without the preemption service (one process, or `jax_enable_preemption_service` off) the
signal sets a flag here, and with several processes the flags are OR-ed over processes at
each step boundary (a host sync per step: the fallback only).

A signal interrupts the system call of the thread it lands on, and a gloo connect cut
short that way fails the step (seen with two processes). So `main` blocks both signals
before JAX starts any thread (`block_signals`; threads inherit the mask) and one watcher
thread takes them with `sigwait`; for JAX's notifier the watcher re-raises SIGTERM on
itself, the one thread where its handler may run.

While a loop is stopping, a further signal only prints that the save is under way: it can
neither cut the checkpoint short nor leave it half written. Before a loop has begun to
stop (no loop running, e.g. a dry run), a second Ctrl-C aborts at once.
"""

import _thread
import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """A run stopped on request after saving its progress; `main` exits 0 with this text."""


class _State:
  listening = False
  asked = None           # the signal's name once one arrived (this process)
  stopping = False       # a loop is saving its last step
  previous = {}
  watcher = None         # the thread taking blocked signals (`block_signals`)


_state = _State()


def _jax_service() -> bool:
  """Whether JAX's preemption service (jax.distributed) takes SIGTERM in this process."""
  from jax._src import distributed   # the state `reached_preemption_sync_point` reads
  return distributed.global_state.preemption_sync_manager is not None


def block_signals() -> None:
  """Block SIGTERM and SIGINT in this thread and the threads it starts from now on (call
  it before JAX starts threads); `listen` then takes them in a watcher thread."""
  signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _on_signal(signum: int) -> None:
  name = signal.Signals(signum).name
  if _state.asked is not None or _state.stopping:
    if signum == signal.SIGINT and not _state.stopping:
      _thread.interrupt_main()      # Ctrl-C twice before any save began: abort at once
      return
    print(f'{name} again: already stopping; the checkpoint is being saved, please wait',
          file=sys.stderr, flush=True)
    return
  _state.asked = name
  print(f'{name} received: stopping after the step in flight', file=sys.stderr, flush=True)
  if _jax_service():
    _notify_jax()


def _notify_jax() -> None:
  """Hand the stop to JAX's preemption notifier (its SIGTERM handler tells every process)."""
  if threading.current_thread() is threading.main_thread():
    os.kill(os.getpid(), signal.SIGTERM)
    return
  # The watcher: SIGTERM is blocked everywhere; let it through on this thread alone.
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _handler(signum, frame):
  del frame
  if signum == signal.SIGINT and _state.asked is not None and not _state.stopping:
    raise KeyboardInterrupt         # Ctrl-C twice before any save began: abort at once
  _on_signal(signum)


def _watch() -> None:
  while True:
    _on_signal(signal.sigwait(SIGNALS))


def listen() -> None:
  """Take SIGTERM and SIGINT from here on (main calls it after jax.distributed is set up:
  with the preemption service, SIGTERM goes on to JAX's notifier). With the signals
  blocked (`block_signals`), a watcher thread takes them."""
  if _state.listening:
    return
  for signum in SIGNALS:
    if signum == signal.SIGTERM and _jax_service():
      continue
    _state.previous[signum] = signal.signal(signum, _handler)
  if set(SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, []):
    if _state.watcher is None:
      _state.watcher = threading.Thread(target=_watch, name='preemption-signals', daemon=True)
      _state.watcher.start()
  _state.listening = True


def stop_listening() -> None:
  """Restore the handlers `listen` replaced and forget a stop request (tests)."""
  for signum, previous in _state.previous.items():
    signal.signal(signum, previous)
  _state.previous, _state.listening, _state.asked, _state.stopping = {}, False, None, False


def reached(step: int) -> bool:
  """True when every process is to stop after `step` (call it at every step boundary of a
  resumable loop, on every process, with increasing steps)."""
  if _jax_service():
    if multihost_utils.reached_preemption_sync_point(step):
      _state.stopping = True
    return _state.stopping
  asked = _state.asked is not None
  if jax.process_count() > 1:
    asked = bool(np.max(multihost_utils.process_allgather(np.int32(asked))))
  _state.stopping = _state.stopping or asked
  return _state.stopping


def stopped(where: str) -> Stopped:
  """The exception a loop raises once its last step is durable."""
  return Stopped(f'{where}; run the same command again to resume')
