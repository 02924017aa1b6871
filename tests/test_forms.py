"""forms.py: the quick split of multipart uploads gives what Werkzeug's parser gives, and leaves every unusual
body (and every error) to Werkzeug."""

import io

import pytest
import requests
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request as WerkzeugRequest

import forms
from support import CASTLE

B = "b0undary7e3c9a"
BOUNDARY = B.encode()


def environ(body, boundary=B, content_type=None):
    return {
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": content_type or f"multipart/form-data; boundary={boundary}",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }


def parsed(request_class, body, **kwargs):
    """What the request's form and files hold, or the exception parsing raised."""
    request = request_class(environ(body, **kwargs))
    request.max_form_parts = 5
    request.max_form_memory_size = 200_000  # above Werkzeug's 64 KiB reads, as Flask's default (500 000) is
    try:
        form, files = list(request.form.items(multi=True)), list(request.files.items(multi=True))
    except RequestEntityTooLarge as exc:
        return type(exc)
    return form, [(key, f.filename, f.name, f.content_type, list(f.headers.items()), f.read()) for key, f in files]


def part(name, content, filename=None, headers=b""):
    disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
    if filename is not None:
        disposition += f'; filename="{filename}"'.encode()
    return disposition + b"\r\n" + headers + b"\r\n" + content


def body(*parts, preamble=b"", epilogue=b"\r\n"):
    delimiter = b"--" + BOUNDARY
    between = b"\r\n" + delimiter + b"\r\n"
    return preamble + delimiter + b"\r\n" + between.join(parts) + b"\r\n" + delimiter + b"--" + epilogue


def requests_body(files, data=None):
    prepared = requests.Request("POST", "http://localhost/", files=files, data=data).prepare()
    boundary = prepared.headers["Content-Type"].split("boundary=")[1]
    return prepared.body, boundary


IMAGE = CASTLE.read_bytes()
USUAL = {
    "one file (what requests, curl and browsers send)": body(part("image", IMAGE, "castle.jpg")),
    "a file with its content type": body(part("image", b"\x89PNG...", "a.png", b"Content-Type: image/png\r\n")),
    "file and fields": body(part("top_k", b"3"), part("image", IMAGE, "c.jpg"), part("note", "caf\u00e9".encode())),
    "an empty file": body(part("image", b"", "empty.jpg")),
    "a latin-1 field": body(
        part("f", "caf\u00e9".encode("latin-1"), headers=b"Content-Type: text/plain; charset=latin1\r\n")
    ),
    "an ISO-8859-1 field": body(part("f", b"caf\xe9", headers=b"Content-Type: text/plain; charset=ISO-8859-1\r\n")),
    "a field that is not UTF-8": body(part("f", b"\xff\xfe")),
    "a UTF-8 file name": body(part("image", b"x", "ch\u00e2teau.jpg")),
    "content with CRLF and dashes": body(part("image", b"\r\n--\r\n-- b0und\r\n\r\n", "x")),
    "no epilogue line break": body(part("image", b"x", "x"), epilogue=b""),
    "an epilogue": body(part("image", b"x", "x"), epilogue=b"\r\nthe end\r\n"),
    "a header line without a colon": body(part("image", b"x", "x", b"X-Odd\r\n")),
}
UNUSUAL = {
    "a preamble": body(part("image", b"x", "x"), preamble=b"this is a preamble\r\n"),
    "bare LF line breaks": body(part("image", b"x", "x")).replace(b"\r\n", b"\n"),
    "the boundary after a bare LF inside a part": body(part("image", b"a\n--" + BOUNDARY + b"\r\nz", "x")),
    "the boundary inside a part": body(part("image", b"a--" + BOUNDARY + b"z", "x")),
    "a folded header": body(part("image", b"x", "x", b"X-Long: a\r\n b\r\n")),
    "no Content-Disposition": body(b"Content-Type: image/png\r\n\r\nx"),
    "no closing delimiter": body(part("image", b"x", "x"))[: -len(B) - 6],
    "whitespace after a delimiter": body(part("a", b"1"), part("x", b"x")).replace(
        BOUNDARY + b"\r\n", BOUNDARY + b" \r\n"
    ),
    "a header that is not UTF-8": body(part("image", b"x", "x", b"X-Bytes: \xff\r\n")),
    "more parts than max_form_parts": body(*[part(f"f{i}", b"v") for i in range(6)]),
    "a field over max_form_memory_size": body(part("f", b"v" * 200_001)),
    "a bare CR in the headers": body(part("image", b"x", "x", b"X-A: 1\r\rX-B: 2\r\n")),
    "a part's headers over max_form_memory_size": body(part("image", b"x", "x", b"X-Pad: " + b"p" * 300_000 + b"\r\n")),
    "a part's headers over 8 KiB": body(part("image", b"x", "x", b"X-Pad: " + b"p" * 9000 + b"\r\n")),
}
# Bytes that str.strip() removes and Werkzeug keeps: the quick split must read them as Werkzeug does.
ODD_WHITESPACE = {
    "a vertical tab before Content-Disposition": body(
        b'\x0bContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\nDATA'
    ),
    "a file separator in a content type": body(part("image", b"x", "x", b"Content-Type: \x1cimage/jpeg\r\n")),
}


@pytest.mark.parametrize("name", list(USUAL))
def test_the_usual_shapes_are_split_quickly_and_as_werkzeug_reads_them(name):
    data = USUAL[name]
    assert forms.split(data, BOUNDARY) is not None
    assert parsed(forms.Request, data) == parsed(WerkzeugRequest, data)


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_shapes_go_to_werkzeug_and_get_its_answer(name):
    data = UNUSUAL[name]
    assert forms.split(data, BOUNDARY) is None or name.startswith(("more parts", "a field over", "no Content"))
    assert parsed(forms.Request, data) == parsed(WerkzeugRequest, data)


@pytest.mark.parametrize("name", list(ODD_WHITESPACE))
def test_odd_whitespace_is_read_as_werkzeug_reads_it(name):
    data = ODD_WHITESPACE[name]
    assert parsed(forms.Request, data) == parsed(WerkzeugRequest, data)


def test_what_requests_sends_is_split_quickly():
    data, boundary = requests_body({"image": ("image", IMAGE)}, {"top_k": "2"})
    assert forms.split(data, boundary.encode()) is not None
    got = parsed(forms.Request, data, boundary=boundary)
    assert got == parsed(WerkzeugRequest, data, boundary=boundary)
    assert got[1][0][5] == IMAGE and got[0] == [("top_k", "2")]


def test_a_body_that_is_not_multipart_is_left_alone():
    data = b"image=abc"
    got = parsed(forms.Request, data, content_type="application/x-www-form-urlencoded")
    assert got == parsed(WerkzeugRequest, data, content_type="application/x-www-form-urlencoded")
    assert parsed(forms.Request, b"--x\r\n", content_type="multipart/form-data") == ([], [])  # no boundary


@pytest.mark.parametrize("preamble", [b"", b"a preamble: Werkzeug's own parser, which spools a large file to disk"])
def test_releasing_the_body_lets_go_of_it_and_closes_the_uploaded_files(preamble):
    request = forms.Request(environ(body(part("image", b"\xff" * 600_000, "big.jpg"), preamble=preamble)))
    upload = request.files["image"].stream
    request.release_body()
    assert upload.closed  # a spooled file's descriptor too, which the request's teardown no longer sees
    assert request.get_data() == b"" and not request.files and not request.form
