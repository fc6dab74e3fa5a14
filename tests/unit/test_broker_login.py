"""The login a client's commands carry as their AMQP `user_id`, read from its URL."""

from __future__ import annotations

import pytest

from shared.amqp import broker_login


@pytest.mark.parametrize(
    ("url", "login"),
    [
        ("amqp://alice:secret@rabbit:5672/", "alice"),
        # Percent-encoded as a URL must be; the broker sees the decoded name.
        ("amqp://al%40ice%3Aone:p%40ss@rabbit/vhost", "al@ice:one"),
        ("amqps://cqrs-client:pw@rabbit:5671/cqrs?cafile=/ca.pem", "cqrs-client"),
        # No user: the driver logs in as guest, so that is the login.
        ("amqp://rabbit:5672/", "guest"),
        ("amqp://:pw@rabbit/", "guest"),
        # A certificate names the login; the URL cannot.
        ("amqps://rabbit:5671/?auth=external&certfile=/c.pem", None),
        ("amqps://ignored@rabbit:5671/?auth=EXTERNAL", None),
    ],
)
def test_the_login_is_the_urls_decoded_user(url: str, login: str | None) -> None:
    assert broker_login(url) == login
