"""Policy files as `mlproxy policy apply/diff` read them (mlproxy/apply.py), against what red
team 14 wrote into them: nothing skipped silently (with --prune its policies would be
deleted), no alias bombs, no duplicate keys, no values JSON cannot carry, no names the server
would refuse, no file contents or terminal escapes in the messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlproxy.apply import read_sources, shown

POLICY = {
    "match": {"path": "/v1/models/{model}:predict"},
    "backend": {"url": "http://model.default.svc/v1/models/{model}:predict"},
}


def write(path: Path, *names: str) -> Path:
    path.write_text(yaml.safe_dump({"policies": [{"name": n, **POLICY} for n in names]}))
    return path


def refused(path: Path, *words: str) -> str:
    with pytest.raises(ValueError) as err:
        read_sources([path])
    message = str(err.value)
    for word in words:
        assert word in message, message
    return message


def test_a_directory_reads_every_policy_file_whatever_the_suffix_case(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "a")
    write(tmp_path / "b.YAML", "b")
    (tmp_path / "c.JSON").write_text(
        '{"name": "c", "match": {"path": "/c"}, "backend": {"url": "http://x/"}}'
    )
    (tmp_path / "notes.txt").write_text("name: nope")
    assert [s.name for s in read_sources([tmp_path])] == ["a", "b", "c"]


def test_a_dangling_link_or_a_directory_named_like_a_file_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "a")
    (tmp_path / "p3.yaml").symlink_to(tmp_path / "not-there.yaml")
    refused(tmp_path, "p3.yaml", "not a readable regular file")
    (tmp_path / "p3.yaml").unlink()
    (tmp_path / "dir.yaml").mkdir()
    refused(tmp_path, "dir.yaml", "not a readable regular file")


def test_a_link_out_of_the_directory_is_refused_and_its_target_never_shown(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.conf"
    secret.write_text('password: "hunter2-SECRET\n')  # not YAML: a parse error would quote it
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "x.yaml").symlink_to(secret)
    message = refused(repo, "x.yaml", "a link out of")
    assert "hunter2" not in message


def test_a_parse_error_names_the_place_not_the_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('name: a\npassword: "hunter2-SECRET\n')
    message = refused(path, "bad.yaml", "not YAML or JSON", "line ")
    assert "hunter2" not in message


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: x\n")  # 10^9 items if expanded
    refused(path, "aliases")  # at once: expanded, it would take minutes and gigabytes


def test_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: a\nmatch: {path: /a}\nbackend: {url: 'http://good/'}\n"
        + "# ...\n" * 50
        + "backend: {url: 'http://evil/'}\n"
    )
    refused(path, "'backend' appears twice")
    (tmp_path / "dup.yaml").unlink()
    (tmp_path / "dup.json").write_text('{"name": "a", "name": "b"}')
    refused(tmp_path / "dup.json", "'name' appears twice")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: a\ntuning: 2024-01-01\n", ("JSON cannot carry",)),
        ("name: a\nx: !!binary aGk=\n", ("JSON cannot carry",)),
        ("name: a\nsla: {latency_ms: .nan}\n", ("JSON cannot carry",)),
        ("name: a b\n", ("not a policy name",)),
        ("name: DEMO\n", ("not a policy name",)),
        ("name: 'x\\x1b[31m'\n", ("not a policy name", "\\x1b")),
    ],
)
def test_values_and_names_the_server_would_refuse_are_refused_first(
    tmp_path: Path, text: str, words: tuple[str, ...]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    message = refused(path, *words)
    assert "\x1b" not in message


def test_terminal_escapes_in_a_file_name_are_shown_escaped(tmp_path: Path) -> None:
    name = "\x1b[31mRED\x1b[0m\rfake.yaml"
    write(tmp_path / name, "a")
    [source] = read_sources([tmp_path])
    assert "\x1b" not in source.origin and "\r" not in source.origin
    assert source.origin.endswith(shown(name)) and "\\x1b[31mRED" in source.origin
    (tmp_path / "copy.yaml").write_text((tmp_path / name).read_text())
    message = refused(tmp_path, "is in", "again in")
    assert "\x1b" not in message


def test_a_file_too_large_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as out:
        out.truncate(4 * 1024 * 1024 + 1)
    refused(path, "larger than")
