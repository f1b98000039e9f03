"""`python -m project fit|validate|test|predict|generate ...`"""

from project.cli import main

main()
