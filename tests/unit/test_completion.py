"""`mlproxy completion bash|zsh`: the script, run by a real bash (and zsh where installed),
completes commands, sub-commands, flags, choices and file names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def script(shell: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "mlproxy.bash"
    path.write_text(script("bash"))
    return path


def complete(bash_script: Path, cwd: Path, *words: str) -> list[str]:
    """What bash offers for the last word of `words` (the line typed so far)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (
        f"source {bash_script}\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))\n"
        "_mlproxy\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (("mlproxy", "pol"), ["policy"]),
        (("mlproxy", "policy", "d"), ["delete", "diff"]),
        (("mlproxy", "policy", "apply", "--pr"), ["--prune"]),
        (("mlproxy", "policy", "apply", "--dr"), ["--dry-run"]),
        (("mlproxy", "policy", "get", "-o", ""), ["table", "json", "yaml"]),
        (("mlproxy", "policy", "status", "x", "--output", "j"), ["json"]),
        (("mlproxy", "-v", "policy", "--url", "http://cp:8080", "di"), ["diff"]),
        (("mlproxy", "store", "p"), ["publish"]),
        (("mlproxy", "completion", ""), ["bash", "zsh"]),
        (("mlproxy", "store", "--t"), ["--token", "--token-file"]),
        (("mlproxy", "policy", "apply", "-f", "p.yaml", "--f"), ["--file", "--force"]),
        (("mlproxy", "extproc", "--workers", ""), []),  # a number: nothing to offer
        (("mlproxy", "replicas", "--url", ""), []),
    ],
)
def test_bash_completes_commands_flags_and_choices(
    bash_script: Path, tmp_path: Path, words: tuple[str, ...], offered: list[str]
) -> None:
    assert sorted(complete(bash_script, tmp_path, *words)) == sorted(offered)


def test_file_flags_complete_file_names(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text("")
    (tmp_path / "token").write_text("")
    assert complete(bash_script, tmp_path, "mlproxy", "policy", "apply", "-f", "pol") == [
        "policies.yaml"
    ]
    assert complete(bash_script, tmp_path, "mlproxy", "policy", "diff", "--file", "p") == [
        "policies.yaml"
    ]
    assert complete(bash_script, tmp_path, "mlproxy", "replicas", "--token-file", "t") == ["token"]


def test_every_command_is_offered(bash_script: Path, tmp_path: Path) -> None:
    top = complete(bash_script, tmp_path, "mlproxy", "")
    for command in ("extproc", "controlplane", "policy", "replicas", "store", "up", "demo"):
        assert command in top
    assert "completion" in top and "healthcheck" in top


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_registers_the_function_and_it_runs_under_zsh(tmp_path: Path) -> None:
    """zsh (no rc files): the script loads compinit and bashcompinit itself and registers the
    function; called as bashcompinit calls it, it offers the flag's choices. (zsh's own
    completion filters the words by what is typed, so they are not filtered here.)"""
    path = tmp_path / "mlproxy.zsh"
    path.write_text(script("zsh"))
    program = (
        f"source {path}\n"
        'print -r -- "registered: ${_comps[mlproxy]}"\n'
        'COMP_WORDS=(mlproxy policy get -o ""); COMP_CWORD=4; _mlproxy\n'
        'print -r -- "offered: ${COMPREPLY[*]}"\n'
    )
    done = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "registered: _bash_complete -F _mlproxy",
        "offered: table json yaml",
    ], done.stdout


def test_a_hostile_file_name_is_completed_quoted_in_an_interactive_bash(
    bash_script: Path, tmp_path: Path
) -> None:
    """Red team 14: a file `x;id>PWNED;.yaml` completed after `-f` and Enter pressed must be
    one argument, never a command. A real interactive bash in a pseudo-terminal, TAB typed."""
    import os
    import pty
    import re
    import select
    import time

    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "x;id>PWNED;.yaml").write_text("")
    (tmp_path / "bench").mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # the child: bash, reading what the test types
        os.chdir(tmp_path)
        env = {"PATH": os.environ["PATH"], "TERM": "dumb", "PS1": "$ ", "HOME": str(tmp_path)}
        os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)

    def read_until(marker: bytes, timeout: float = 20) -> bytes:
        """What the terminal shows until `marker` (a regular expression) matches it."""
        out, deadline = b"", time.monotonic() + timeout
        while not re.search(marker, out) and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return out

    try:
        os.write(
            fd, f'source {bash_script}; mlproxy(){{ echo "ARGS<$*>"; }}; echo READY\n'.encode()
        )
        read_until(rb"READY\r\n")
        os.write(fd, b"mlproxy policy apply -f pol/x\t")
        read_until(rb"\.yaml")  # the completion is on the line
        os.write(fd, b"\n")
        out = read_until(rb"ARGS<[^>]*>[^\r]*\r\n")
        # a command word is no file name: beside a directory `bench`, `benc` completes to
        # `bench `, not `bench/`
        os.write(fd, b"mlproxy benc\t")
        read_until(rb"bench")
        os.write(fd, b"\n")
        word = read_until(rb"ARGS<bench[^>]*>")
        os.write(fd, b"exit\n")
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    assert b"ARGS<policy apply -f pol/x;id>PWNED;.yaml>" in out, out
    assert not (tmp_path / "PWNED").exists()
    assert b"ARGS<bench>" in word, word
