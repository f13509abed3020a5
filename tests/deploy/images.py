"""What each image runs, read out of deploy/docker/Dockerfile.* with dockerfile-parse: the
final stage's ENV, ENTRYPOINT, CMD, HEALTHCHECK command, USER, RUN lines and COPY targets,
so the tests run the very commands a container would (no Docker engine runs here)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
IMAGES = ("ascend", "cuda", "cpu")


def image_id(name: str) -> str:
    """A test id that is not a bare "cuda" (the suite skips tests whose keywords hold it)."""
    return f"Dockerfile.{name}"


@dataclass
class Image:
    name: str
    path: Path
    env: dict[str, str]
    args: dict[str, str]               # the final stage's ARG defaults
    base: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    user: str
    runs: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)   # destination -> source (final stage)

    @property
    def command(self) -> list[str]:
        """What the container executes: ENTRYPOINT + CMD (exec form)."""
        return self.entrypoint + self.cmd


def dockerfile(name: str) -> Path:
    return DOCKER_DIR / f"Dockerfile.{name}"


def parse(name: str) -> Image:
    path = dockerfile(name)
    with open(path, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure = parser.structure
        env, args, base = parser.envs, parser.args, parser.baseimage
    last_from = max(i for i, s in enumerate(structure) if s["instruction"] == "FROM")
    final = structure[last_from:]
    found: dict[str, list[str]] = {}
    runs, copies, user, healthcheck = [], {}, "", []
    for s in final:
        inst, value = s["instruction"], s["value"]
        if inst in ("ENTRYPOINT", "CMD"):
            found[inst] = json.loads(value)           # exec form only: no shell in between
        elif inst == "HEALTHCHECK":
            healthcheck = json.loads(value.split(" CMD ", 1)[1].strip())
        elif inst == "USER":
            user = value
        elif inst == "RUN":
            runs.append(value)
        elif inst == "COPY" and not value.startswith("--from"):
            src, dest = shlex.split(value)
            copies[dest] = src
    return Image(name, path, env, args, base, found.get("ENTRYPOINT", []), found.get("CMD", []), healthcheck,
                 user, runs, copies)
