"""A small HTTP client for a Leyline server (``leyline serve`` or the SGLang plugin's routes).

Most users never touch it: :func:`leyline.wrap` puts Leyline under an existing ``openai``
client. This one speaks the protocol directly (sessions, stats) and is what the demo and the
evals use::

    from leyline import LeylineClient, Session

    with LeylineClient("http://127.0.0.1:8000/v1") as client:
        session = Session()
        result = client.chat(session, [{"role": "user", "content": "Hi"}], model="smollm2")
        print(result.text, result.accounting)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from leyline._config import Environment
from leyline.accounting import Accounting
from leyline.errors import ServerError, TransportError
from leyline.session import Session

__all__ = ["ChatResult", "LeylineClient"]


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A chat completion body plus its parsed accounting (``None`` from non-Leyline servers)."""

    body: dict[str, Any]
    accounting: Accounting | None

    @property
    def text(self) -> str:
        return str(self.body["choices"][0]["message"].get("content") or "")

    @property
    def message(self) -> dict[str, Any]:
        return dict(self.body["choices"][0]["message"])


class LeylineClient:
    """Synchronous client; ``base_url`` ends in ``/v1`` like an OpenAI base URL.

    ``api_key`` (default ``LEYLINE_API_KEY``) goes out as ``Authorization: Bearer``, as the
    ``openai`` client sends it; ``cache_salt`` (optional) is sent with every chat request and
    session call: together they name the client's tenant on the server (docs/security.md)::

        LeylineClient("http://127.0.0.1:8000/v1", api_key="k1", cache_salt="team-a")
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        cache_salt: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        env = Environment.read()
        self.base_url = (base_url or env.base_url).rstrip("/")
        self.cache_salt = cache_salt
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key or env.api_key}"},
            transport=transport,
        )

    def __enter__(self) -> LeylineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, json: Any = None, *, salted: bool = False) -> Any:
        params = {"cache_salt": self.cache_salt} if salted and self.cache_salt else None
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {self.base_url}{path} failed: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ServerError.from_body(response.status_code, body)
        return body

    def chat(
        self,
        session: Session | None,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str,
        forget: Collection[int] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> ChatResult:
        """Send one chat completion; with a ``session``, attach and commit its payload."""
        request: dict[str, Any] = {"model": model, "messages": list(messages), **params}
        if self.cache_salt is not None:
            request.setdefault("cache_salt", self.cache_salt)
        if tools:
            request["tools"] = list(tools)
        prepared = None
        if session is not None:
            prepared = session.prepare(messages, forget=forget, tools=tools)
            request = prepared.to_payload().attach(request)
        body = self._request("POST", "/chat/completions", request)
        if session is not None and prepared is not None:
            session.commit(prepared)
        return ChatResult(body, Accounting.from_response(body))

    def open_session(self, session: Session | str, *, ttl_s: float | None = None) -> Any:
        """Open (or refresh) a session on the server."""
        sid = session.id if isinstance(session, Session) else session
        body = {"ttl_s": ttl_s} if ttl_s else {}
        return self._request("POST", f"/leyline/sessions/{sid}", body, salted=True)

    def get_session(self, session: Session | str) -> Any:
        sid = session.id if isinstance(session, Session) else session
        return self._request("GET", f"/leyline/sessions/{sid}", salted=True)

    def close_session(self, session: Session | str) -> Any:
        """Close a session: its cache locks are released and its approximate KV dropped."""
        sid = session.id if isinstance(session, Session) else session
        return self._request("DELETE", f"/leyline/sessions/{sid}", salted=True)

    def stats(self) -> Any:
        return self._request("GET", "/leyline/stats")

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/models")["data"]]
