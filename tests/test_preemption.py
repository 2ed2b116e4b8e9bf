"""Stop requests in one process: a signal marks the next step boundary as the stop, a
repeated SIGTERM during the save is only reported, a second Ctrl-C before any loop began
to stop aborts, and the previous handlers come back."""

import os
import signal

import pytest

from saber_jax.train import preemption


@pytest.fixture
def listening():
  before = signal.getsignal(signal.SIGINT)
  preemption.listen()
  yield
  preemption.stop_listening()
  assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_at_the_next_boundary_and_a_second_one_is_only_reported(listening,
                                                                              capsys):
  assert not preemption.reached(1)
  os.kill(os.getpid(), signal.SIGTERM)
  assert 'SIGTERM received' in capsys.readouterr().err
  assert preemption.reached(2) and preemption.reached(3)     # stays stopped
  os.kill(os.getpid(), signal.SIGTERM)                       # during the save
  assert 'SIGTERM again: already stopping' in capsys.readouterr().err
  stopped = preemption.stopped('[sft] stopped after step 2 of 9')
  assert isinstance(stopped, preemption.Stopped)
  assert str(stopped).endswith('run the same command again to resume')


def test_second_ctrl_c_before_any_loop_stops_aborts(listening):
  os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    os.kill(os.getpid(), signal.SIGINT)
