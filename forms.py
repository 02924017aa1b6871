"""A quicker parse of the common multipart upload, with Werkzeug's own parser for everything else.

Werkzeug parses multipart/form-data as a stream: it compiles two regular expressions for each request's boundary
(every request has a new one, so Python's regex cache never helps) and feeds the body through a state machine in
64 KiB chunks. For a 76 KiB upload that cost ~0.6 ms of the web process's CPU per request, the largest share
after the image itself and the job's encoding. The body is in memory already (run_web_server.py buffers it, and
MAX_UPLOAD_BYTES bounds it), so the usual shape of upload, the one curl, requests, browsers and our clients send
(no preamble, CRLF line breaks, the boundary nowhere but in its delimiters), is split with `bytes.find` instead.

Anything else, however slightly unusual (a preamble, bare LF line breaks, folded headers, whitespace after a
delimiter, the boundary inside a part, a missing closing delimiter, more parts than `max_form_parts`, a field over
`max_form_memory_size`, a part's headers over 8 KiB), goes to Werkzeug's parser unchanged, so the answers
(including its errors) are Werkzeug's.
Where the quick split does answer, it gives what Werkzeug would (tests/test_forms.py compares the two).

`Request.release_body` lets go of the body once the request no longer needs it, before it waits.
"""

import io

from flask import Request as FlaskRequest
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

_CHARSETS = {"ascii", "us-ascii", "utf-8", "iso-8859-1"}  # Werkzeug's list of part charsets it honours
# A part's headers longer than this go to Werkzeug, which refuses them (413) past max_form_memory_size. Found by
# review: 600 KB of them were split quickly and answered 200. Real parts' headers are a hundred bytes or two.
_LONGEST_HEADERS = 8192
# The WSGI environ's key of a function that tells the server the request's body is no longer held (run_web_server
# counts the bodies it holds against MAX_BUFFERED_BYTES).
RELEASE_BODY = "imgclf.release_body"


def _nothing():
    pass


def split(body: bytes, boundary: bytes) -> list[tuple[Headers, bytes]] | None:
    """The parts of a multipart body of the usual shape, as (headers, content); None for any other shape."""
    delimiter = b"--" + boundary
    if not boundary or not body.startswith(delimiter + b"\r\n"):
        return None
    separator = b"\r\n" + delimiter
    parts, start, found = [], len(delimiter) + 2, 1
    while True:
        end = body.find(separator, start)
        if end < 0:
            return None  # no closing delimiter
        found += 1
        headers_end = body.find(b"\r\n\r\n", start, end)
        if headers_end < 0 or headers_end - start > _LONGEST_HEADERS:
            return None
        headers = _headers(body[start:headers_end])
        if headers is None:
            return None
        parts.append((headers, body[headers_end + 4 : end]))
        after = end + len(separator)
        if body.startswith(b"--", after):
            break  # the closing delimiter; what follows it (the epilogue) is ignored, as Werkzeug does
        if not body.startswith(b"\r\n", after):
            return None  # transport padding or garbage after a delimiter
        start = after + 2
    # The boundary anywhere else (in a part, or after a bare LF or CR) is a shape Werkzeug reads its own way.
    return parts if body.count(boundary) == found else None


def _headers(block: bytes) -> Headers | None:
    """The part's headers as Werkzeug reads them (each line stripped, then split at its first colon)."""
    if block.count(b"\r") != block.count(b"\n") or block.count(b"\r\n") != block.count(b"\n"):
        return None  # a bare CR or LF: Werkzeug may end the headers elsewhere
    items = []
    for raw in block.split(b"\r\n"):
        if raw[:1] in (b" ", b"\t"):
            return None  # a folded header (or a first line that starts with a blank)
        line = raw.strip(b" \t")  # Werkzeug's whitespace; other bytes (\x0b, \x1c) are part of the line
        if line:
            try:
                name, _, value = line.decode().partition(":")
            except UnicodeDecodeError:
                return None
            items.append((name.strip(" \t"), value.strip(" \t")))
    return Headers(items)


class QuickFormDataParser(FormDataParser):
    """Werkzeug's FormDataParser, with `split` tried first on multipart bodies."""

    def _parse_multipart(self, stream, mimetype, content_length, options):
        body = stream.read()
        try:
            boundary = options.get("boundary", "").encode("ascii")
        except UnicodeEncodeError:  # not a boundary RFC 2046 allows: Werkzeug's parser says what it makes of it
            boundary = b""
        parts = split(body, boundary)
        if parts is None or (self.max_form_parts is not None and len(parts) > self.max_form_parts):
            return super()._parse_multipart(io.BytesIO(body), mimetype, content_length, options)
        fields, files = [], []
        for headers, content in parts:
            if "content-disposition" not in headers:
                return super()._parse_multipart(io.BytesIO(body), mimetype, content_length, options)
            _, extra = parse_options_header(headers["content-disposition"])
            name, filename = extra.get("name"), extra.get("filename")
            if filename is not None:
                files.append((name, FileStorage(io.BytesIO(content), filename, name, headers=headers)))
                continue
            if self.max_form_memory_size is not None and len(content) > self.max_form_memory_size:
                return super()._parse_multipart(io.BytesIO(body), mimetype, content_length, options)
            charset = parse_options_header(headers.get("content-type", ""))[1].get("charset", "").lower()
            fields.append((name, content.decode(charset if charset in _CHARSETS else "utf-8", "replace")))
        return stream, self.cls(fields), self.cls(files)


class Request(FlaskRequest):
    form_data_parser_class = QuickFormDataParser

    def release_body(self):
        """Let go of the body and of everything parsed from it, once the images are prepared: a request then
        waits for its answer holding its pixels (150 KB an image), not the body and its parts (two copies of an
        upload of up to MAX_UPLOAD_BYTES). A later read of the form finds it empty."""
        self.close()  # the files Werkzeug's own parser spooled to disk, which the request's teardown no longer sees
        self.environ.get(RELEASE_BODY, _nothing)()  # the server's count of the bodies it holds
        self.environ["wsgi.input"] = io.BytesIO()
        self.environ["CONTENT_LENGTH"] = "0"
        for cached in ("stream", "form", "files", "_cached_data"):  # Werkzeug's caches of them
            self.__dict__.pop(cached, None)
