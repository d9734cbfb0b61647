"""docs/openapi/ stays in step with the HTTP APIs it describes (without schemathesis).

The OpenAPI descriptions of both daemons' HTTP APIs are what `make fuzz`
runs schemathesis with; these checks catch the drift that is mechanical:
a description that is no longer a valid OpenAPI 3 document, a route or a
method the code serves but the description lacks (or the reverse, read
from the `match` statements of each API's `route`), a refusal code the
daemon can answer that is not described under its HTTP status, a key of a
JSON answer the schema does not name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from xaind.protocol import ErrorCode
from xaind.web import HTTP_STATUS

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTIONS = ROOT / "docs" / "openapi"
SOURCES = {
    "coordinator": ROOT / "xaind" / "coordinator" / "http_api.py",
    "aggregator": ROOT / "xaind" / "aggregator" / "http_api.py",
}
#: The methods an OpenAPI 3 path item may describe.
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

pytestmark = pytest.mark.skipif(not DESCRIPTIONS.is_dir(), reason="docs/ is not installed with the package")


def description(daemon: str) -> dict[str, Any]:
    return yaml.safe_load((DESCRIPTIONS / f"{daemon}.yaml").read_text(encoding="utf-8"))


def resolve(document: dict[str, Any], node: Any) -> Any:
    """`node` with a local `$ref` followed (once: the descriptions do not chain them)."""
    if isinstance(node, dict) and "$ref" in node:
        reference = node["$ref"]
        assert reference.startswith("#/"), reference
        target: Any = document
        for part in reference[2:].split("/"):
            assert isinstance(target, dict) and part in target, f"unresolved $ref {reference}"
            target = target[part]
        return target
    return node


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, METHOD) -> operation object."""
    return {
        (path, method.upper()): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def codes_in(document: dict[str, Any], response: dict[str, Any]) -> set[str]:
    """The refusal codes a response's JSON schema allows (the `code` enums of it and its allOf parts)."""
    schema = resolve(document, response).get("content", {}).get("application/json", {}).get("schema", {})
    parts = [resolve(document, part) for part in schema.get("allOf", [])] + [schema]
    found: set[str] = set()
    for part in parts:
        found.update(part.get("properties", {}).get("code", {}).get("enum", []))
    return found


def described_codes(document: dict[str, Any]) -> dict[str, set[int]]:
    """code -> the statuses it is described under, in every operation."""
    found: dict[str, set[int]] = {}
    for operation in operations(document).values():
        for status, response in operation["responses"].items():
            for code in codes_in(document, response):
                found.setdefault(code, set()).add(int(status))
    return found


# -- the code's routes, read from the `match` statement of each API's `route` ----------------------


def _literal_bytes(node: ast.AST) -> bytes | None:
    if isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, bytes):
        return node.value.value
    return None


def served_routes(daemon: str) -> dict[str, set[str]]:
    """Path template -> the methods `route` takes on it: `case [b"heartbeat", raw_id]` is /heartbeat/{…}."""
    tree = ast.parse(SOURCES[daemon].read_text(encoding="utf-8"))
    routes: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.FunctionDef) and node.name == "route"):
            continue
        for match in (child for child in ast.walk(node) if isinstance(child, ast.Match)):
            for case in match.cases:
                assert isinstance(case.pattern, ast.MatchSequence), ast.dump(case.pattern)
                segments = []
                for pattern in case.pattern.patterns:
                    literal = _literal_bytes(pattern)
                    segments.append(literal.decode() if literal is not None else "{}")
                methods: set[str] = set()
                for call in (child for statement in case.body for child in ast.walk(statement)):
                    if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "require_method":
                        methods.update(argument.value.decode() for argument in call.args[1:] if isinstance(argument, ast.Constant))
                assert methods, f"{SOURCES[daemon]}: a route without require_method"
                routes["/" + "/".join(segments)] = methods
    assert routes, f"no routes found in {SOURCES[daemon]}"
    return routes


def json_keys_of_200(daemon: str) -> dict[str, set[str]]:
    """Path template -> the keys of the dict literal answered with `json_body(request, 200, {...})`, where literal."""
    tree = ast.parse(SOURCES[daemon].read_text(encoding="utf-8"))
    keys: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "route":
            for match in (child for child in ast.walk(node) if isinstance(child, ast.Match)):
                for case in match.cases:
                    segments = [(_literal_bytes(p) or b"{}").decode() for p in case.pattern.patterns]
                    for call in (child for statement in case.body for child in ast.walk(statement)):
                        if (
                            isinstance(call, ast.Call)
                            and getattr(call.func, "id", None) == "json_body"
                            and isinstance(call.args[2], ast.Dict)
                        ):
                            keys["/" + "/".join(segments)] = {key.value for key in call.args[2].keys}
    return keys


def template(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def status_keys(module: Path, class_name: str) -> set[str]:
    """The keys of the dict literal that `<class_name>.status` returns."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for function in node.body:
                if isinstance(function, ast.FunctionDef) and function.name == "status":
                    for returned in (child for child in ast.walk(function) if isinstance(child, ast.Return)):
                        if isinstance(returned.value, ast.Dict):
                            return {key.value for key in returned.value.keys}
    raise AssertionError(f"{module}: no dict literal returned by {class_name}.status")


# -- which daemon answers which code: the rows of docs/http-api.rst ---------------------------------


def refusal_rows() -> dict[str, str]:
    """code -> the `when` column of its row in docs/http-api.rst."""
    text = (ROOT / "docs" / "http-api.rst").read_text(encoding="utf-8")
    return {match[1]: match[2] for match in re.finditer(r"^``(\w+)``\s+\d{3}\s+(.*)$", text, re.MULTILINE)}


def http_codes(daemon: str) -> set[ErrorCode]:
    """The codes `daemon` may answer over HTTP, by their rows: every route's, and its own ("<daemon>: ...").

    Never those "between the daemons" (PB). A code without a row is
    tests/test_docs.py's finding; it is checked here once it has one.
    """
    rows = refusal_rows()
    codes = set()
    for code in ErrorCode:
        when = rows.get(code.value)
        if when is None or when.startswith("between the daemons"):
            continue
        owner = re.match(r"(coordinator|aggregator):", when)
        if owner is not None and owner[1] != daemon:
            continue
        codes.add(code)
    return codes


# -- the checks ----------------------------------------------------------------------------------


DAEMONS = pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])


@DAEMONS
def test_the_description_is_an_openapi_3_document(daemon: str) -> None:
    document = description(daemon)
    assert str(document["openapi"]).startswith("3."), document["openapi"]
    assert document["info"]["title"] and document["info"]["version"]
    assert document["paths"]
    for (path, method), operation in operations(document).items():
        assert path.startswith("/"), path
        assert operation.get("operationId"), (path, method)
        assert operation["responses"], (path, method)
        for status, response in operation["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d", str(status)), (path, method, status)
            assert resolve(document, response)["description"], (path, method, status)
        for name in re.findall(r"\{([^}]+)\}", path):
            declared = [resolve(document, p) for p in document["paths"][path].get("parameters", []) + operation.get("parameters", [])]
            assert any(p["name"] == name and p["in"] == "path" and p["required"] for p in declared), (path, name)


@DAEMONS
def test_every_reference_resolves(daemon: str) -> None:
    document = description(daemon)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(document, node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


@DAEMONS
def test_the_routes_and_methods_are_those_the_code_serves(daemon: str) -> None:
    described: dict[str, set[str]] = {}
    for path, method in operations(description(daemon)):
        described.setdefault(template(path), set()).add(method)
    assert described == served_routes(daemon)


@DAEMONS
def test_every_code_the_daemon_can_answer_is_described_under_its_status(daemon: str) -> None:
    document = description(daemon)
    found = described_codes(document)
    expected = http_codes(daemon) - {ErrorCode.METHOD_NOT_ALLOWED}  # no described method gets it: see below
    for code in expected:
        assert HTTP_STATUS[code] in found.get(code.value, set()), f"{daemon}.yaml: {code.value} is not described under {HTTP_STATUS[code]}"
    rows = refusal_rows()
    for code, statuses in found.items():
        assert code in {c.value for c in ErrorCode}, f"{daemon}.yaml describes {code}, which is no ErrorCode"
        if code in rows:
            assert ErrorCode(code) in http_codes(daemon), f"{daemon}.yaml describes {code}, which it never answers over HTTP"
        assert statuses == {HTTP_STATUS[ErrorCode(code)]}, f"{daemon}.yaml: {code} under {statuses}"


@DAEMONS
def test_a_method_not_allowed_is_described_with_its_allow_header(daemon: str) -> None:
    document = description(daemon)
    response = document["components"]["responses"]["MethodNotAllowed"]
    assert codes_in(document, response) == {ErrorCode.METHOD_NOT_ALLOWED.value}
    assert response["headers"]["Allow"]["required"] is True
    assert HTTP_STATUS[ErrorCode.METHOD_NOT_ALLOWED] == 405


@DAEMONS
def test_every_operation_describes_the_refusals_of_every_route(daemon: str) -> None:
    """Deadlines and bugs may answer any request; the body limit any but an upload."""
    document = description(daemon)
    for (path, method), operation in operations(document).items():
        codes: dict[int, set[str]] = {}
        for status, response in operation["responses"].items():
            codes[int(status)] = codes_in(document, response)
        for code in (ErrorCode.HEADER_TIMEOUT, ErrorCode.BODY_TOO_SLOW, ErrorCode.INTERNAL_ERROR):
            assert code.value in codes.get(HTTP_STATUS[code], set()), (path, method, code)
        if method != "POST":
            assert ErrorCode.BODY_TOO_LARGE.value in codes.get(413, set()), (path, method)
        if "{" in path:
            assert ErrorCode.BAD_REQUEST.value in codes.get(400, set()), (path, method)
            assert ErrorCode.NOT_FOUND.value in codes.get(404, set()), (path, method)


@DAEMONS
def test_the_200_json_answers_name_the_keys_the_code_sends(daemon: str) -> None:
    document = description(daemon)
    by_template = {template(path): item for path, item in document["paths"].items()}
    for path, keys in json_keys_of_200(daemon).items():
        schema = by_template[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == keys, path
        assert set(schema["required"]) == keys, path


@pytest.mark.parametrize(
    ("daemon", "module", "class_name"),
    [
        ("coordinator", ROOT / "xaind" / "coordinator" / "service.py", "CoordinatorService"),
        ("aggregator", ROOT / "xaind" / "aggregator" / "service.py", "AggregatorService"),
    ],
)
def test_the_status_schema_names_every_key_of_status(daemon: str, module: Path, class_name: str) -> None:
    schema = description(daemon)["paths"]["/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    keys = status_keys(module, class_name)
    assert set(schema["properties"]) == keys
    assert set(schema["required"]) <= keys


def test_the_upload_body_is_the_wire_format_as_octet_stream() -> None:
    document = description("aggregator")
    body = document["paths"]["/{participant_id}/{token}"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert "wire-format.rst" in body["description"]
