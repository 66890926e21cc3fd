"""`python -m fusellm.train ...`: the module entry the deepspeed/torchrun launchers start."""

from fusellm.train.cli import main

main()
