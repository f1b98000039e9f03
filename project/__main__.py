"""`python -m project COMMAND ...`: see project/commands.py (`python -m project --help` lists the commands)."""

from project.commands import main

main()
