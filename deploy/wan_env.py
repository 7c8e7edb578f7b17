#!/usr/bin/env python3
"""Run a command with the secrets of an AWS Secrets Manager secret in its environment.

The secret's value is the text of deploy/secrets.env (``KEY=value`` lines). cluster.yaml starts Ray
through this on every node, so each Ray worker (and so every ingress replica) inherits the variables
while no node keeps the secrets in a file: the plain-text copy stays on the operator's machine.

    wan-env --secret-id wan-i2v/serve --region us-east-1 -- ray start --head ...

Standard library and boto3 only: it runs before anything of the project is imported.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLACEHOLDER_PREFIX = "change-me"  # serve_app.config's too; this runs before the project is importable


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` lines (the secrets.env format) as a dict; ``#`` lines and blank lines are skipped.

    A value may be wrapped in one pair of single or double quotes; nothing is expanded.

    Raises:
        ValueError: a line that is not a comment, blank or ``KEY=value`` (its line number, never its text,
            which may hold a secret).
    """
    values = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ValueError(f"secret line {number} is not KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secret-id", required=True, help="name or ARN of the Secrets Manager secret")
    parser.add_argument("--region", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    import boto3

    secret = boto3.client("secretsmanager", region_name=args.region).get_secret_value(SecretId=args.secret_id)
    values = parse_env(secret["SecretString"])
    placeholders = sorted(k for k, v in values.items() if v.lower().startswith(PLACEHOLDER_PREFIX))
    if placeholders:
        sys.exit(f"wan-env: {', '.join(placeholders)} in {args.secret_id} still the example placeholder "
                 f"({PLACEHOLDER_PREFIX}...) of deploy/secrets.env.example; not starting")
    os.environ.update(values)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
