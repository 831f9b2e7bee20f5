"""A small synchronous client for the clipforge server (httpx), used by tests and scripts.

c = Client("http://127.0.0.1:8000")
c.search("a dog on the beach", k=5)["results"]
c.classify("cat.jpg", label_set="cifar10")["predictions"][0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx


class ClientError(RuntimeError):
    """The server answered 4xx/5xx: ``status``, ``code`` (e.g. "bad_k") and ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


ImageRef = str | Path | bytes


def _image_file(image: ImageRef) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return ("image", image, "application/octet-stream")
    p = Path(image)
    return (p.name, p.read_bytes(), "application/octet-stream")


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                body = r.json()
                code, detail = body.get("error", "http_error"), body.get("detail", r.text)
            except (json.JSONDecodeError, AttributeError):
                code, detail = "http_error", r.text[:500]
            raise ClientError(r.status_code, code, detail)
        return r

    def health(self) -> dict[str, Any]:
        return self._check(self.http.get("/health")).json()

    def label_sets(self) -> dict[str, int]:
        return self._check(self.http.get("/label_sets")).json()["label_sets"]

    def embed_text(self, texts: str | list[str]) -> list[list[float]]:
        body = {"texts": [texts] if isinstance(texts, str) else list(texts)}
        return self._check(self.http.post("/embed/text", json=body)).json()["embeddings"]

    def embed_image(self, image: ImageRef | None = None, url: str | None = None) -> list[float]:
        if url is not None:
            r = self.http.post("/embed/image", json={"url": url})
        else:
            assert image is not None, "give an image or a url"
            r = self.http.post("/embed/image", files={"file": _image_file(image)})
        return self._check(r).json()["embedding"]

    def classify(
        self,
        image: ImageRef | None = None,
        labels: list[str] | None = None,
        label_set: str | None = None,
        templates: list[str] | None = None,
        top_k: int | None = None,
        url: str | None = None,
    ) -> dict[str, Any]:
        data: dict[str, str] = {}
        if labels is not None:
            data["labels"] = json.dumps(labels)
        if label_set is not None:
            data["label_set"] = label_set
        if templates is not None:
            data["templates"] = json.dumps(templates)
        if top_k is not None:
            data["top_k"] = str(top_k)
        if url is not None:
            data["url"] = url
        files = {"file": _image_file(image)} if image is not None else None
        if files is None:  # force multipart even without a file
            files = {"_": ("", b"", "application/octet-stream")}
        return self._check(self.http.post("/classify", data=data, files=files)).json()

    def search(
        self,
        text: str | None = None,
        k: int = 10,
        filters: dict[str, Any] | None = None,
        image: ImageRef | None = None,
        image_url: str | None = None,
    ) -> dict[str, Any]:
        if image is not None:
            data = {"k": str(k)}
            if filters:
                data["filters"] = json.dumps(filters)
            r = self.http.post("/search", data=data, files={"file": _image_file(image)})
        else:
            body: dict[str, Any] = {"k": k}
            if text is not None:
                body["text"] = text
            if image_url is not None:
                body["image_url"] = image_url
            if filters:
                body["filters"] = filters
            r = self.http.post("/search", json=body)
        return self._check(r).json()

    def image(self, key: str) -> bytes:
        return self._check(self.http.get(f"/images/{key}")).content

    def caption(
        self, image: ImageRef | None = None, url: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """``POST /caption``: the response (``captions``, ``caption``, ``settings``, ``took_ms``).
        ``options``: strategy, beam_width, max_length, min_length, temperature, top_k, top_p, seed, ..."""
        if image is None:
            if url is None:
                raise ValueError("give an image or a url")
            return self._check(self.http.post("/caption", json={"url": url, **options})).json()
        data = {k: str(v) for k, v in options.items() if v is not None}
        return self._check(self.http.post("/caption", data=data, files={"file": _image_file(image)})).json()
