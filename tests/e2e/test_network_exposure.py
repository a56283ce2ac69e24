"""A coordinator on a network address serves only the fleet API there (real `fedtune server` / `fedtune client`).

This machine's own non-loopback address stands in for the network: a connection from it is not
loopback, so to the coordinator's SuperLink it is an outsider, holding the CA certificate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import httpx
import pytest

from fedtune.deploy.certs import write_client_key
from tests.helpers.deployment import Federation

pytest.importorskip("flwr")

TINY = {"partition": {"num_clients": 2}, "federation": {"rounds": 1}, "training": {"local_steps": 1}}


def _network_ipv4() -> str | None:
    """This machine's non-loopback IPv4 address that can be listened on, or None."""
    candidates = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("198.51.100.1", 9))  # UDP: sends nothing, only picks the outgoing interface's address
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    for host in candidates:
        addr = ipaddress.ip_address(host)
        if addr.is_loopback or addr.is_unspecified:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind((host, 0))
            return host
    return None


NETWORK = _network_ipv4()
pytestmark = [
    pytest.mark.slow,  # about 40 s each on 2 cores
    pytest.mark.skipif(NETWORK is None, reason="this machine has no non-loopback IPv4 address"),
]


def _train(fed: Federation) -> None:
    """The enrolled clients join (over the network address) and the run completes."""
    fed.client(0, None, None, "--threads", "1")
    fed.client(1, None, None, "--threads", "1")
    assert fed.wait_exit("server", 300) == 0, fed.output("server")
    assert "refused" not in fed.output("server")


def _direct_refuses_outsiders(tmp_path, port: int) -> None:
    """The direct channel (SuperLink port + 1) answers nothing to a key that is not enrolled, nor unsigned."""
    import time

    from fedtune.deploy.direct_link import DirectLink
    from fedtune.deploy.fleet import load_key

    ca = tmp_path / "certs" / "ca.crt"
    until = time.monotonic() + 120
    while True:  # it listens once the run's ServerApp has started
        with contextlib.suppress(OSError), socket.create_connection((NETWORK, port), timeout=1):
            break
        assert time.monotonic() < until, "the direct channel never listened"
        time.sleep(0.2)
    outsider = DirectLink(NETWORK, port, ca, *load_key(tmp_path / "x" / "outsider.key"))
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            outsider.take()
        assert refused.value.response.status_code == 401
        for path in ("/take", "/reply"):
            assert outsider.client.post(f"{outsider.base}{path}", content=b"x").status_code == 401
        assert outsider.client.get(f"{outsider.base}/take").status_code == 405
    finally:
        outsider.close()


def test_over_the_network_only_the_fleet_api_answers_and_the_federation_still_runs(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from fedtune.deploy.control import Control

    # listening everywhere; the clients reach it at the network address
    fed = Federation(tmp_path, TINY, host=NETWORK, listen="0.0.0.0")
    outsider = public_key_to_bytes(load_ssh_public_key(write_client_key(tmp_path / "x", "outsider")[1].read_bytes()))
    ca = str(tmp_path / "certs" / "ca.crt")
    try:
        fed.server()
        attacker = Control(f"{NETWORK}:{fed.port}", ca)
        try:
            for attempt in (
                lambda: attacker.client.RegisterNode(RegisterNodeRequest(public_key=outsider, name="outsider")),
                lambda: attacker.client.ListRuns(ListRunsRequest()),
                lambda: attacker.submit(tmp_path / "evil", tmp_path / "fed.yaml"),
            ):
                with pytest.raises(httpx.HTTPStatusError) as refused:
                    attempt()
                assert refused.value.response.status_code == 404
        finally:
            attacker.close()
        with httpx.Client(verify=ca, timeout=10) as http:
            for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/get-nodes", "/openapi.json"):
                # from this machine the path exists (415: no protobuf body); from the network it does not
                assert http.post(f"https://127.0.0.1:{fed.port}{path}").status_code != 404, path
                assert http.post(f"https://{NETWORK}:{fed.port}{path}").status_code == 404, path
            for path in ("/docs", "/openapi.json"):
                assert http.get(f"https://{NETWORK}:{fed.port}{path}").status_code == 404, path
            assert http.get(f"https://{NETWORK}:{fed.port}/health").status_code == 200
            # the fleet prefix leads nowhere else: the path is routed as it is, dots and all
            assert http.post(f"https://{NETWORK}:{fed.port}/v1/fleet/%2E%2E/control/list-runs").status_code == 404
        _direct_refuses_outsiders(tmp_path, fed.port + 1)
        local = Control(f"127.0.0.1:{fed.port}", ca)
        try:
            assert sorted(name for name, _ in local.enrolled().values()) == ["client-0", "client-1"]
            assert len(local.client.ListRuns(ListRunsRequest()).run_dict) == 1  # fedtune's own run only
        finally:
            local.close()
        _train(fed)
    finally:
        fed.close()
    assert (fed.run_dir / "final_adapter" / "adapter_model.safetensors").is_file()


def test_a_coordinator_listening_on_one_network_address_still_reaches_its_own_superlink(tmp_path):
    # bound to the network address only: fedtune's Control client and Flower's SuperExec connect there
    fed = Federation(tmp_path, TINY, host=NETWORK, listen=NETWORK)
    try:
        fed.server()
        _train(fed)
    finally:
        fed.close()
    assert (fed.run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
