"""A small, strict reader for docker/Dockerfile and its .dockerignore, shared by the
manifest tests (structure) and the guest image lane (the final stage's metadata).

Only the syntax the project's Dockerfile uses is supported: comments, line continuations,
``FROM image [AS name]``, exec-form (JSON) or shell-form arguments and ``--flag=value``
options.  Anything it cannot read raises ``ValueError`` instead of being skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "docker" / "Dockerfile.dockerignore"

KNOWN = frozenset(
    ("FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
     "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER")
)  # fmt: skip
# Instructions that only set image metadata: the guest lane applies these, verbatim, to
# the rootfs it imports (docker import --change).
METADATA = ("ENV", "LABEL", "WORKDIR", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the (joined) line, flags included
    line: int  # 1-based line where it starts

    @property
    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` options (``COPY --from=build``, ``HEALTHCHECK
        --interval=10s``)."""
        out = {}
        for word in self.args.split():
            m = re.fullmatch(r"--([a-z-]+)(?:=(.*))?", word)
            if not m:
                break
            out[m.group(1)] = m.group(2) or ""
        return out

    @property
    def body(self) -> str:
        """The arguments after the leading ``--flags``."""
        words = self.args.split(" ")
        while words and (words[0].startswith("--") or words[0] == ""):
            words.pop(0)
        return " ".join(words).strip()

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        body = self.body
        if self.keyword == "HEALTHCHECK":
            if not body.startswith("CMD "):
                return None
            body = body[4:].strip()
        if not body.startswith("["):
            return None
        value = json.loads(body)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"line {self.line}: exec form must be a list of strings")
        return value

    def text(self) -> str:
        return f"{self.keyword} {self.args}"


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.find(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def metadata(self) -> list[str]:
        """The final stage's metadata instructions, in order, as Dockerfile lines."""
        return [i.text() for i in self.final.instructions if i.keyword in METADATA]


def parse(text: str) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments may sit inside a continuation, too
        if not buf:
            start = n
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1].strip())
            continue
        buf.append(stripped)
        logical.append((start, " ".join(b for b in buf if b)))
        buf = []
    if buf:
        raise ValueError("the last instruction ends with a line continuation")

    pre_args: list[Instruction] = []
    stages: list[Stage] = []
    for line, content in logical:
        keyword, _, args = content.partition(" ")
        keyword = keyword.upper()
        if keyword not in KNOWN:
            raise ValueError(f"line {line}: unknown instruction {keyword!r}")
        ins = Instruction(keyword, args.strip(), line)
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.I)
            if not m:
                raise ValueError(f"line {line}: cannot read FROM {ins.args!r}")
            stages.append(Stage(m.group(1), m.group(2), line))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may come before FROM")
            pre_args.append(ins)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise ValueError("no FROM")
    return Dockerfile(pre_args, stages)


def load(path: Path = DOCKERFILE) -> Dockerfile:
    return parse(path.read_text())


# ---- .dockerignore -------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out.append(pattern[i : j + 1])
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) for every pattern line, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((exception, _pattern_regex(pattern)))
    return rules


def is_ignored(rel_path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories
    decides; ``!`` patterns re-include."""
    parts = rel_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not exception
    return ignored
