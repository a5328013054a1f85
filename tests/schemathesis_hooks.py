"""Schemathesis hooks for the API check in tests/accounts.rs.

Schemathesis reads the bearer token's `sub` and tries it as a user name. Left alone, it
would sooner or later disable, demote, delete or re-password the admin whose token it runs
with. The API does what it is told and revokes that token, and the rest of the run would
learn nothing but 401. Requests that name that user are sent to another name instead.
"""

import os

import schemathesis

RUNNER = os.environ["GATEHOUSE_SCHEMATHESIS_USER"]


@schemathesis.hook
def before_call(context, case, kwargs):
    if (case.path_parameters or {}).get("name") == RUNNER:
        case.path_parameters["name"] = "not-" + RUNNER
    # The runner signs in with its bearer token (added after this hook); an API key
    # schemathesis makes up beside it would be two credentials, which the API refuses (400)
    # before looking at the request. API keys are tested in tests/identity.rs.
    for headers in (case.headers, kwargs.get("headers")):
        for name in [k for k in (headers or {}) if k.lower() == "x-api-key"]:
            del headers[name]
