"""The console progress line's elapsed time and time-left estimate."""

import pytest

from train import metrics


@pytest.mark.parametrize("seconds, text", [
    (0.2, "0s"), (7.4, "7s"), (59.6, "1m00s"), (62, "1m02s"), (3599, "59m59s"),
    (3600, "1h00m"), (11_100, "3h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


def test_progress_line_ends_with_elapsed_and_eta():
  line = metrics.progress_line(4, 10, {"loss": 1.0, "tokens_per_sec": 10.0},
                               elapsed_s=62, eta_s=220)
  assert line.endswith("elapsed 1m02s  eta 3m40s")
  without = metrics.progress_line(1, 10, {"loss": 1.0}, elapsed_s=5)
  assert without.endswith("elapsed 5s") and "eta" not in without


def test_clock_measures_step_time_after_the_first_step(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  clock = metrics.StepClock(num_steps=50)
  now[0] = 130.0  # The first step compiles: 30 s.
  clock.step_done(1)
  assert clock.remaining() is None and clock.elapsed() == 30.0
  now[0] = 140.0  # Then 2 s per step.
  clock.step_done(6)
  assert clock.remaining() == pytest.approx(2.0 * 44)
  assert clock.elapsed() == 40.0


def test_clock_on_resume_counts_from_the_first_step_run_here(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  clock = metrics.StepClock(num_steps=100)
  now[0] = 10.0
  clock.step_done(81)  # Resumed at step 80.
  now[0] = 14.0
  clock.step_done(90)
  assert clock.remaining() == pytest.approx(4.0 / 9 * 10)
