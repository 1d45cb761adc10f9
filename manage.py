#!/usr/bin/env python
"""Django's command-line utility for administrative tasks.

The entry point of ``runserver`` and ``runworker`` (the flush workers): it declares what they
serve before Django starts (``runtime.roles``: the malloc arena cap then precedes every thread)
and runs their start-up (``memfuse_project.serving.start``: the models, the embedded database,
the flush workers) before the command. Every command gets the embedded database started when
no ``DATABASE_URL`` is set.
"""

import os
import sys

# The commands that serve, and what they serve as (runtime.roles).
SERVING_COMMANDS = {"runserver": "web", "runworker": "worker"}


def serving_role(argv: list[str]) -> str | None:
    """The role of the command in ``argv``, or ``None`` for a command that does not serve.

    ``runserver``'s autoreloader parent only watches files and restarts its child
    (``RUN_MAIN=true``), which serves.
    """
    command = argv[1] if len(argv) > 1 else None
    role = SERVING_COMMANDS.get(command)
    if command == "runserver" and "--noreload" not in argv and os.environ.get("RUN_MAIN") != "true":
        return None
    return role


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")
    import django
    from django.core.management import execute_from_command_line

    from runtime import embedded_pg, roles

    role = serving_role(sys.argv)
    if role is not None:
        roles.declare(role)
    embedded_pg.start_if_embedded()
    if role is not None:
        django.setup()
        # Imported once Django runs: the start-up imports the apps' models.
        from memfuse_project import serving

        # Before the command: runserver's check for unapplied migrations then finds none.
        serving.start()
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
