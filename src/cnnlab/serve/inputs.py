"""Pull the image(s) out of a request, whatever way the client sent them.

Accepted for /predict and /inspect (one image) and /predict/batch (several):
- `multipart/form-data`: file field(s) `file` / `files` / `image` (any file field works), and an
  optional `top_k` field;
- `application/json`: `{"image": BASE64}` or `{"images": [BASE64, ...]}`, optional `top_k`;
  data URLs (`data:image/png;base64,...`) work as well;
- a raw body with an `image/*` or `application/octet-stream` content type.
Anything else is a 415; a malformed body is a 422. Both carry a JSON `detail`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..errors import shorten
from ..data.decode import BadImage
from .schemas import BatchIn, ImageIn

ACCEPTED = "multipart/form-data (field 'file'), application/json ({\"image\": base64}) or a raw image/* body"


@dataclass
class Upload:
    filename: str | None
    data: bytes


def decode_base64(text: str, what: str = "image") -> bytes:
    """Base64 or a base64 data URL -> bytes; a 422 `BadImage` if it is neither."""
    if not isinstance(text, str):
        raise BadImage(f"{what} must be a base64 string", 422)
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or ";base64" not in header:
            raise BadImage(f"{what}: only base64 data URLs are supported", 422)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{what} is not valid base64", 422) from None


def _top_k(value) -> int | None:
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadImage(f"top_k must be a whole number, got {shorten(str(value)[:20])}", 422) from None
    if number < 1:
        raise BadImage(f"top_k must be at least 1, got {number}", 422)
    return number


async def read_uploads(request: Request, many: bool, max_files: int) -> tuple[list[Upload], int | None]:
    """The uploaded images and the body's `top_k` (None when not given)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if not body:
        raise BadImage(f"empty request body: send an image as {ACCEPTED}", 422)
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_files)
    if content_type == "application/json" or content_type.endswith("+json"):
        return _read_json(body, many)
    if content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
        return [Upload(None, body)], None
    raise BadImage(f"unsupported content type {shorten(content_type)}: send {ACCEPTED}", 415)


async def _read_multipart(request: Request, max_files: int) -> tuple[list[Upload], int | None]:
    try:
        form = await request.form(max_files=max_files + 1, max_fields=50)
    except Exception as exc:  # starlette turns python-multipart's many errors into HTTP or parser exceptions
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise BadImage(f"malformed multipart body ({str(detail)[:120]})", 422) from None
    try:
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename, await value.read()))
        top_k = _top_k(form.get("top_k"))
    finally:
        await form.close()
    if not uploads:
        fields = ", ".join(sorted(set(form.keys()))) or "none"
        raise BadImage(f"no file in the multipart body (fields: {fields}); send the image in a file field named 'file'", 422)
    if len(uploads) > max_files:
        raise BadImage(f"too many images: at most {max_files} per request", 413)
    return uploads, top_k


def _read_json(body: bytes, many: bool) -> tuple[list[Upload], int | None]:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadImage(f"the body is not valid JSON ({exc})", 422) from None
    try:
        if many:
            parsed = BatchIn.model_validate(raw)
            return [Upload(None, decode_base64(text, f"images[{i}]")) for i, text in enumerate(parsed.images)], parsed.top_k
        parsed_one = ImageIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise BadImage(f"invalid JSON body: {where}: {first.get('msg')}", 422) from None
    return [Upload(None, decode_base64(parsed_one.image))], parsed_one.top_k
