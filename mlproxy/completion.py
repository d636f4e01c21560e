"""`mlproxy completion bash|zsh`: a shell completion script, made from the CLI's own parser, so
it always knows every command, flag and choice the installed version has.

bash: `source <(mlproxy completion bash)` (or write it to
/etc/bash_completion.d/mlproxy); zsh: `source <(mlproxy completion zsh)` (bash's completion
through zsh's bashcompinit).
"""

from __future__ import annotations

import argparse
import shlex

__all__ = ["script"]

# Flags whose value is a path: completed with file names.
_PATHS = {"FILE", "DIR", "FILE|DIR", "PATH"}


def _walk(
    parser: argparse.ArgumentParser, path: str, out: dict[str, argparse.ArgumentParser]
) -> None:
    out[path] = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _walk(sub, f"{path} {name}".strip(), out)


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """The sub-commands and positional choices (`store get|publish`), and the long flags."""
    words: list[str] = []
    flags: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words.extend(action.choices)
        elif action.option_strings:
            if action.help != argparse.SUPPRESS:
                flags.extend(s for s in action.option_strings if s.startswith("--"))
        elif action.choices:
            words.extend(str(c) for c in action.choices)
    return words, flags


def _values(parser: argparse.ArgumentParser) -> dict[str, str]:
    """For each flag that takes a value: `files`, or the words of its choices, or `any`."""
    values: dict[str, str] = {}
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        if action.choices:
            kind = " ".join(str(c) for c in action.choices)
        elif str(action.metavar) in _PATHS or (
            action.type is not None and "Path" in str(action.type)
        ):
            kind = "files"
        else:
            kind = "any"
        for flag in action.option_strings:
            values[flag] = kind
    return values


# Long: the bash script is one template.
def _bash(parser: argparse.ArgumentParser, prog: str) -> str:
    paths: dict[str, argparse.ArgumentParser] = {}
    _walk(parser, "", paths)
    fn = "_" + "".join(c if c.isalnum() else "_" for c in prog)
    commands = sorted(p for p in paths if p)
    words_cases = []
    value_cases = []
    for path, sub in sorted(paths.items()):
        words, flags = _words(sub)
        words_cases.append(
            f"    {shlex.quote(path)}) words={shlex.quote(' '.join(words))}"
            f" flags={shlex.quote(' '.join(flags))} ;;"
        )
        for flag, kind in sorted(_values(sub).items()):
            value_cases.append(f"    {shlex.quote(path + '|' + flag)}) kind={shlex.quote(kind)} ;;")
    known = " ".join(shlex.quote(c) for c in commands)
    return f"""# {prog} completion for bash (and zsh through bashcompinit): `{prog} completion`
{fn}() {{
  [[ -n "${{ZSH_VERSION-}}" ]] && setopt localoptions ksharrays  # zsh: arrays from 0, as bash
  local cur prev path word i kind words next k flags
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  prev=""
  (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
  path=""
  local -a known=({known})
  for (( i = 1; i < COMP_CWORD; i++ )); do
    word="${{COMP_WORDS[i]}}"
    [[ "$word" == -* ]] && continue
    next="${{path:+$path }}$word"
    for k in "${{known[@]}}"; do
      if [[ "$k" == "$next" ]]; then path="$next"; break; fi
    done
  done
  kind=""
  case "$path|$prev" in
{chr(10).join(value_cases)}
  esac
  COMPREPLY=()
  local line
  if [[ -n "$kind" ]]; then
    # One completion per line, whatever a file name holds (spaces, `;`, `*`): never
    # word-split or globbed; `compopt -o filenames` has bash quote them on the command line
    # (zsh's completion quotes them itself). Only here: a command word is no file name.
    case "$kind" in
      files)
        type compopt >/dev/null 2>&1 && compopt -o filenames
        while IFS= read -r line; do COMPREPLY+=("$line"); done < <(compgen -f -- "$cur") ;;
      any) ;;
      *) while IFS= read -r line; do COMPREPLY+=("$line"); done < <(compgen -W "$kind" -- "$cur") ;;
    esac
    return 0
  fi
  words=""
  flags=""
  case "$path" in
{chr(10).join(words_cases)}
  esac
  if [[ "$cur" == -* ]]; then
    words="$flags"
  fi
  while IFS= read -r line; do COMPREPLY+=("$line"); done < <(compgen -W "$words" -- "$cur")
  return 0
}}
complete -F {fn} {prog}
"""


def script(parser: argparse.ArgumentParser, shell: str, prog: str = "mlproxy") -> str:
    """The completion script for `shell` (bash or zsh)."""
    text = _bash(parser, prog)
    if shell == "zsh":
        return (
            "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit }\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + text
        )
    return text
