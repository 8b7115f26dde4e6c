"""The sender notices an agent's ERROR while it sends (not only at the end of its
stream): it stops the cycle promptly with the agent's cause mapped to its Standby error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import CuttingProxy, make_pki, running_agent  # noqa: E402

from standby.domain.bandwidth import Schedule  # noqa: E402
from standby.errors import IntegrityError, OutOfSpace  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.changes import FullSource  # noqa: E402
from standby.replication.sender import SenderOptions, run_cycle  # noqa: E402
from standby.replication.store import CycleWriter  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("fault, expected", [(OutOfSpace("out of space on the replica store"), OutOfSpace),
                                             (IntegrityError("staged block unreadable"), IntegrityError)])
@pytest.mark.parametrize("streams", [1, 3])
def test_agent_error_mid_stream_stops_the_sender_with_its_cause(tmp_path: Path, pki: dict[str, tls.Identity],
                                                                monkeypatch, fault: Exception, expected: type,
                                                                streams: int) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(32 * MiB))  # 4 s at 8 MiB/s
    real_write = CycleWriter.write
    count = [0]

    def write(self, offset, data, digest=None):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] > 20:
            raise fault
        return real_write(self, offset, data, digest)

    monkeypatch.setattr(CycleWriter, "write", write)
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget=1 << 40)  # counts, never cuts
        try:
            with pytest.raises(expected) as info:
                run_cycle(FullSource(img), f"127.0.0.1:{proxy.address[1]}", tls.client_context(pki["sender"]), "e",
                          SenderOptions(streams=streams, schedule=Schedule.parse("00:00-24:00=8MiB/s")))
        finally:
            proxy.close()
    assert "connection lost" not in str(info.value), info.value
    # it stopped mid-image: the agent's linger would have taken all 32 MiB (4 s of it)
    assert proxy.forwarded < 12 * MiB, f"the sender sent {proxy.forwarded} bytes after the agent's ERROR"
