"""Policy validation, the policy file loader and the path router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlproxy_kernel.policy import Policy, PolicyFileError, Router, load_policy_file, parse_policies
from tests import docs


def policy(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": "iris",
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://model:8080/v1/models/{model}:predict"},
    }
    doc.update(overrides)
    return doc


def test_defaults_are_filled_in() -> None:
    (p,) = parse_policies({"policies": [policy()]})
    assert p.codec == "kserve-v1"
    assert p.batching.mode == "static"
    assert p.batching.max_batch_size == 32
    assert p.max_body_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batching": {"max_batch_size": 0}}, "policies.0.batching.max_batch_size"),
        ({"batching": {"max_wait_ms": -1}}, "policies.0.batching.max_wait_ms"),
        ({"batching": {"mode": "turbo"}}, "policies.0.batching.mode"),
        ({"sla": {"percentile": 101}}, "policies.0.sla.percentile"),
        ({"codec": "grpc"}, "policies.0.codec"),
        ({"name": "Not_A_Name"}, "policies.0.name"),
        ({"colour": "blue"}, "policies.0.colour"),
        ({"backend": {"url": "ftp://x"}}, "policies.0.backend.url"),
        ({"backend": {"url": "http://x/{version}"}}, "does not define"),
        ({"backend": {"url": "http://user:pw@x/"}}, "credentials"),
        ({"match": {"path": "/v1/{m}/{m}"}, "backend": {"url": "http://x/"}}, "repeats"),
        # clients must not choose what ext_proc connects to
        ({"backend": {"url": "http://{model}/v1/predict"}}, "only in its path"),
        ({"backend": {"url": "http://{model}.svc:8080/x"}}, "only in its path"),
        ({"backend": {"url": "http://model:{model}/x"}}, "only in its path"),
        ({"backend": {"url": "https://model{model}/x"}}, "only in its path"),
        ({"backend": {"url": "http://model/x?m={model}"}}, "only in its path"),
        ({"backend": {"url": "http://model/x#{model}"}}, "only in its path"),
        ({"backend": {"url": "http://model:99999/x"}}, "invalid host or port"),
        ({"backend": {"url": "http://:8080/x"}}, "no host"),
        ({"backend": {"url": "http://m/", "max_response_bytes": 10}}, "max_response_bytes"),
        ({"tuning": {"replicas": 10**400}}, "policies.0.tuning.replicas"),
        ({"tuning": {"replicas": 100_001}}, "policies.0.tuning.replicas"),
    ],
)
def test_invalid_policies_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyFileError, match=field.replace(".", r"\.")):
        parse_policies({"policies": [policy(**change)]})


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(PolicyFileError, match="more than once"):
        parse_policies({"policies": [policy(), policy()]})


def test_loader_reads_yaml_and_json_and_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"policies": [policy()]}))
    assert load_policy_file(good)[0].name == "iris"
    yml = tmp_path / "p.yaml"
    yml.write_text(
        "policies:\n  - name: iris\n    match: {path: /a}\n    backend: {url: http://b/}\n"
    )
    assert load_policy_file(yml)[0].match.path == "/a"
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [ {name: x")
    with pytest.raises(PolicyFileError, match=r"bad\.yaml: not valid YAML"):
        load_policy_file(bad)
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(PolicyFileError, match=r"empty\.yaml"):
        load_policy_file(empty)


def test_router_resolves_templates_and_renders_the_backend_url() -> None:
    router = Router(parse_policies({"policies": [policy()]}))
    route = router.resolve("/v1/models/iris-2:predict?x=1")
    assert route is not None
    assert route.policy.name == "iris"
    assert route.backend_url == "http://model:8080/v1/models/iris-2:predict"
    assert route.key == ("iris", "http://model:8080/v1/models/iris-2:predict")
    assert router.resolve("/v1/models/iris") is None
    assert router.resolve("/v1/models/a/b:predict") is None
    assert router.resolve("/v1/models/..:predict") is None  # never `..` into the backend URL
    assert router.resolve("/v1/models/%2e%2e:predict") is None  # nor an encoded one
    assert router.resolve("/v1/models/a%2Fb:predict") is None


def test_router_most_specific_wins_and_replace_clears_the_cache() -> None:
    exact = Policy.model_validate(
        policy(name="exact", match={"path": "/v1/models/a:predict"}, backend={"url": "http://a/"})
    )
    general = Policy.model_validate(policy(name="general"))
    router = Router([general, exact])  # order does not matter
    assert router.resolve("/v1/models/a:predict").policy.name == "exact"  # type: ignore[union-attr]
    assert router.resolve("/v1/models/b:predict").policy.name == "general"  # type: ignore[union-attr]
    router.replace([general])
    assert router.resolve("/v1/models/a:predict").policy.name == "general"  # type: ignore[union-attr]
    router.replace([])
    assert router.resolve("/v1/models/a:predict") is None


def test_the_example_policy_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    adaptive, static = load_policy_file(root / "examples" / "policies.yaml")
    assert (adaptive.name, adaptive.batching.mode) == ("iris", "adaptive")
    assert (static.name, static.batching.mode) == ("kserve-models", "static")


def test_router_orders_by_variables_then_literal_length_then_name() -> None:
    def p(name: str, path: str) -> Policy:
        return Policy.model_validate(
            {"name": name, "match": {"path": path}, "backend": {"url": "http://b/"}}
        )

    router = Router(
        [
            p("a", "/v1/{x}/{y}"),
            p("b", "/v1/models/{m}"),
            p("c", "/v1/{x}/m"),
            p("d", "/v1/models/{m}"),
        ]
    )
    assert [q.name for q in router.policies] == ["b", "d", "c", "a"]
    assert router.resolve("/v1/models/z").policy.name == "b"  # type: ignore[union-attr]


def test_a_file_that_is_not_utf8_is_a_policy_file_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"policies: [\xff\xfe]")
    with pytest.raises(PolicyFileError, match="not UTF-8"):
        load_policy_file(path)


def test_percent_escapes_are_decoded_before_matching() -> None:
    (p,) = parse_policies({"policies": [policy()]})
    router = Router([p])
    for path in (
        "/v1/models/iris%3Apredict",
        "/v1/%6Dodels/iris:predict",
        "/v1/models/ir%69s%3apredict",
    ):
        route = router.resolve(path)
        assert route is not None and route.backend_url == "http://model:8080/v1/models/iris:predict"
    assert router.resolve("/v1/models/iris%2Fx:predict") is None  # an encoded slash: no segment
    assert router.resolve("/v1/models/iris%253Apredict") is None  # decoded once, as servers do


def test_long_paths_and_crowded_segments_cannot_stall_the_matcher() -> None:
    (p,) = parse_policies(
        {
            "policies": [
                policy(
                    match={"path": "/v1/models/{model}-{version}:predict"},
                    backend={"url": "http://model/v1/models/{model}/{version}"},
                )
            ]
        }
    )
    router = Router([p])
    assert router.resolve("/v1/models/a-1:predict") is not None
    assert router.resolve("/v1/models/" + "-." * 600 + ":predict") is None  # over 1024: no match
    with pytest.raises(PolicyFileError, match="more than two variables in one segment"):
        parse_policies(
            {"policies": [policy(match={"path": "/v1/{a}-{b}-{c}"}, backend={"url": "http://m/"})]}
        )


def test_the_readmes_policies_for_each_kind_of_server_are_valid() -> None:
    """docs/protocols.md, "In front of your model server": the example file parses, one policy
    per codec (a typo there would send a new user to a validation error)."""
    text = docs.section("In front of your model server")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    policies = parse_policies(yaml.safe_load(block))
    assert {p.codec for p in policies} == {
        "kserve-v1",
        "oip-v2",
        "tfs-columnar",
        "openai-embeddings",
    }


def body_policy(name: str, path: str, body: dict[str, str] | None, url: str) -> Policy:
    doc = policy(name=name, match={"path": path, **({"body": body} if body else {})})
    doc["backend"] = {"url": url}
    return parse_policies({"policies": [doc]})[0]


def test_a_policy_can_match_on_body_fields_and_the_first_that_matches_takes_it() -> None:
    router = Router(
        [
            body_policy("any", "/v1/embeddings", None, "http://any/v1/embeddings"),
            body_policy("a", "/v1/embeddings", {"model": "a"}, "http://a/v1/embeddings"),
            body_policy(
                "a-256", "/v1/embeddings", {"model": "a", "dimensions": "256"}, "http://a256/x"
            ),
            body_policy("b", "/v1/embeddings", {"model": "b"}, "http://b/v1/embeddings"),
        ]
    )
    assert router.has_body_rules

    def chosen(body: object) -> str | None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        route = router.choose("/v1/embeddings?x=1", raw)
        return None if route is None else route.policy.name

    assert chosen({"model": "a", "input": "x"}) == "a"
    assert chosen({"model": "b", "input": "x"}) == "b"
    assert chosen({"model": "a", "dimensions": "256"}) == "a-256"  # more fields first
    assert chosen({"model": "c"}) == "any"  # no body rule matches: the policy without one
    assert chosen({"model": ["a"]}) == "any"  # only a string equals a string
    assert chosen(b"not json") == "any"
    assert chosen([{"model": "a"}]) == "any"
    assert router.choose("/v1/other", b"{}") is None
    only_rules = Router([body_policy("a", "/v1/e", {"model": "a"}, "http://a/e")])
    assert only_rules.choose("/v1/e", b'{"model": "z"}') is None  # goes on untouched
    assert only_rules.resolve("/v1/e") is not None  # at the headers: the body decides later
    assert not Router([body_policy("x", "/v1/e", None, "http://a/e")]).has_body_rules


@pytest.mark.parametrize(
    "body", [{}, {"bad key!": "x"}, {"model": ""}, {"model": 5}, {f"k{i}": "v" for i in range(9)}]
)
def test_body_fields_are_checked(body: dict[str, object]) -> None:
    with pytest.raises(PolicyFileError, match=r"match\.body"):
        parse_policies({"policies": [policy(match={"path": "/x", "body": body})]})


def test_the_readmes_body_match_example_is_valid_and_routes_by_model() -> None:
    """docs/policies.md, "Matching on a body field": the example routes each model to its
    own server."""
    text = docs.section("Matching on a body field")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    router = Router(parse_policies(yaml.safe_load(block)))
    route = router.choose("/v1/embeddings", b'{"model": "e5-large", "input": "x"}')
    assert route is not None and route.backend_url.startswith("http://e5-large.")
