"""Distributed flags and the coordinator probe fail in one line naming the flag."""

import socket
import threading
import time

import pytest

from train import distributed


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1:1234", ("10.0.0.1", 1234)), ("node-3.cluster:80", ("node-3.cluster", 80)),
    ("[::1]:1234", ("::1", 1234))])
def test_split_address(address, expected):
  assert distributed.split_address(address) == expected


@pytest.mark.parametrize("address", ["10.0.0.1", ":1234", "host:http", "host:70000"])
def test_bad_addresses_name_the_flag(address):
  with pytest.raises(distributed.DistributedSetupError, match="--coordinator_address="):
    distributed.split_address(address)


def test_unreachable_coordinator_names_flag_timeout_and_what_to_check():
  address = f"127.0.0.1:{_free_port()}"  # Nothing listens there.
  start = time.monotonic()
  with pytest.raises(distributed.DistributedSetupError) as error:
    distributed.wait_for_coordinator(address, timeout_s=0.6)
  assert 0.6 <= time.monotonic() - start < 5
  message = str(error.value)
  assert "\n" not in message
  assert f"--coordinator_address={address}" in message
  assert "--distributed_timeout=0.6 s" in message and "process 0" in message


def test_probe_retries_until_the_coordinator_listens():
  port = _free_port()
  server = socket.socket()
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

  def listen_later():
    time.sleep(0.8)
    server.bind(("127.0.0.1", port))
    server.listen()

  thread = threading.Thread(target=listen_later)
  thread.start()
  try:
    start = time.monotonic()
    distributed.wait_for_coordinator(f"127.0.0.1:{port}", timeout_s=20)
    assert time.monotonic() - start >= 0.8
  finally:
    thread.join()
    server.close()


def test_process_zero_refuses_a_taken_port():
  with socket.socket() as holder:
    holder.bind(("", 0))
    holder.listen()
    port = holder.getsockname()[1]
    with pytest.raises(distributed.DistributedSetupError, match=f"port {port} of "
                       f"--coordinator_address=localhost:{port}"):
      distributed.check_port_free(f"localhost:{port}")
  distributed.check_port_free(f"localhost:{_free_port()}")  # A free one passes.


@pytest.mark.parametrize("num_processes, process_id, match", [
    (2, None, "needs --num_processes and --process_id"),
    (2, 2, r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (0, 0, "--num_processes=0")])
def test_bad_process_flags_name_them(num_processes, process_id, match):
  with pytest.raises(distributed.DistributedSetupError, match=match):
    distributed.initialize("localhost:1234", num_processes, process_id, timeout_s=1)
