"""Image files in request bodies: a raw ``image/png`` or ``image/jpeg`` body, or a form.

``/predict`` and ``/explain`` of an image model take the file itself (``curl
--data-binary @digit.png -H 'Content-Type: image/png'``) or an HTML form upload
(``multipart/form-data`` with one field, ``image``: ``curl -F image=@digit.png``).

Why a parser of our own rather than python-multipart (which FastAPI uses for forms):
the request bodies of this server are decoded by hand (ADR 0503: no framework parsing
on the predict path; the body is read once, bounded in size and time, by
:func:`insitu.serve._codec.read_body`), python-multipart is not installed on a device,
and what is accepted here is deliberately narrow: a whole body already in memory, one
boundary, exactly one part, named ``image``. Anything else (no boundary, a body that
does not start with it or never closes it, two parts, another field name, a part
without its blank line) is a 400 naming what to send, so there is no streaming state,
no spooling to temporary files and no field limits to configure.
"""

from __future__ import annotations

from email.message import Message

from insitu.serve._codec import BodyError

__all__ = ["IMAGE_TYPES", "image_of"]

#: Content types whose body is the image file itself.
IMAGE_TYPES = ("image/png", "image/jpeg")
_FIELD = "image"
_FORM_HELP = "send one form field named 'image' holding a PNG or JPEG file (curl -F image=@x.png)"


def image_of(body: bytes, content_type: str) -> bytes | None:
    """The image file in ``body``; ``None`` when ``content_type`` is not an image or a form.

    Raises:
        BodyError: 400 for a form that is not one well-formed ``image`` part.

    """
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in IMAGE_TYPES:
        return body
    if kind != "multipart/form-data":
        return None
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise BodyError(400, f"the multipart body has no valid boundary parameter; {_FORM_HELP}")
    return _one_part(body, boundary.encode("latin-1"))


def _one_part(body: bytes, boundary: bytes) -> bytes:
    """The content of the single ``image`` part of a multipart ``body``."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        raise BodyError(400, f"the multipart body does not start with its boundary; {_FORM_HELP}")
    chunks = body[len(delimiter) :].split(b"\r\n" + delimiter)
    parts: list[bytes] = []
    closed = False
    for index, chunk in enumerate(chunks):
        if chunk.startswith(b"--") and index > 0:
            closed = index == len(chunks) - 1 and chunk[2:] in (b"", b"\r\n")
            break
        if not chunk.startswith(b"\r\n"):
            break
        parts.append(chunk[2:])
    if not closed:
        raise BodyError(
            400, f"the multipart body is not closed by its boundary (truncated?); {_FORM_HELP}"
        )
    if len(parts) != 1:
        raise BodyError(400, f"the form has {len(parts)} fields; {_FORM_HELP}")
    head, blank, content = parts[0].partition(b"\r\n\r\n")
    if not blank:
        raise BodyError(400, f"the form field has no blank line after its headers; {_FORM_HELP}")
    name = _field_name(head)
    if name != _FIELD:
        shown = "no name" if name is None else f"the name {name[:40]!r}"
        raise BodyError(400, f"the form field has {shown}; {_FORM_HELP}")
    return content


def _field_name(head: bytes) -> str | None:
    """The ``name`` of a part's ``Content-Disposition: form-data`` header."""
    for line in head.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        header = Message()
        header["content-disposition"] = value.strip()
        if header.get_content_disposition() != "form-data":
            return None
        name = header.get_param("name", header="content-disposition")
        return name if isinstance(name, str) else None
    return None
