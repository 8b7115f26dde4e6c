"""Property-based run of the whole API from its own OpenAPI description (schemathesis):
for every operation, generated valid and invalid requests against the real HTTPS server,
with an operator's token and a registered agent's client certificate (so the agent routes
are exercised past authentication too); none may be answered with a 5xx."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api_helpers import ControlPlane, register

# Examples per operation: valid requests reach the code behind validation, so they get
# more. With ~60 operations this takes about two minutes on 2 cores.
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 5}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_generated_request_gets_a_server_error(cp: ControlPlane, tmp_path: Path) -> None:
    # A token only this test knows, so generated requests cannot revoke it by name; with
    # "admin" also valid, revoking one operator token is allowed and the run goes on.
    token = cp.new_token(f"fuzz-{uuid.uuid4().hex}", "operator")
    _agent, cert = register(cp, tmp_path, "fuzz-agent", host="fuzz-host")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    tls = {"verify": str(cp.ca_cert), "cert": (str(cert[0]), str(cert[1]))}
    schema = schemathesis.openapi.from_url(cp.url + "/openapi.json", verify=str(cp.ca_cert))

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 50
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            calls = [0]

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                response = case.call_and_validate(session=session, checks=[not_a_server_error], **tls)
                statuses[response.status_code // 100 * 100] += 1
                calls[0] += 1

            try:
                run()
            except Unsatisfiable:
                # only an operation that takes nothing has no invalid request (GET /health)
                if mode is GenerationMode.POSITIVE or _takes_input(operation):
                    failures.append(f"{operation.label} ({mode.value}): no request could be generated")
                continue
            except Exception as e:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} ({mode.value}): {e}")
                continue
            if mode is GenerationMode.POSITIVE and not calls[0]:
                failures.append(f"{operation.label}: no valid request was sent")
    session.close()
    assert not failures, "\n\n".join(failures)
    # The run was not vacuous: the credentials worked, and valid requests were served.
    assert statuses[200] > 100, statuses


def _takes_input(operation: object) -> bool:
    """Whether an operation has parameters or a request body to make invalid."""
    return any(True for _ in operation.iter_parameters()) or bool(  # type: ignore[attr-defined]
        operation.get_request_payload_content_types())  # type: ignore[attr-defined]
