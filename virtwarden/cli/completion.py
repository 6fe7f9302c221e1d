"""``virtwarden completion bash|zsh``: a shell completion script made from the parser.

The script is static: the commands, subcommands, options and the choices of options
that have them, read from ``build_parser()`` when the script is printed. Completing a
word therefore starts no Python (a TAB costs nothing on a loaded host), and the script
is printed again after an upgrade. Option values without fixed choices complete as
file names (``--config``, ``--to-dir``, ...) or not at all.

    source <(virtwarden completion bash)                 # this shell
    virtwarden completion bash > /etc/bash_completion.d/virtwarden
    # zsh: autoload -U +X bashcompinit && bashcompinit; source <(virtwarden completion zsh)
"""
from __future__ import annotations

import argparse
import shlex
import sys

from virtwarden.errors import EXIT_OK

_FILE_OPTIONS = ("--config", "--to-dir", "--disk-dir", "--passphrase-file", "--new-passphrase-file")


def cli(args: argparse.Namespace) -> int:
    from virtwarden.cli.main import build_parser

    sys.stdout.write(bash_script(build_parser()))
    return EXIT_OK


def tree(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], list[str], dict[str, list[str]]]]:
    """Each command path ("" for the top, "schedule slots", ...) -> its subcommands, its
    options, and the choices of each option that has them."""
    out: dict[str, tuple[list[str], list[str], dict[str, list[str]]]] = {}

    def walk(path: str, p: argparse.ArgumentParser) -> None:
        subs: list[str] = []
        options: list[str] = []
        choices: dict[str, list[str]] = {}
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs.append(name)
                    walk(f"{path} {name}".strip(), child)
            elif action.option_strings:
                options += [o for o in action.option_strings if o.startswith("--")]
                if action.choices:
                    for o in action.option_strings:
                        choices[o] = [str(c) for c in action.choices]
        out[path] = (subs, sorted(options), choices)

    walk("", parser)
    return out


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_actions(child)
    return found


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash function completing ``virtwarden`` (zsh runs it through bashcompinit)."""
    # Keyed by the words of the command so far ("virtwarden schedule"): bash refuses an
    # empty key.
    commands = {f"virtwarden {path}".strip(): node for path, node in tree(parser).items()}
    q = shlex.quote
    subs = " ".join(f"[{q(path)}]={q(' '.join(s))}" for path, (s, _, _) in sorted(commands.items()) if s)
    opts = " ".join(f"[{q(path)}]={q(' '.join(o))}" for path, (_, o, _) in sorted(commands.items()) if o)
    values = " ".join(f"[{q(path + ' ' + option)}]={q(' '.join(c))}"
                      for path, (_, _, choices) in sorted(commands.items()) for option, c in sorted(choices.items()))
    files = " ".join(_FILE_OPTIONS)
    takes = " ".join(sorted({o for a in _all_actions(parser) if a.option_strings and a.nargs != 0
                             for o in a.option_strings}))
    return f"""# virtwarden shell completion (bash; zsh through bashcompinit), made by
# `virtwarden completion bash` from the command line's own parser: print it again after
# an upgrade.
declare -gA _virtwarden_subs=({subs})
declare -gA _virtwarden_opts=({opts})
declare -gA _virtwarden_values=({values})
_virtwarden() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} path=virtwarden word i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ $word == -* ]]; then
            [[ " {takes} " == *" $word "* ]] && ((i++))  # its value is not a command
            continue
        fi
        if [[ " ${{_virtwarden_subs[$path]}} " == *" $word "* ]]; then
            path="$path $word"
        elif [[ -n ${{_virtwarden_subs[$path]+set}} ]]; then
            path="$path ?"  # not a command here: nothing to offer after it
        fi
    done
    if [[ -n ${{_virtwarden_values["$path $prev"]+set}} ]]; then
        COMPREPLY=($(compgen -W "${{_virtwarden_values["$path $prev"]}}" -- "$cur"))
    elif [[ " {files} " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{_virtwarden_opts[$path]}}" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "${{_virtwarden_subs[$path]}}" -- "$cur"))
    fi
}}
complete -F _virtwarden virtwarden
"""
